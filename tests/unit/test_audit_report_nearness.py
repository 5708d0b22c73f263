"""The auditor's ``rpe audit report`` shows each composition's "nothing close enough" check (issue 28).

The ``composition`` audit entry records ``nearness`` (ratio, threshold, warning, reason), and the
operator sees it in ``rpe compose`` and the console; the auditor's report showed nothing of it, so a
composition delivered with the warning looked like any other. Now the text report prints, under the
composition, the same line ``rpe compose`` printed (``WARNING nothing close enough: ...`` or
``nearness: ... no warning``), and ``--json`` carries the entry's ``nearness`` as recorded. Both task
families, a far and a near target each, on the real two-family registry root (``support.two_family``).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from support.cli import rpe_run
from support.two_family import FAMILIES, SEG_DIR, build

from server.nearness import WARNING
from server.registry import Registry


@pytest.fixture(scope="module")
def composed(tmp_path_factory):
    """The two-family root with, per family, one far and one near composition by ``rpe compose``."""
    tmp = tmp_path_factory.mktemp("audit-nearness")
    root = build(tmp)["root"]
    from deploy.cli import main  # as rpe_run does; a module-scoped fixture has no capsys

    for key in FAMILIES:
        reg = root / SEG_DIR if key == "seg" else root
        with Registry(reg, read_only=True) as r:
            Z = np.stack([x.z for x in r.list()]).astype(np.float64)
        far = Z.mean(axis=0)
        far[0] += 400.0
        for which, z in (("far", far), ("near", Z[1] + 0.05)):
            np.save(tmp / f"{key}-{which}.npy", z.astype(np.float32))
            argv = ["compose", "--registry", str(reg), "--embedding", str(tmp / f"{key}-{which}.npy")]
            argv += ["--k", "2", "--target", f"{which}-{key}", "--out", str(tmp / f"out-{key}-{which}")]
            try:
                main(argv)
            except SystemExit as exc:
                assert not exc.code, (key, which, exc.code)
    return root


def entry(reg, target: str) -> dict:
    lines = [json.loads(x) for x in (reg / "audit.jsonl").read_text().splitlines()]
    return [e for e in lines if e["event"] == "composition" and e["target"] == target][-1]


@pytest.mark.parametrize("key", list(FAMILIES))
def test_the_text_report_prints_the_warning_under_the_far_composition_only(capsys, composed, key):
    code, out, err = rpe_run(capsys, "audit", "report", "--registry", str(composed))
    assert code == 0, err
    lines = out.splitlines()
    reg = composed / SEG_DIR if key == "seg" else composed
    for which, warned in (("far", True), ("near", False)):
        recorded = entry(reg, f"{which}-{key}")["nearness"]
        assert (recorded["warning"] == WARNING) is warned
        head = next(i for i, x in enumerate(lines) if x.startswith("composition ") and f" for {which}-{key} " in x)
        block = []
        for x in lines[head + 1 :]:
            if not x.startswith("  "):
                break
            block.append(x.strip())
        shown = [x for x in block if x.startswith(("WARNING", "nearness:"))]
        assert len(shown) == 1, block
        if warned:
            assert shown[0] == f"WARNING {WARNING}: {recorded['reason']}"
        else:
            assert shown[0].startswith("nearness: the nearest adapter is ") and shown[0].endswith("no warning")
            assert f"{recorded['ratio']:.3g}x" in shown[0]


@pytest.mark.parametrize("key", list(FAMILIES))
def test_the_json_report_carries_the_recorded_check(capsys, composed, key):
    code, out, err = rpe_run(capsys, "audit", "report", "--registry", str(composed), "--json")
    assert code == 0, err
    family = FAMILIES[key]["task"]
    comps = {c["target"]: c for c in json.loads(out)["families"][family]["compositions"]}
    reg = composed / SEG_DIR if key == "seg" else composed
    for which in ("far", "near"):
        assert comps[f"{which}-{key}"]["nearness"] == entry(reg, f"{which}-{key}")["nearness"]
    assert comps[f"far-{key}"]["nearness"]["warning"] == WARNING
    assert comps[f"near-{key}"]["nearness"]["warning"] is None


def test_a_composition_recorded_before_the_check_prints_no_nearness_line():
    from server.auditreport import format_report

    rep = {
        "path": "audit.jsonl",
        "entries": 1,
        "head": None,
        "problems": [],
        "sites": {},
        "compositions": [
            {
                "seq": 3,
                "target": "t",
                "strategy": "sim",
                "output_sha256": "ab" * 32,
                "retrieved": ["x"],
                "distances": [1.0],
                "weights": [1.0],
                "adapter_sha256": ["cd" * 32],
                "kind": "local",
            }
        ],
        "queries": {},
        "registry": {"added": 0, "removed": 0},
    }
    text = format_report(rep)
    assert "composition seq 3 for t (sim)" in text
    assert "nearness" not in text and "WARNING" not in text
