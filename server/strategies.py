"""Ensemble weighting strategies: how much each retrieved adapter counts for a target.

Every strategy is a small pure function ``(z_target[d], Z[k, d], **params) -> w[k]`` returning
float64 weights that sum to one. ``z_target`` is the mean embedding of the target's data and the
rows of ``Z`` are the mean embeddings stored with the k retrieved adapters; the composer then
builds ``Σ_i w_i ΔW_i``. The strategies follow the retrieval-based parameter ensemble paper:

- ``sim``:    w = softmax(−‖z_t − z_i‖² / λ1)                 (similarity weighting)
- ``lin``:    w = argmin_{Σw=1} ‖z_t − Σ_i w_i z_i‖²           (linear reconstruction)
- ``lin-l1``: w = argmin_{Σw=1} ‖z_t − Σ_i w_i z_i‖² + λ2‖w‖₁  (sparse reconstruction)
- ``avg``:    w = 1/k                                          (uniform baseline)
- ``nearest``: one-hot on the closest reference                (retrieval-only baseline)

Scale: embeddings from different layers/models differ in norm by orders of magnitude, so the
default λ1 and λ2 are set relative to the median squared distance between the target and the
references. With those defaults, multiplying every embedding by a constant (or translating them
all) leaves the weights unchanged. Explicit λ values are in the units of squared distance.

Everything is computed in float64 on the differences ``z_i − z_t`` (exact, no ‖a‖²+‖b‖²−2ab
cancellation), which also makes ``lin`` and ``lin-l1`` translation invariant by construction.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import numpy as np

Strategy = Callable[..., np.ndarray]

LAM2_DEFAULT_FACTOR = 0.1
# Bound on ‖w‖₁ for ``lin`` and ``lin-l1``. Σw = 1 makes ‖w‖₁ = 1 + 2·(total negative weight), so
# 3.0 lets at most one unit of negative weight cancel. Without a bound, a site that submits a z near-duplicating
# another's gets weights like +674 / −673 and an update hundreds of times an honest one (issue 10).
MAX_L1_DEFAULT = 3.0
_NULL_RTOL = 1e-10  # eigenvalues below this fraction of the largest count as exact zeros
_KKT_RTOL = 1e-11  # optimality tolerance of the active-set solver (dimensionless, see lin_l1)
#: references closer than this (squared, relative to the distance scale) are one reference to lin / lin-l1
_DUP_RTOL = 1e-8


# --------------------------------------------------------------------------------------------
# input handling


def _as_float64(name: str, value: Any) -> np.ndarray:
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch tensor without importing torch
        value = value.detach().cpu().numpy()
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a numeric array; could not convert it ({exc})") from exc
    return arr


def _validate(z_target: Any, Z: Any) -> tuple[np.ndarray, np.ndarray]:
    """Check shapes and finiteness, with messages naming the input and what was expected."""
    z = _as_float64("z_target", z_target)
    R = _as_float64("Z", Z)
    if z.ndim != 1:
        raise ValueError(f"z_target must be a 1-D vector of length d; got an array of shape {z.shape}")
    if z.shape[0] == 0:
        raise ValueError("z_target must have at least one dimension (d >= 1); got length 0")
    if R.ndim != 2:
        raise ValueError(f"Z must be a 2-D array of shape (k, d), one reference per row; got shape {R.shape}")
    if R.shape[0] < 1:
        raise ValueError("Z must hold at least one reference embedding (k >= 1); got k = 0")
    if R.shape[1] != z.shape[0]:
        raise ValueError(
            f"Z has rows of dimension {R.shape[1]} but z_target has dimension {z.shape[0]}; "
            f"expected Z of shape (k, {z.shape[0]})"
        )
    if not np.all(np.isfinite(z)):
        raise ValueError("z_target contains NaN or infinite values")
    if not np.all(np.isfinite(R)):
        bad = sorted({int(i) for i in np.argwhere(~np.isfinite(R))[:, 0]})
        raise ValueError(f"Z contains NaN or infinite values (rows {bad})")
    return z, R


def _check_lambda(name: str, value: Any, allow_zero: bool, allow_inf: bool) -> float:
    try:
        lam = float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a number; got {value!r}") from exc
    if np.isnan(lam) or lam < 0 or (lam == 0 and not allow_zero) or (np.isinf(lam) and not allow_inf):
        lo = ">= 0" if allow_zero else "> 0"
        hi = " (inf allowed)" if allow_inf else " and finite"
        raise ValueError(f"{name} must be {lo}{hi}; got {value!r}")
    return lam


def squared_distances(z_target: Any, Z: Any) -> np.ndarray:
    """‖z_t − z_i‖² for every reference, computed from explicit differences (no cancellation)."""
    z, R = _validate(z_target, Z)
    D = R - z
    return np.einsum("ij,ij->i", D, D)


def distance_scale(d2: np.ndarray) -> float:
    """The scale that default λ values are relative to: the median squared distance.

    The median (not the mean) so that one far-away reference does not flatten the weights of the
    rest. Falls back to the mean when more than half of the references coincide with the target
    (median 0), and to 1.0 when every reference coincides with it (all distances 0: any positive
    scale then gives the same weights).
    """
    med = float(np.median(d2))
    if med > 0:
        return med
    mean = float(np.mean(d2))
    return mean if mean > 0 else 1.0


# --------------------------------------------------------------------------------------------
# strategies


def avg(z_target: Any, Z: Any) -> np.ndarray:
    """Uniform weights, w_i = 1/k: the baseline that ignores the target embedding entirely."""
    _, R = _validate(z_target, Z)
    k = R.shape[0]
    return np.full(k, 1.0 / k)


def nearest(z_target: Any, Z: Any) -> np.ndarray:
    """One-hot on argmin_i ‖z_t − z_i‖² (ties → lowest index, so the result is deterministic).

    The retrieval-only baseline: use the single adapter whose data looks most like the target.
    """
    d2 = squared_distances(z_target, Z)
    w = np.zeros(d2.shape[0])
    w[int(np.argmin(d2))] = 1.0
    return w


def sim(z_target: Any, Z: Any, lam1: float | None = None) -> np.ndarray:
    """Similarity weights  w_i = exp(−‖z_t − z_i‖²/λ1) / Σ_j exp(−‖z_t − z_j‖²/λ1).

    λ1 is a temperature in units of squared distance: λ1 → 0 gives ``nearest`` (ties share the
    weight equally), λ1 → ∞ gives ``avg`` (``lam1=float("inf")`` is accepted and returns exactly
    uniform weights). Default ``lam1=None``: the median squared distance (``distance_scale``), so
    the weights do not change when every embedding is scaled by a constant. Computed as a
    stable softmax (the largest logit is subtracted before exponentiating).
    """
    d2 = squared_distances(z_target, Z)
    if lam1 is None:
        lam = distance_scale(d2)
    else:
        lam = _check_lambda("lam1", lam1, allow_zero=False, allow_inf=True)
    if np.isinf(lam):
        return np.full(d2.shape[0], 1.0 / d2.shape[0])
    logits = -d2 / lam
    logits -= logits.max()
    e = np.exp(logits)
    return e / e.sum()


def _null_basis_of_ones(k: int) -> np.ndarray:
    """Orthonormal basis (k × (k−1)) of {c : Σc = 0}, from a complete QR of the ones vector."""
    Q, _ = np.linalg.qr(np.ones((k, 1)), mode="complete")
    return Q[:, 1:]


def _near_duplicate_groups(z: np.ndarray, R: np.ndarray) -> list[list[int]]:
    """Indices of references that coincide up to ``_DUP_RTOL`` × the distance scale, in first-seen order.

    Why: two sites whose z differ by round-off make the affine problem ill-posed (its Gram matrix
    is singular to working precision), and the solvers then follow directions that exist only in
    the round-off (a site once crashed ``lin`` with "flat descent direction"). At the problem's
    precision such references are one point, so they are solved as one and share its weight
    equally — the same answer the minimum-norm solution gives for exact duplicates.
    """
    D = R - z
    scale = distance_scale(np.einsum("ij,ij->i", D, D))
    groups: list[list[int]] = []
    for i in range(R.shape[0]):
        for g in groups:
            diff = R[i] - R[g[0]]
            if float(diff @ diff) <= _DUP_RTOL * scale:
                g.append(i)
                break
        else:
            groups.append([i])
    return groups


def _on_distinct_references(
    solve: Callable[[np.ndarray, np.ndarray], np.ndarray], z: np.ndarray, R: np.ndarray
) -> np.ndarray:
    """``solve(z, R)`` on one representative per near-duplicate group; each group's weight is split equally."""
    groups = _near_duplicate_groups(z, R)
    if len(groups) == R.shape[0]:
        return solve(z, R)
    w_groups = solve(z, R[[g[0] for g in groups]])
    w = np.empty(R.shape[0])
    for g, wg in zip(groups, w_groups):
        w[g] = wg / len(g)
    return w


