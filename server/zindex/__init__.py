"""Registry search components: a memory-mapped z column file and an exact top-k index.

``ZColumn`` keeps every z as a float32 row in a checksummed, append-only file (reopen = mmap);
``ExactTopK`` keeps derived bounds (a PCA projection and an int8 copy) that prune a search
which an exact float64 re-rank then decides — the same answer as brute force, ties included.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from server.zindex.column import ColumnCorruptError, ColumnDimensionError, ColumnError, ZColumn

if TYPE_CHECKING:
    from server.zindex.topk import ExactTopK, TopKError, exact_sq_l2

__all__ = [
    "ColumnCorruptError",
    "ColumnDimensionError",
    "ColumnError",
    "ExactTopK",
    "TopKError",
    "ZColumn",
    "exact_sq_l2",
]

_TOPK = ("ExactTopK", "TopKError", "exact_sq_l2")


def __getattr__(name: str) -> Any:
    """``ExactTopK`` & co. on first use: they need torch (its int8 GEMV), which takes seconds to
    import, and opening a registry to list or verify it never searches."""
    if name in _TOPK:
        from server.zindex import topk  # lazy: torch (seconds); opening a registry never searches

        return getattr(topk, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
