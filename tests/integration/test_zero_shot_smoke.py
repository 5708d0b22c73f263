"""The zero-shot evidence recipe (benchmarks/zero_shot.py) run end to end on its smoke profile with
the tiny model, twice (the second from the cache). Moved from ``tests/unit/test_zero_shot.py``: it
trains LoRAs and generates for every arm, several seconds of CPU, so out of the fast loop."""

from __future__ import annotations

import json

import pytest

from benchmarks import zero_shot as zs

pytestmark = pytest.mark.integration


def test_smoke_profile_runs_end_to_end_and_reruns_from_the_cache(tiny_model_dir, tmp_path):
    out = zs.run("smoke", str(tiny_model_dir), tmp_path / "out", cache=tmp_path / "cache")
    arms = {r["arm"] for r in out["results"]}
    assert {
        "base",
        "own",
        "avg-all",
        "nearest",
        "sim",
        "lin",
        "lin-l1",
        "sim-loso",
        "lin-l1-loso",
        "fewshot",
        "sim[z=mid]",
    } <= arms
    fewshot = [r for r in out["results"] if r["arm"] == "fewshot"]
    assert fewshot and not any(r["zero_shot"] for r in fewshot)
    assert out["cache"]["lora_trained"] > 0
    report = (tmp_path / "out" / "ZERO_SHOT.md").read_text()
    assert "score_vs_n.png" in report and (tmp_path / "out" / "weights.png").exists()
    again = zs.run("smoke", str(tiny_model_dir), tmp_path / "out2", cache=tmp_path / "cache")
    assert again["cache"]["lora_trained"] == 0 and again["cache"]["gen_computed"] == 0
    same = json.loads((tmp_path / "out" / "results.json").read_text())["results"]
    assert [r["rouge_l"] for r in same] == [r["rouge_l"] for r in again["results"]]