def lin(z_target: Any, Z: Any, max_l1: float = MAX_L1_DEFAULT) -> np.ndarray:
    """Affine reconstruction weights  w = argmin_{Σ_i w_i = 1, ‖w‖₁ ≤ B} ‖z_t − Σ_i w_i z_i‖²  (w_i may be < 0).

    ``max_l1`` = B bounds how much the weights may cancel (default ``MAX_L1_DEFAULT``; ``inf``
    disables it). When the unconstrained minimiser satisfies the bound it is returned as below;
    otherwise the constrained problem is solved exactly through its Lagrangian: the solution is
    ``lin_l1`` at the smallest λ2 whose solution meets the bound (‖w(λ2)‖₁ is non-increasing in λ2),
    found by bisection (``_bounded``).

    Solved exactly by eliminating the constraint: w = 1/k + N c with N an orthonormal basis of
    {Σc = 0}, so the problem becomes the unconstrained least squares ‖(Z − z_t)ᵀ N c + (Z − z_t)ᵀ 1/k‖²
    solved by ``numpy.linalg.lstsq`` (SVD). If z_t is an affine combination of the references the
    residual is zero and the planted weights are recovered.

    Rank-deficient cases (k > d + 1, duplicated or affinely dependent references) have a whole
    affine set of minimisers; lstsq returns the minimum-norm c, and because 1/k ⟂ N c this is the
    minimum-‖w‖₂ minimiser — e.g. two identical references share their weight equally. Singular
    values below numpy's default cutoff (machine epsilon × max(k, d) × largest) count as zero.
    """
    z, R = _validate(z_target, Z)
    bound = _check_max_l1(max_l1)

    def solve(z: np.ndarray, R: np.ndarray) -> np.ndarray:
        w = _lin_unbounded(z, R)
        return w if np.abs(w).sum() <= bound else _bounded(z, R, 0.0, bound)

    return _on_distinct_references(solve, z, R)


