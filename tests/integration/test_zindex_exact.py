"""server/zindex: exact top-k equals brute force (random, clustered, adversarial ties, extreme
scales, bounds, masks, state round trips, projection code blocks). Pure numerics, but thousands of
rows per case: ~1 min of CPU in all, so out of the fast loop (moved from ``tests/unit/test_zindex.py``,
which keeps the column file tests)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from server.zindex import ExactTopK, exact_sq_l2

pytestmark = pytest.mark.integration


def brute(Z: np.ndarray, q: np.ndarray, k: int, elig: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    rows = np.arange(Z.shape[0]) if elig is None else np.flatnonzero(elig)
    d = exact_sq_l2(Z, rows, q)
    o = np.lexsort((rows, d))[:k]
    return rows[o], d[o]


def clustered(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    C = rng.standard_normal((8, d)).astype(np.float32)
    Z = C[rng.integers(0, 8, n)] + 0.2 * rng.standard_normal((n, d)).astype(np.float32)
    Z[: n // 5] = rng.standard_normal((n // 5, d))
    return Z.astype(np.float32)


# ---- exact top-k ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["random", "clustered"])
def test_search_equals_brute_force_on_random_and_clustered_data(kind: str) -> None:
    n, d = 5000, 96
    Z = np.random.default_rng(1).standard_normal((n, d)).astype(np.float32) if kind == "random" else clustered(n, d, 2)
    ix = ExactTopK(d, proj_dim=16)
    for s in range(0, n, 700):
        ix.add(Z[s : s + 700])
    ix.fit_projection(Z)
    rng = np.random.default_rng(3)
    for i in range(30):
        q = (
            Z[rng.integers(n)] + 0.05 * rng.standard_normal(d).astype(np.float32)
            if i % 2
            else rng.standard_normal(d).astype(np.float32)
        )
        for k in (1, 8, 33):
            rows, dist = ix.search(q, k, Z)
            ref_rows, ref_d = brute(Z, q, k)
            assert rows.tolist() == ref_rows.tolist()
            assert np.array_equal(dist, ref_d)


def test_adversarial_ties_are_broken_by_lower_row_like_brute_force() -> None:
    d = 64
    rng = np.random.default_rng(4)
    base = rng.standard_normal(d).astype(np.float32)
    # many exact duplicates, sign flips (same distance to q = 0) and permutations of one vector
    Z = np.concatenate(
        [
            np.tile(base, (300, 1)),
            -np.tile(base, (300, 1)),
            np.stack([rng.permutation(base) for _ in range(300)]),
            rng.standard_normal((1500, d)).astype(np.float32) * 3,
        ]
    ).astype(np.float32)
    Z = Z[rng.permutation(Z.shape[0])]
    ix = ExactTopK(d, proj_dim=8)
    ix.add(Z)
    ix.fit_projection(Z)
    for q in (np.zeros(d, np.float32), base, -base, base * 0.5):
        for k in (1, 8, 50, 400):
            rows, dist = ix.search(q, k, Z)
            ref_rows, ref_d = brute(Z, q, k)
            assert rows.tolist() == ref_rows.tolist()
            assert np.array_equal(dist, ref_d)


@pytest.mark.parametrize("scale,offset", [(1e-3, 0.0), (1e3, 0.0), (1.0, 100.0), (0.01, -5.0)])
def test_exact_at_extreme_scales_and_offsets(scale: float, offset: float) -> None:
    """Large offsets make the int8 and projection bounds loose (little pruning) but never wrong."""
    rng = np.random.default_rng(int(scale * 1000) % 97)
    n, d = 3000, 40
    Z = (clustered(n, d, 9) * scale + offset).astype(np.float32)
    ix = ExactTopK(d, proj_dim=8)
    ix.add(Z)
    ix.fit_projection(Z)
    for _ in range(8):
        q = (Z[rng.integers(n)] + scale * 0.01 * rng.standard_normal(d)).astype(np.float32)
        rows, dist = ix.search(q, 8, Z)
        ref_rows, ref_d = brute(Z, q, 8)
        assert rows.tolist() == ref_rows.tolist() and np.array_equal(dist, ref_d)


@pytest.mark.parametrize("d", [24, 576])
def test_every_row_lies_within_its_bounds(d: int) -> None:
    """The proof's premise, checked row by row: L_i <= D_i <= U_i for all three passes."""
    n = 2000
    Z = clustered(n, d, 11)
    ix = ExactTopK(d, proj_dim=8)
    ix.add(Z)
    ix.fit_projection(Z)
    rng = np.random.default_rng(12)
    for q in (Z[5], rng.standard_normal(d).astype(np.float32), Z[7] + 1e-3):
        D = exact_sq_l2(Z, np.arange(n), q)
        assert (ix._pass_a(q, np.ones(n, bool)) <= D).all()
        lb, ub = ix._pass_b(q, None)
        assert (lb <= D).all() and (D <= ub).all()
        lb2, ub2 = ix._pass_b(q, np.arange(0, n, 3))
        assert np.array_equal(lb2, lb[::3]) and np.array_equal(ub2, ub[::3])
        lb3, ub3 = ix._pass_c(q, np.arange(n), Z)
        assert (lb3 <= D).all() and (D <= ub3).all()
        assert np.median(ub3 - lb3) < np.median(ub - lb) / 50  # the float32 bounds are the tight ones


