"""Weighting strategies: the paper's equations, exact solutions, scale robustness, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from server.strategies import (
    STRATEGIES,
    avg,
    compute_weights,
    distance_scale,
    lin,
    lin_l1,
    lin_l1_kkt_residual,
    nearest,
    sim,
    squared_distances,
)


def _problem(seed: int, k: int = 6, d: int = 20) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=d), rng.normal(size=(k, d))


def _nnz(w: np.ndarray) -> int:
    return int(np.count_nonzero(np.abs(w) > 1e-12))


@pytest.mark.parametrize("name", sorted(STRATEGIES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weights_are_float64_and_sum_to_one(name, seed):
    rng = np.random.default_rng(seed)
    for k, d in [(1, 5), (3, 5), (8, 4), (12, 30)]:  # includes k > d + 1 (rank-deficient lin)
        Z = rng.normal(size=(k, d)) * 50.0
        z = rng.normal(size=d) * 50.0
        w = compute_weights(name, z, Z)
        assert w.shape == (k,) and w.dtype == np.float64
        assert np.all(np.isfinite(w))
        assert abs(w.sum() - 1.0) < 1e-10


def test_avg_and_nearest():
    Z = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 0.0], [5.0, 5.0]])
    assert np.allclose(avg([0.0, 0.0], Z), 0.25)
    assert nearest([0.9, 0.1], Z).tolist() == [0.0, 1.0, 0.0, 0.0]  # tie between rows 1, 2 → lowest
    assert nearest([4.0, 4.0], Z).tolist() == [0.0, 0.0, 0.0, 1.0]


def test_lin_recovers_planted_affine_weights_including_negative():
    rng = np.random.default_rng(3)
    k, d = 5, 16
    Z = rng.normal(size=(k, d))
    planted = np.array([0.9, -0.4, 0.7, -0.5, 0.3])
    assert planted.sum() == pytest.approx(1.0)
    z = planted @ Z
    assert np.allclose(lin(z, Z), planted, atol=1e-10)
    # affine weights are translation and scale invariant
    assert np.allclose(lin(3.0 * z + 7.0, 3.0 * Z + 7.0), planted, atol=1e-9)


def test_lin_rank_deficient_is_minimum_norm():
    rng = np.random.default_rng(4)
    Z = rng.normal(size=(3, 10))
    Zdup = np.vstack([Z, Z[1]])  # reference 1 duplicated as reference 3
    z = np.array([0.5, 0.8, -0.3]) @ Z
    w = lin(z, Zdup)
    assert np.allclose(w, [0.5, 0.4, -0.3, 0.4], atol=1e-10)  # the duplicate pair shares 0.8
    # k > d + 1: many exact solutions; the one returned is exact and the minimum-norm one
    Zw = rng.normal(size=(9, 3))
    z = rng.normal(size=3)
    w = lin(z, Zw)
    assert np.allclose(w @ Zw, z, atol=1e-10) and w.sum() == pytest.approx(1.0)
    N = np.linalg.svd(np.vstack([Zw.T, np.ones(9)]))[2][4:]  # null space of the constraints
    assert np.allclose(N @ w, 0.0, atol=1e-10)  # no component along the solution set → min-norm


def test_lin_l1_with_zero_lambda_equals_lin():
    for seed in range(3):
        z, Z = _problem(seed)
        assert np.allclose(lin_l1(z, Z, lam2=0.0), lin(z, Z), atol=1e-12)
        # and the active-set solver itself (not the λ2 = 0 shortcut) converges to lin as λ2 → 0
        tiny = 1e-9 * distance_scale(squared_distances(z, Z))
        assert np.allclose(lin_l1(z, Z, lam2=tiny), lin(z, Z), atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 5])
@pytest.mark.parametrize("rel_lam", [1e-3, 0.03, 0.1, 0.5, 2.0, 50.0])
def test_lin_l1_satisfies_kkt(seed, rel_lam):
    z, Z = _problem(seed)
    lam2 = rel_lam * distance_scale(squared_distances(z, Z))
    w = lin_l1(z, Z, lam2=lam2)
    assert lin_l1_kkt_residual(z, Z, w, lam2) < 1e-6
    # the residual is a real optimality test: a feasible perturbation violates it
    bumped = w + 1e-3 * np.arange(len(w))
    bumped += (1.0 - bumped.sum()) / len(w)
    assert lin_l1_kkt_residual(z, Z, bumped, lam2) > 1e-4


def test_lin_l1_kkt_with_duplicates_and_many_references():
    rng = np.random.default_rng(7)
    Z = rng.normal(size=(10, 4))
    Z[3] = Z[0]
    z = rng.normal(size=4) * 2.0
    for lam2 in [0.01, 0.3, 3.0]:
        w = lin_l1(z, Z, lam2=lam2)
        assert abs(w.sum() - 1.0) < 1e-10
        assert lin_l1_kkt_residual(z, Z, w, lam2) < 1e-6


def test_lin_l1_gets_sparser_as_lambda_grows():
    # Lasso-type paths are not monotone in general (a weight can re-enter; ~5% of random k=6,
    # d=20 problems do), so this uses one fixed problem whose lin solution has two negative weights.
    z, Z = _problem(1)
    assert int((lin(z, Z) < 0).sum()) == 2
    scale = distance_scale(squared_distances(z, Z))
    nnz = [_nnz(lin_l1(z, Z, lam2=r * scale)) for r in np.geomspace(1e-3, 1e2, 25)]
    assert all(b <= a for a, b in zip(nnz[:-1], nnz[1:], strict=True)), nnz
    assert nnz[0] == 6 and nnz[-1] < nnz[0]
    w_big = lin_l1(z, Z, lam2=100.0 * scale)
    assert np.all(w_big >= 0)  # a large λ2 removes every negative weight


def test_sim_limits():
    z, Z = _problem(2)
    assert np.allclose(sim(z, Z, lam1=1e-9), nearest(z, Z))
    assert np.allclose(sim(z, Z, lam1=1e12), avg(z, Z), atol=1e-9)
    assert np.allclose(sim(z, Z, lam1=float("inf")), avg(z, Z))
    # closer references never get less weight
    w = sim(z, Z)
    order = np.argsort(squared_distances(z, Z))
    assert np.all(np.diff(w[order]) <= 1e-15)


def test_sim_is_numerically_stable_for_huge_distances():
    Z = np.array([[1e6, 0.0], [1e6 + 1.0, 0.0]])
    w = sim([0.0, 0.0], Z, lam1=1.0)  # logits ~ -1e12: a naive exp underflows to 0/0
    assert np.all(np.isfinite(w)) and w[0] == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["sim", "lin-l1", "lin", "avg", "nearest"])
def test_default_weights_are_scale_and_translation_invariant(name):
    z, Z = _problem(0)
    w = compute_weights(name, z, Z)
    assert np.allclose(compute_weights(name, 1000.0 * z, 1000.0 * Z), w, atol=1e-9)
    assert np.allclose(compute_weights(name, z + 5.0, Z + 5.0), w, atol=1e-9)


def test_coincident_references_use_fallback_scale():
    Z = np.zeros((3, 4))
    assert np.allclose(sim(np.zeros(4), Z), 1 / 3)
    Z2 = np.array([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [2.0, 0.0]])  # median distance 0 → mean
    w = sim([0.0, 0.0], Z2)
    assert np.all(np.isfinite(w)) and abs(w.sum() - 1) < 1e-12


def test_compute_weights_dispatch_and_params():
    z, Z = _problem(0)
    assert np.allclose(compute_weights("lin_l1", z, Z, lam2=0.5), lin_l1(z, Z, lam2=0.5))
    assert np.allclose(compute_weights("sim", z, Z, lam1=None), sim(z, Z))  # None = default
    valid = r"valid strategies: avg, lin, lin-l1, nearest, sim"
    with pytest.raises(ValueError, match=r"unknown weighting strategy 'softmax'; " + valid):
        compute_weights("softmax", z, Z)
    with pytest.raises(ValueError, match=r"'avg' does not take lam1"):
        compute_weights("avg", z, Z, lam1=1.0)
    with pytest.raises(ValueError, match=r"'sim' does not take lam2; it takes lam1"):
        compute_weights("sim", z, Z, lam2=1.0)


@pytest.mark.parametrize(
    "z, Z, match",
    [
        (np.zeros((2, 3)), np.zeros((4, 3)), r"z_target must be a 1-D vector.*shape \(2, 3\)"),
        (np.zeros(3), np.zeros(3), r"Z must be a 2-D array of shape \(k, d\).*got shape \(3,\)"),
        (np.zeros(3), np.zeros((0, 3)), r"k >= 1"),
        (np.zeros(3), np.zeros((4, 5)), r"Z has rows of dimension 5 but z_target has dimension 3"),
        (np.array([0.0, np.nan, 1.0]), np.zeros((2, 3)), r"z_target contains NaN"),
        (np.zeros(3), np.array([[0.0, 0, 0], [np.inf, 0, 0]]), r"Z contains NaN.*\(rows \[1\]\)"),
        (np.zeros(0), np.zeros((2, 0)), r"at least one dimension"),
        (["a", "b"], np.zeros((2, 2)), r"z_target must be a numeric array"),
    ],
)
def test_bad_inputs_raise_clear_errors(z, Z, match):
    for name in STRATEGIES:
        with pytest.raises(ValueError, match=match):
            compute_weights(name, z, Z)


def test_bad_lambdas():
    z, Z = _problem(0)
    for bad in (0.0, -1.0, float("nan"), "x"):
        with pytest.raises(ValueError, match="lam1"):
            sim(z, Z, lam1=bad)
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="lam2"):
            lin_l1(z, Z, lam2=bad)
    with pytest.raises(ValueError, match="w must be a vector of length k = 6"):
        lin_l1_kkt_residual(z, Z, np.ones(3) / 3, 0.1)


# -- the ‖w‖₁ bound (issue 10: one site must not steer a composition) -------------------------------


def _near_duplicate_attack():
    """Site b submits a z that nearly duplicates site a's: unbounded lin answers +674 / −673-like weights."""
    rng = np.random.default_rng(7)
    Z = rng.normal(size=(3, 32))
    Z[1] = Z[0] + 1e-3 * rng.normal(size=32)
    z = 0.5 * Z[0] + 0.5 * Z[2] + 0.3 * rng.normal(size=32)
    return z, Z


