"""The one durable-file toolkit: ``atomic_write``, ``fsync_dir`` and an append-only JSONL log.

Why one module: the coordinator keeps four append-only logs (records, audit, nonce ledger; the
site keeps its egress log) and a dozen small files that must survive a crash whole or not at
all. Each of them used to carry its own locking, fsync and torn-line handling; a bug fixed in
one stayed in the others. Every log and cache in the project now goes through this module.

- ``atomic_write(path, data)``: temp file in the same directory, fsync, ``os.replace``, fsync the
  directory, so a crash leaves the old file or the new one, never a mix.
- ``JsonlLog``: one JSON object per line, appended under an exclusive ``flock`` (several
  processes may share one log), flushed and fsynced before ``append`` returns. A final line
  without its newline is a *torn tail* (a crash mid-append): ``complete_end`` finds where the
  last complete line ends, ``repair`` truncates back to it, and an ``append`` that fails half way
  truncates the file back to where it started, so a failed append never leaves a torn line.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO

TMP_PREFIX = ".tmp-"


class TornTailError(OSError):
    """The log's last line has no newline: an append was interrupted (crash mid-write)."""


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory, so that a rename or a new file inside it survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike[str]) -> None:
    """fsync an already written file by path (e.g. a batch of temp files fsynced in parallel)."""
    fsync_dir(path)  # the same open(O_RDONLY) + fsync works for regular files


def atomic_write(path: str | os.PathLike[str], data: bytes | str, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old or the new file.

    The temp file lives in the target's directory (a rename across filesystems is not atomic),
    gets ``mode`` (default owner-only: most of what we write is private), is fsynced, renamed
    over ``path``, and the directory is fsynced so the rename itself is durable.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + target.name + "-", dir=target.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(target.parent)


def complete_end(data: bytes) -> int:
    """Byte count of the complete lines at the start of ``data`` (everything up to the last newline)."""
    return data.rfind(b"\n") + 1


def _write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is written (a short write on a nearly full disk is not an error
    by itself; the next write raises ENOSPC)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class JsonlLog:
    """An append-only JSON-lines file at ``path`` (created, with its directory, if missing).

    ``append`` writes whole lines under an exclusive lock with one ``write``, fsyncs, and on any
    failure truncates back to the offset it started at. ``read_from(offset)`` returns the bytes
    after ``offset`` under a shared lock; ``last_line`` the last complete line (``TornTailError``
    if the file ends mid-line); ``repair`` truncates a torn tail. What a line *means* (and what a
    damaged line means) is the caller's business: this class only guarantees whole lines.
    """

    def __init__(self, path: str | os.PathLike[str], *, mode: int = 0o600, create: bool = True) -> None:
        self.path = Path(path)
        if create and not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, mode)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            fsync_dir(self.path.parent)

    @contextlib.contextmanager
    def locked(self, shared: bool = False) -> Iterator[IO[bytes]]:
        """The file opened ``a+b`` (``rb`` when shared) under an flock, released on exit."""
        with open(self.path, "rb" if shared else "a+b") as fh:
            fcntl.flock(fh, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            try:
                yield fh
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def append(
        self, lines: Sequence[str | bytes], *, fh: IO[bytes] | None = None, midway: Callable[[], None] | None = None
    ) -> tuple[int, int]:
        """Append ``lines`` (each without its newline) durably; returns (start, end) offsets.

        ``fh``: a handle from ``locked()`` the caller already holds (so it can read the tail and
        append under one lock). ``midway`` is called after half the bytes are written and
        flushed (the crash tests' hook). On failure the file is truncated back to ``start``.
        """
        data = b"".join((ln.encode("utf-8") if isinstance(ln, str) else ln) + b"\n" for ln in lines)
        if fh is None:
            with self.locked() as own:
                return self.append(lines, fh=own, midway=midway)
        fh.flush()  # nothing of ours may sit in the buffer: the bytes below go straight to the fd
        fd = fh.fileno()
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            if midway is not None and len(data) > 2:
                _write_all(fd, data[: len(data) // 2])
                midway()
                _write_all(fd, data[len(data) // 2 :])
            else:
                _write_all(fd, data)
            os.fsync(fd)
        except BaseException:
            # ftruncate on the descriptor, never fh.truncate: a buffered truncate flushes first and
            # a flush that fails again (ENOSPC) would skip the truncate and leave a torn line
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
                os.fsync(fd)
            raise
        return start, start + len(data)

    def size(self) -> int:
        """Current size in bytes (0 if the file is missing)."""
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def read_from(self, offset: int, fh: IO[bytes] | None = None) -> bytes:
        """Every byte after ``offset`` (complete lines and a possible torn tail)."""
        if fh is None:
            with self.locked(shared=True) as own:
                return self.read_from(offset, own)
        fh.seek(offset)
        return fh.read()

    def last_line(self, fh: IO[bytes]) -> bytes | None:
        """The last line (without its newline) of the open file, or None when it is empty.

        Raises ``TornTailError`` when the file does not end with a newline."""
        size = fh.seek(0, os.SEEK_END)
        if size == 0:
            return None
        fh.seek(size - 1)
        if fh.read(1) != b"\n":
            raise TornTailError(f"{self.path}: the last line has no newline (an append was interrupted)")
        pos, buf = size - 1, b""  # buf holds bytes [pos, size - 1): everything but the final newline
        while pos > 0:
            step = min(8192, pos)
            pos -= step
            fh.seek(pos)
            buf = fh.read(step) + buf
            if b"\n" in buf:
                break
        return buf.rsplit(b"\n", 1)[-1]

    def repair(self, good_end: int, fh: IO[bytes] | None = None) -> int:
        """Truncate the file to ``good_end`` (the end of its last good line); returns bytes cut."""
        if fh is None:
            with self.locked() as own:
                return self.repair(good_end, own)
        size = fh.seek(0, os.SEEK_END)
        if size <= good_end:
            return 0
        fh.flush()
        os.ftruncate(fh.fileno(), good_end)
        os.fsync(fh.fileno())
        return size - good_end
