"""Large byte buffers that are cheap to touch for the first time, and whole-file reads into them.

Why (issue 14, goal 5): composing adapters is a few memory passes between a read and a durable
write, so the cost that decides whether it stays near the I/O floor is *fresh memory*. glibc
hands out multi-megabyte blocks with ``mmap`` and returns them on ``free``; every composition
then faults its output in again, 4 KiB at a time. On the 2-core benchmark VM that costs about
0.33 ms per MiB, two thirds of what writing and fsyncing the same MiB costs. Asking the kernel
for transparent huge pages on the block (``madvise(MADV_HUGEPAGE)``, honoured when
``/sys/kernel/mm/transparent_hugepage/enabled`` is ``always`` or ``madvise``) makes the first
touch about ten times cheaper, without changing the process's allocator settings for anyone
else. Where huge pages are off or unsupported the buffer is an ordinary ``torch.empty``.

The memory is returned when the last tensor viewing it is dropped (``torch.frombuffer`` keeps
the mapping alive).
"""

from __future__ import annotations

import mmap
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from common.safetensors_header import SafetensorsHeaderError, check_sizes, parse_header

HUGE_PAGE = 2 * 1024 * 1024
#: below this a buffer is an ordinary allocation (a huge page would mostly sit unused)
HUGE_MIN_BYTES = 2 * HUGE_PAGE
_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", None)


def empty_bytes(nbytes: int) -> torch.Tensor:
    """An uninitialised 1-D ``uint8`` tensor of ``nbytes`` bytes, 2 MiB-aligned and backed by
    transparent huge pages where the kernel offers them (``torch.empty`` otherwise)."""
    if nbytes < 0:
        raise ValueError(f"a buffer size must be >= 0, got {nbytes}")
    if nbytes < HUGE_MIN_BYTES or _MADV_HUGEPAGE is None:
        return torch.empty(nbytes, dtype=torch.uint8)
    try:
        region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        region.madvise(_MADV_HUGEPAGE)
    except (OSError, ValueError):  # no anonymous mmap / madvise here: an ordinary allocation
        return torch.empty(nbytes, dtype=torch.uint8)
    whole = torch.frombuffer(region, dtype=torch.uint8)
    start = -whole.data_ptr() % HUGE_PAGE  # huge pages cover 2 MiB-aligned ranges only
    return whole[start:start + nbytes]


def read_files(paths: Sequence[str | os.PathLike[str]], max_bytes: int | None = None) -> list[torch.Tensor]:
    """Each whole regular file of ``paths`` as a ``uint8`` tensor, all read into one
    :func:`empty_bytes` buffer (each file starting 64-byte aligned), one ``readinto`` per file.

    ``max_bytes`` bounds each file's size (``ValueError`` above it); a file that shrinks while it
    is read raises ``OSError`` rather than returning a short buffer.
    """
    handles = []
    try:
        for path in paths:
            handles.append(open(path, "rb", buffering=0))  # noqa: SIM115 (closed below, all together)
        sizes = [os.fstat(fh.fileno()).st_size for fh in handles]
        for path, size in zip(paths, sizes, strict=True):
            if max_bytes is not None and size > max_bytes:
                raise ValueError(f"{path}: {size} bytes is over the {max_bytes}-byte limit")
        starts = []
        total = 0
        for size in sizes:
            starts.append(total)
            total += size + (-size % 64)
        arena = empty_bytes(total)
        out = []
        for path, fh, start, size in zip(paths, handles, starts, sizes, strict=True):
            buf = arena[start:start + size]
            view = memoryview(buf.numpy()) if size else memoryview(b"")
            got = 0
            while got < size:
                n = fh.readinto(view[got:])
                if not n:
                    raise OSError(f"{Path(path)}: the file shrank from {size} to {got} bytes while it was read")
                got += n
            out.append(buf)
        return out
    finally:
        for fh in handles:
            fh.close()


def read_file(path: str | os.PathLike[str], max_bytes: int | None = None) -> torch.Tensor:
    """The whole regular file ``path`` as a ``uint8`` tensor (:func:`read_files` of one)."""
    return read_files([path], max_bytes)[0]


_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                 "U8": torch.uint8, "BOOL": torch.bool}


def torch_dtype(name: str, tensor: str) -> torch.dtype:
    """The torch dtype of the safetensors dtype ``name`` (of tensor ``tensor``, for the message)."""
    dtype = _TORCH_DTYPES.get(name)
    if dtype is None:
        raise SafetensorsHeaderError(f"tensor {tensor!r}: dtype {name} is not supported here "
                                     f"(supported: {', '.join(_TORCH_DTYPES)})")
    return dtype


def safetensors_tensors(buf: torch.Tensor) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """``(metadata, {name: tensor})`` of the safetensors bytes in the ``uint8`` tensor ``buf``.

    The tensors are views into ``buf`` (no copy) wherever their offset suits their dtype's
    alignment, else aligned copies. The header is checked first (``common.safetensors_header``:
    sizes, ranges, overlaps, gaps), so nothing is sliced by an unchecked number; a dtype torch
    cannot represent raises ``SafetensorsHeaderError``.
    """
    raw = memoryview(buf.numpy()) if buf.numel() else memoryview(b"")
    header = parse_header(raw)
    check_sizes(header)
    base = 8 + int.from_bytes(bytes(raw[:8]), "little")
    metadata: dict[str, str] = header.get("__metadata__") or {}
    tensors: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = torch_dtype(info["dtype"], name)
        begin, end = info["data_offsets"]
        span = buf[base + begin:base + end]
        if (base + begin) % dtype.itemsize or span.data_ptr() % dtype.itemsize:
            span = span.clone()  # a fresh allocation is aligned for every dtype
        tensors[name] = span.view(dtype).view(info["shape"])
    return metadata, tensors


_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of the range's dirty pages, do not wait
_sync_file_range: Any = None


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing ``nbytes`` of ``fd`` from ``offset`` to the device now
    (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``; a no-op where it is missing or refused).

    Durability still comes from the ``fsync`` at the end; this only moves the device's work
    earlier, so it overlaps whatever the writer does next instead of all waiting in that fsync
    (on the benchmark VM a 52 MB write + fsync took 29 ms without it and 18 ms with it).
    """
    global _sync_file_range
    if _sync_file_range is None:
        _sync_file_range = False
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                fn = ctypes.CDLL(None, use_errno=True).sync_file_range
                fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
                fn.restype = ctypes.c_int
                _sync_file_range = fn
            except (OSError, AttributeError):
                pass
    if _sync_file_range:
        _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)
