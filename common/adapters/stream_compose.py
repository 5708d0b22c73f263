"""Composition from PEFT directories straight to a PEFT directory, streamed.

``compose_peft_dirs(dirs, weights, out)`` writes exactly the directory that
``save_peft_adapter(compose(load_peft_adapters(dirs), weights), out)`` writes (same bytes), but
never holds the inputs or the output in memory. Module by module (in the output's key order),
each input's ``A`` and ``B`` are read with one ``pread`` where they lie back to back, the output's
``c_i A_i`` rows and ``[B_1, …, B_k]`` are computed into a buffer that stays in the CPU cache,
and the buffer is handed to a writer thread that writes it and starts its writeback
(``sync_file_range``) while the next chunk is computed; one fsync at the end. A module too large
for the buffers is done in row chunks. Memory is therefore about 16 MiB of buffers whatever k
and the adapters' size, and the time is close to the I/O floor: read the inputs once, write the
output once (issue 14, goal 5: the in-memory path pays for faulting in fresh memory for the
inputs and the output and for moving both through DRAM once more).

Everything ``load_peft_adapter`` checks is checked before a byte of output is written, by the
same code (``common.adapters.peft_io.peft_factors``, given the header's shapes and dtypes): the configs,
then each safetensors header against its file's size, then the factors' keys, shapes, dtypes
and ranks. The inputs are read with ``pread``, not mapped, so a file cut short by someone else
while it is read gives ``LoraFormatError``, never a SIGBUS. The output is written into a
temporary directory beside ``out`` and swapped in only when complete and fsynced
(``staged_peft_dir``); a write error (a full disk) in the writer thread reaches the caller.
"""

from __future__ import annotations

import math
import os
import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from common.adapters.composition import (
    CompositionPlan,
    Part,
    check_weights,
    compose,
    join_columns_into,
    plan_composition,
    scale_rows_into,
    work_dtype,
)
from common.adapters.lora import LoraAdapter, peft_key
from common.adapters.normalise import (
    DEFAULT_UPDATE_NORM,
    NormScaling,
    check_update_norm,
    module_norm_sq,
    norm_scaling,
    scaling_from_norms,
    total_norm,
)
from common.adapters.peft_io import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    _checked_peft_dir,
    load_peft_adapters,
    peft_config_bytes,
    safetensors_head,
    save_peft_adapter,
    staged_peft_dir,
    write_all,
)
from common.adapters.stream_inputs import _Adapter, _Input, _open_input, _torch_dtype  # noqa: F401 (_torch_dtype: tests)
from common.files.buffers import empty_bytes, start_writeback

#: the output buffer (computed, then written) and the read buffer: together small enough to stay
#: in the CPU's last-level cache, large enough that a module of a 7-8B model at k = 16 is one step
CHUNK_BYTES = 4 << 20
#: hand the output buffer to the writer thread once this much is in it (at a tensor boundary)
FLUSH_BYTES = 1 << 20
#: below this output size the chunks are written by the computing thread itself
THREAD_MIN_BYTES = 8 << 20


_pool: list[torch.Tensor] = []  # idle buffers of finished compositions, reused by the next
_pool_lock = threading.Lock()
_POOL_MAX = 6  # at most 6 idle buffers (about 40 MiB) stay with the process


def _take_buffer(nbytes: int) -> torch.Tensor:
    """A ``uint8`` buffer of at least ``nbytes``: the smallest idle pooled one that fits, else a
    fresh one (huge pages where offered): fresh memory costs more to fault in than the
    arithmetic done in it."""
    with _pool_lock:
        fits = [i for i, buf in enumerate(_pool) if buf.numel() >= nbytes]
        if fits:
            return _pool.pop(min(fits, key=lambda i: _pool[i].numel()))
    return empty_bytes(nbytes)


def _give_buffer(buf: torch.Tensor) -> None:
    with _pool_lock:
        if len(_pool) < _POOL_MAX:
            _pool.append(buf)


_writer: tuple[int, ThreadPoolExecutor] | None = None


def _writer_thread() -> ThreadPoolExecutor:
    """The one thread that writes compositions' output chunks (FIFO, so each file's chunks land
    in order; started on first use, shared by concurrent compositions, and started afresh in a
    forked child, which inherits the executor but not its thread)."""
    global _writer
    if _writer is None or _writer[0] != os.getpid():
        _writer = (os.getpid(), ThreadPoolExecutor(max_workers=1, thread_name_prefix="rpe-compose-writer"))
    return _writer[1]