def _lin_unbounded(z: np.ndarray, R: np.ndarray) -> np.ndarray:
    k = R.shape[0]
    if k == 1:
        return np.ones(1)
    D = R - z  # (k, d); Σ w_i z_i − z_t = Dᵀ w when Σw = 1
    w0 = np.full(k, 1.0 / k)
    N = _null_basis_of_ones(k)
    c, *_ = np.linalg.lstsq(D.T @ N, -(D.T @ w0), rcond=None)
    return w0 + N @ c


def _check_max_l1(value: Any) -> float:
    try:
        bound = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"max_l1 must be a number >= 1 (Σw = 1 forces ‖w‖₁ >= 1) or inf; got {value!r}") from None
    if not bound >= 1.0:  # also rejects NaN
        raise ValueError(f"max_l1 must be >= 1 (Σw = 1 forces ‖w‖₁ >= 1) or inf; got {value!r}")
    return bound


def _bounded(z: np.ndarray, R: np.ndarray, lam_lo: float, bound: float) -> np.ndarray:
    """``lin_l1`` at the smallest λ2 ≥ lam_lo with ‖w‖₁ ≤ bound (bisection on the monotone path).

    As λ2 → ∞ the solution tends to the convex-hull projection (‖w‖₁ = 1), so an upper end
    always exists for bound > 1; for bound = 1 the largest λ2 tried is used and the tiny
    remaining negative mass (≤ 1e-9 relative) is the solver's round-off.
    """
    D = R - z
    s = distance_scale(np.einsum("ij,ij->i", D, D))
    G = (D @ D.T) / s
    start = int(np.argmin(np.einsum("ij,ij->i", D, D)))

    def solve(lam: float) -> np.ndarray:
        return _lin_l1_active_set(G, lam / s, start) if lam > 0 else _lin_unbounded(z, R)

    try:
        return _bisect_bound(solve, lam_lo, s, bound)
    except RuntimeError:  # round-off defeated the active set: solve the bounded problem as one QP
        return _lin_l1_qp(G, lam_lo / s, start, bound)


