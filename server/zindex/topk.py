r"""Exact top-k squared-L2 search: cheap bounds prune, an exact float64 re-rank decides.

The answer is *defined* as the brute force: the k rows with the smallest ``exact_sq_l2`` (float64
Σ(z−q)² of the stored float32 rows), ties broken by the lower row index. Two cheap passes compute,
for every eligible row i, an interval [L_i, U_i] that provably contains D_i = exact_sq_l2(z_i, q):

* **A — projection bound** (skipped adaptively when it prunes little). With an orthonormal
  basis P (d × m, top principal directions of a sample, centred at μ), y_i = Pᵀ(z_i − μ) and
  ρ_i = ‖(I − PPᵀ)(z_i − μ)‖, Pythagoras and the reverse triangle inequality give
  ‖z_i − q‖² = ‖y_i − y_q‖² + ‖r_i − r_q‖² ≥ ‖y_i − y_q‖² + (ρ_i − ρ_q)².
  Y is kept in float32 (a GEMV over N × m, m ≪ d). Rounding: storing y in float32 moves
  ‖y_i − y_q‖ by ≤ u(‖y_i‖+‖y_q‖), the float32 dot by ≤ γ_m‖y_i‖‖y_q‖, ρ (from t − ‖y‖² in float64)
  by ≤ √(ε_c t), and the float64 reference D_i differs from the real distance by ≤ 2(d+2)u₆₄(t_i+t_q),
  t = ‖z − μ‖². All are ≤ c_A (t_i + t_q); L_i subtracts twice that (``_slack_a``).
* **B — int8 bound.** ẑ_i = s_i Q_i with Q_i = round(z_i / s_i) ∈ [−127, 127]ᵈ, s_i = max|z_i|/127 (the
  query likewise). The integer dot I_i = Q_i·Q_q is exact (int32, |I| ≤ 127²d < 2³¹). Writing
  e_i = ‖z_i − ẑ_i‖, z·q − ẑ·q̂ = (z − ẑ)·q + ẑ·(q − q̂), so by Cauchy–Schwarz
  |D_i − (‖z_i‖² + ‖q‖² − 2 s_i s_q I_i)| ≤ 2(e_i‖q‖ + ‖ẑ_i‖e_q) + float64 slack (4(d+8)u₆₄(‖z_i‖²+‖q‖²)).

**Exactness (recall 1.0).** Let τ be any value ≥ D_(k), the k-th smallest exact distance among
eligible rows: the k-th smallest exact distance of any k eligible rows qualifies (pass A's seeds),
and so does the k-th smallest upper bound U_i (k rows have D_i ≤ U_i ≤ τ). Every row j of the true
answer has D_j ≤ D_(k) ≤ τ and L_j ≤ D_j, hence L_j ≤ τ: the candidate set {i : L_i ≤ τ} contains
every row with D_i ≤ D_(k) — the true top-k *and* every row tied with the k-th. Re-ranking the
candidates by (D_i, i) with the same ``exact_sq_l2`` therefore returns exactly the brute force
answer, ties included. Pruning a row is only ever justified by L_i > τ ≥ D_(k).

Speed: pass A costs m/d of a float32 scan and prunes almost everything when the data has
structure (clusters, a dominant subspace — real embeddings do); on isotropic data it prunes
nothing and is switched off for a while. Pass B reads a quarter of the bytes of a float32 scan
through an integer GEMV (``torch._int_mm``: VNNI/AMX kernels).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch

U32 = 2.0 ** -24
U64 = 2.0 ** -53
_EXACT_CHUNK = 1 << 22  # elements per float64 re-rank chunk (bounds temporary memory)
_MIN_INT_MM_ROWS = 32   # below this the int8 pass is not worth a kernel call: go exact


class TopKError(ValueError):
    """A bad search request (k, query shape, mask length) — says what to change."""


def exact_sq_l2(Z: np.ndarray, rows: np.ndarray, q: np.ndarray) -> np.ndarray:
    """The reference distance: float64 Σ(z_i − q)² for the given rows (chunked)."""
    out = np.empty(rows.shape[0], dtype=np.float64)
    q64 = q.astype(np.float64)
    step = max(1, _EXACT_CHUNK // max(1, Z.shape[1]))
    for s in range(0, rows.shape[0], step):
        diff = Z[rows[s:s + step]].astype(np.float64)
        diff -= q64
        out[s:s + step] = np.einsum("ij,ij->i", diff, diff)
    return out


def quantize_int8(X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-row symmetric int8: (codes Q, scale s, e ≥ ‖x − sQ‖, ‖sQ‖); s, e, ‖sQ‖ as float64.

    Computed in float32 for speed; e is then inflated to stay an upper bound of the real error
    norm: fl(s·Q) is off by ≤ u|x_j| per entry, so the computed residual differs from x − sQ by
    ≤ 2u‖x‖ in norm, and its float32 sum of squares by a relative γ_d; ‖sQ‖ = s·√(ΣQ²) with ΣQ²
    an exact integer."""
    X32 = np.asarray(X, dtype=np.float32)
    d = X32.shape[1]
    amax = np.abs(X32).max(axis=1).astype(np.float64)
    scale = np.where(amax > 0, amax / 127.0, 1.0)
    s32 = scale.astype(np.float32)
    Qf = np.rint(X32 / s32[:, None])
    np.clip(Qf, -127, 127, out=Qf)
    R = X32 - Qf * s32[:, None]
    scale = s32.astype(np.float64)  # the scale actually used (exactly representable)
    gamma = d * U32 / (1 - d * U32)
    xn = np.sqrt(np.einsum("ij,ij->i", X32, X32, dtype=np.float64))
    err = np.sqrt(np.einsum("ij,ij->i", R, R).astype(np.float64) * (1 + 2 * gamma)) + 2.5 * U32 * xn + 1e-300
    Q = Qf.astype(np.int8)
    qsq = np.einsum("ij,ij->i", Q, Q, dtype=np.int64).astype(np.float64)
    return Q, scale, err, scale * np.sqrt(qsq)


