"""Processes started by a test that outlive their parent: found by a marker in their environment."""

from __future__ import annotations

import os
from pathlib import Path

from deploy import launch


def processes_with_env(marker: str) -> list[tuple[int, int]]:
    """(pid, start time) of every live process whose environment holds ``marker`` (not this one)."""
    found = []
    needle = marker.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = (entry / "environ").read_bytes()
        except OSError:
            continue
        start = launch.proc_start_time(int(entry.name))
        if needle in env.split(b"\0") and start is not None:
            found.append((int(entry.name), start))
    return found