def _bisect_bound(solve: Callable[[float], np.ndarray], lam_lo: float, s: float, bound: float) -> np.ndarray:
    lo, hi = lam_lo, max(lam_lo, s) * 2.0
    w_hi = solve(hi)
    for _ in range(80):
        if np.abs(w_hi).sum() <= bound + 1e-12:
            break
        lo, hi = hi, hi * 4.0
        w_hi = solve(hi)
    for _ in range(60):  # bisection: keep hi feasible
        if hi - lo <= 1e-9 * hi:
            break
        mid = 0.5 * (lo + hi)
        w_mid = solve(mid)
        if np.abs(w_mid).sum() <= bound + 1e-12:
            hi, w_hi = mid, w_mid
        else:
            lo = mid
    return w_hi


def _default_lam2(d2: np.ndarray) -> float:
    return LAM2_DEFAULT_FACTOR * distance_scale(d2)


def lin_l1(z_target: Any, Z: Any, lam2: float | None = None, max_l1: float = MAX_L1_DEFAULT) -> np.ndarray:
    """Sparse affine reconstruction  w = argmin_{Σw=1} ‖z_t − Σ_i w_i z_i‖² + λ2‖w‖₁.

    ``max_l1`` bounds ‖w‖₁ as for ``lin``: if the solution at λ2 exceeds it, λ2 is raised to the
    smallest value whose solution meets the bound.

    Since Σw = 1 forces ‖w‖₁ ≥ 1 with equality exactly when w ≥ 0, λ2 mainly prices negative
    weights: λ2 = 0 is ``lin`` (delegated to it, including its minimum-norm choice), and as
    λ2 → ∞ the solution tends to the projection of z_t onto the convex hull of the references
    (non-negative weights, supported on a face, hence sparser than ``lin``).

    Default ``lam2=None``: 0.1 × the median squared distance (``distance_scale``), which keeps
    the weights invariant when all embeddings are scaled by a constant. Explicit values are in
    units of squared distance.

    Solver: an exact active-set ("feature-sign") method on the convex QP. For a fixed support S
    and sign pattern θ the problem is an equality-constrained quadratic solved from its KKT
    linear system; a line search to the first sign change keeps every step a strict decrease of
    the true objective, and a zero weight is activated only when it violates the subgradient
    condition |g_i + μ| ≤ λ2. It stops when all KKT conditions hold to 1e-11 (relative to the
    distance scale) — exact up to floating point, see ``lin_l1_kkt_residual``. When the
    quadratic is singular on the support (duplicates, k > d + 1) flat directions are followed to
    the next zero crossing, and the returned minimiser is one of several with equal objective.
    """
    z, R = _validate(z_target, Z)
    bound = _check_max_l1(max_l1)
    k = R.shape[0]
    D = R - z
    d2 = np.einsum("ij,ij->i", D, D)
    lam = _default_lam2(d2) if lam2 is None else _check_lambda("lam2", lam2, allow_zero=True, allow_inf=False)
    if lam == 0.0:
        return lin(z, R, max_l1=bound)
    if k == 1:
        return np.ones(1)

    def solve(z: np.ndarray, R: np.ndarray) -> np.ndarray:
        if R.shape[0] == 1:
            return np.ones(1)
        D = R - z
        d2 = np.einsum("ij,ij->i", D, D)
        s = distance_scale(d2)
        G = (D @ D.T) / s  # work in units of the distance scale: O(1) numbers whatever the embedding
        w = _lin_l1_solve(G, lam / s, start=int(np.argmin(d2)))
        return w if np.abs(w).sum() <= bound else _bounded(z, R, lam, bound)

    return _on_distinct_references(solve, z, R)


