"""The coordinator's "nothing close enough" warning (``server/nearness.py``, issue 28).

1. The ratio itself: scale-free, off at ``far-ratio=0``, no ratio without a library spacing,
   duplicates in the library.
2. On the in-process two-family federation (real ServerApp, real ClientApps, real registries): a
   target whose nearest library adapter is much farther than the library's own spacing gets the
   warning in the run report, the ``composition`` audit entry and the delivery the site keeps; a
   target inside the library's spread does not. Both task families.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from support.seg import report_config, run_local, seg_config

from server.nearness import DEFAULT_FAR_RATIO, WARNING, assess, library_spacing


def test_the_ratio_has_no_unit_and_says_why_when_it_cannot_be_computed():
    rng = np.random.default_rng(0)
    Z = rng.normal(size=(6, 5))
    s = library_spacing(Z)
    assert s is not None and s > 0
    assert library_spacing(Z * 10.0) == pytest.approx(100.0 * s)
    near, far = assess([0.5 * s, 3 * s], s, 4.0), assess([10 * s], s, 4.0)
    assert near["ratio"] == pytest.approx(0.5) and near["warning"] is None
    assert far["ratio"] == pytest.approx(10.0) and far["warning"] == WARNING and "far-ratio 4" in far["reason"]
    scaled = assess([1000 * s], 100 * s, 4.0)  # the same geometry in a z space 100x larger: the same answer
    assert scaled["ratio"] == pytest.approx(far["ratio"]) and scaled["warning"] == WARNING

    off = assess([10 * s], s, 0.0)
    assert off["warning"] is None and off["ratio"] is None and "off" in off["reason"]
    one = assess([10 * s], library_spacing(Z[:1]), 4.0)
    assert one["warning"] is None and "fewer than two" in one["reason"]
    dup = np.vstack([Z[:1], Z[:1], Z[:1], Z[1:2]])  # most of the library are copies of one adapter
    assert library_spacing(dup) == 0.0
    assert assess([1e-3], 0.0, 4.0)["warning"] == WARNING and assess([0.0], 0.0, 4.0)["warning"] is None


def test_the_default_threshold_is_the_run_config_default():
    import tomllib

    from server.settings import Settings

    table = tomllib.loads(Path("pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert table["far-ratio"] == DEFAULT_FAR_RATIO == Settings().far_ratio
    assert Settings.from_run_config({"far-ratio": "2.5", "registry-dir": "/x"}).far_ratio == 2.5


def _add_decoys(registry, template, centre: np.ndarray, radius2: float, names: list[str]) -> None:
    """Stored adapters of sites ``names`` (copies of ``template``'s adapter) whose z lie at squared
    distance ``radius2`` from ``centre`` along orthogonal directions (pairwise 2·radius2 apart)."""
    rng = np.random.default_rng(len(names))
    q, _ = np.linalg.qr(rng.normal(size=(centre.size, len(names))))
    adapter = registry.load_adapter(template.id)
    for name, u in zip(names, q.T, strict=True):
        z = (centre.astype(np.float64) + np.sqrt(radius2) * u).astype(np.float32)
        meta = dataclasses.replace(template.meta, site=name, extra={}, created_at=None, rank=None)
        registry.add(adapter, z, meta)


def _composition_entry(reg_dir: Path, target: str) -> dict:
    entries = [json.loads(x) for x in (reg_dir / "audit.jsonl").read_text().splitlines()]
    return [e for e in entries if e["event"] == "composition" and e["target"] == target][-1]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["report-text", "segmentation"])
def test_a_far_target_is_warned_and_a_near_one_is_not(local, family):
    from server.registry import Registry

    reg_root: Path = local["registry"]
    if family == "report-text":
        rc, reg_dir, near, far, run0 = report_config(local), reg_root, "a", "b", 61
    else:
        rc = seg_config(reg_root, local["sam"], sites="RUNMC,BMC")
        reg_dir, near, far, run0 = reg_root / "segmentation", "RUNMC", "BMC", 71
    assert run_local(local, run0, {**rc, "mode": "enroll"})["status"] == "completed"
    with Registry(reg_dir, chroma="off") as reg:
        rec = {r.meta.site: r for r in reg.list(task=family)}
        z_near, z_far = rec[near].z.astype(np.float64), rec[far].z.astype(np.float64)
        d = float(np.sum((z_near - z_far) ** 2))
        assert d > 0
        # three more sites close around `near`: for `near` the library is {far, x1, x2, x3}, its
        # nearest adapter as close as the library's own spacing; for `far` the library is {near, x1,
        # x2, x3}, a tight cluster 16x its spacing away
        _add_decoys(reg, rec[near], z_near, d / 16.0, [f"{near}-x{i}" for i in range(3)])

    results = {}
    for i, target in enumerate((near, far)):
        report = run_local(local, run0 + 1 + i, {**rc, "mode": "compose", "target": target, "k": 2})
        assert report["status"] == "completed", report.get("error")
        res = report["compose"][target]
        assert res["status"] == "delivered", res  # warned or not, the operator decides: it is delivered
        results[target] = res
        check = res["nearness"]
        assert check["threshold"] == DEFAULT_FAR_RATIO and check["library_spacing"] > 0
        assert check["nearest_distance"] == pytest.approx(min(res["distances"]))
        entry = _composition_entry(reg_dir, target)
        assert entry["output_sha256"] == res["blob_sha256"] and entry["nearness"] == check
        kept = local["tmp"] / "sites" / target / "adapters" / res["adapter_name"] / "rpe-provenance.json"
        assert json.loads(json.loads(kept.read_text())["nearness"]) == check  # the site keeps what it was told

    assert results[near]["nearness"]["ratio"] < 2.0 and results[near]["nearness"]["warning"] is None
    assert results[far]["nearness"]["ratio"] > 8.0 and results[far]["nearness"]["warning"] == WARNING
    assert "nothing like this target" in results[far]["nearness"]["reason"]

    # far-ratio is the operator's: above the far target's ratio, no warning; 0 switches the check off
    ratio = results[far]["nearness"]["ratio"]
    for i, (value, expect_ratio) in enumerate(((ratio * 2, True), (0.0, False))):
        report = run_local(local, run0 + 5 + i, {**rc, "mode": "compose", "target": far, "k": 2, "far-ratio": value})
        check = report["compose"][far]["nearness"]
        assert check["warning"] is None and (check["ratio"] is not None) == expect_ratio
        assert _composition_entry(reg_dir, far)["nearness"]["threshold"] == value
