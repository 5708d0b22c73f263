"""A binary, checksummed, memory-mapped column of float32 rows (the registry's z store).

Why: z kept as base64 inside JSON lines made reopening a 100,000 × 4096 registry take 15–21 s
(every line parsed and decoded). Here the rows are one contiguous little-endian float32 block that
is memory-mapped on open (no parse, no copy), so reopening costs a header read and a check of the
last rows, whatever N is.

Layout of ``<path>`` (the data file)::

    [0, 4096)        header: two 512-byte slots (A at 0, B at 512), each
                     MAGIC(8) | version u32 | dim u32 | count u64 | seq u64 | crc32 u32 (of the bytes before it)
    [4096, ...)      count × dim float32 rows, row i at 4096 + i·4·dim (page aligned: an mmap view)

and ``<path>.crc``: one little-endian crc32 per row (4·count bytes), so any row can be checked on
its own (``rows(..., verify=True)``) and ``verify()`` names every damaged row.

Crash safety (append-only): ``append`` writes the rows and their crcs past the published count,
fsyncs both files, and only then publishes the new count by writing the *older* header slot with
``seq + 1`` and fsyncing. A crash at any point leaves either the old or the new count published
(a torn slot fails its crc and the other slot wins); bytes past the published count are a torn
tail, truncated on the next writable open (reported in ``recovered_rows``). Rows below the
published count are never rewritten.

Tamper evidence stays with the record log: a record keeps ``row`` and the sha256 of its z bytes,
which ``row_sha256`` recomputes from the column on demand.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """All of ``data`` at ``offset``, or ``OSError``: a short write (a full disk gives one before it
    gives ENOSPC) is retried for the rest and becomes ENOSPC when nothing more goes in."""
    done = 0
    while done < len(data):
        n = os.pwrite(fd, data[done:], offset + done)
        if n <= 0:
            raise OSError(errno.ENOSPC, "no space left for the z column", None)
        done += n


MAGIC = b"RPEZCOL\x01"
VERSION = 1
HEADER_BYTES = 4096
SLOT_BYTES = 512
_SLOT = struct.Struct("<8sIIQQ")  # magic, version, dim, count, seq  (then crc32 u32)
TAIL_CHECK_ROWS = 64  # rows whose crc is checked on every open (where a crash would have left damage)


class ColumnError(Exception):
    """Base class of the column file's errors."""


