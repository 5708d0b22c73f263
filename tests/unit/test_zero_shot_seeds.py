"""Pooling the reduced zero-shot profile over seeds (benchmarks/zero_shot_seeds.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import zero_shot_seeds as zs


def _run(folder: Path, seed: int, shift: float, per_report: bool = True) -> Path:
    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 0.1, size=10)
    rows = []
    for kind in zs.KINDS:
        arms = {
            ("base", None, None): base,
            ("avg-all", 32, 32): base + 0.01,
            ("sim", 32, 3): base + shift,
        }
        for (arm, n, k), scores in arms.items():
            row = {
                "target": f"target-{kind}-{seed}",
                "target_kind": kind,
                "arm": arm,
                "n": n,
                "k": k,
                "rouge_l": float(np.mean(scores)),
                "vs_base": {"diff": float(np.mean(scores - base))},
                "vs_avg": {"diff": float(np.mean(scores - base - 0.01))} if n else None,
            }
            if per_report:
                row["rouge_l_per_report"] = [float(x) for x in scores]
            rows.append(row)
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"profile": "reduced", "results": rows, "command": "x"}))
    return folder


def test_t_interval_widens_with_spread_and_needs_two_values():
    m, lo, hi = zs.t_interval([1.0, 2.0, 3.0])
    assert m == 2.0 and lo < 1.0 and hi > 3.0  # t(2) = 4.30: wider than the range
    assert np.isnan(zs.t_interval([1.0])[1])


def test_pool_gives_per_seed_figures_and_both_intervals(tmp_path):
    runs = [zs.load_run(_run(tmp_path / f"seed{s}", s, 0.05 + 0.01 * s)) for s in range(3)]
    rows = zs.pool(runs, n_boot=200)
    sim = next(r for r in rows if r["kind"] == "single" and r["arm"] == "sim")
    assert sim["vs_base_per_seed"] == pytest.approx([0.05, 0.06, 0.07])
    assert sim["vs_base_t"][0] == pytest.approx(0.06)
    assert sim["vs_base_boot"][1] > 0  # every seed and report gains 0.05-0.07
    assert sim["vs_avg_t"][0] == pytest.approx(0.05)
    # arms missing from a run (nearest, lin, ...) are left out, not invented
    assert {r["arm"] for r in rows} == {"base", "avg-all", "sim"}


def test_runs_without_per_report_scores_get_the_t_interval_only(tmp_path):
    runs = [zs.load_run(_run(tmp_path / f"s{s}", s, 0.05, per_report=s != 0)) for s in range(3)]
    sim = next(r for r in zs.pool(runs, n_boot=200) if r["arm"] == "sim")
    assert "vs_base_t" in sim and "vs_base_boot" not in sim


def test_main_writes_the_table_and_refuses_a_missing_run(tmp_path, capsys):
    dirs = [str(_run(tmp_path / f"seed{s}", s, 0.05)) for s in range(3)]
    assert zs.main([*dirs, "--out", str(tmp_path / "out"), "--bootstrap", "200"]) == 0
    md = (tmp_path / "out" / "SEEDS.md").read_text()
    assert "(seeds 0, 1, 2)" in md and "| single | `sim` | 32 |" in md
    with pytest.raises(SystemExit) as e:
        zs.main([dirs[0], str(tmp_path / "nowhere"), "--out", str(tmp_path / "o2")])
    assert e.value.code == 2 and "no results.json" in capsys.readouterr().err