class ExactTopK:
    """Derived search state for a growing float32 matrix (the rows themselves stay in the caller's
    column file; ``search`` takes the matrix view). ``add`` must be called with every appended row,
    in order."""

    def __init__(self, dim: int, *, proj_dim: int | None = None, fit_sample: int = 1024, seed: int = 0) -> None:
        if dim > 130_000:
            raise TopKError(f"dim {dim} would overflow the int32 accumulator of the int8 pass (max 130,000)")
        self.dim = dim
        self.proj_dim = min(256, max(8, dim // 16)) if proj_dim is None else proj_dim
        self.fit_sample = fit_sample
        self.seed = seed
        self.n = 0
        cap = 0
        self._n2 = np.zeros(cap)          # ‖z‖² float64
        self._q8 = torch.zeros((cap, dim), dtype=torch.int8)
        self._scale = np.zeros(cap)
        self._err = np.zeros(cap)
        self._rnorm = np.zeros(cap)
        self._P: np.ndarray | None = None  # d × m orthonormal (float64)
        self._mu: np.ndarray | None = None
        self._Y = np.zeros((cap, 0), dtype=np.float32)
        self._yn = np.zeros(cap)
        self._t = np.zeros(cap)           # ‖z − μ‖²
        self._rho = np.zeros(cap)
        self._a_off = 0                   # queries left with pass A switched off
        self._a_ema = 0.0                 # running survivor fraction of pass A
        self.stats: dict[str, int] = {"queries": 0, "pass_a": 0, "pass_b_rows": 0, "exact_rows": 0}

    # ---- building ----------------------------------------------------------------------------

    def _grow(self, need: int) -> None:
        cap = self._n2.shape[0]
        if need <= cap:
            return
        new = max(need, 2 * cap, 1024)

        def g(a: np.ndarray) -> np.ndarray:
            out = np.zeros((new,) + a.shape[1:], dtype=a.dtype)
            out[: self.n] = a[: self.n]
            return out

        self._n2, self._scale, self._err, self._rnorm = g(self._n2), g(self._scale), g(self._err), g(self._rnorm)
        self._Y, self._yn, self._t, self._rho = g(self._Y), g(self._yn), g(self._t), g(self._rho)
        q8 = torch.zeros((new, self.dim), dtype=torch.int8)
        q8[: self.n] = self._q8[: self.n]
        self._q8 = q8

    def add(self, block: np.ndarray) -> None:
        """Index appended rows (float32, shape (n, dim)); row numbers continue from ``self.n``."""
        X = np.asarray(block, dtype=np.float32).reshape(-1, self.dim)
        n = X.shape[0]
        if n == 0:
            return
        self._grow(self.n + n)
        s, e = self.n, self.n + n
        step = max(1, _EXACT_CHUNK // self.dim)
        for a in range(0, n, step):
            b = min(n, a + step)
            x = X[a:b]
            Q, sc, er, rn = quantize_int8(x)
            self._q8[s + a:s + b] = torch.from_numpy(Q)
            self._scale[s + a:s + b], self._err[s + a:s + b], self._rnorm[s + a:s + b] = sc, er, rn
            self._n2[s + a:s + b] = np.einsum("ij,ij->i", x, x, dtype=np.float64)
            if self._P is not None:
                self._project(x.astype(np.float64), s + a)
        self.n = e

    def _project(self, x64: np.ndarray, at: int) -> None:
        assert self._P is not None and self._mu is not None
        c = x64 - self._mu
        y = c @ self._P
        t = np.einsum("ij,ij->i", c, c)
        y32 = y.astype(np.float32)
        sl = slice(at, at + x64.shape[0])
        self._Y[sl] = y32
        self._yn[sl] = np.einsum("ij,ij->i", y32.astype(np.float64), y32.astype(np.float64))
        self._t[sl] = t
        self._rho[sl] = np.sqrt(np.maximum(t - np.einsum("ij,ij->i", y, y), 0.0))

    def fit_projection(self, Z: np.ndarray) -> None:
        """PCA basis from a sample of the rows, then project every row (any orthonormal basis gives a
        valid bound: a stale basis costs speed, never correctness)."""
        m = min(self.proj_dim, self.dim)
        rng = np.random.default_rng(self.seed)
        n = self.n
        sample = np.arange(n) if n <= self.fit_sample else np.sort(rng.choice(n, self.fit_sample, replace=False))
        X = np.asarray(Z[sample], dtype=np.float64)
        mu = X.mean(axis=0) if n else np.zeros(self.dim)
        Xc = X - mu
        parts = []
        if X.shape[0] > 1:
            evals, evecs = np.linalg.eigh(Xc @ Xc.T)
            top = np.argsort(evals)[::-1][:m]
            top = top[evals[top] > max(evals.max(), 0.0) * 1e-12]
            if top.size:
                parts.append((Xc.T @ evecs[:, top]).T)
        have = sum(p.shape[0] for p in parts)
        if have < m:
            parts.append(rng.standard_normal((m - have, self.dim)))
        Pq, _ = np.linalg.qr(np.vstack(parts).T)
        self._P, self._mu = np.ascontiguousarray(Pq[:, :m]), mu
        self._Y = np.zeros((self._n2.shape[0], m), dtype=np.float32)
        step = max(1, _EXACT_CHUNK // self.dim)
        for a in range(0, n, step):
            b = min(n, a + step)
            self._project(np.asarray(Z[a:b], dtype=np.float64), a)

    # ---- persistence (derived data: rebuildable from the column) -------------------------------

    def state(self) -> dict[str, np.ndarray]:
        """Arrays to persist (e.g. ``np.savez``); ``from_state`` restores them without recomputing."""
        n = self.n
        out = {"n": np.asarray(n), "dim": np.asarray(self.dim), "proj_dim": np.asarray(self.proj_dim),
               "n2": self._n2[:n], "q8": self._q8[:n].numpy(), "scale": self._scale[:n], "err": self._err[:n],
               "rnorm": self._rnorm[:n]}
        if self._P is not None:
            out.update(P=self._P, mu=self._mu, Y=self._Y[:n], yn=self._yn[:n], t=self._t[:n], rho=self._rho[:n])
        return out

    @classmethod
    def from_state(cls, st: dict[str, np.ndarray]) -> ExactTopK:
        """Inverse of ``state`` (arrays may be memory-mapped; they are copied into growable buffers)."""
        ix = cls(int(st["dim"]), proj_dim=int(st["proj_dim"]))
        n = int(st["n"])
        ix._grow(n)
        ix.n = n
        ix._n2[:n], ix._scale[:n], ix._err[:n], ix._rnorm[:n] = st["n2"], st["scale"], st["err"], st["rnorm"]
        ix._q8[:n] = torch.from_numpy(np.ascontiguousarray(st["q8"]))
        if "P" in st:
            ix._P, ix._mu = np.asarray(st["P"]), np.asarray(st["mu"])
            ix._Y = np.zeros((ix._n2.shape[0], ix._P.shape[1]), dtype=np.float32)
            ix._Y[:n], ix._yn[:n], ix._t[:n], ix._rho[:n] = st["Y"], st["yn"], st["t"], st["rho"]
        return ix

    # ---- search ------------------------------------------------------------------------------

    def _slack_a(self) -> float:
        m, d = self._Y.shape[1], self.dim
        gamma_m = m * U32 / (1 - m * U32)
        eps_c = 4 * (d + m + 8) * U64
        c = 4.1 * U32 * (1 + U32) + 1.01 * gamma_m * (1 + U32) ** 2 + 4 * math.sqrt(eps_c) + 2 * (d + 2) * U64
        return 2.0 * c  # a factor 2 of margin for the float64 evaluation of the bound itself

    def search(self, q: np.ndarray, k: int, Z: np.ndarray, *, mask: np.ndarray | None = None,
               exclude: Iterable[int] = ()) -> tuple[np.ndarray, np.ndarray]:
        """The exact k nearest eligible rows of ``Z`` (the column's matrix, ``len(Z) >= self.n``) to
        ``q``: (rows, float64 squared distances), nearest first, ties by lower row.

        ``mask``: boolean eligibility per row (metadata filters); ``exclude``: rows never returned.
        """
        n = self.n
        q = np.asarray(q, dtype=np.float32).reshape(-1)
        if q.shape[0] != self.dim:
            raise TopKError(f"the query has {q.shape[0]} values, the index holds {self.dim}-d rows")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise TopKError(f"k must be a positive integer; got {k!r}")
        elig = np.ones(n, dtype=bool) if mask is None else np.array(mask, dtype=bool, copy=True)
        if elig.shape != (n,):
            raise TopKError(f"mask has shape {elig.shape}, expected ({n},): one flag per indexed row")
        ex = np.fromiter(exclude, dtype=np.int64)
        if ex.size:
            elig[ex[(ex >= 0) & (ex < n)]] = False
        n_elig = int(elig.sum())
        if k > n_elig:
            raise TopKError(f"asked for k={k} but only {n_elig} row(s) are eligible; lower k or widen the filters")
        self.stats["queries"] += 1
        if n_elig <= 4 * k + 64:
            rows = np.flatnonzero(elig)
            return self._final(Z, rows, q, k)

        cand = np.flatnonzero(elig)
        tau = math.inf
        seeds = np.zeros(0, dtype=np.int64)
        seed_d = np.zeros(0)
        if self._P is None and n >= max(2048, 4 * self.proj_dim):
            self.fit_projection(Z)
        if self._P is not None and self._a_off <= 0:
            self.stats["pass_a"] += 1
            lb = self._pass_a(q, elig)
            seeds = np.argpartition(lb, 2 * k - 1)[: 2 * k]
            seeds = seeds[elig[seeds]]
            seed_d = exact_sq_l2(Z, seeds, q)
            tau = float(np.partition(seed_d, k - 1)[k - 1])
            cand = np.flatnonzero(lb <= tau)
            self._a_ema = 0.9 * self._a_ema + 0.1 * cand.size / n_elig
            if self._a_ema > 0.9 and self.stats["pass_a"] >= 8:
                self._a_off, self._a_ema = 64, 0.0  # isotropic-looking data: skip pass A for a while
        elif self._a_off > 0:
            self._a_off -= 1
        if cand.size >= _MIN_INT_MM_ROWS and cand.size > 4 * k:
            lb, ub = self._pass_b(q, None if cand.size == n_elig == n else cand)
            self.stats["pass_b_rows"] += int(cand.size)
            tau = min(tau, float(np.partition(ub, k - 1)[k - 1]))
            cand = cand[lb <= tau]
        rest = np.setdiff1d(cand, seeds, assume_unique=True)
        self.stats["exact_rows"] += int(rest.size + seeds.size)
        return self._final(Z, np.concatenate([seeds, rest]), q, k, seed_d)

    def _final(self, Z: np.ndarray, rows: np.ndarray, q: np.ndarray, k: int,
               known: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Exact distances (the first ``len(known)`` rows already computed), then the (D, row) order."""
        nk = 0 if known is None else known.shape[0]
        d = exact_sq_l2(Z, rows[nk:], q)
        if nk:
            d = np.concatenate([known, d])
        order = np.lexsort((rows, d))[:k]
        return rows[order], d[order]

    def _pass_a(self, q: np.ndarray, elig: np.ndarray) -> np.ndarray:
        assert self._P is not None and self._mu is not None
        n = self.n
        c = q.astype(np.float64) - self._mu
        y = c @ self._P
        tq = float(c @ c)
        rho_q = math.sqrt(max(tq - float(y @ y), 0.0))
        y32 = y.astype(np.float32)
        yqn = float(np.dot(y32.astype(np.float64), y32.astype(np.float64)))
        s = self._Y[:n] @ y32
        lb = self._yn[:n] + yqn - 2.0 * s.astype(np.float64)
        lb += (self._rho[:n] - rho_q) ** 2
        lb -= self._slack_a() * (self._t[:n] + tq)
        lb[~elig] = np.inf
        return lb

    def _pass_b(self, q: np.ndarray, rows: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Lower/upper bounds from the int8 copy, for ``rows`` (all rows when None)."""
        Qq, sq, eq, rq = quantize_int8(q.reshape(1, -1))
        qt = torch.from_numpy(np.ascontiguousarray(Qq.reshape(-1, 1)))
        if rows is None:
            A = self._q8[: self.n]
            sl: slice | np.ndarray = slice(0, self.n)
        else:
            A = self._q8.index_select(0, torch.from_numpy(rows))
            sl = rows
        dot = torch._int_mm(A, qt).numpy().reshape(-1).astype(np.float64)
        q64 = q.astype(np.float64)
        qn2 = float(q64 @ q64)
        n2 = self._n2[sl]
        approx = n2 + qn2 - 2.0 * (self._scale[sl] * float(sq[0])) * dot
        bound = 2.0 * (self._err[sl] * math.sqrt(qn2) + self._rnorm[sl] * float(eq[0])) * (1 + 1e-9)
        bound += 4 * (self.dim + 8) * U64 * (n2 + qn2) + 1e-300
        return approx - bound, approx + bound