class ColumnCorruptError(ColumnError):
    """The column file is damaged (bad header, missing rows, or a row failing its checksum)."""

    def __init__(self, message: str, bad_rows: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.bad_rows = list(bad_rows)


class ColumnDimensionError(ColumnError, ValueError):
    """Rows of the wrong width, or a reopen with a different dim."""


def _crc_rows(block: np.ndarray) -> np.ndarray:
    """crc32 of each row's little-endian bytes."""
    b = np.ascontiguousarray(block, dtype="<f4")
    return (
        np.fromiter((zlib.crc32(r) for r in b), dtype="<u4", count=b.shape[0])
        if b.size
        else np.zeros(b.shape[0], dtype="<u4")
    )


def _pack_slot(dim: int, count: int, seq: int) -> bytes:
    body = _SLOT.pack(MAGIC, VERSION, dim, count, seq)
    return (body + struct.pack("<I", zlib.crc32(body))).ljust(SLOT_BYTES, b"\x00")


def _unpack_slot(raw: bytes) -> tuple[int, int, int] | None:
    """(dim, count, seq) of a valid slot, else None."""
    n = _SLOT.size
    if len(raw) < n + 4:
        return None
    body, (crc,) = raw[:n], struct.unpack("<I", raw[n : n + 4])
    if zlib.crc32(body) != crc:
        return None
    magic, version, dim, count, seq = _SLOT.unpack(body)
    if magic != MAGIC or version != VERSION:
        return None
    return dim, count, seq


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ZColumn:
    """An append-only float32 row store: ``ZColumn.create(path, dim)`` / ``ZColumn(path)``.

    One writer per file (the registry's lock guarantees it); readers (``read_only=True``) see the
    published count as of open or the last ``refresh()``.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, read_only: bool = False, dim: int | None = None, check: bool = True
    ) -> None:
        """``check=False`` skips the crc check of the last rows on open (an auditor reading a
        possibly damaged column row by row, ``server/registry/binding.py``)."""
        self.path = Path(path)
        self.crc_path = self.path.with_name(self.path.name + ".crc")
        self.read_only = read_only
        self.recovered_rows = 0
        if not self.path.exists():
            raise ColumnError(f"{self.path} does not exist; create it with ZColumn.create(path, dim)")
        self._fh = open(self.path, "rb" if read_only else "rb+")  # noqa: SIM115 - kept open for the mmap
        self._crc_fh = open(self.crc_path, "rb" if read_only else "rb+")  # noqa: SIM115
        self._mm: mmap.mmap | None = None
        self._view: np.ndarray | None = None
        self._load_header()
        if dim is not None and dim != self.dim:
            self.close()
            raise ColumnDimensionError(f"{self.path} holds {self.dim}-d rows, the caller expects {dim}")
        self._recover_tail()
        self._crc = self._read_crcs()
        self._map()
        if check:
            self.check_tail()

    # ---- creation / open ----------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike[str], dim: int) -> ZColumn:
        """Create an empty column (refuses to overwrite) durably: header fsynced, directory fsynced."""
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ColumnDimensionError(f"dim must be a positive integer; got {dim!r}")
        p = Path(path)
        if p.exists():
            raise ColumnError(f"{p} already exists; open it with ZColumn(path)")
        header = bytearray(HEADER_BYTES)
        header[0:SLOT_BYTES] = _pack_slot(dim, 0, 1)
        header[SLOT_BYTES : 2 * SLOT_BYTES] = _pack_slot(dim, 0, 0)
        crc_p = p.with_name(p.name + ".crc")
        with open(crc_p, "wb") as fh:
            fh.flush()
            os.fsync(fh.fileno())
        tmp = p.with_name(p.name + ".tmp")
        with open(tmp, "wb") as fh:
            fh.write(header)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
        _fsync_dir(p.parent)
        return cls(p)

    def _load_header(self) -> None:
        self._fh.seek(0)
        raw = self._fh.read(HEADER_BYTES)
        slots = [_unpack_slot(raw[i * SLOT_BYTES : (i + 1) * SLOT_BYTES]) for i in (0, 1)]
        valid = [(s, i) for i, s in enumerate(slots) if s is not None]
        if not valid:
            raise ColumnCorruptError(
                f"{self.path}: neither header slot is valid (not a z column, or its first 1 KiB was overwritten); "
                "rebuild the column from the record log's backup"
            )
        (dim, count, seq), slot = max(valid, key=lambda v: v[0][2])
        self.dim, self._count, self._seq, self._slot = dim, count, seq, slot
        self.row_bytes = 4 * dim

    def _recover_tail(self) -> None:
        """Truncate rows written past the published count (a crash before the count was published)."""
        size = os.fstat(self._fh.fileno()).st_size
        want = HEADER_BYTES + self._count * self.row_bytes
        if size < want:
            raise ColumnCorruptError(
                f"{self.path}: the header publishes {self._count} rows ({want} bytes) but the file has {size} bytes: "
                "rows were lost outside the registry (truncated copy?); restore the file from a backup"
            )
        crc_size = os.fstat(self._crc_fh.fileno()).st_size
        if crc_size < 4 * self._count:
            raise ColumnCorruptError(
                f"{self.crc_path}: {crc_size // 4} checksums for {self._count} published rows; restore it from a "
                "backup (the record log's z sha256 values can confirm which rows are still intact)"
            )
        extra = size - want
        if extra or crc_size > 4 * self._count:
            self.recovered_rows = -(-extra // self.row_bytes)
            if not self.read_only:
                self._fh.truncate(want)
                os.fsync(self._fh.fileno())
                self._crc_fh.truncate(4 * self._count)
                os.fsync(self._crc_fh.fileno())

    def _read_crcs(self) -> np.ndarray:
        self._crc_fh.seek(0)
        raw = self._crc_fh.read(4 * self._count)
        return np.frombuffer(raw, dtype="<u4").copy()

    def _map(self) -> None:
        if self._mm is not None:
            self._view = None
            try:
                self._mm.close()
            except BufferError:  # a caller still holds an older matrix() view: it stays valid, unmapped on release
                pass
            self._mm = None
        length = HEADER_BYTES + self._count * self.row_bytes
        self._mm = mmap.mmap(self._fh.fileno(), length, access=mmap.ACCESS_READ)
        self._view = np.frombuffer(self._mm, dtype="<f4", count=self._count * self.dim, offset=HEADER_BYTES).reshape(
            self._count, self.dim
        )

    def refresh(self) -> int:
        """Re-read the published count (a reader following a writer); returns the new count."""
        self._load_header()
        self._crc = self._read_crcs()
        if len(self._crc) < self._count:
            raise ColumnCorruptError(f"{self.crc_path}: fewer checksums than published rows")
        self._map()
        return self._count

    def close(self) -> None:
        """Release the mapping and the files (views from ``matrix()`` must not be used after)."""
        self._view = None
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a caller still holds a view: the OS unmaps when it is dropped
                pass
            self._mm = None
        self._fh.close()
        self._crc_fh.close()

    def __enter__(self) -> ZColumn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- reading --------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._count

    def matrix(self) -> np.ndarray:
        """A read-only (count, dim) float32 view of the mapped rows (no copy, not verified)."""
        assert self._view is not None
        return self._view

    def rows(self, indices: Sequence[int] | np.ndarray, *, verify: bool = True) -> np.ndarray:
        """A copy of the given rows; ``verify`` checks each row's crc32 (raises ``ColumnCorruptError``)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self._count):
            raise IndexError(f"row index out of range 0..{self._count - 1}")
        out = np.array(self.matrix()[idx], dtype=np.float32)
        if verify and idx.size:
            bad = idx[_crc_rows(out) != self._crc[idx]]
            if bad.size:
                raise ColumnCorruptError(self._bad_message(bad), bad.tolist())
        return out

    def crc_digest(self, count: int | None = None) -> str:
        """sha256 of the first ``count`` rows' crc32 values: binds derived state (a search index) to
        exactly these rows without reading them."""
        n = self._count if count is None else min(count, self._count)
        return hashlib.sha256(self._crc[:n].tobytes()).hexdigest()

    def row_sha256(self, index: int) -> str:
        """sha256 hex of row ``index``'s float32 little-endian bytes (what the record log keeps)."""
        return hashlib.sha256(self.rows([index], verify=False).tobytes()).hexdigest()

    def _bad_message(self, bad: np.ndarray) -> str:
        shown = ", ".join(str(int(b)) for b in bad[:10]) + (" …" if bad.size > 10 else "")
        return (
            f"{self.path}: {bad.size} row(s) fail their crc32 (rows {shown}): the file was damaged "
            "outside the registry (disk error or edit); restore it from a backup"
        )

    def verify(self, start: int = 0, stop: int | None = None, *, raise_on_error: bool = True) -> list[int]:
        """Check every row's crc32 in ``[start, stop)`` (all rows by default); the damaged rows are
        returned (and, with ``raise_on_error``, raised as ``ColumnCorruptError`` naming them)."""
        stop = self._count if stop is None else min(stop, self._count)
        bad: list[int] = []
        step = max(1, (8 << 20) // self.row_bytes)
        M = self.matrix()
        for s in range(start, stop, step):
            e = min(stop, s + step)
            mism = np.flatnonzero(_crc_rows(M[s:e]) != self._crc[s:e])
            bad.extend((mism + s).tolist())
        if bad and raise_on_error:
            raise ColumnCorruptError(self._bad_message(np.asarray(bad)), bad)
        return bad

    def check_tail(self, rows: int = TAIL_CHECK_ROWS) -> None:
        """The open-time check: the last ``rows`` rows (where a crash or torn write would show)."""
        self.verify(max(0, self._count - rows), self._count)

    # ---- writing --------------------------------------------------------------------------------

    def append(self, block: np.ndarray) -> range:
        """Append rows durably; returns their indices. Rows + crcs are fsynced before the count is
        published (then fsynced), so a crash never publishes a row that is not on disk."""
        if self.read_only:
            raise ColumnError(f"{self.path} is open read-only")
        arr = np.asarray(block)
        if arr.ndim == 1:
            arr = arr.reshape(1, -1)
        if arr.ndim != 2 or arr.shape[1] != self.dim:
            raise ColumnDimensionError(f"rows must be (n, {self.dim}); got shape {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise ValueError("rows contain NaN or infinity; z must be finite")
        arr = np.ascontiguousarray(arr, dtype="<f4")
        n = arr.shape[0]
        start = self._count
        if n == 0:
            return range(start, start)
        crcs = _crc_rows(arr)
        _pwrite_all(self._fh.fileno(), memoryview(arr).cast("B"), HEADER_BYTES + start * self.row_bytes)
        _pwrite_all(self._crc_fh.fileno(), memoryview(crcs.tobytes()), 4 * start)
        os.fsync(self._fh.fileno())
        os.fsync(self._crc_fh.fileno())
        self._publish(start + n)
        self._crc = np.concatenate([self._crc, crcs])
        self._map()
        return range(start, start + n)

    def _publish(self, count: int) -> None:
        slot = 1 - self._slot
        seq = self._seq + 1
        _pwrite_all(self._fh.fileno(), memoryview(_pack_slot(self.dim, count, seq)), slot * SLOT_BYTES)
        os.fsync(self._fh.fileno())
        self._count, self._seq, self._slot = count, seq, slot
