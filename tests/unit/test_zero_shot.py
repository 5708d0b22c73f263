"""The zero-shot evidence recipe (benchmarks/zero_shot.py): federations without leakage, honest statistics.

The smoke profile run end to end (trains and generates) is ``tests/integration/test_zero_shot_smoke.py``."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import zero_shot as zs
from common.families.report.data import report_groups


@pytest.fixture(scope="module")
def federation():
    p = zs.PROFILES["reduced"]
    groups = {g: exs for g, exs in report_groups(min_size=1).items() if g in zs.GROUPS}
    ref, tgt = zs.split_pools(groups, p.target_fraction, seed=0)
    library = zs.build_library(ref, p, max(p.library_sizes), seed=0)
    targets = zs.build_targets(tgt, library, p, seed=0)
    return p, ref, tgt, library, targets


def test_target_reports_never_reach_a_library_adapter(federation):
    _, ref, tgt, library, targets = federation
    library_uids = {e.uid for s in library for e in s.train}
    for t in targets:
        for role in (t.eval, t.query, t.train):
            assert not library_uids & {e.uid for e in role}, t.name
        # query, eval and the own-LoRA set of one target are disjoint
        assert not {e.uid for e in t.eval} & {e.uid for e in t.query}
        assert not {e.uid for e in t.eval} & {e.uid for e in t.train}
        # the supervised reference has data to learn from: 22 query reports with their labels, 15 for the
        # reduced profile's ct-thorax/ct-head midpoint, whose two groups' target pools run short
        assert len(t.train) >= 15
    for g in ref:
        assert not {e.uid for e in ref[g]} & {e.uid for e in tgt[g]}


def test_library_has_single_group_sites_first_then_mixtures_and_no_far_group(federation):
    p, _, _, library, targets = federation
    assert len(library) == max(p.library_sizes)
    assert [s.kind for s in library[:4]] == ["single"] * 4
    assert {s.kind for s in library[5:]} == {"mixture"}
    assert all(e.group != zs.FAR_GROUP for s in library for e in s.train)
    sizes = {len(s.train) for s in library if s.kind == "mixture"}
    assert len(sizes) > 3  # hospitals of different sizes
    far = [t for t in targets if t.kind == "far"]
    assert far and all(e.group == zs.FAR_GROUP for t in far for e in t.eval)
    assert all(len(t.eval) == p.n_eval for t in targets)


def test_affine_target_is_the_midpoint_of_two_library_sites(federation):
    _, _, _, library, targets = federation
    for t in (t for t in targets if t.kind == "affine"):
        best = min(
            zs.mixture_distance(
                t.mixture, {g: 0.5 * a.mixture.get(g, 0) + 0.5 * b.mixture.get(g, 0) for g in zs.GROUPS}
            )
            for i, a in enumerate(library[:4])
            for b in library[i + 1 : 4]
        )
        assert best < 1e-9


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    small, large = rng.normal(0.3, 0.1, 20), rng.normal(0.3, 0.1, 2000)
    lo_s, hi_s = zs.bootstrap_ci(small, 2000)
    lo_l, hi_l = zs.bootstrap_ci(large, 2000)
    assert lo_s < small.mean() < hi_s and lo_l < large.mean() < hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 3


def test_paired_test_detects_a_real_difference_and_not_noise():
    rng = np.random.default_rng(1)
    base = rng.uniform(0, 1, 60)
    better = base + 0.05 + rng.normal(0, 0.01, 60)
    same = base + rng.normal(0, 0.01, 60)
    t = zs.paired_test(better, base, 2000)
    assert t["p"] < 0.01 and t["lo"] > 0 and abs(t["diff"] - 0.05) < 0.01
    assert zs.paired_test(same, base, 2000)["p"] > 0.01


def test_seg_loo_table_carries_intervals_and_paired_tests() -> None:
    """The segmentation recipe reports each DICE with its bootstrap interval and each strategy's
    paired difference to the pretrained model and to avg (stars only where p < 0.05)."""
    from benchmarks import seg_loo

    rng = np.random.default_rng(0)
    pre = list(rng.uniform(0.1, 0.3, 30))
    per = {
        "pretrained": pre,
        "own": [x + 0.5 for x in pre],
        "avg": [x + 0.3 for x in pre],
        "nearest": [x + rng.normal(0, 0.05) for x in pre],
        "sim": [x + 0.31 for x in pre],
        "lin": [x + 0.3 for x in pre],
        "lin-l1": [x + 0.3 for x in pre],
    }
    tests = {
        s: {"vs_pretrained": zs.paired_test(per[s], pre, 500), "vs_avg": zs.paired_test(per[s], per["avg"], 500)}
        for s in seg_loo.STRATEGIES
    }
    result = {
        "dataset": "toy",
        "model": "m",
        "prompt": {"mode": "center"},
        "steps": 1,
        "wall_s": 1.0,
        "simulated_sites": [],
        "dice": {"A": {c: float(np.mean(v)) for c, v in per.items()}},
        "mean": {c: float(np.mean(v)) for c, v in per.items()},
        "dice_ci": {"A": {c: list(zs.bootstrap_ci(v, 500)) for c, v in per.items()}},
        "dice_per_image": {"A": per},
        "tests": {"A": tests},
        "weights": {"A": {s: {"B": 1.0} for s in seg_loo.STRATEGIES}},
    }
    md = seg_loo.markdown(result)
    assert "| A (30 slices) | sim | " in md
    sim_row = next(line for line in md.splitlines() if line.startswith("| A (30 slices) | sim |"))
    assert sim_row.count("*") == 2  # +0.31 over pretrained and +0.01 over avg on every slice
    nearest_row = next(line for line in md.splitlines() if line.startswith("| A (30 slices) | nearest |"))
    assert "*" not in nearest_row.split("|")[4]  # noise around pretrained: no star
    assert "| A (30 slices) | avg | " in md and md.count("| A (30 slices) |") == len(seg_loo.COLUMNS)


def test_seg_loo_pools_by_lineage_and_keeps_virtual_sites_out_of_their_source() -> None:
    """Virtual scanner sites carry their source as lineage (a target never sees its own lineage);
    pooled intervals and tests treat a lineage as the independent unit (exact sign-flip p)."""
    from benchmarks import seg_loo
    from common.families.segmentation.data import SegSite

    rng = np.random.default_rng(0)

    def site(name: str) -> SegSite:
        imgs = [rng.integers(0, 255, (32, 32), dtype=np.uint8) for _ in range(2)]
        masks = [np.zeros((32, 32), dtype=bool) for _ in range(2)]
        return SegSite(name, "toy", imgs, masks, imgs, masks)

    real = [site("A"), site("B"), site("C")]
    virt = seg_loo.virtual_sites(real, 4, seed=0)
    assert [seg_loo.lineage(v) for v in virt] == ["A", "B", "C", "A"] and all(v.simulated for v in virt)
    assert all(v.meta["profile"]["match_site"] != seg_loo.lineage(v) for v in virt)
    assert [v.name for v in virt] == [v.name for v in seg_loo.virtual_sites(real, 4, seed=0)]  # seeded
    per = {
        t: {"pretrained": [0.2, 0.3], "own": [0.8, 0.9], **{s: [0.6, 0.7] for s in seg_loo.STRATEGIES}}
        for t in ("A", "vA", "B")
    }
    two = seg_loo.pooled(per, {"A": "A", "vA": "A", "B": "B"}, seg_loo.COLUMNS, n_boot=200)
    assert (two["targets"], two["lineages"], two["slices"]) == (3, 2, 6)
    cell = two["columns"]["sim"]["vs_pretrained"]
    assert cell["diff"] == pytest.approx(0.4) and cell["p"] == 1.0 / 2  # 2 lineages: p >= 1/2, never a star
    many = seg_loo.pooled(
        {f"T{i}": per["A"] for i in range(6)}, {f"T{i}": f"T{i}" for i in range(6)}, seg_loo.COLUMNS, n_boot=200
    )
    assert many["columns"]["sim"]["vs_pretrained"]["p"] == pytest.approx(2 / 64)
