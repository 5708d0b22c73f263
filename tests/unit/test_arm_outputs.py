"""What the arms say (issue 28, item 5): every arm's output is kept at the site, never sent, and the
evaluation reports on what share of the held-out items two arms produced identical output.

On the in-process two-family federation (real ServerApp, real ClientApps): with two sites per
family, leave-one-site-out leaves one adapter in each target's library, so ``sim``, ``nearest`` and
``avg`` are the same adapter - identical output on every item, which the table must say (the
mechanism behind the main job's identical 0.0723 cells) - while the numbers that leave the site are
shares only.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.seg import report_config, run_local, seg_config

from client.arms import ARM_OUTPUTS_DIR, SAME_KEY_RE, arm_outputs, identical_shares
from server.modes.evaluate import same_pairs


def test_shares_are_pairwise_within_the_budget_and_skip_arms_without_outputs():
    outs = [["x", "y", "z", "w"], ["x", "y", "q", "w"], None, ["x", "y", "z", "w"]]
    got = identical_shares(["a0", "a1", "a2", "base"], outs, budget=100)
    assert got == {"a0_same_a1": 0.75, "a0_same_base": 1.0, "a1_same_base": 0.75}
    assert all(SAME_KEY_RE.match(k) for k in got)
    assert list(identical_shares(["a0", "a1", "a2", "base"], outs, budget=2)) == ["a0_same_a1", "a0_same_base"]
    assert arm_outputs({"predictions": ("t1", "t2")}) == ["t1", "t2"]
    assert arm_outputs({"outputs": ["d1"], "predictions": ["t1"]}) == ["d1"] and arm_outputs({"dice": 0.5}) is None
    assert same_pairs({"a0_same_a1": 1.0, "a1_same_base": 0.5, "a0_rouge_l": 0.2}, ["sim", "avg"]) == {
        "sim|avg": 1.0,
        "avg|base": 0.5,
    }


@pytest.mark.slow
@pytest.mark.parametrize("family", ["report-text", "segmentation"])
def test_arm_outputs_stay_at_the_site_and_identical_shares_reach_the_table(local, family):
    reg_root: Path = local["registry"]
    if family == "report-text":
        rc, targets, run0 = report_config(local), ("a", "b"), 41
    else:
        rc, targets, run0 = seg_config(reg_root, local["sam"], sites="RUNMC,BMC"), ("RUNMC", "BMC"), 51
    assert run_local(local, run0, {**rc, "mode": "enroll"})["status"] == "completed"
    report = run_local(local, run0 + 1, {**rc, "mode": "evaluate", "k": 1})
    assert report["status"] == "completed", report.get("error")
    identical = report["evaluate"]["identical"]
    rows = report["evaluate"]["rows"]
    for t in targets:
        methods = [r["method"] for r in rows if r["target"] == t and r["method"] != "base"]
        # one adapter in the library: every composed arm is that adapter, so they say the same thing
        for a, b in (("sim", "nearest"), ("sim", "avg"), ("lin", "lin-l1")):
            if a in methods and b in methods:
                assert identical[t][f"{a}|{b}"] == 1.0, identical[t]
        scores = {r["method"]: r["score"] for r in rows if r["target"] == t}
        assert scores["sim"] == scores["nearest"] == scores["avg"]
        n_pairs = len(methods) * (len(methods) + 1) // 2  # the arms and the base model, pairwise
        assert len(identical[t]) == n_pairs and all(0.0 <= v <= 1.0 for v in identical[t].values())

        site_dir = local["tmp"] / "sites" / t
        kept = sorted((site_dir / ARM_OUTPUTS_DIR).glob(f"run-{run0 + 1}-*.json"))
        assert len(kept) == 1 and oct(kept[0].stat().st_mode & 0o777) == "0o600"
        doc = json.loads(kept[0].read_text())
        assert [a["arm"] for a in doc["arms"]] == [*methods, "base"]
        outs = doc["outputs"]
        assert len({len(v) for v in outs.values()}) == 1 and len(outs["a0"]) == len(doc["items"]) > 0
        # the shares the coordinator got are the ones the kept outputs give
        labels = {a["label"]: a["arm"] for a in doc["arms"]}
        for pair, share in identical[t].items():
            x, y = (next(lab for lab, arm in labels.items() if arm == name) for name in pair.split("|"))
            same = sum(p == q for p, q in zip(outs[x], outs[y], strict=True)) / len(outs[x])
            assert share == pytest.approx(same)
        # nothing of what the arms produced is in what the site sent (its egress log lists every reply)
        egress = (site_dir / "egress.jsonl").read_text()
        assert ARM_OUTPUTS_DIR not in egress
        for text in {o for v in outs.values() for o in v if isinstance(o, str) and len(o) >= 12}:
            assert json.dumps(text)[1:-1] not in egress

    md = Path(report["evaluate"]["outputs"]["markdown"]).read_text()
    assert "## Identical outputs" in md and "`sim` = `nearest` | 1.00" in md
    assert "## How close the library was" in md
