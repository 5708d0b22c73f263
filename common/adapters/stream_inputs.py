"""The inputs of the streamed composition (``common.adapters.stream_compose``): a PEFT directory's
weights file opened for ``pread`` and its factors as the safetensors header describes them (shapes
and dtypes only), checked by the same code as ``load_peft_adapter`` (``peft_factors``) before any
tensor byte is read.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

import torch

from common.adapters.lora import LoraFormatError
from common.adapters.peft_io import peft_factors
from common.adapters.safetensors_header import MAX_HEADER_BYTES, SafetensorsHeaderError, check_sizes, parse_header


@dataclass(frozen=True)
class _Factor:
    """A factor as the safetensors header describes it (what the checks and the plan need)."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)


@dataclass
class _Module:
    """A module's factors, duck-typed as ``LoraModule`` for ``plan_composition``."""

    A: _Factor
    B: _Factor
    scale: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return self.B.shape[0], self.A.shape[1]


@dataclass
class _Adapter:
    """An adapter's modules, duck-typed as ``LoraAdapter`` for ``plan_composition``."""

    modules: dict[str, _Module]
    base_model: str | None


@dataclass
class _Input:
    """One input weights file, open for ``pread``: where each tensor's bytes start."""

    path: Path
    fd: int
    offsets: dict[str, int]  # tensor name -> absolute byte offset of its data

    def read_into(self, buf: torch.Tensor, offset: int) -> None:
        """Fill the ``uint8`` tensor ``buf`` with the file's bytes from ``offset``."""
        view = buf.numpy().data.cast("B")
        done = 0
        while done < len(view):
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n <= 0:
                raise LoraFormatError(
                    f"{self.path} became shorter while it was read (another process "
                    "rewrote it?); compose again once it is complete"
                )
            done += n


_TORCH_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _torch_dtype(name: str, tensor: str) -> torch.dtype:
    """The torch dtype of the safetensors dtype ``name`` (of tensor ``tensor``, for the message)."""
    dtype = _TORCH_DTYPES.get(name)
    if dtype is None:
        raise SafetensorsHeaderError(
            f"tensor {tensor!r}: dtype {name} is not supported here (supported: {', '.join(_TORCH_DTYPES)})"
        )
    return dtype


def _open_input(directory: Path, config: dict, weights_path: Path) -> tuple[_Input, _Adapter]:
    """The open input and its adapter's factor shapes and dtypes, checked as ``load_peft_adapter``
    checks a directory (the same code), reading only the safetensors header."""
    fd = os.open(weights_path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise LoraFormatError(f"{weights_path} is not a regular file")
        try:
            first = os.pread(fd, min(st.st_size, 1 << 16), 0)  # the header, in one read when it is small
            n = int.from_bytes(first[:8], "little") if len(first) >= 8 else 0
            if len(first) >= 8 and len(first) < 8 + n <= min(MAX_HEADER_BYTES + 8, st.st_size):
                first += os.pread(fd, 8 + n - len(first), len(first))
            header = parse_header(first, st.st_size)  # refuses a bad length before reading by it
            if len(first) < 8 + n:
                raise SafetensorsHeaderError(f"header of {n} bytes could not be read whole")
            check_sizes(header)
            specs = {
                name: _Factor(tuple(info["shape"]), _torch_dtype(info["dtype"], name))
                for name, info in header.items()
                if name != "__metadata__"
            }
        except SafetensorsHeaderError as exc:
            raise LoraFormatError(f"{weights_path}: not a valid safetensors file ({exc}); re-save the adapter") from exc
        offsets = {name: 8 + n + info["data_offsets"][0] for name, info in header.items() if name != "__metadata__"}
        modules, base = peft_factors(directory, config, specs)
        adapter = _Adapter({name: _Module(A, B, scale) for name, (A, B, scale) in modules.items()}, base)
        return _Input(weights_path, fd, offsets), adapter
    except BaseException:
        os.close(fd)
        raise
