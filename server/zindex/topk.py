r"""Exact top-k squared-L2 search: cheap bounds prune, an exact float64 re-rank decides.

The answer is *defined* as the brute force: the k rows with the smallest ``exact_sq_l2`` (float64
Σ(z−q)² of the stored float32 rows), ties broken by the lower row index. Two cheap passes compute,
for every eligible row i, an interval [L_i, U_i] that provably contains D_i = exact_sq_l2(z_i, q):

* **A — projection bound** (skipped adaptively when it prunes little). With an orthonormal
  basis P (d × m, top principal directions of a sample, centred at μ), y_i = Pᵀ(z_i − μ) and
  ρ_i = ‖(I − PPᵀ)(z_i − μ)‖, Pythagoras and the reverse triangle inequality give
  ‖z_i − q‖² = ‖y_i − y_q‖² + ‖r_i − r_q‖² ≥ ‖y_i − y_q‖² + (ρ_i − ρ_q)².
  Y is kept as per-row int8 codes (an integer GEMV over N × m, m ≪ d: a sixteenth of the bytes of a
  float32 scan at m = d/4), bounded like pass B: with ŷ = s_y Q_y and e_y ≥ ‖y − ŷ‖,
  ‖y_i − y_q‖² ≥ ‖y_i‖² + ‖y_q‖² − 2 s_i s_q (Q_i·Q_q) − 2(e_i‖y_q‖ + ‖ŷ_i‖e_q). Rounding: y, t and
  ρ (from t − ‖y‖² in float64, off by ≤ √(ε_c t)) are float64, and the float64 reference D_i differs
  from the real distance by ≤ 2(d+2)u₆₄(t_i+t_q), t = ‖z − μ‖². All are ≤ c_A (t_i + t_q); L_i
  subtracts twice that (``_slack_a``, which also still covers a float32 copy of y).
* **B — int8 bound.** ẑ_i = s_i Q_i with Q_i = round(z_i / s_i) ∈ [−127, 127]ᵈ, s_i = max|z_i|/127 (the
  query likewise). The integer dot I_i = Q_i·Q_q is exact (int32, |I| ≤ 127²d < 2³¹). Writing
  e_i = ‖z_i − ẑ_i‖, z·q − ẑ·q̂ = (z − ẑ)·q + ẑ·(q − q̂), so by Cauchy–Schwarz
  |D_i − (‖z_i‖² + ‖q‖² − 2 s_i s_q I_i)| ≤ 2(e_i‖q‖ + ‖ẑ_i‖e_q) + float64 slack (4(d+8)u₆₄(‖z_i‖²+‖q‖²)).
* **C — float32 bound** (on the few rows A and B leave, read from the column itself): a float32 dot
  z_i·q of length d, summed in any order, is off by ≤ γ_d Σ|z_ij q_j| ≤ γ_d‖z_i‖‖q‖ (Cauchy–Schwarz),
  so |D_i − (‖z_i‖² + ‖q‖² − 2 fl(z_i·q))| ≤ 2γ_d‖z_i‖‖q‖ + the same float64 slack. Rows that are
  nearly equidistant (a cluster's members, in high dimension) survive A and B; C separates them at
  a quarter of the float64 re-rank's cost, which then only sees the near-ties.

**Exactness (recall 1.0).** Let τ be any value ≥ D_(k), the k-th smallest exact distance among
eligible rows: the k-th smallest exact distance of any k eligible rows qualifies (pass A's seeds),
and so does the k-th smallest upper bound U_i (k rows have D_i ≤ U_i ≤ τ). Every row j of the true
answer has D_j ≤ D_(k) ≤ τ and L_j ≤ D_j, hence L_j ≤ τ: the candidate set {i : L_i ≤ τ} contains
every row with D_i ≤ D_(k) — the true top-k *and* every row tied with the k-th. Re-ranking the
candidates by (D_i, i) with the same ``exact_sq_l2`` therefore returns exactly the brute force
answer, ties included. Pruning a row is only ever justified by L_i > τ ≥ D_(k).

Speed: pass A reads m/(4d) of the bytes of a float32 scan and prunes almost everything when the
data has structure (clusters, a dominant subspace — real embeddings do); on isotropic data it
prunes nothing and is switched off for a while. Pass B reads a quarter of the bytes of a float32
scan through an integer GEMV (``torch._int_mm``: VNNI/AMX kernels), and only runs on large
candidate sets; pass C reads the candidates' float32 rows.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch

U32 = 2.0**-24
U64 = 2.0**-53
_EXACT_CHUNK = 1 << 22  # elements per float64 re-rank chunk (bounds temporary memory)
_MIN_INT_MM_ROWS = 32  # below this the int8 pass is not worth a kernel call: go exact
_MIN_PASS_B_ROWS = 1024  # below this pass B's int8 rows save little over pass C's float32 rows
_PASS_C_CHUNK = 64  # rows per gathered float32 block of pass C
_Y_BLOCK = 64  # pass A's codes are kept in column blocks of this width (see ``_y_blocks``)
STATE_VERSION = 2  # 2: the projection kept as int8 codes (version 1 states are rebuilt)


class TopKError(ValueError):
    """A bad search request (k, query shape, mask length) — says what to change."""


def exact_sq_l2(Z: np.ndarray, rows: np.ndarray, q: np.ndarray) -> np.ndarray:
    """The reference distance: float64 Σ(z_i − q)² for the given rows (chunked)."""
    out = np.empty(rows.shape[0], dtype=np.float64)
    q64 = q.astype(np.float64)
    step = max(1, _EXACT_CHUNK // max(1, Z.shape[1]))
    for s in range(0, rows.shape[0], step):
        diff = Z[rows[s : s + step]].astype(np.float64)
        diff -= q64
        out[s : s + step] = np.einsum("ij,ij->i", diff, diff)
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
        # pass A reads m int8 bytes a row: about d/8 dimensions, a power of two (the int8 GEMV is
        # markedly slower just past 64: 1M x 72 took 2.2x the time of 1M x 64), at most 128 (at
        # 4096-d the benchmark's survivors are as few as with 256; benchmarks/ZINDEX.md)
        self.proj_dim = 1 << (min(128, max(8, dim // 8)).bit_length() - 1) if proj_dim is None else proj_dim
        self.fit_sample = fit_sample
        self.seed = seed
        self.n = 0
        cap = 0
        self._n2 = np.zeros(cap)  # ‖z‖² float64
        self._q8 = torch.zeros((cap, dim), dtype=torch.int8)
        self._scale = np.zeros(cap)
        self._err = np.zeros(cap)
        self._rnorm = np.zeros(cap)
        self._P: np.ndarray | None = None  # d × m orthonormal (float64)
        self._mu: np.ndarray | None = None
        self._Yq = torch.zeros((1, cap, 0), dtype=torch.int8)  # int8 codes of y = Pᵀ(z − μ), column blocks
        self._ys = np.zeros(cap)  # their scale
        self._yn = np.zeros(cap)  # ‖y‖² (float64)
        self._t = np.zeros(cap)  # ‖z − μ‖²
        self._aa = np.zeros(cap)  # ‖y‖² + ρ² − c_A t: pass A's per-row constant
        self._w = np.zeros((cap, 3))  # (e_y ≥ ‖y − s_y Q_y‖, ‖s_y Q_y‖, ρ): pass A's error weights
        self._a_off = 0  # queries left with pass A switched off
        self._a_ema = 0.0  # running survivor fraction of pass A
        self.stats: dict[str, int] = {"queries": 0, "pass_a": 0, "pass_b_rows": 0, "pass_c_rows": 0, "exact_rows": 0}

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
        self._ys, self._yn, self._t, self._aa, self._w = g(self._ys), g(self._yn), g(self._t), g(self._aa), g(self._w)

        q8 = torch.zeros((new, self._q8.shape[1]), dtype=self._q8.dtype)
        q8[: self.n] = self._q8[: self.n]
        yq = torch.zeros((self._Yq.shape[0], new, self._Yq.shape[2]), dtype=self._Yq.dtype)
        yq[:, : self.n] = self._Yq[:, : self.n]
        self._q8, self._Yq = q8, yq

    @staticmethod
    def _y_blocks(m: int, cap: int) -> torch.Tensor:
        """Zeroed storage for the m-wide codes of ``cap`` rows as contiguous column blocks (b, cap, m/b).

        ``torch._int_mm`` over N × 64 is markedly faster per byte than over N × 128 (100k rows, one
        thread, torch 2.13 on the 2-core machine: 1.25 ms for two 64-wide blocks against 2.0 ms for
        one 128-wide matrix; the clustered top-8 p50 fell to 0.79× in an interleaved A/B), and the
        integer dot of the full code is exactly the sum of the blocks' dots."""
        nb = m // _Y_BLOCK if m > _Y_BLOCK and m % _Y_BLOCK == 0 else 1
        return torch.zeros((nb, cap, m // nb), dtype=torch.int8)

    def _set_codes(self, at: int, Q: np.ndarray) -> None:
        """Store the (n, m) int8 codes of rows ``at``… into the column blocks."""
        nb, _, w = self._Yq.shape
        self._Yq[:, at : at + Q.shape[0]] = torch.from_numpy(np.ascontiguousarray(Q)).reshape(-1, nb, w).transpose(0, 1)

    def _codes(self) -> np.ndarray:
        """The (n, m) int8 codes of every row, as one matrix (for ``state``)."""
        nb, _, w = self._Yq.shape
        return self._Yq[:, : self.n].transpose(0, 1).reshape(self.n, nb * w).numpy()

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
            self._q8[s + a : s + b] = torch.from_numpy(Q)
            self._scale[s + a : s + b], self._err[s + a : s + b], self._rnorm[s + a : s + b] = sc, er, rn
            self._n2[s + a : s + b] = np.einsum("ij,ij->i", x, x, dtype=np.float64)
            if self._P is not None:
                self._project(x.astype(np.float64), s + a)
        self.n = e

    def _project(self, x64: np.ndarray, at: int) -> None:
        assert self._P is not None and self._mu is not None
        c = x64 - self._mu
        y = c @ self._P
        t = np.einsum("ij,ij->i", c, c)
        yn = np.einsum("ij,ij->i", y, y)
        rho = np.sqrt(np.maximum(t - yn, 0.0))
        Q, sc, er, yh = self._quantize_y(y, yn)
        sl = slice(at, at + x64.shape[0])
        self._set_codes(at, Q)
        self._ys[sl], self._yn[sl], self._t[sl] = sc, yn, t
        self._aa[sl] = yn + rho * rho - self._slack_a() * t
        self._w[sl] = np.stack([er, yh, rho], axis=1)

    @staticmethod
    def _quantize_y(y: np.ndarray, yn: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """int8 codes of float64 rows y: ``quantize_int8`` bounds the error against y's float32
        copy; ‖y − fl32(y)‖ ≤ u‖y‖ is added so e_y bounds the error against y itself."""
        Q, sc, er, yh = quantize_int8(y)
        return Q, sc, er + 1.01 * U32 * np.sqrt(yn), yh

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
        self._Yq = self._y_blocks(m, self._n2.shape[0])
        step = max(1, _EXACT_CHUNK // self.dim)
        for a in range(0, n, step):
            b = min(n, a + step)
            self._project(np.asarray(Z[a:b], dtype=np.float64), a)

    # ---- persistence (derived data: rebuildable from the column) -------------------------------

    def state(self) -> dict[str, np.ndarray]:
        """Arrays to persist (e.g. ``np.savez``); ``from_state`` restores them without recomputing."""
        n = self.n
        out = {
            "v": np.asarray(STATE_VERSION),
            "n": np.asarray(n),
            "dim": np.asarray(self.dim),
            "proj_dim": np.asarray(self.proj_dim),
            "n2": self._n2[:n],
            "q8": self._q8[:n].numpy(),
            "scale": self._scale[:n],
            "err": self._err[:n],
            "rnorm": self._rnorm[:n],
        }
        if self._P is not None:
            w = self._w[:n]
            out.update(
                P=self._P,
                mu=self._mu,
                Yq=self._codes(),
                ys=self._ys[:n],
                ye=w[:, 0],
                yh=w[:, 1],
                yn=self._yn[:n],
                t=self._t[:n],
                rho=w[:, 2],
            )
        return out

    @classmethod
    def from_state(cls, st: dict[str, np.ndarray]) -> ExactTopK:
        """Inverse of ``state`` (arrays may be memory-mapped; they are copied into growable buffers).
        A state of another version raises ``ValueError`` (the caller rebuilds from the column)."""
        if "v" not in st or int(st["v"]) != STATE_VERSION:
            got = int(st["v"]) if "v" in st else 1
            raise ValueError(f"index state version {got}, this code writes {STATE_VERSION}")
        ix = cls(int(st["dim"]), proj_dim=int(st["proj_dim"]))
        n = int(st["n"])
        ix._grow(n)
        ix.n = n
        ix._n2[:n], ix._scale[:n], ix._err[:n], ix._rnorm[:n] = st["n2"], st["scale"], st["err"], st["rnorm"]
        ix._q8[:n] = torch.from_numpy(np.ascontiguousarray(st["q8"]))
        if "P" in st:
            ix._P, ix._mu = np.asarray(st["P"]), np.asarray(st["mu"])
            ix._Yq = ix._y_blocks(ix._P.shape[1], ix._n2.shape[0])
            ix._set_codes(0, np.asarray(st["Yq"]))
            ix._ys[:n], ix._yn[:n], ix._t[:n] = st["ys"], st["yn"], st["t"]
            ix._w[:n] = np.stack([st["ye"], st["yh"], st["rho"]], axis=1)
            ix._aa[:n] = ix._yn[:n] + ix._w[:n, 2] ** 2 - ix._slack_a() * ix._t[:n]
        return ix

    # ---- search ------------------------------------------------------------------------------

    def _slack_a(self) -> float:
        m, d = min(self.proj_dim, self.dim), self.dim
        gamma_m = m * U32 / (1 - m * U32)
        eps_c = 4 * (d + m + 8) * U64
        c = 4.1 * U32 * (1 + U32) + 1.01 * gamma_m * (1 + U32) ** 2 + 4 * math.sqrt(eps_c) + 2 * (d + 2) * U64
        return 2.0 * c  # a factor 2 of margin for the float64 evaluation of the bound itself

    def search(
        self, q: np.ndarray, k: int, Z: np.ndarray, *, mask: np.ndarray | None = None, exclude: Iterable[int] = ()
    ) -> tuple[np.ndarray, np.ndarray]:
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

        cand: np.ndarray | None = None
        tau = math.inf
        seeds = np.zeros(0, dtype=np.int64)
        seed_d = np.zeros(0)
        if self._P is None and n >= max(2048, 4 * self.proj_dim):
            self.fit_projection(Z)
        if self._P is not None and self._a_off <= 0:
            self.stats["pass_a"] += 1
            lb = self._pass_a(q, elig, n_elig == n)
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
        if cand is None:
            cand = np.flatnonzero(elig)
        if cand.size >= max(_MIN_PASS_B_ROWS, 4 * k):
            lb, ub = self._pass_b(q, None if cand.size == n_elig == n else cand)
            self.stats["pass_b_rows"] += int(cand.size)
            tau = min(tau, float(np.partition(ub, k - 1)[k - 1]))
            cand = cand[lb <= tau]
        if cand.size > 4 * k + 16:
            lb, ub = self._pass_c(q, cand, Z)
            self.stats["pass_c_rows"] += int(cand.size)
            tau = min(tau, float(np.partition(ub, k - 1)[k - 1]))
            cand = cand[lb <= tau]
        rest = np.setdiff1d(cand, seeds, assume_unique=True)
        self.stats["exact_rows"] += int(rest.size + seeds.size)
        return self._final(Z, np.concatenate([seeds, rest]), q, k, seed_d)

    def _final(
        self, Z: np.ndarray, rows: np.ndarray, q: np.ndarray, k: int, known: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact distances (the first ``len(known)`` rows already computed), then the (D, row) order."""
        nk = 0 if known is None else known.shape[0]
        d = exact_sq_l2(Z, rows[nk:], q)
        if nk:
            d = np.concatenate([known, d])
        order = np.lexsort((rows, d))[:k]
        return rows[order], d[order]

    def _pass_a(self, q: np.ndarray, elig: np.ndarray, all_elig: bool = False) -> np.ndarray:
        assert self._P is not None and self._mu is not None
        n = self.n
        c = q.astype(np.float64) - self._mu
        y = c @ self._P
        tq = float(c @ c)
        yqn = float(y @ y)
        rho_q = math.sqrt(max(tq - yqn, 0.0))
        Qq, sq, eq, _ = self._quantize_y(y.reshape(1, -1), np.asarray([yqn]))
        nb, _, w = self._Yq.shape
        qb = torch.from_numpy(np.ascontiguousarray(Qq.reshape(nb, w, 1)))
        dot = torch._int_mm(self._Yq[0, :n], qb[0])
        for j in range(1, nb):
            dot += torch._int_mm(self._Yq[j, :n], qb[j])
        # in place, few passes over N (at 10^6 rows each float64 pass costs ~1.5 ms)
        lb = np.multiply(dot.numpy().reshape(-1), self._ys[:n], dtype=np.float64)
        lb *= -2.0 * float(sq[0])  # −2 ŷ_i·ŷ_q
        lb += self._aa[:n]
        # e_i‖y_q‖ + ‖ŷ_i‖e_q + ρ_iρ_q, times 2 (and a hair of margin for its own rounding)
        lb -= self._w[:n] @ ((2.0 * (1 + 1e-9)) * np.array([math.sqrt(yqn), float(eq[0]), rho_q]))
        lb += yqn + rho_q * rho_q - self._slack_a() * tq
        if not all_elig:
            lb[~elig] = np.inf
        return lb

    def _pass_b(self, q: np.ndarray, rows: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Lower/upper bounds from the int8 copy, for ``rows`` (all rows when None)."""
        Qq, sq, eq, rq = quantize_int8(q.reshape(1, -1))
        qt = torch.from_numpy(np.ascontiguousarray(Qq.reshape(-1, 1)))
        if rows is not None and rows.size > self.n // 4:  # gathering that many rows costs more than a scan
            lb, ub = self._pass_b(q, None)
            return lb[rows], ub[rows]
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

    def _pass_c(self, q: np.ndarray, rows: np.ndarray, Z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Lower/upper bounds from a float32 dot with the stored rows themselves (``rows`` of ``Z``)."""
        d = self.dim
        q32 = np.asarray(q, dtype=np.float32)
        dot = np.empty(rows.shape[0])
        for a in range(0, rows.shape[0], _PASS_C_CHUNK):  # gathered blocks that stay in cache
            dot[a : a + _PASS_C_CHUNK] = Z[rows[a : a + _PASS_C_CHUNK]] @ q32
        q64 = q32.astype(np.float64)
        qn2 = float(q64 @ q64)
        n2 = self._n2[rows]
        gamma = d * U32 / (1 - d * U32)
        approx = n2 + qn2 - 2.0 * dot
        bound = 2.0 * gamma * np.sqrt(n2 * qn2) * (1 + 1e-6) + 4 * (d + 8) * U64 * (n2 + qn2) + 1e-300
        return approx - bound, approx + bound