def test_unbounded_lin_on_a_near_duplicate_z_explodes_and_the_default_bound_stops_it():
    from server.strategies import MAX_L1_DEFAULT

    z, Z = _near_duplicate_attack()
    free = lin(z, Z, max_l1=float("inf"))
    assert np.abs(free).sum() > 50  # the attack works without the bound
    for fn in (lin, lin_l1):
        w = fn(z, Z)
        assert abs(w.sum() - 1.0) < 1e-9
        assert np.abs(w).sum() <= MAX_L1_DEFAULT + 1e-9


def test_bounded_lin_is_the_constrained_optimum():
    """No feasible w (Σw = 1, ‖w‖₁ ≤ B) reconstructs z_t better than the bounded solution."""
    z, Z = _near_duplicate_attack()
    B = 1.5
    w = lin(z, Z, max_l1=B)
    assert np.abs(w).sum() <= B + 1e-9
    best = float(np.sum((w @ Z - z) ** 2))
    rng = np.random.default_rng(0)
    for _ in range(3000):
        c = rng.normal(size=3)
        c = c - c.mean() + 1.0 / 3  # Σc = 1
        if np.abs(c).sum() > B:
            continue
        assert float(np.sum((c @ Z - z) ** 2)) >= best - 1e-9


def test_bound_inactive_leaves_weights_unchanged():
    rng = np.random.default_rng(3)
    Z = rng.normal(size=(5, 16))
    planted = np.array([0.9, -0.4, 0.7, -0.5, 0.3])  # ‖w‖₁ = 2.8 ≤ 3
    assert np.allclose(lin(planted @ Z, Z), lin(planted @ Z, Z, max_l1=float("inf")), atol=1e-12)


@pytest.mark.parametrize("bad", [0.5, float("nan"), "two", -1])
def test_max_l1_below_one_or_not_a_number_is_refused(bad):
    z, Z = _near_duplicate_attack()
    with pytest.raises(ValueError, match="max_l1"):
        lin(z, Z, max_l1=bad)
    with pytest.raises(ValueError, match="max_l1"):
        compute_weights("lin-l1", z, Z, max_l1=bad)