def _write_chunk(fd: int, buf: torch.Tensor, nbytes: int, offset: int) -> None:
    write_all(fd, [buf.numpy().data[:nbytes]])
    start_writeback(fd, offset, nbytes)  # the device works while the next chunk is computed


class _ChunkWriter:
    """Output bytes are computed into one buffer while the writer thread writes the previous one
    (double buffering: ``os.writev`` and torch's kernels release the GIL, so computing the next
    chunk overlaps copying the last one into the page cache, and the device's writeback overlaps
    both). A write error (a full disk) is raised by the next ``reserve`` or by ``close``."""

    def __init__(self, fd: int, size: int, offset: int, threaded: bool = True) -> None:
        self.fd, self.offset, self.threaded = fd, offset, threaded
        self.buffers = [_take_buffer(size)] + ([_take_buffer(size)] if threaded else [])
        self.free = self.buffers[1:]
        self.pending: deque[tuple[Future[None], torch.Tensor]] = deque()
        self.buf, self.fill = self.buffers[0], 0

    def reserve(self, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """A ``shape`` view of the next ``nbytes`` of output, to be filled before the next call."""
        if self.fill + nbytes > self.buf.numel() or self.fill >= FLUSH_BYTES:
            self._submit()
            if nbytes > self.buf.numel():  # one row longer than a chunk
                self.buf = torch.empty(nbytes, dtype=torch.uint8)
                self.buffers.append(self.buf)
        view = self.buf[self.fill : self.fill + nbytes]
        self.fill += nbytes
        return view.view(dtype).view(shape)

    def _submit(self) -> None:
        if not self.fill:
            return
        if not self.threaded:  # a small output: handing chunks to a thread costs more than it hides
            _write_chunk(self.fd, self.buf, self.fill, self.offset)
            self.offset, self.fill = self.offset + self.fill, 0
            return
        future = _writer_thread().submit(_write_chunk, self.fd, self.buf, self.fill, self.offset)
        self.pending.append((future, self.buf))
        self.offset += self.fill
        if not self.free:  # both buffers in flight: wait for the older one
            done, buf = self.pending.popleft()
            done.result()
            self.free.append(buf)
        self.buf, self.fill = self.free.pop(), 0

    def close(self) -> None:
        """Write what is left and wait for it; raises the first write error."""
        self._submit()
        while self.pending:
            self.pending.popleft()[0].result()

    def release(self) -> None:
        """Wait for anything still in flight (after an error) and pool the buffers."""
        for future, _ in self.pending:
            future.exception()
        self.pending.clear()
        while self.buffers:
            _give_buffer(self.buffers.pop())


class _Scratch:
    """A reused read buffer: ``take(n)`` hands out consecutive slices until ``reset``."""

    def __init__(self, size: int) -> None:
        self.buf = _take_buffer(size)
        self.used = 0

    def reset(self, need: int) -> None:
        if need > self.buf.numel():
            self.buf = torch.empty(need, dtype=torch.uint8)
        self.used = 0

    def take(self, nbytes: int) -> torch.Tensor:
        """The next ``nbytes``, starting 8-byte aligned (``reset`` with the padded total)."""
        view = self.buf[self.used : self.used + nbytes]
        self.used += nbytes + (-nbytes % 8)
        return view


def _stream_A(
    out: _ChunkWriter,
    scratch: _Scratch,
    inputs: Sequence[_Input],
    name: str,
    parts: Sequence[Part],
    inp: int,
    dtype: torch.dtype,
) -> None:
    """``[c_1 A_1; c_2 A_2; ...]`` in row chunks (the arithmetic of ``compose``'s, chunk by chunk)."""
    work = work_dtype([(m, c) for _, m, c in parts], "A", dtype)
    key = peft_key(name, "A")
    for i, m, c in parts:
        src_dtype = m.A.dtype
        row_bytes = inp * max(dtype.itemsize, src_dtype.itemsize)
        step = max(1, CHUNK_BYTES // max(1, row_bytes))
        for r0 in range(0, m.rank, step):
            rows = min(step, m.rank - r0)
            block = out.reserve(rows * inp * dtype.itemsize, dtype, (rows, inp))
            offset = inputs[i].offsets[key] + r0 * inp * src_dtype.itemsize
            if src_dtype == work == dtype:  # read straight into the output, scale in place
                inputs[i].read_into(block.view(-1).view(torch.uint8), offset)
                scale_rows_into(block, block, c, work)
            else:
                scratch.reset(rows * inp * src_dtype.itemsize)
                raw = scratch.take(rows * inp * src_dtype.itemsize)
                inputs[i].read_into(raw, offset)
                scale_rows_into(block, raw.view(src_dtype).view(rows, inp), c, work)


def _stream_B(
    out: _ChunkWriter,
    scratch: _Scratch,
    inputs: Sequence[_Input],
    name: str,
    parts: Sequence[Part],
    out_dim: int,
    total: int,
    dtype: torch.dtype,
) -> None:
    """``[B_1, B_2, ...]`` in bands of rows: each band reads the same rows of every ``B_i``."""
    key = peft_key(name, "B")
    in_row = sum(m.rank * m.B.dtype.itemsize for _, m, _ in parts)
    step = max(1, CHUNK_BYTES // max(1, total * dtype.itemsize, in_row))
    for j0 in range(0, out_dim, step):
        rows = min(step, out_dim - j0)
        scratch.reset(rows * in_row + 8 * len(parts))
        blocks = []
        for i, m, _ in parts:
            size = m.B.dtype.itemsize
            raw = scratch.take(rows * m.rank * size)
            inputs[i].read_into(raw, inputs[i].offsets[key] + j0 * m.rank * size)
            blocks.append(raw.view(m.B.dtype).view(rows, m.rank))
        join_columns_into(out.reserve(rows * total * dtype.itemsize, dtype, (rows, total)), blocks)


class _ModuleReader:
    """Every input's factors of one module, read into the shared scratch buffer with one ``pread``
    per input where its A and B lie back to back (as PEFT and safetensors write them)."""

    def __init__(self, inputs: Sequence[_Input], scratch: _Scratch) -> None:
        self.inputs, self.scratch = inputs, scratch
        self.name: str | None = None
        self.views: list[tuple[torch.Tensor, torch.Tensor]] = []

    @staticmethod
    def need(parts: Sequence[Part]) -> int:
        """Scratch bytes :meth:`read` needs for ``parts`` (with alignment padding)."""
        return sum(
            m.A.dtype.itemsize * math.prod(m.A.shape) + m.B.dtype.itemsize * math.prod(m.B.shape) + 16
            for _, m, _ in parts
        )

    def read(self, name: str, parts: Sequence[Part]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``[(A_i, B_i)]`` of module ``name``, in the order of ``parts`` (read once per module)."""
        if name == self.name:
            return self.views
        self.name = None
        self.scratch.reset(self.need(parts))
        key_a, key_b = peft_key(name, "A"), peft_key(name, "B")
        views = []
        for i, m, _ in parts:
            src = self.inputs[i]
            a_off, b_off = src.offsets[key_a], src.offsets[key_b]
            a_n = m.A.dtype.itemsize * math.prod(m.A.shape)
            b_n = m.B.dtype.itemsize * math.prod(m.B.shape)
            if b_off == a_off + a_n and a_n % 8 == 0:  # A then B: one read
                raw = self.scratch.take(a_n + b_n)
                src.read_into(raw, a_off)
                a_raw, b_raw = raw[:a_n], raw[a_n:]
            elif a_off == b_off + b_n and b_n % 8 == 0:  # B then A: one read
                raw = self.scratch.take(a_n + b_n)
                src.read_into(raw, b_off)
                a_raw, b_raw = raw[b_n:], raw[:b_n]
            else:
                a_raw, b_raw = self.scratch.take(a_n), self.scratch.take(b_n)
                src.read_into(a_raw, a_off)
                src.read_into(b_raw, b_off)
            views.append((a_raw.view(m.A.dtype).view(m.A.shape), b_raw.view(m.B.dtype).view(m.B.shape)))
        self.name, self.views = name, views
        return views


def _output_bytes(plan: CompositionPlan) -> int:
    return sum((inp + out_dim) * total for _, _, out_dim, inp, total in plan.modules) * plan.dtype.itemsize


def _write_weights(path: Path, plan: CompositionPlan, inputs: Sequence[_Input], threaded: bool) -> None:
    dtype = plan.dtype
    jobs: dict[str, tuple[str, tuple[str, list[Part], int, int, int]]] = {}
    for entry in plan.modules:
        jobs[peft_key(entry[0], "A")] = ("A", entry)
        jobs[peft_key(entry[0], "B")] = ("B", entry)
    order = sorted(jobs)  # the order ``write_safetensors`` uses
    specs = []
    for key in order:
        factor, (_, _, out_dim, inp, total) = jobs[key]
        specs.append((key, dtype, (total, inp) if factor == "A" else (out_dim, total)))
    head = safetensors_head(specs, {"format": "pt"})
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o644)
    out = scratch = None
    try:
        write_all(fd, [head])
        out = _ChunkWriter(fd, CHUNK_BYTES, len(head), threaded)
        scratch = _Scratch(2 * CHUNK_BYTES)
        reader = _ModuleReader(inputs, scratch)
        large = {
            name
            for name, parts, out_dim, inp, total in plan.modules  # too big for one step
            if reader.need(parts) > 2 * CHUNK_BYTES or max(out_dim, inp) * total * dtype.itemsize > CHUNK_BYTES
        }
        for key in order:
            factor, (name, parts, out_dim, inp, total) = jobs[key]
            if name in large:
                reader.name = None  # a large module: in row chunks, through the same scratch
                if factor == "A":
                    _stream_A(out, scratch, inputs, name, parts, inp, dtype)
                else:
                    _stream_B(out, scratch, inputs, name, parts, out_dim, total, dtype)
                continue
            views = reader.read(name, parts)
            if factor == "A":
                block = out.reserve(total * inp * dtype.itemsize, dtype, (total, inp))
                work = work_dtype([(m, c) for _, m, c in parts], "A", dtype)
                row = 0
                for (_, m, c), (A, _) in zip(parts, views, strict=True):
                    scale_rows_into(block[row : row + m.rank], A, c, work)
                    row += m.rank
            else:
                join_columns_into(
                    out.reserve(out_dim * total * dtype.itemsize, dtype, (out_dim, total)), [B for _, B in views]
                )
        out.close()
        os.fsync(fd)
    finally:
        if out is not None:
            out.release()
        if scratch is not None:
            _give_buffer(scratch.buf)
        os.close(fd)


def _input_norms(inputs: Sequence[_Input], metas: Sequence[_Adapter]) -> list[float]:
    """Each input's total update norm ``‖δ_i‖_F`` (``common.adapters.normalise.update_norm`` of the
    loaded adapter, the same float64 arithmetic in the same module order), reading one module's
    factors at a time through a reused buffer: memory is one module, not one adapter."""
    scratch = _Scratch(2 * CHUNK_BYTES)
    try:
        norms = []
        for i, meta in enumerate(metas):
            squares = []
            for name, m in meta.modules.items():  # sorted, as ``load_peft_adapter`` orders them
                reader = _ModuleReader(inputs, scratch)  # fresh: its cache is by module name only
                ((A, B),) = reader.read(name, [(i, cast("Any", m), 1.0)])
                squares.append(module_norm_sq(A, B, m.scale))
            norms.append(total_norm(squares))
        return norms
    finally:
        _give_buffer(scratch.buf)


def _open_inputs(paths: Sequence[Path]) -> tuple[list[_Input], list[_Adapter]]:
    """Every directory checked (every config before any weights) and its weights file opened."""
    inputs: list[_Input] = []
    metas: list[_Adapter] = []
    try:
        for checked in [_checked_peft_dir(p) for p in paths]:
            src, meta = _open_input(*checked)
            inputs.append(src)
            metas.append(meta)
    except BaseException:
        for src in inputs:
            os.close(src.fd)
        raise
    return inputs, metas


def peft_dirs_scaling(dirs: Sequence[str | os.PathLike[str]], mode: str = "frobenius") -> NormScaling:
    """The ``update-norm`` scaling (``common.adapters.normalise``) of the PEFT directories ``dirs``,
    measured from the files module by module (never a whole adapter in memory): the same
    :class:`NormScaling` (norms, reference, scales, ``record()``) as ``norm_scaling`` of the loaded
    adapters. Pass it to :func:`compose_peft_dirs` as ``update_norm`` to compose with it and keep it
    for the record. ``mode`` is checked first (``UpdateNormError``), then the directories as
    :func:`compose_peft_dirs` checks them."""
    mode = check_update_norm(mode)
    paths = [Path(p) for p in dirs]
    if mode == "none":
        return NormScaling("none", [1.0] * len(paths))
    inputs, metas = _open_inputs(paths)
    try:
        return scaling_from_norms(_input_norms(inputs, metas), mode)
    finally:
        for src in inputs:
            os.close(src.fd)


def _checked_scaling(update_norm: str | NormScaling, n: int) -> tuple[str, NormScaling | None]:
    """(mode, the given scaling or None) of ``compose_peft_dirs``'s ``update_norm``, refused before any work."""
    if isinstance(update_norm, NormScaling):
        if len(update_norm.scales) != n:
            raise ValueError(
                f"update_norm: a scaling of {len(update_norm.scales)} adapters given for {n} directories; "
                "measure it with peft_dirs_scaling(dirs, mode) on the same directories"
            )
        return check_update_norm(update_norm.mode), update_norm
    return check_update_norm(update_norm), None


def compose_peft_dirs(
    dirs: Sequence[str | os.PathLike[str]],
    weights: Sequence[float] | np.ndarray | torch.Tensor,
    out: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    max_rank: int | None = None,
    base_model_name_or_path: str | None = None,
    update_norm: str | NormScaling = DEFAULT_UPDATE_NORM,
) -> Path:
    """Compose the PEFT LoRA directories ``dirs`` with ``weights`` into the PEFT directory ``out``.

    The result is :func:`common.adapters.lora.compose` of the loaded adapters saved with
    :func:`common.adapters.lora.save_peft_adapter` (byte for byte), computed without loading them: see the
    module docstring. ``dtype`` is the output dtype (default: the inputs' common dtype);
    ``base_model_name_or_path`` goes into the config (default: the inputs' base when they agree).
    ``max_rank`` (best rank-r approximation) needs every factor of a module at once, so it takes
    the in-memory path. ``update_norm`` (``common/adapters/normalise.py``): ``none`` (default) or
    ``frobenius``, every input's whole update ``s·B·A`` rescaled to the median total Frobenius norm of
    the inputs before weighting, so the output is exactly ``Σ w_i c_i δ_i`` (the norms are measured
    from the files first, one module at a time); or a :class:`NormScaling` from
    :func:`peft_dirs_scaling`, used as given (how a caller keeps the scales for its record). An
    unknown value raises ``UpdateNormError`` before anything is read. Bad input raises
    ``LoraFormatError`` naming the directory and the problem, before anything is written; ``out``
    is replaced only by a complete, fsynced directory.
    """
    paths = [Path(p) for p in dirs]
    w = check_weights(len(paths), weights)
    mode, scaling = _checked_scaling(update_norm, len(paths))
    if max_rank is not None:
        loaded = load_peft_adapters(paths)
        coefs = (scaling or norm_scaling(loaded, mode)).apply(w)
        adapter = compose(loaded, coefs, max_rank=max_rank, dtype=dtype)
        return save_peft_adapter(adapter, out, base_model_name_or_path)
    inputs, metas = _open_inputs(paths)
    try:
        if scaling is None and mode != "none":
            scaling = scaling_from_norms(_input_norms(inputs, metas), mode)
        if scaling is not None:
            w = scaling.apply(w)  # the coefficients w_i c_i: from here on the composition is as ever
        plan = plan_composition(cast("list[LoraAdapter]", metas), w, dtype)  # duck-typed: shapes, ranks, dtypes
    except BaseException:
        for src in inputs:
            os.close(src.fd)
        raise
    if any(total > min(o, i) for _, _, o, i, total in plan.modules):
        # wider than a LoRA may be: compose() rewrites such a module at full rank (exact, same bytes)
        for src in inputs:
            os.close(src.fd)
        adapter = compose(load_peft_adapters(paths), w, dtype=dtype)
        return save_peft_adapter(adapter, out, base_model_name_or_path)
    try:
        want = {name: (total, total) for name, _, _, _, total in plan.modules}  # scale 1: alpha = r
        base = base_model_name_or_path if base_model_name_or_path is not None else plan.base_model
        config = peft_config_bytes(want, base)
        # a small output is written by this thread: waking another costs more than it hides
        threaded = _output_bytes(plan) >= THREAD_MIN_BYTES
        with staged_peft_dir(out) as tmp:
            cfd = os.open(tmp / CONFIG_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                # the config is known already: written (by the writer thread, while the weights are
                # computed, when there is one) before the weights; its fsync after theirs finds it
                # committed with them
                if threaded:
                    done = _writer_thread().submit(write_all, cfd, [config])
                    try:
                        _write_weights(tmp / WEIGHTS_NAME, plan, inputs, threaded)
                    finally:
                        done.exception()  # never leave it writing into a directory being removed
                    done.result()
                else:
                    write_all(cfd, [config])  # no early writeback for a few hundred bytes: it costs more
                    _write_weights(tmp / WEIGHTS_NAME, plan, inputs, threaded)
                os.fsync(cfd)
            finally:
                os.close(cfd)
    finally:
        for src in inputs:
            os.close(src.fd)
    return Path(out)