def _objective(G: np.ndarray, lam: float, w: np.ndarray) -> float:
    return float(w @ G @ w + lam * np.abs(w).sum())


def _lin_l1_solve(G: np.ndarray, lam: float, start: int) -> np.ndarray:
    """The exact active set; where round-off defeats it, a generic QP solver on the same problem.

    Nearly affinely dependent references (three sites on a line up to 1e-4 relative) leave G with
    eigenvalues that are neither clearly zero nor clearly positive, and the active set can then
    cycle or find a flat direction on one support that is curved on the next. The problem is
    still convex and well defined, so it is solved as the QP in (p, n) = (max(w, 0), max(−w, 0)):
    min (p−n)ᵀG(p−n) + λ1ᵀ(p+n) subject to 1ᵀ(p−n) = 1, p, n ≥ 0 (scipy's SLSQP), not refused.
    """
    try:
        return _lin_l1_active_set(G, lam, start)
    except RuntimeError:
        return _lin_l1_qp(G, lam, start)


def _lin_l1_qp(G: np.ndarray, lam: float, start: int, bound: float = float("inf")) -> np.ndarray:
    from scipy.optimize import minimize  # lazy: scipy.optimize costs ~0.3 s and is only needed here

    k = G.shape[0]

    def f(x: np.ndarray) -> float:
        w = x[:k] - x[k:]
        return float(w @ G @ w + lam * x.sum())

    def grad(x: np.ndarray) -> np.ndarray:
        g = 2.0 * (G @ (x[:k] - x[k:]))
        return np.concatenate([g + lam, -g + lam])

    x0 = np.zeros(2 * k)
    x0[start] = 1.0
    ones = np.concatenate([np.ones(k), -np.ones(k)])
    constraints: list[dict[str, Any]] = [{"type": "eq", "fun": lambda x: float(ones @ x) - 1.0, "jac": lambda x: ones}]
    if np.isfinite(bound):  # ‖w‖₁ = 1ᵀ(p + n) ≤ bound
        constraints.append({"type": "ineq", "fun": lambda x: bound - float(x.sum()), "jac": lambda x: -np.ones(2 * k)})
    res = minimize(
        f,
        x0,
        jac=grad,
        method="SLSQP",
        bounds=[(0.0, None)] * (2 * k),
        constraints=constraints,
        options={"maxiter": 500, "ftol": 1e-13},
    )
    w = res.x[:k] - res.x[k:]
    if not np.all(np.isfinite(w)) or abs(float(w.sum()) - 1.0) > 1e-6:
        raise RuntimeError(
            f"lin_l1: the references are numerically degenerate and the QP fallback failed ({res.message})"
        )
    w[np.abs(w) <= 1e-12] = 0.0
    return w / w.sum()


