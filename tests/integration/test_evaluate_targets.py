"""``mode=evaluate`` names only real problems (H2 item 3; benchmarks/FEDERATION_SCALE.md counted 41
false ones at N = 50): an enrolled site that is no target of the run - not named in ``target=``, or
holding no held-out data - is listed under ``skipped`` with the reason, never under ``problems``; a
site named in ``target=`` that holds no held-out data is still a problem, before anything is sent.

On BOTH task families over the in-process grid (``support.grid``: the real ServerApp ``main`` and the
real ClientApp handlers): report site a (held-out reports) and c (training reports only) enrolled,
b online but never enrolled; prostate site RUNMC (test slices) and a volume site ``vol`` whose node
config holds no slice out (``seg-test-fraction 0``) enrolled, BMC online only. The pure target
choice (offline sites included) is checked beside it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from support import write_site_data
from support.grid import enrol_keys, flower_task_identity, run_server_app, site_context
from support.seg import REPORT_RELEASE, SEG_RELEASE, report_config, seg_config

from server.messaging import SiteInfo
from server.modes.evaluate import NO_HELD_OUT, NOT_A_TARGET, choose_targets
from server.run_summary import summarize

pytestmark = pytest.mark.integration  # a minute of in-process federation runs: out of the fast loop

#: node ids of the extra sites (``local`` holds a, b = 101, 102 and RUNMC, BMC = 201, 202)
NO_EVAL_REPORT, NO_EVAL_SEG = 107, 207


def _labelled_volume(folder: Path) -> None:
    """One CT-like NIfTI volume with a label map present on every slice (10 labelled slices)."""
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(3)
    vol = (rng.random((48, 48, 10)) * 200).astype(np.int16)
    lab = np.zeros((48, 48, 10), dtype=np.uint8)
    lab[16:32, 14:30, :] = 1
    vol[lab == 1] += 300
    for sub, data in (("images", vol), ("labels", lab)):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(data, np.eye(4)), str(folder / sub / "case1.nii.gz"))


@pytest.fixture(scope="module")
def fed(local, tmp_path_factory):
    """``local`` plus a report site and a volume site without held-out data, every site enrolled."""
    from server.allowlist import AllowList

    root = tmp_path_factory.mktemp("no-held-out")
    allow = AllowList(local["allowlist"])
    (c_dir,) = write_site_data(root / "data", {"c": "ct-abdomen"}, n=10, n_eval=0).values()
    _labelled_volume(root / "vol")
    extra = {
        NO_EVAL_REPORT: (
            "c",
            {"model-path": str(local["model"]), "threads": 1, "data-path": str(c_dir), **REPORT_RELEASE},
        ),
        NO_EVAL_SEG: (
            "vol",
            {
                "model-path": str(local["sam"]),
                "threads": 1,
                "task": "segmentation",
                "seg-dataset": "volumes",
                "seg-test-fraction": "0",
                "data-path": str(root / "vol"),
                **SEG_RELEASE,
            },
        ),
    }
    with flower_task_identity():
        for node, (site, nc) in extra.items():
            nc = {"site-id": site, "site-dir": str(root / "sites" / site), **nc}
            local["nodes"][node] = site_context(node, enrol_keys(root, allow, local["registry"], site, nc))
    rcs = {
        "report-text": {**report_config(local), "k": 1, "eval-strategies": "sim"},
        "segmentation": seg_config(local["registry"], local["sam"], k=1, **{"eval-strategies": "sim"}),
    }
    for i, (family, rc) in enumerate(rcs.items()):
        target, _, no_data = CASES[family]  # the other site stays unenrolled: online, no part of the run
        report = _run(local, 700 + i, {**rc, "mode": "enroll", "sites": f"{target},{no_data}"})
        enrolled = {s for s, r in report["enroll"].items() if r["status"] == "accepted"}
        assert enrolled == {target, no_data}, report["enroll"]
    yield {**local, "rcs": rcs}
    for node in extra:
        del local["nodes"][node]


def _run(t: dict, run_id: int, rc: dict) -> dict:
    report, _ = run_server_app(t["nodes"], run_id, {"allowlist": str(t["allowlist"]), **rc})
    assert report["status"] == "completed", report.get("error")
    return report


CASES = {  # family: (the target, an online site with held-out data that never enrolled, the site without)
    "report-text": ("a", "b", "c"),
    "segmentation": ("RUNMC", "BMC", "vol"),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", list(CASES))
def test_a_clean_evaluation_of_a_subset_has_no_problem_and_a_target_without_data_has(fed, family):
    target, other, no_data = CASES[family]
    base = 710 if family == "report-text" else 720
    rc = {**fed["rcs"][family], "mode": "evaluate"}

    report = _run(fed, base, {**rc, "target": target})
    ev = report["evaluate"]
    assert ev["problems"] == {}, ev["problems"]  # before: every enrolled non-target was a "problem"
    assert ev["skipped"] == {no_data: NOT_A_TARGET} and other not in ev["problems"]
    assert {r["target"] for r in ev["rows"]} == {target}
    assert {r["method"] for r in ev["rows"]} == {"base", "sim", "nearest", "avg", "own"}
    assert summarize(report)["outcome"] == "ok"  # `rpe fed run` exits 0

    # a target that was asked and cannot be evaluated is still a problem, named, and nothing is sent to it
    report = _run(fed, base + 1, {**rc, "target": f"{target},{no_data}"})
    ev = report["evaluate"]
    assert set(ev["problems"]) == {no_data}, ev["problems"]
    assert "holds no held-out evaluation data" in ev["problems"][no_data]
    assert {r["target"] for r in ev["rows"]} == {target} and ev["skipped"] == {}
    verdict = summarize(report)
    assert verdict["outcome"] == "site-failures" and set(verdict["problems"]) == {no_data}  # exit 1

    # no target=: every enrolled site with held-out data; the one without is skipped, not a problem
    report = _run(fed, base + 2, rc)
    ev = report["evaluate"]
    assert ev["problems"] == {} and ev["skipped"] == {no_data: NO_HELD_OUT}
    assert {r["target"] for r in ev["rows"]} == {target}  # the unenrolled site is no target either


def _info(n_eval: int) -> SiteInfo:
    return SiteInfo(site="x", node_id=1, info={"n_eval": n_eval})


def test_the_target_choice():
    sites = {"a": _info(3), "b": _info(2), "c": _info(0)}  # d is enrolled but offline
    enrolled = ["a", "b", "c", "d"]
    assert choose_targets(["a"], enrolled, sites) == (
        ["a"],
        {},
        {"b": NOT_A_TARGET, "c": NOT_A_TARGET, "d": NOT_A_TARGET},
    )
    targets, problems, skipped = choose_targets(["c", "a", "d", "a"], enrolled, sites)
    assert targets == ["a", "d"] and set(problems) == {"c"} and skipped == {"b": NOT_A_TARGET}  # d: named, later
    targets, problems, skipped = choose_targets([], enrolled, sites)
    assert targets == ["a", "b"] and skipped == {"c": NO_HELD_OUT} and set(problems) == {"d"}
    assert "offline" in problems["d"]
