"""One writer per registry path: a process-wide, reference-counted flock on ``REG/.lock``."""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from pathlib import Path

from server.registry.errors import RegistryLockedError

LOCK_NAME = ".lock"


class PathLock:
    """Process-wide exclusive flock on ``REG/.lock`` with a reference count.

    flock is per open file, so two Registry objects in one process share this lock (and a thread
    lock serialising their writes) instead of locking each other out; another process is refused.
    """

    _table: dict[str, PathLock] = {}
    _table_lock = threading.Lock()

    def __init__(self, key: str, fd: int) -> None:
        self.key = key
        self.fd = fd
        self.refs = 0
        self.mutex = threading.RLock()

    @classmethod
    def acquire(cls, root: Path) -> PathLock:
        key = str(root.resolve())
        with cls._table_lock:
            lock = cls._table.get(key)
            if lock is None:
                fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                    os.close(fd)
                    raise RegistryLockedError(
                        f"registry {root} is open for writing by another process (pid {holder}); only one "
                        "writer per registry is allowed: stop it, or open with Registry(path, read_only=True)"
                    ) from None
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                lock = cls(key, fd)
                cls._table[key] = lock
            lock.refs += 1
            return lock

    def release(self) -> None:
        with self._table_lock:
            self.refs -= 1
            if self.refs <= 0:
                self._table.pop(self.key, None)
                with contextlib.suppress(OSError):
                    fcntl.flock(self.fd, fcntl.LOCK_UN)
                os.close(self.fd)