def _lin_l1_active_set(G: np.ndarray, lam: float, start: int) -> np.ndarray:
    """Minimise wᵀGw + λ‖w‖₁ subject to Σw = 1 (G symmetric PSD) by an exact active-set method.

    State: a support S with sign pattern θ (all w_S nonzero except possibly one freshly
    activated entry). Inner loop: minimise the smooth model wᵀGw + λθᵀw on {w_S, Σw=1}; move to
    its minimiser or to the best sign-change point on the way (strict decrease of the true
    objective), dropping weights that reach zero. Outer loop: with multiplier μ from the support,
    activate the zero weight with the largest |g_i + μ| − λ > 0 with sign −sign(g_i + μ) (a
    descent direction). Each (S, θ) model optimum is visited at most once because the objective
    strictly decreases, so the method terminates; an iteration cap guards against round-off.
    """
    k = G.shape[0]
    w = np.zeros(k)
    w[start] = 1.0
    theta = np.zeros(k)
    theta[start] = 1.0
    support = [start]
    tol = _KKT_RTOL * max(1.0, lam, float(np.abs(np.diag(G)).max()))
    max_iter = 100 + 50 * k

    for _ in range(max_iter):
        S = np.array(sorted(support))
        th = theta[S]
        GS = G[np.ix_(S, S)]
        M = GS + np.ones((len(S), len(S)))  # xᵀMx = ‖D_Sᵀx‖²/s + (Σx)²: null space = flat feasible dirs
        evals, evecs = np.linalg.eigh(M)
        null = evecs[:, evals <= _NULL_RTOL * max(1.0, float(evals.max()))]
        proj = null @ (null.T @ th) if null.shape[1] else np.zeros(len(S))
        if np.linalg.norm(proj) > 1e-9 * np.sqrt(len(S)):
            # unbounded model: the smooth part is flat along d, λθᵀd < 0; walk to the first zero
            d = -proj
            ratios = [(-w[i] / d[j], j) for j, i in enumerate(S) if w[i] * d[j] < 0]
            if not ratios:  # impossible in exact arithmetic (θᵀd < 0 needs a shrinking weight)
                raise RuntimeError("lin_l1 active set: flat descent direction without a zero crossing")
            t, _ = min(ratios)
            w[S] = w[S] + t * d
            _drop_zeros(w, theta, support, S, t, ratios)
            continue

        # bounded model: solve [2G_SS 1; 1ᵀ 0][x; μ] = [−λθ; 1] (consistent; lstsq → min-norm)
        n = len(S)
        K = np.zeros((n + 1, n + 1))
        K[:n, :n] = 2.0 * GS
        K[:n, n] = 1.0
        K[n, :n] = 1.0
        rhs = np.concatenate([-lam * th, [1.0]])
        sol, *_ = np.linalg.lstsq(K, rhs, rcond=None)
        x = sol[:n]
        wS = w[S]
        flips = [(j, wS[j] / (wS[j] - x[j])) for j in range(n) if x[j] * th[j] <= 0 and wS[j] != 0.0]
        if not flips and np.all(x * th > 0):
            w[S] = x
            # model optimum on (S, θ): check the zero weights
            g = 2.0 * (G @ w)
            mu = float(np.mean(-(g[S] + lam * th)))
            outside = np.setdiff1d(np.arange(k), S)
            if outside.size == 0:
                break
            viol = np.abs(g[outside] + mu) - lam
            j = int(np.argmax(viol))
            if viol[j] <= tol:
                break
            i = int(outside[j])
            support.append(i)
            theta[i] = -np.sign(g[i] + mu)
            continue
        # line search over the segment w_S → x: candidates are the sign changes and x itself
        best_t, best_f = 1.0, np.inf
        for t in sorted({t for _, t in flips if 0.0 < t < 1.0} | {1.0}):
            trial = w.copy()
            trial[S] = wS + t * (x - wS)
            f = _objective(G, lam, trial)
            if f < best_f:  # ascending t and strict <: ties go to the earlier point
                best_t, best_f = t, f
        w[S] = wS + best_t * (x - wS)
        for j, t in flips:
            if abs(t - best_t) <= 1e-12:
                w[S[j]] = 0.0
        # an entry that ended on the wrong side of zero at t = 1 starts a new sign pattern
        for j in range(n):
            i = int(S[j])
            if w[i] == 0.0 or abs(w[i]) <= 1e-15:
                w[i] = 0.0
                if i in support:
                    support.remove(i)
                theta[i] = 0.0
            else:
                theta[i] = np.sign(w[i])
        if not support:  # cannot happen with Σw = 1, but never loop on an empty support
            raise RuntimeError("lin_l1 active set emptied (numerical breakdown)")
    else:
        raise RuntimeError(
            f"lin_l1 active-set solver did not converge in {max_iter} iterations; "
            "the references are probably numerically degenerate"
        )
    return w


