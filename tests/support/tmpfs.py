"""Run code on a real, tiny filesystem: a tmpfs in a private mount namespace (root only).

Disk-full behaviour cannot be mocked honestly (short writes, ENOSPC from fsync, a rename that
needs a free inode), so the tests run the writer in ``unshare -m --propagation private`` with a
tmpfs of a few hundred KiB mounted at a directory. The mount is invisible outside the child, so
the child does the writing *and* the checking and reports JSON on its last stdout line. Tests
skip with the reason where the kernel or the sandbox refuses namespaces or mounts.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def tmpfs_unavailable() -> str | None:
    """Why a private tmpfs cannot be made here (None when it can)."""
    if os.geteuid() != 0:
        return "needs root to mount a tmpfs in a private mount namespace"
    if shutil.which("unshare") is None:
        return "util-linux `unshare` is not installed"
    probe = subprocess.run(
        [
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            'd=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs "$d" && umount "$d"; rmdir "$d"',
        ],
        capture_output=True,
        text=True,
        timeout=20,
    )
    if probe.returncode != 0:
        return f"the kernel refused a private tmpfs mount: {probe.stderr.strip()[:200]}"
    return None


def run_in_tmpfs(script: str, size_kib: int, args: list[str] | None = None, timeout: float = 120.0) -> Any:
    """Run ``script`` (Python source) with a fresh ``size_kib`` tmpfs mounted at ``sys.argv[1]``.

    Returns the JSON object the script printed on its last stdout line. Skips the calling test with
    the reason if private tmpfs mounts are not permitted.
    """
    reason = tmpfs_unavailable()
    if reason:
        pytest.skip(reason)
    mnt = Path(subprocess.run(["mktemp", "-d"], capture_output=True, text=True, check=True).stdout.strip())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [
        "unshare",
        "-m",
        "--propagation",
        "private",
        "sh",
        "-c",
        f'mount -t tmpfs -o size={int(size_kib)}k,mode=0700 tmpfs "$0" && exec "$@"',
        str(mnt),
        sys.executable,
        "-c",
        script,
        str(mnt),
        *(args or []),
    ]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT, start_new_session=True
        )
    finally:
        try:
            mnt.rmdir()
        except OSError:
            pass
    if proc.returncode != 0:
        raise AssertionError(
            f"tmpfs worker failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])
