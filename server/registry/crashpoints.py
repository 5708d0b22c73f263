"""Test hook: SIGKILL the process at a named point of a write, to prove crash safety for real.

When ``RPE_CRASH_AT`` names a point (``point`` or ``point@N`` for the N-th time it is reached;
several comma-separated), the process kills itself there; it is inert otherwise. Points:
``mid_blob`` (half the temp blob written), ``after_blob_tmp`` (temp blob fsynced, not renamed),
``after_blob`` (blob in place, z not yet in the column), ``after_column`` (z rows
published in the column, record not yet written), ``mid_record`` (half a record line
written), ``after_record`` (record durable, Chroma not updated), ``after_index`` (Chroma
updated, audit line not written); batch commits, ``batch.py``: ``mid_audit`` (half the batch's audit
entries written), ``after_audit`` (every entry durable, columns and Chroma not yet updated). ``tests/integration/test_registry_crash.py`` uses them.
"""

from __future__ import annotations

import os
import signal

_crash_counts: dict[str, int] = {}


def armed() -> bool:
    """True when some crash point is set (lets writers split a write in two only then)."""
    return bool(os.environ.get("RPE_CRASH_AT"))


def crash_point(name: str) -> None:
    """SIGKILL ourselves at ``name`` if RPE_CRASH_AT says so."""
    spec = os.environ.get("RPE_CRASH_AT")
    if not spec:
        return
    for item in spec.split(","):
        point, _, nth = item.strip().partition("@")
        if point != name:
            continue
        _crash_counts[name] = _crash_counts.get(name, 0) + 1
        if _crash_counts[name] >= (int(nth) if nth else 1):
            os.kill(os.getpid(), signal.SIGKILL)
