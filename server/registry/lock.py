"""One writer per registry path: a process-wide, reference-counted flock on ``REG/.lock``.

The lock file names its holder (pid, since when, and what it is: a Flower run's ServerApp says
``run 42 (enroll)`` through :func:`set_holder`, anything else its command line), so a refused
writer gets one line saying which run or process holds the registry.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from server.registry.errors import RegistryLockedError

LOCK_NAME = ".lock"

#: what this process is, for the lock file (``set_holder``); None: its command line
_HOLDER: dict[str, str] = {}


def set_holder(description: str, run_id: str | None = None) -> None:
    """Name this process in every lock it takes from now on, e.g. ``set_holder("run 42 (enroll)", "42")``."""
    _HOLDER.clear()
    _HOLDER["what"] = description
    if run_id is not None:
        _HOLDER["run_id"] = str(run_id)


def _holder_record() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "since": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "what": _HOLDER.get("what") or " ".join(Path(a).name if i == 0 else a for i, a in enumerate(sys.argv))[:200],
        **({"run_id": _HOLDER["run_id"]} if "run_id" in _HOLDER else {}),
    }


def describe_holder(text: str) -> str:
    """The lock file's content as words: ``run 42 (enroll), pid 1234, since 2026-12-07 19:30:01 UTC``."""
    text = text.strip()
    try:
        rec = json.loads(text)
    except ValueError:
        rec = None
    if not isinstance(rec, dict):  # an older lock file: just the pid
        return f"pid {text or '?'}"
    what = str(rec.get("what") or "").strip()
    return ", ".join(p for p in (what, f"pid {rec.get('pid', '?')}", f"since {rec.get('since', '?')}") if p)


def locked_message(root: Path, text: str) -> str:
    """The one line a refused writer gets: which run or process holds ``root``, and what to do."""
    try:
        rec = json.loads(text)
    except ValueError:
        rec = None
    run_id = rec.get("run_id") if isinstance(rec, dict) else None
    todo = (
        f"wait for run {run_id} to finish, or stop it: rpe fed stop {run_id}"
        if run_id
        else "wait for it to finish, or stop that process"
    )
    return f"registry {root} is in use by {describe_holder(text)} (one writer at a time): {todo}"


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
                    holder = os.pread(fd, 4096, 0).decode(errors="replace")
                    os.close(fd)
                    raise RegistryLockedError(locked_message(root, holder)) from None
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(_holder_record()) + "\n").encode(), 0)
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