def test_mask_and_exclude_restrict_the_answer_exactly() -> None:
    n, d = 4000, 48
    Z = clustered(n, d, 5)
    ix = ExactTopK(d, proj_dim=8)
    ix.add(Z)
    rng = np.random.default_rng(6)
    mask = rng.random(n) < 0.3
    excl = rng.choice(n, 200, replace=False)
    for _ in range(10):
        q = Z[rng.integers(n)]
        elig = mask.copy()
        elig[excl] = False
        rows, _ = ix.search(q, 8, Z, mask=mask, exclude=excl.tolist())
        assert rows.tolist() == brute(Z, q, 8, elig)[0].tolist()
        assert mask[rows].all() and not np.isin(rows, excl).any()


def test_index_state_round_trip_gives_the_same_answers() -> None:
    Z = clustered(3000, 32, 7)
    ix = ExactTopK(32, proj_dim=8)
    ix.add(Z)
    ix.fit_projection(Z)
    ix2 = ExactTopK.from_state(ix.state())
    for q in Z[:5]:
        assert ix.search(q, 8, Z)[0].tolist() == ix2.search(q, 8, Z)[0].tolist()


@pytest.mark.parametrize("proj_dim", [128, 192])
def test_projection_codes_in_column_blocks_give_the_brute_force_answer(proj_dim: int) -> None:
    """Past 64 dimensions pass A's codes are kept in 64-wide column blocks (the int8 GEMV is faster
    per byte there); the blocked dot, rows added after the fit and a state round trip must all still
    give exactly the brute force answer, and the state must hold the codes as one (n, m) matrix."""
    n, d = 3000, 256
    Z = clustered(n, d, 11)
    ix = ExactTopK(d, proj_dim=proj_dim)
    ix.add(Z[:2000])
    ix.fit_projection(Z[:2000])
    ix.add(Z[2000:])  # projected on add, into the blocks
    assert tuple(ix._Yq.shape[::2]) == (proj_dim // 64, 64)
    st = ix.state()
    assert st["Yq"].shape == (n, proj_dim)
    ref = ExactTopK(d, proj_dim=proj_dim)
    ref.add(Z[:2000])
    ref.fit_projection(Z[:2000])
    ref.add(Z[2000:])
    assert np.array_equal(st["Yq"], ref.state()["Yq"])  # deterministic codes, block order = column order
    ix2 = ExactTopK.from_state(st)
    assert np.array_equal(ix2.state()["Yq"], st["Yq"])
    qc = torch.from_numpy(np.random.default_rng(13).integers(-127, 128, (proj_dim, 1)).astype(np.int8))
    blocked = sum(torch._int_mm(ix._Yq[j, :n], qc[64 * j : 64 * (j + 1)].contiguous()) for j in range(proj_dim // 64))
    assert torch.equal(blocked, torch._int_mm(torch.from_numpy(np.ascontiguousarray(st["Yq"])), qc))
    rng = np.random.default_rng(12)
    for _ in range(12):
        q = Z[rng.integers(n)] + 0.05 * rng.standard_normal(d).astype(np.float32)
        for index in (ix, ix2):
            rows, dist = index.search(q, 8, Z)
            ref_rows, ref_d = brute(Z, q, 8)
            assert rows.tolist() == ref_rows.tolist()
            assert np.array_equal(dist, ref_d)
    assert ix.stats["pass_a"] > 0 and ix2.stats["pass_a"] > 0