def _drop_zeros(
    w: np.ndarray, theta: np.ndarray, support: list[int], S: np.ndarray, t: float, ratios: list[tuple[float, int]]
) -> None:
    """After a ray step, set the entries that hit zero to exactly zero and leave the support."""
    for r, j in ratios:
        if abs(r - t) <= 1e-12 * max(1.0, abs(t)):
            i = int(S[j])
            w[i] = 0.0
            theta[i] = 0.0
            if i in support:
                support.remove(i)


def lin_l1_kkt_residual(z_target: Any, Z: Any, w: Any, lam2: float | None = None) -> float:
    """Largest violation of the optimality conditions of ``lin_l1`` at w (0 = exactly optimal).

    KKT for min ‖z_t − Σ w_i z_i‖² + λ2‖w‖₁ s.t. Σw = 1, with g = ∇ of the smooth part:
      g_i + λ2 sign(w_i) + μ = 0   for w_i ≠ 0,
      |g_i + μ| ≤ λ2               for w_i = 0,
      Σ w_i = 1.
    The multiplier μ is chosen to minimise the worst violation (closed form: the stationarity
    terms have slope ±1 or 0 in μ, so the min-max sits at μ = (Q − P)/2). Gradient violations are
    divided by the distance scale (median squared distance) so that one tolerance works at any
    embedding scale; the result is max(scaled stationarity violation, |Σw − 1|). Weights with
    |w_i| ≤ 1e-12 count as zero. ``lam2=None`` means the same default as ``lin_l1``.
    """
    z, R = _validate(z_target, Z)
    wv = _as_float64("w", w)
    if wv.shape != (R.shape[0],):
        raise ValueError(f"w must be a vector of length k = {R.shape[0]}; got shape {wv.shape}")
    D = R - z
    d2 = np.einsum("ij,ij->i", D, D)
    lam = _default_lam2(d2) if lam2 is None else _check_lambda("lam2", lam2, allow_zero=True, allow_inf=False)
    s = distance_scale(d2)
    g = 2.0 * (D @ (D.T @ wv)) / s
    lam_s = lam / s
    nz = np.abs(wv) > 1e-12
    a = g[nz] + lam_s * np.sign(wv[nz])  # want a + μ = 0
    c = g[~nz]  # want |c + μ| ≤ λ
    P = max([*a.tolist(), *(c - lam_s).tolist()])
    Q = max([*(-a).tolist(), *(-c - lam_s).tolist()])
    stationarity = max(0.0, (P + Q) / 2.0)
    return float(max(stationarity, abs(wv.sum() - 1.0)))


# --------------------------------------------------------------------------------------------
# registry


STRATEGIES: dict[str, Strategy] = {
    "sim": sim,
    "lin": lin,
    "lin-l1": lin_l1,
    "avg": avg,
    "nearest": nearest,
}


def compute_weights(name: str, z_target: Any, Z: Any, **params: Any) -> np.ndarray:
    """Weights of strategy ``name`` (``lin_l1`` is accepted as a spelling of ``lin-l1``).

    Parameters whose value is ``None`` mean "use the default" and are dropped, so a caller can
    pass ``lam1=cfg.lam1, lam2=cfg.lam2`` generically; any other parameter the strategy does not
    take is an error (a typo must not silently fall back to a default).
    """
    key = name.replace("_", "-") if isinstance(name, str) else name
    if key not in STRATEGIES:
        valid = ", ".join(sorted(STRATEGIES))
        raise ValueError(f"unknown weighting strategy {name!r}; valid strategies: {valid}")
    fn = STRATEGIES[key]
    accepted = [p for p in inspect.signature(fn).parameters if p not in ("z_target", "Z")]
    given = {k: v for k, v in params.items() if v is not None}
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        takes = ", ".join(accepted) if accepted else "no parameters"
        raise ValueError(f"strategy {key!r} does not take {', '.join(unknown)}; it takes {takes}")
    return fn(z_target, Z, **given)
