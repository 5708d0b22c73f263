"""The heterogeneity benchmark's pure parts (``benchmarks/zero_shot_hetero.py``, issue 28 item 2):
the seeded per-site training configurations, the two-level (draws x targets) bootstrap interval,
the paired comparisons and the merge of runs made in parallel. No model is loaded."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.zero_shot_hetero import (
    HETERO_LR,
    HETERO_RANK,
    HETERO_STEPS,
    MODES,
    STRATEGIES,
    main,
    markdown,
    site_config,
    summarise,
    two_level_ci,
)

SITES = ("RUNMC", "BMC", "I2CVB", "UCL", "BIDMC", "HK")


def test_site_configs_are_seeded_and_heterogeneous_only_in_the_hetero_setting():
    uni = [site_config("uniform", 3, s, 12, 2e-3, 4) for s in SITES]
    assert all(c == {"steps": 12, "lr": 2e-3, "rank": 4, "seed": 3} for c in uni)
    het = [site_config("hetero", 3, s, 12, 2e-3, 4) for s in SITES]
    assert het == [site_config("hetero", 3, s, 12, 2e-3, 4) for s in SITES]  # seeded: the same again
    assert all(c["steps"] in HETERO_STEPS and c["lr"] in HETERO_LR and c["rank"] in HETERO_RANK for c in het)
    assert len({(c["steps"], c["lr"], c["rank"]) for c in het}) > 1
    assert het != [site_config("hetero", 4, s, 12, 2e-3, 4) for s in SITES]  # another draw, other sites' configs


def test_the_scaled_kind_keeps_the_uniform_training_and_scales_by_the_drawn_lr_and_steps():
    from benchmarks.zero_shot_hetero import config_key

    for s in SITES:
        scaled, trained = site_config("hetero", 0, s, 12, 2e-3, 4, "scaled"), site_config("hetero", 0, s, 12, 2e-3, 4)
        assert {k: scaled[k] for k in ("steps", "lr", "rank", "seed")} == site_config("uniform", 0, s, 12, 2e-3, 4)
        assert scaled["as_if"] == trained
        assert scaled["factor"] == pytest.approx(trained["lr"] / 2e-3 * trained["steps"] / 12)
        assert config_key(scaled) == config_key(site_config("uniform", 0, s, 12, 2e-3, 4)) + f"-x{scaled['factor']:g}"


def test_the_interval_resamples_draws_and_targets():
    flat = {(d, t): np.full(3, 0.5) for d in range(3) for t in SITES}
    c = two_level_ci(flat)
    assert c["mean"] == pytest.approx(0.5) and c["lo"] == pytest.approx(0.5) and c["hi"] == pytest.approx(0.5)
    # targets differ, draws agree: an interval; draws differ as well: a wider one
    by_target = {(d, t): np.full(3, i / 10) for d in range(3) for i, t in enumerate(SITES)}
    by_both = {(d, t): np.full(3, i / 10 + 0.2 * d) for d in range(3) for i, t in enumerate(SITES)}
    w1, w2 = (two_level_ci(x) for x in (by_target, by_both))
    assert w1["hi"] - w1["lo"] > 0.05 and (w2["hi"] - w2["lo"]) > (w1["hi"] - w1["lo"])


def _draw(offset: float) -> dict:
    """A fake draw: hetero loses 0.2 without normalisation; frobenius gives 0.15 of it back."""
    rng = np.random.default_rng(int(offset * 100))
    dice: dict = {}
    bases = {t: 0.6 + 0.05 * rng.normal(size=3) for t in SITES}  # the same slices in both settings
    for setting, loss in (("uniform", 0.0), ("hetero", 0.2)):
        dice[setting] = {}
        for t in SITES:
            base = bases[t]
            cells = {"pretrained": [0.2] * 3, "own": [0.7] * 3}
            for s in STRATEGIES:
                cells[f"{s}/none"] = list(base - loss + offset)
                cells[f"{s}/frobenius"] = list(base - loss / 4 + offset)
            dice[setting][t] = cells
    norms = {"uniform": dict.fromkeys(SITES, 1.0), "hetero": {t: 1.0 + 3 * i for i, t in enumerate(SITES)}}
    configs = {st: {t: site_config(st, 0, t, 12, 2e-3, 4) for t in SITES} for st in ("uniform", "hetero")}
    return {"configs": configs, "norms": norms, "dice": dice, "weights": {}, "scales": {}}


def test_summary_and_merge(tmp_path, capsys):
    draws = {0: _draw(0.0), 1: _draw(0.01)}
    summ = summarise(draws)
    cost = summ["diffs"]["heterogeneity cost"]["sim"]
    assert cost["mean"] == pytest.approx(-0.2) and cost["hi"] < 0
    assert summ["diffs"]["recovered by frobenius"]["avg"]["mean"] == pytest.approx(0.15)
    assert summ["norm_spread"]["hetero"] == pytest.approx([16.0, 16.0])
    assert set(summ["pooled"]["hetero"]) == {"pretrained", "own", *(f"{s}/{m}" for s in STRATEGIES for m in MODES)}

    def result(draw: int) -> dict:
        return {
            "dataset": "prostate-multisite",
            "uniform": {"steps": 12, "lr": 2e-3, "rank": 4},
            "copies": 1,
            "draws_run": [draw],
            "draws": {str(draw): draws[draw]},
            "summary": summarise({draw: draws[draw]}),
            "parts": [
                {"command": f"x --draws {draw}", "draws": [draw], "wall_s": 1, "train_s": 0, "eval_s": 0, "n_evals": 0}
            ],
            "train_stats": {},
        }

    for d in draws:
        (tmp_path / f"{d}.json").write_text(json.dumps(result(d)))
    assert main(["--merge", str(tmp_path / "0.json"), str(tmp_path / "1.json"), "--out", str(tmp_path / "m")]) == 0
    merged = json.loads((tmp_path / "m" / "hetero.json").read_text())
    assert merged["draws_run"] == [0, 1] and len(merged["parts"]) == 2
    assert merged["summary"]["diffs"]["heterogeneity cost"]["sim"]["mean"] == pytest.approx(cost["mean"])
    md = (tmp_path / "m" / "HETERO.md").read_text()
    assert md == markdown(merged) and "`x --draws 0`" in md and "`x --draws 1`" in md
    assert "| sim | -0.200 [" in md
    # a run without `--uniform-frobenius` / `--own`: those cells are absent, the table says "not run"
    lean = {0: _draw(0.0)}
    for per in lean[0]["dice"]["uniform"].values():
        for s in STRATEGIES:
            del per[f"{s}/frobenius"]
        del per["own"]
    summ = summarise(lean)
    assert "frobenius when uniform" not in summ["diffs"] and "recovered by frobenius" in summ["diffs"]
    assert "sim/frobenius" not in summ["pooled"]["uniform"] and "own" not in summ["pooled"]["uniform"]
    lean_md = markdown({**result(0), "summary": summ, "draws": {"0": lean[0]}})
    assert "not run" in lean_md and "own LoRA" not in lean_md
    with pytest.raises(SystemExit, match="draw 0 appears twice"):
        main(["--merge", str(tmp_path / "0.json"), str(tmp_path / "0.json"), "--out", str(tmp_path / "m2")])
