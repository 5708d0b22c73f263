"""The segmentation decoy study's pure parts (benchmarks/zero_shot_seg_decoys.py): plan, arms, summaries."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import zero_shot_seg_decoys as sd

PROSTATE = ["RUNMC", "BMC", "I2CVB", "UCL", "BIDMC"]


def test_decoy_plan_mixes_the_kinds_and_nests():
    full = sd.decoy_plan(32)
    assert len({d["name"] for d in full}) == 32 == sd.N_DECOYS
    assert [d["kind"] for d in sd.decoy_plan(4)] == list(sd.DECOY_KINDS)  # M = 4: one of each kind
    assert sd.decoy_plan(8) == full[:8]  # a larger M only adds decoys
    assert {d["name"] for d in full if d["kind"] == "fundus-cup"} == {f"fundus-cup-Domain{i}" for i in range(1, 5)}
    assert [d["label"] for d in full[:16] if d["kind"] == "ct"] == [5, 1, 2, 3]  # liver, spleen, kidneys
    assert [d["kind"] for d in full[16:]] == ["ct", "mr"] * 8  # then more labels of the two volumes
    assert full[16]["name"] == "ct-label4" and full[17]["name"] == "mr-label4"
    assert sd.decoy_plan(0) == []
    for bad in (-1, 33):
        with pytest.raises(ValueError, match="32 decoys"):
            sd.decoy_plan(bad)


def test_split_slices_even_alternate_disjoint():
    idx = list(range(10, 40))
    train, test = sd.split_slices(idx)
    assert len(train) == len(test) == 3
    assert not set(train) & set(test)
    assert train[0] == 10 and test[-1] == 39  # both ends used
    picks = sorted(train + test)
    assert picks[0::2] == train and picks[1::2] == test
    assert sd.split_slices([1, 2, 3, 4, 5, 6]) == ([1, 3, 5], [2, 4, 6])
    with pytest.raises(ValueError, match="need at least 6"):
        sd.split_slices([1, 2, 3, 4, 5])


def _library(m: int):
    """5 prostate sites near the target, the first decoy nearer than two of them, the rest far."""
    z_t = np.zeros(3)
    Z = {n: z_t + 0.1 * (i + 1) for i, n in enumerate(PROSTATE)}
    kind = dict.fromkeys(PROSTATE, sd.TASK)
    for j, d in enumerate(sd.decoy_plan(m)):
        Z[d["name"]] = z_t + (0.25 if j == 0 else 5.0 + j)
        kind[d["name"]] = d["kind"]
    return z_t, Z, kind


def test_target_arms_precision_and_decoy_weight():
    z_t, Z, kind = _library(4)
    cell = sd.target_arms(z_t, Z, list(Z), kind, k=5)
    assert cell["retrieved"] == ["RUNMC", "BMC", "fundus-disc-Domain1", "I2CVB", "UCL"]
    assert cell["precision"] == pytest.approx(4 / 5)
    assert cell["decoys_retrieved"] == ["fundus-disc-Domain1"]
    dw = cell["decoy_weight"]
    assert dw["avg-all"] == pytest.approx(4 / 9)  # one-shot FedAvg: 1/9 on each of the 4 decoys
    assert dw["soup"] == pytest.approx(1 / 5)  # AdapterSoup: the retrieved decoy's 1/k
    assert dw["nearest"] == 0.0
    assert dw["sim"] == pytest.approx(cell["weights"]["sim"]["fundus-disc-Domain1"])
    for arm, w in cell["weights"].items():
        assert sum(w.values()) == pytest.approx(1.0), arm
    # without decoys: every arm weighs prostate adapters only
    z_t, Z0, kind0 = _library(0)
    c0 = sd.target_arms(z_t, Z0, list(Z0), kind0, k=5)
    assert c0["precision"] == 1.0 and not any(c0["decoy_weight"].values())
    assert c0["weights"]["soup"] == c0["weights"]["avg-all"]  # k = library: AdapterSoup is FedAvg


def test_z_distances_by_kind():
    z_t, Z, kind = _library(4)
    zd = sd.z_distances(z_t, Z, kind)
    assert zd["farthest_prostate"] == pytest.approx(3 * 0.5**2)
    assert zd["nearest_decoy"] == pytest.approx(3 * 0.25**2)
    assert set(zd["median_by_kind"]) == {sd.TASK, *sd.DECOY_KINDS}


def _per_target(ms):
    rng = np.random.default_rng(0)
    out = {}
    for t in PROSTATE:
        by_m = {}
        for m in ms:
            dice = {a: list(rng.uniform(0.4, 0.6, 3) - 0.01 * m * (a == "avg-all")) for a in sd.ARMS}
            dice["sim"] = list(np.asarray(dice["avg-all"]) + 0.1)
            by_m[str(m)] = {"dice": dice, "precision": 1.0 - m / 20, "decoy_weight": {a: m / (5 + m) for a in sd.ARMS}}
        out[t] = {"dice": {"pretrained": [0.2, 0.2, 0.2], "own": [0.7, 0.8, 0.9]}, "by_m": by_m}
    return out


def test_summarise_pools_and_pairs():
    ms = [0, 4]
    s = sd.summarise(_per_target(ms), ms)
    assert s["pretrained"]["mean"] == pytest.approx(0.2)
    assert s["own"]["mean"] == pytest.approx(0.8)
    assert s["own"]["lo"] <= 0.8 <= s["own"]["hi"]
    d = s["vs_avg_all"]["4"]["sim"]
    assert d["mean"] == pytest.approx(0.1) and d["lo"] == pytest.approx(0.1) and d["hi"] == pytest.approx(0.1)
    assert "avg-all" not in s["vs_avg_all"]["0"]
    assert set(s["vs_m0"]) == {"4"}  # the first M is the reference
    assert s["precision"] == {"0": 1.0, "4": pytest.approx(0.8)}
    assert s["decoy_weight"]["4"]["avg-all"]["mean"] == pytest.approx(4 / 9)


def test_markdown_renders_every_table():
    ms = [0, 4]
    per = _per_target(ms)
    for r in per.values():
        r["z"] = {"median_by_kind": {sd.TASK: 1.0, "ct": 9.0}, "nearest_decoy": 4.0, "farthest_prostate": 2.0}
        for m in ms:
            r["by_m"][str(m)]["decoys_retrieved"] = ["ct-liver"] if m else []
    result = {
        "summary": sd.summarise(per, ms),
        "decoys_m": ms,
        "k": 5,
        "command": "python -m benchmarks.zero_shot_seg_decoys --decoys 0,4",
        "timing": {"wall_s": 1.0, "train_s": 0.0, "eval_s": 0.0, "n_evals": 0, "load_start": 1.0, "load_end": 2.0},
        "machine": "test",
        "decoys": sd.decoy_plan(4),
        "lora": {"steps": 12, "lr": 2e-3, "rank": 4},
        "targets": per,
    }
    result["decoy_dice"] = {
        d["name"]: {"pretrained": [0.1, 0.2, 0.3], "own": [0.5, 0.6, 0.7]} for d in sd.decoy_plan(4)
    }
    result["adapters"] = {d["name"]: f"{d['name']}/s12" for d in sd.decoy_plan(4)}
    result["train_stats"] = {f"{d['name']}/s12": {"loss_first": 2.0, "loss_last": 0.5} for d in sd.decoy_plan(4)}
    result["update_norms"] = {**{d["name"]: 2.5 for d in sd.decoy_plan(4)}, "RUNMC": 2.0, "BMC": 2.25}
    md = sd.markdown(result)
    assert "| ct-liver | ct | 0.200 | 0.600 | 2.00 → 0.50 | 2.50 |" in md  # each decoy on its own task
    assert "the prostate LoRAs' norms: 2.00–2.25:" in md
    assert "| sim | " in md and "M = 4" in md
    assert "0.80 (ct-liver)" in md  # precision with the decoy retrieved
    assert "| RUNMC | 1 | nan | 9 | nan | nan | 2.00 |" in md  # z by kind, decoy / prostate ratio
    assert "+0.100 [+0.100, +0.100]*" in md


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--decoys", "0,x"], "comma-separated integers"),
        (["--decoys", "0,33"], "between 0 and 32"),
        (["--decoys", ","], "names no M"),
        (["--k", "0"], "between 1 and 5"),
        (["--k", "6"], "between 1 and 5"),
        (["--steps", "0"], "at least 1"),
        (["--lr", "0"], "--lr positive"),
    ],
)
def test_bad_options_exit_2_with_a_reason(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        sd.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_defaults():
    a = sd.parse_args([])
    assert a.ms == [0, 4, 8, 16, 32] and a.k == 5 and (a.steps, a.lr, a.rank) == (12, 2e-3, 4)


def test_earlier_runs_kept_only_for_the_same_study(tmp_path):
    path = tmp_path / "results.json"
    this = {"fingerprint": "f", "k": 5, "lora": {"steps": 12}, "decoys_m": [0, 4]}
    assert sd.earlier_runs(path, this) == []  # no earlier file
    path.write_text("not json")
    assert sd.earlier_runs(path, this) == []
    first = {"command": "python -m x", "wall_s": 1134.0, "train_s": 848.0}
    path.write_text(json.dumps({**this, "command": "python -m x", "timing": {"wall_s": 1134.0, "train_s": 848.0}}))
    assert sd.earlier_runs(path, this) == [first]  # the training run's cost survives a rerun from the cache
    path.write_text(json.dumps({**this, "runs": [first, first]}))
    assert sd.earlier_runs(path, this) == [first, first]
    assert sd.earlier_runs(path, {**this, "k": 3}) == []  # another study: its runs are not this one's
    assert sd.earlier_runs(path, {**this, "decoys_m": [0, 8]}) == []  # M = 4 is not in this study
    assert sd.earlier_runs(path, {**this, "decoys_m": [0, 4, 8]}) == [first, first]  # a larger study: kept
