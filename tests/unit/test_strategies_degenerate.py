"""Numerically degenerate references: near-duplicate or nearly collinear site embeddings.

Issue 26 (class 9): a near-duplicate z crashed ``lin`` with "flat descent direction". Every
strategy must return finite weights that sum to one (and meet ``lin``'s ‖w‖₁ bound) for such
references, and near-duplicates must share their weight equally, as exact duplicates do.
"""

from __future__ import annotations

import numpy as np
import pytest

from server.strategies import MAX_L1_DEFAULT, compute_weights

AFFINE = ("lin", "lin-l1")


def _check(w: np.ndarray, k: int, name: str) -> None:
    assert w.shape == (k,) and np.all(np.isfinite(w))
    assert abs(float(w.sum()) - 1.0) < 1e-6
    if name in AFFINE:
        assert float(np.abs(w).sum()) <= MAX_L1_DEFAULT + 1e-6


@pytest.mark.parametrize("name", ["sim", "lin", "lin-l1", "avg", "nearest"])
@pytest.mark.parametrize("eps", [1e-13, 1e-7, 1e-4])
def test_a_near_duplicate_reference_gives_finite_weights(name, eps):
    # the reported case: two sites whose z differ by round-off, the target away from both
    rng = np.random.default_rng(7)
    for d, k in [(34, 2), (28, 6), (55, 2), (6, 4)]:
        Z = rng.normal(size=(k, d))
        Z[1] = Z[0] + eps * rng.normal(size=d)
        z = Z.mean(0) + 10 * rng.normal(size=d)
        _check(compute_weights(name, z, Z), k, name)


def test_near_duplicates_share_their_weight_equally():
    rng = np.random.default_rng(3)
    Z = rng.normal(size=(4, 16))
    Z[3] = Z[1] + 1e-9 * rng.normal(size=16)
    z = 0.5 * Z[0] + 0.5 * Z[1]
    for name in AFFINE:
        w = compute_weights(name, z, Z)
        assert w[1] == pytest.approx(w[3], abs=1e-12)
        assert w[1] + w[3] == pytest.approx(0.5, abs=1e-6) and w[0] == pytest.approx(0.5, abs=1e-6)


@pytest.mark.parametrize("e", [-10, -8, -6, -4])
def test_nearly_collinear_references_give_bounded_weights(e):
    # sites on a line up to 10^e: the active set alone cycled or found a false flat direction here
    rng = np.random.default_rng(1)
    for _ in range(25):
        d, k = int(rng.integers(2, 40)), int(rng.integers(3, 10))
        a, b = rng.normal(size=(2, d))
        Z = a + np.outer(rng.normal(size=k), b) + 10.0**e * rng.normal(size=(k, d))
        z = a + rng.normal(size=d) * rng.choice([1e-8, 1.0, 10.0])
        for name in AFFINE:
            _check(compute_weights(name, z, Z), k, name)
