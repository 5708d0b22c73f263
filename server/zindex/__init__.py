"""Registry search components: a memory-mapped z column file and an exact top-k index.

``ZColumn`` keeps every z as a float32 row in a checksummed, append-only file (reopen = mmap);
``ExactTopK`` keeps derived bounds (a PCA projection and an int8 copy) that prune a search
which an exact float64 re-rank then decides — the same answer as brute force, ties included.
"""

from server.zindex.column import ColumnCorruptError, ColumnDimensionError, ColumnError, ZColumn
from server.zindex.topk import ExactTopK, TopKError, exact_sq_l2

__all__ = ["ColumnCorruptError", "ColumnDimensionError", "ColumnError", "ExactTopK", "TopKError", "ZColumn",
           "exact_sq_l2"]
