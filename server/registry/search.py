"""Exact top-k by squared L2 over the columns, and the PCA certificate that makes an approximate
index exact.

Small searches are a numpy brute force: one float32 BLAS matrix-vector product, then an exact
float64 re-check of every row that rounding could have moved across the k-th boundary. Large
searches take 8·k candidates from the index (Chroma's HNSW) and *certify* them: a PCA
projection gives a lower bound ‖Pᵀ(x−q)‖² ≤ ‖x−q‖² on every distance, and every row whose
bound does not exclude it is checked exactly, so the answer always equals brute force. The
index is only asked for candidates (``candidates(q, want, where) -> rows``); a wrong or empty
answer costs time, never correctness.

``auto`` (the default) asks ``server.zindex.ExactTopK`` instead: PCA and int8 bounds over the
z column rows prune, an exact float64 re-rank decides, so it returns the brute force answer
(ties by record row) without a Chroma index. Its state is derived from the column, caught up on
the first query after rows were appended (the write path only appends to the column) and
persisted beside it (``zindex.npz``, bound to the column's row count and checksums) so a reopen
does not rebuild it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from server import zindex
from server.registry.columns import Columns

if TYPE_CHECKING:
    from server.zindex import ExactTopK

log = logging.getLogger(__name__)

#: kept for callers that import it (the old brute-force / index switch point; ``auto`` now uses ExactTopK)
BRUTE_FORCE_BUDGET = 20_000 * 4096
CANDIDATE_FACTOR = 8
_LB_DIM = 64
_LB_MIN_EXPLAINED = 0.5  # share of variance the 64-d bound must capture to be worth using
_U32 = 2.0**-24  # float32 unit roundoff
METHODS = ("auto", "brute", "index", "approx")

Candidates = Callable[[np.ndarray, int, "dict[str, Any] | None"], np.ndarray]


def where_clause(
    task: str | None, modality: str | None, base: str | None, exclude_site: str | None
) -> dict[str, Any] | None:
    """The Chroma ``where`` filter equivalent to ``Columns.mask`` (None when unfiltered)."""
    clauses: list[dict[str, Any]] = []
    for key, value in (("task", task), ("modality", modality), ("base", base)):
        if value is not None:
            clauses.append({key: value})
    if exclude_site is not None:
        clauses.append({"site": {"$ne": exclude_site}})
    if not clauses:
        return None
    return clauses[0] if len(clauses) == 1 else {"$and": clauses}


class Searcher:
    """Answers top-k over ``cols``; ``candidates`` proposes rows (the index), may be wrong or empty.

    State: ``proj`` (the PCA bound, built on first use and kept current through
    ``Columns.on_rows``) and ``index_misses`` (after the bound pruned too little, the next
    ``auto`` queries skip the index path).
    """

    def __init__(self, cols: Columns, candidates: Candidates, state_path: Path | None = None) -> None:
        self.cols = cols
        self.candidates = candidates
        self.proj: dict[str, Any] | None = None
        self.index_misses = 0
        self.state_path = state_path  # where ExactTopK's state persists (None: never saved)
        self.topk: ExactTopK | None = None
        self.dirty = False
        cols.on_rows = self.project_rows

    # ---- ExactTopK over the z column (the ``auto`` path) ------------------------------------

    def _column_digest(self, n: int) -> str:
        digest = getattr(self.cols.zcol, "crc_digest", None)
        return "" if digest is None else str(digest(n))

    def _load_state(self) -> ExactTopK | None:
        """The persisted index, if it belongs to this column (row count and crc digest agree)."""
        p = self.state_path
        if p is None or not p.exists():
            return None
        try:
            with np.load(p, allow_pickle=False) as f:
                n = int(f["col_n"])
                if n > len(self.cols.zcol) or str(f["col_digest"]) != self._column_digest(n):
                    log.warning("%s does not match the z column; rebuilding the search index", p)
                    return None
                st = {k: f[k] for k in f.files if k not in ("col_n", "col_digest")}
            return zindex.ExactTopK.from_state(st)  # zindex loads ExactTopK (torch) on first use
        except (OSError, ValueError, KeyError) as exc:
            log.warning("%s is unreadable (%s); rebuilding the search index", p, exc)
            return None

    def save_state(self) -> None:
        """Persist ExactTopK's state atomically (when it changed since it was loaded)."""
        ix, p = self.topk, self.state_path
        if ix is None or p is None or not self.dirty:
            return
        tmp = p.with_name(p.name + ".tmp")
        with open(tmp, "wb") as fh:
            state: dict[str, Any] = ix.state()
            np.savez(fh, col_n=np.asarray(ix.n), col_digest=np.asarray(self._column_digest(ix.n)), **state)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
        self.dirty = False

    def ensure_topk(self) -> ExactTopK:
        """ExactTopK holding every column row (loaded, or built, then caught up with appends)."""
        col = self.cols.zcol
        if self.topk is None:
            self.topk = self._load_state() or zindex.ExactTopK(self.cols.dim)
            self.dirty = self.topk.n == 0
        ix, n = self.topk, len(col)
        if ix.n > n:  # cannot happen with an append-only column: rebuild rather than trust it
            self.topk = ix = zindex.ExactTopK(self.cols.dim)
        if ix.n < n:
            M = col.matrix()
            step = 16384
            for s in range(ix.n, n, step):
                ix.add(M[s : min(n, s + step)])
            self.dirty = True
        return ix

    def fast(self, q: np.ndarray, elig: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k by ExactTopK over the column rows of the eligible records, in record-row tie
        order (when re-adds made column order differ from record order, a tie at the k-th place
        falls back to ``brute``)."""
        ix = self.ensure_topk()
        had_proj = ix._P is not None  # noqa: SLF001
        cols = self.cols
        zmask = np.zeros(ix.n, dtype=bool)
        live = np.flatnonzero(elig)
        zmask[cols.zrow[live]] = True
        mono = cols.zrow_monotone()
        kk = k if mono else min(k + 1, live.size)
        zr, dist = ix.search(q, kk, cols.zcol.matrix(), mask=zmask)
        if (ix._P is not None) != had_proj:  # noqa: SLF001 - a projection was fitted: worth persisting
            self.dirty = True
        rows = cols.z_of_zrows()[zr]
        if not mono:
            if kk > k and dist[k] == dist[k - 1]:
                return self.brute(q, elig, k)
            order = np.lexsort((rows, dist))[:k]
            rows, dist = rows[order], dist[order]
        return rows, dist

    def search(
        self, q: np.ndarray, elig: np.ndarray, k: int, method: str, where: dict[str, Any] | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(rows, squared distances) of the k nearest eligible rows, ties broken by row order.

        ``method``: ``auto`` (``ExactTopK``: bounds + exact re-rank), ``brute``, ``index``
        (candidates + certification: same answer) or ``approx`` (candidates re-ranked exactly, not
        certified)."""
        if method == "auto":
            return self.fast(q, elig, k)
        if method == "brute":
            return self.brute(q, elig, k)
        return self.certified(q, elig, k, certify=(method == "index"), where=where)

    def exact(self, rows: np.ndarray, q: np.ndarray) -> np.ndarray:
        """float64 squared L2 from the stored float32 rows (chunked to bound memory)."""
        out = np.empty(rows.shape[0], dtype=np.float64)
        q64 = q.astype(np.float64)
        step = max(1, (1 << 22) // self.cols.dim)
        for s in range(0, rows.shape[0], step):
            diff = self.cols.Z[rows[s : s + step]].astype(np.float64)
            diff -= q64
            out[s : s + step] = np.einsum("ij,ij->i", diff, diff)
        return out

    @staticmethod
    def top(rows: np.ndarray, dist: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        order = np.lexsort((rows, dist))[:k]
        return rows[order], dist[order]

    def brute(self, q: np.ndarray, elig: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """One float32 BLAS pass, then exact float64 distances for every row whose rounding error
        bound (≈2d·u·(‖x‖²+‖q‖²)) reaches the k-th best upper bound: the result is exactly the
        float64 brute force, not an approximation of it."""
        n = self.cols.n
        n_elig = int(elig.sum())
        if n_elig < 0.3 * n:
            sub = np.flatnonzero(elig)
            s = self.cols.Z[sub] @ q
            n2 = self.cols.n2[sub]
        else:
            sub = None
            s = self.cols.Z[:n] @ q
            n2 = self.cols.n2[:n]
        qn = float(np.dot(q.astype(np.float64), q.astype(np.float64)))
        approx = n2 - 2.0 * s.astype(np.float64) + qn
        # |error| of n2 (float32 sum) plus that of 2·x·q (float32 BLAS) is at most
        # ~2(d+2)·u·(‖x‖² + ‖q‖²): candidates within that of the k-th best get an exact check.
        tol = (2 * self.cols.dim + 8) * _U32 * (n2 + qn) + 1e-300
        if sub is None:
            approx[~elig] = np.inf
        upper = approx + tol
        kth = np.partition(upper, k - 1)[k - 1]
        cand = np.flatnonzero(approx - tol <= kth)
        rows = cand if sub is None else sub[cand]
        rows = rows[elig[rows]]
        return self.top(rows, self.exact(rows, q), k)

    def ensure_projection(self) -> dict[str, Any]:
        """PCA basis (from a sample of live z) giving lower bounds ‖Pᵀ(x−q)‖² ≤ ‖x−q‖² for every row.

        Any orthonormal P gives a valid bound, so drift after it was built costs speed, never
        correctness."""
        if self.proj is not None and (not self.proj.get("weak") or self.cols.n <= 2 * self.proj["n"]):
            return self.proj
        d = self.cols.dim
        m = min(_LB_DIM, d)
        live = np.flatnonzero(self.cols.live[: self.cols.n])
        rng = np.random.default_rng(0)
        sample = live if live.size <= 1024 else np.sort(rng.choice(live, 1024, replace=False))
        X = self.cols.Z[sample].astype(np.float64)
        mu = X.mean(axis=0) if X.shape[0] else np.zeros(d)
        basis = np.zeros((0, d))
        explained = 1.0
        if X.shape[0] > 1:
            Xc = X - mu
            evals, evecs = np.linalg.eigh(Xc @ Xc.T)  # s × s Gram matrix: cheap even for d = 4096
            top = np.argsort(evals)[::-1][:m]
            top = top[evals[top] > evals.max() * 1e-12]
            explained = float(evals[top].sum() / max(evals.sum(), 1e-300)) if top.size else 0.0
            if explained < _LB_MIN_EXPLAINED:
                # isotropic-looking data: a 64-d bound would prune almost nothing, so the index path
                # would only add work to a full scan; skip it until the registry has doubled
                self.proj = {"weak": True, "n": self.cols.n, "explained": explained}
                return self.proj
            if top.size:
                basis = (Xc.T @ evecs[:, top]).T  # principal directions (unnormalised)
        rows = [basis] if basis.shape[0] else []
        if basis.shape[0] < m:  # too few samples: complete with random directions
            rows.append(rng.standard_normal((m - basis.shape[0], d)))
        q, _ = np.linalg.qr(np.vstack(rows).T)  # orthonormal columns, leading ones span the PCA subspace
        basis = q.T[:m]
        P = np.ascontiguousarray(basis.T)  # d × m, orthonormal columns
        cap = self.cols.n
        self.proj = {
            "mu": mu,
            "P": P,
            "Y": np.zeros((cap, m)),
            "yn": np.zeros(cap),
            "n": self.cols.n,
            "explained": explained,
        }
        self.project_rows(np.arange(self.cols.n))
        return self.proj

    def project_rows(self, rows: np.ndarray) -> None:
        pr = self.proj
        if pr is None or "Y" not in pr:
            return
        cap = max(self.cols.live.shape[0], int(rows.max()) + 1 if rows.size else 0)
        if pr["Y"].shape[0] < cap:  # the columns grew: grow the projected copy with them
            Y, yn = np.zeros((cap, pr["Y"].shape[1])), np.zeros(cap)
            Y[: pr["Y"].shape[0]], yn[: pr["yn"].shape[0]] = pr["Y"], pr["yn"]
            pr["Y"], pr["yn"] = Y, yn
        step = max(1, (1 << 22) // self.cols.dim)
        for s in range(0, rows.shape[0], step):
            r = rows[s : s + step]
            y = (self.cols.Z[r].astype(np.float64) - pr["mu"]) @ pr["P"]
            pr["Y"][r] = y
            pr["yn"][r] = np.einsum("ij,ij->i", y, y)

    def certified(
        self, q: np.ndarray, elig: np.ndarray, k: int, certify: bool, where: dict[str, Any] | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Chroma proposes 8·k candidates, numpy re-ranks them exactly; with ``certify`` every
        eligible row whose PCA lower bound is below the k-th candidate distance is checked too,
        so the result equals brute force. Falls back to brute force when the bound prunes little
        (e.g. isotropic random data), and then skips this path for a while."""
        n = self.cols.n
        n_elig = int(elig.sum())
        if certify and self.ensure_projection().get("weak"):
            return self.brute(q, elig, k)
        want = min(CANDIDATE_FACTOR * k, n_elig)
        cand = self.candidates(q, want, where)
        cand = cand[elig[cand]] if cand.size else cand
        pr = self.ensure_projection() if (certify or cand.size < k) else None
        lb = None
        if pr is not None and pr.get("weak"):  # uncertified path without a usable bound
            pr = None
            if cand.size < k:
                return self.brute(q, elig, k)
        if pr is not None:
            yq = (q.astype(np.float64) - pr["mu"]) @ pr["P"]
            yqn = float(yq @ yq)
            lb = pr["yn"][:n] - 2.0 * (pr["Y"][:n] @ yq) + yqn
            lb -= 1e-9 * (pr["yn"][:n] + yqn) + 1e-300  # float64 rounding slack: keep it a lower bound
            lb[~elig] = np.inf
        if cand.size < k:  # Chroma unavailable or stale: seed from the lower bound order
            assert lb is not None
            extra = np.argpartition(lb, want - 1)[:want]
            cand = np.unique(np.concatenate([cand, extra[elig[extra]]]))
        cand = np.unique(cand)
        dist = self.exact(cand, q)
        if not certify:
            return self.top(cand, dist, k)
        assert lb is not None
        dk = np.partition(dist, k - 1)[k - 1]
        maybe = np.flatnonzero(lb <= dk)
        if maybe.size > 0.25 * n_elig:
            self.index_misses = 20
            return self.brute(q, elig, k)
        rest = np.setdiff1d(maybe, cand, assume_unique=True)
        rows = np.concatenate([cand, rest])
        dist = np.concatenate([dist, self.exact(rest, q)])
        return self.top(rows, dist, k)
