"""The decoy study's pure parts (benchmarks/zero_shot_decoys.py): arms, precision, seeds' intervals."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import zero_shot_decoys as zd


def _library():
    rng = np.random.default_rng(0)
    z_t = np.zeros(4)
    Z = {
        "imp-a": z_t + 0.1,
        "imp-b": z_t + 0.2,
        "dec-c": z_t + 0.15,
        "dec-far": z_t + 5.0,
        "imp-far": z_t + 6.0 + rng.normal(size=4) * 0.01,
    }
    kind = {"imp-a": "impression", "imp-b": "impression", "imp-far": "impression", "dec-c": "modality"}
    kind["dec-far"] = "nonmed"
    return z_t, Z, kind


def test_arms_weigh_as_named():
    z_t, Z, kind = _library()
    names = list(Z)
    chosen, arms = zd.library_arms(z_t, Z, names, k=3)
    assert chosen == ["imp-a", "dec-c", "imp-b"]  # nearest first
    w = dict(arms)
    assert set(w) == {"avg-all", "soup", "nearest", "sim", "lin", "lin-l1"}
    assert w["avg-all"] == {n: pytest.approx(1 / 5) for n in names}  # one-shot FedAvg: every adapter
    assert w["soup"] == {n: pytest.approx(1 / 3) for n in chosen}  # AdapterSoup: the k retrieved, uniform
    assert w["nearest"] == {"imp-a": 1.0}
    for st in ("sim", "lin", "lin-l1"):
        assert set(w[st]) <= set(chosen), st  # the strategies only weigh what was retrieved
    assert sum(w["sim"].values()) == pytest.approx(1.0)
    assert w["sim"]["imp-a"] > w["sim"]["imp-b"]  # closer weighs more
    # a decoy among the retrieved carries weight; the far ones none
    assert zd.decoy_weight(w["soup"], kind) == pytest.approx(1 / 3)
    assert zd.decoy_weight(w["avg-all"], kind) == pytest.approx(2 / 5)
    assert zd.decoy_weight({"imp-a": 1.0}, kind) == 0.0
    assert zd.decoy_weight(None, kind) == 0.0


def test_precision_counts_same_task_retrieved():
    _, _, kind = _library()
    assert zd.precision_same_task(["imp-a", "dec-c", "imp-b"], kind) == pytest.approx(2 / 3)
    assert zd.precision_same_task(["imp-a", "imp-b", "imp-far"], kind) == 1.0
    assert zd.precision_same_task(["dec-c", "dec-far"], kind) == 0.0
    assert np.isnan(zd.precision_same_task([], kind))


def test_eval_sample_seed_zero_is_the_first_reports_others_differ_and_repeat():
    assert zd.eval_sample(50, 20, 0) == list(range(20))
    s1, s2 = zd.eval_sample(50, 20, 1), zd.eval_sample(50, 20, 2)
    assert s1 == zd.eval_sample(50, 20, 1)  # deterministic
    assert s1 != s2 and len(set(s1)) == 20 and max(s1) < 50
    assert zd.eval_sample(8, 20, 3) == sorted(zd.eval_sample(8, 20, 3)) and len(zd.eval_sample(8, 20, 3)) == 8


def test_seeds_interval_holds_seed_variance():
    rng = np.random.default_rng(1)
    same = [list(rng.normal(0.3, 0.05, 20)) for _ in range(3)]
    shifted = [list(np.asarray(g) + d) for g, d in zip(same, (-0.1, 0.0, 0.1))]
    m0, lo0, hi0 = zd.seeds_interval(same, 1000)
    m1, lo1, hi1 = zd.seeds_interval(shifted, 1000)
    assert lo0 < m0 < hi0 and lo1 < m1 < hi1
    assert m1 == pytest.approx(m0)
    assert hi1 - lo1 > 2 * (hi0 - lo0)  # seeds that disagree widen the interval
    # one seed: the plain bootstrap over reports
    m, lo, hi = zd.seeds_interval([same[0]], 1000)
    assert m == pytest.approx(np.mean(same[0])) and lo < m < hi
    assert all(np.isnan(x) for x in zd.seeds_interval([], 100))


def test_seed_spread_and_paired_differences():
    s = zd.seed_spread([[0.1, 0.3], [0.4], [0.5, 0.7]])
    assert s["means"] == pytest.approx([0.2, 0.4, 0.6]) and s["mean"] == pytest.approx(0.4)
    assert s["sd"] == pytest.approx(0.2)
    assert zd.seed_spread([[0.2, 0.4]])["sd"] == 0.0
    a = [[0.5, 0.6, 0.7, 0.5, 0.6], [0.4, 0.5, 0.6, 0.5, 0.4]]
    b = [[0.1, 0.2, 0.1, 0.2, 0.1], [0.2, 0.1, 0.2, 0.1, 0.2]]
    d = zd._paired(a, b, 500)
    assert d["diff"] == pytest.approx(np.mean(np.subtract(a, b))) and 0 < d["lo"] <= d["diff"] <= d["hi"]
    assert d["p"] < 0.05
    with pytest.raises(ValueError):
        zd._paired(a, b[:1], 100)  # seeds must pair


def test_generation_cache_key_keeps_seed_zero_shared_and_separates_seeds():
    w = {"a": 0.25, "b": 0.75}
    assert zd._gen_key(w, 0) == [("a", 0.25), ("b", 0.75)]  # the zero-shot study's own key
    assert zd._gen_key(w, 1) != zd._gen_key(w, 0) != zd._gen_key(w, 2) != zd._gen_key(w, 1)
    assert zd._gen_key(None, 2) == zd._gen_key(None, 0) == []  # the base model does not depend on the seed


def test_decoy_examples_per_task():
    from common.families.report.data import Example

    site = [Example("one two three four five six seven eight nine ten eleven twelve thirteen", "imp", "ct-head", "u1")]
    assert zd.decoy_examples("modality", site, 0)[0].target == "ct head"
    cont = zd.decoy_examples("continuation", site, 0)[0]
    assert cont.prompt.split()[-1] == "six" and cont.target.startswith("seven")
    assert zd.decoy_examples("imp2find", site, 0)[0].prompt == "imp"
    nonmed = zd.decoy_examples("nonmed", site, 0)
    assert nonmed and all(e.group == "nonmed" for e in nonmed)
    assert {e.uid for e in nonmed} != {e.uid for e in zd.decoy_examples("nonmed", site, 1)}


def test_outputs_pool_seeds_into_one_table(tmp_path):
    import json
    from argparse import Namespace
    from types import SimpleNamespace

    from benchmarks.zero_shot import PROFILES, Site

    p = PROFILES["smoke"]
    lab = SimpleNamespace(p=p, model_dir="m", counts={})
    targets = [Site("t-a", "affine", {}), Site("t-b", "single", {})]
    kind = {"s1": "impression", "s2": "impression", "d1": "modality", "t-a": "own", "t-b": "own"}
    ms = [0, 2]
    plans, scores, rng = {}, {}, np.random.default_rng(0)
    for t in targets:
        plans[t.name] = [("base", None, None), ("own", None, {t.name: 1.0})]
        for m in ms:
            names = ["s1", "s2", "d1"][: 2 + (m > 0)]
            plans[t.name] += [(a, m, {n: 1 / len(names) for n in names}) for a in zd.ARMS]
        scores[t.name] = {(a, m): {s: list(rng.uniform(0, 1, 4 + s)) for s in (0, 1)} for a, m, _ in plans[t.name]}
    retrieval = [
        {"target": t.name, "m": m, "precision_same_task": 1.0, "decoy_kinds_retrieved": []} for t in targets for m in ms
    ]
    args = Namespace(library=2, eval=4, max_length=96, eval_seeds_only=False, out=tmp_path)
    zd.write_outputs(
        args,
        lab,
        [Site("s1", "single", {})],
        [("d1", "modality", [])],
        targets,
        ms,
        plans,
        kind,
        scores,
        retrieval,
        {},
        0.0,
        {"seeds_done": [0, 1]},
    )
    out = json.loads((tmp_path / "results.json").read_text())
    row = next(r for r in out["results"] if r["target"] == "t-a" and r["arm"] == "avg-all" and r["m"] == 2)
    assert row["n_eval"] == [4, 5] and set(row["scores"]) == {"0", "1"}
    assert row["decoy_weight"] == pytest.approx(1 / 3) and row["vs_avg_all"] is None
    assert len(row["per_seed"]["means"]) == 2
    md = (tmp_path / "DECOYS.md").read_text()
    assert "Per-seed means" in md and "| t-b | lin-l1 |" in md and "--seeds 0,1" in md


@pytest.mark.parametrize("bad", ["x", "2/2", "1", "-1/2", "0/0"])
def test_a_bad_train_shard_is_refused_before_any_work(bad, capsys):
    with pytest.raises(SystemExit) as e:
        zd.main([f"--train-shard={bad}"])
    assert e.value.code == 2
    assert "expected K/N with 0 <= K < N" in capsys.readouterr().err
