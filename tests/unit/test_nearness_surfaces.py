"""The "nothing close enough" warning where the coordinator operator looks (issue 28 item 3):
local ``rpe compose`` (text and ``--json``) and the console's compositions list and detail page,
on both task families, over the real two-family registry root (``support.two_family``).

A target whose z lies far outside the library is warned (the adapter is still written); a target
inside the library's spread is not; ``--far-ratio 0`` turns the check off; bad ``--far-ratio`` is
refused before anything is written. The console shows exactly what each audit entry recorded.
"""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from support.cli import rpe_run as rpe
from support.two_family import FAMILIES, SEG_DIR, build

from server.nearness import DEFAULT_FAR_RATIO, WARNING, FarRatioError, check_far_ratio, summary
from server.registry import Registry

#: per family: the near target's z is a library site's z plus this; the far one the library's mean
#: plus FAR along one axis (the library's own sites are ~3·sqrt(2·dim) apart)
NEAR, FAR = 0.05, 400.0


def test_the_threshold_is_a_finite_number_not_below_zero():
    assert check_far_ratio("1.5") == 1.5 and check_far_ratio(0) == 0.0 and check_far_ratio(2) == 2.0
    for bad in (-1, "-0.5", "nan", float("inf"), "inf", "many", "", None, True):
        with pytest.raises(FarRatioError, match=r"far-ratio must be a finite number >= 0 \(0 turns the check off"):
            check_far_ratio(bad)


def family_dir(root: Path, key: str) -> Path:
    return root / SEG_DIR if key == "seg" else root


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """The two-family root plus, per family, a near and a far target's z file."""
    tmp = tmp_path_factory.mktemp("nearness")
    built = build(tmp)
    zs: dict[str, dict[str, Path]] = {}
    for key in FAMILIES:
        with Registry(family_dir(built["root"], key), read_only=True) as reg:
            Z = np.stack([r.z for r in reg.list()]).astype(np.float64)
        far = Z.mean(axis=0)
        far[0] += FAR
        zs[key] = {"near": tmp / f"{key}-near.npy", "far": tmp / f"{key}-far.npy"}
        np.save(zs[key]["near"], (Z[1] + NEAR).astype(np.float32))
        np.save(zs[key]["far"], far.astype(np.float32))
    return {**built, "tmp": tmp, "z": zs}


def compose(capsys, tree, key: str, which: str, *extra: str, target: str = "") -> tuple[int, str, str]:
    root = tree["root"]
    out = tree["tmp"] / f"out-{key}-{which}-{len(extra)}"
    return rpe(
        capsys,
        "compose",
        "--registry",
        str(family_dir(root, key)),
        "--embedding",
        str(tree["z"][key][which]),
        "--k",
        "2",
        "--target",
        target or f"{which}-{key}",
        "--out",
        str(out),
        "--force",
        *extra,
    )


def last_composition(reg_dir: Path) -> dict:
    entries = [json.loads(x) for x in (reg_dir / "audit.jsonl").read_text().splitlines()]
    return [e for e in entries if e["event"] == "composition"][-1]


@pytest.mark.parametrize("key", list(FAMILIES))
def test_local_compose_prints_the_warning_for_a_far_target_only(capsys, tree, key):
    code, out, _ = compose(capsys, tree, key, "far")
    assert code == 0  # warned, but written: the operator decides
    line = [x for x in out.splitlines() if x.startswith("WARNING")]
    assert line == [line[0]] and line[0].startswith(f"WARNING {WARNING}: the nearest adapter is ")
    assert f"far-ratio {DEFAULT_FAR_RATIO:g}" in line[0] and "no gain over the base model" in line[0]
    assert "composed adapter written to" in out
    entry = last_composition(family_dir(tree["root"], key))
    assert entry["target"] == f"far-{key}" and entry["nearness"]["warning"] == WARNING

    code, out, _ = compose(capsys, tree, key, "near")
    assert code == 0 and "WARNING" not in out and "nothing close enough" not in out
    assert "no warning" in out and f"(far-ratio {DEFAULT_FAR_RATIO:g})" in out
    assert last_composition(family_dir(tree["root"], key))["nearness"]["warning"] is None


@pytest.mark.parametrize("key", list(FAMILIES))
def test_local_compose_json_carries_the_check_as_the_audit_entry_does(capsys, tree, key):
    for which, warned in (("far", True), ("near", False)):
        code, out, _ = compose(capsys, tree, key, which, "--json")
        assert code == 0
        res = json.loads(out)
        check = res["nearness"]
        assert (check["warning"] == WARNING) is warned and check["threshold"] == DEFAULT_FAR_RATIO
        assert (check["ratio"] > DEFAULT_FAR_RATIO) is warned
        assert check["nearest_distance"] == pytest.approx(min(r["distance"] for r in res["retrieved"]))
        assert last_composition(family_dir(tree["root"], key))["nearness"] == check

    code, out, _ = compose(capsys, tree, key, "far", "--json", "--far-ratio", "0")
    check = json.loads(out)["nearness"]
    assert code == 0 and check["warning"] is None and check["ratio"] is None and "off" in check["reason"]
    code, out, _ = compose(capsys, tree, key, "far", "--far-ratio", "1e9")
    assert code == 0 and "WARNING" not in out and "far-ratio 1e+09): no warning" in out


@pytest.mark.parametrize("bad", ["-1", "nan", "inf", "many"])
def test_a_bad_far_ratio_is_refused_and_changes_nothing(capsys, tree, bad):
    """Before any work: no adapter written, no audit entry (``inf`` once composed, wrote the adapter
    and then failed on the audit append, which cannot hold an infinity)."""
    reg_dir = family_dir(tree["root"], "report")
    before = (reg_dir / "audit.jsonl").read_bytes()
    out_dir = tree["tmp"] / f"refused-{bad}"
    code, out, err = rpe(
        capsys,
        *("compose", "--registry", str(reg_dir), "--embedding", str(tree["z"]["report"]["far"])),
        *("--k", "2", "--out", str(out_dir), f"--far-ratio={bad}"),
    )
    assert code == 2 and "far-ratio" in err and "Traceback" not in err and out == ""
    assert (reg_dir / "audit.jsonl").read_bytes() == before and not out_dir.exists()


def test_the_composer_refuses_a_bad_far_ratio_before_any_work(tree):
    from server.composer import CompositionError, compose_for_target

    reg_dir = family_dir(tree["root"], "seg")
    before = (reg_dir / "audit.jsonl").read_bytes()
    out_dir = tree["tmp"] / "composer-refused"
    with Registry(reg_dir, chroma="off") as reg:
        for bad in (float("inf"), float("nan"), -1.0):
            with pytest.raises(CompositionError, match="far-ratio must be a finite number >= 0"):
                compose_for_target(reg, np.load(tree["z"]["seg"]["far"]), k=2, out_dir=out_dir, far_ratio=bad)
    assert (reg_dir / "audit.jsonl").read_bytes() == before and not out_dir.exists()


@pytest.mark.parametrize("bad", ["-1", "nan", "inf"])
def test_a_bad_far_ratio_in_a_run_config_is_refused_before_the_run(bad):
    """``rpe fed run compose far-ratio=...`` refuses it before submitting (exit 2, CliError), and the
    ServerApp's settings refuse it too (a run submitted with flwr directly)."""
    from common.cli_base import CliError
    from deploy import fed
    from server.settings import Settings, SettingsError

    with pytest.raises(CliError, match="far-ratio must be a finite number >= 0"):
        fed.run_config("compose", ["target=a", f"far-ratio={bad}"], fed.APP_DIR)
    with pytest.raises(SettingsError, match="far-ratio must be a finite number >= 0"):
        Settings.from_run_config({"far-ratio": bad, "registry-dir": "/x"})
    assert fed.run_config("compose", ["target=a", "far-ratio=0"], fed.APP_DIR)["far-ratio"] == 0.0


def test_the_console_shows_each_compositions_check_for_both_families(capsys, tree, tmp_path):
    """After a far and a near composition per family, the compositions list marks exactly the far
    ones, and each detail page shows the check its audit entry recorded (warning box or none)."""
    from starlette.testclient import TestClient

    from server.console import views
    from server.console.app import create_app

    for key in FAMILIES:
        for which in ("far", "near"):
            assert compose(capsys, tree, key, which, target=f"console-{which}-{key}")[0] == 0
    root = tmp_path / "root"
    shutil.copytree(tree["root"], root, symlinks=True, ignore=shutil.ignore_patterns(".lock"))
    app = create_app(root)
    fams = app.state.console.families
    try:
        comps = views.compositions(fams)
        assert {c["family"] for c in comps} == {f.name for f in fams}
        with TestClient(app) as client:
            listing = client.get("/compositions").text
            for c in comps:
                detail = client.get(f"/compositions/{c['seq']}?family={c['family']}")
                assert detail.status_code == 200
                row = listing.split(f'data-seq="{c["seq"]}" data-family="{c["family"]}"')[1].split("</tr>")[0]
                warned = bool((c["nearness"] or {}).get("warning"))  # what the audit entry recorded
                if c["target"].startswith("console-"):
                    assert warned is c["target"].startswith("console-far-"), c
                assert ("⚠ nothing close enough" in row) is warned, row
                assert ('id="composition-nearness-warning"' in detail.text) is warned
                shown = detail.text.split('id="comp-nearness"')[1].split("</td>")[0]
                assert f'data-warning="{WARNING if warned else ""}"' in shown
                assert summary(c["nearness"]) in html.unescape(shown)  # the line `rpe compose` prints
                assert ("no warning" in shown) is (not warned and c["nearness"]["ratio"] is not None)
                if warned:
                    assert c["nearness"]["reason"] in html.unescape(detail.text)
        ours = [c for c in comps if c["target"].startswith("console-")]
        assert sorted((c["family"], bool(c["nearness"]["warning"])) for c in ours) == sorted(
            (f.name, w) for f in fams for w in (True, False)
        )  # both families show a warned and a clean composition
    finally:
        for f in fams:
            if f.registry is not None:
                f.registry.close()


def test_the_console_says_when_an_entry_is_older_than_the_check(tree, tmp_path):
    """A composition entry as the coordinator wrote it before the check existed (no ``nearness``,
    appended through the real audit log, chain intact): the pages say "not recorded", never "no warning"."""
    from starlette.testclient import TestClient

    from server.console.app import create_app

    root = tmp_path / "root"
    shutil.copytree(tree["root"], root, symlinks=True, ignore=shutil.ignore_patterns(".lock"))
    with Registry(root, chroma="off") as reg:
        prev = last_composition(root)
        old = {k: v for k, v in prev.items() if k not in ("seq", "ts", "prev", "hash", "event", "nearness")}
        entry = reg.audit.append("composition", **{**old, "target": "before-the-check"})
    app = create_app(root)
    fams = app.state.console.families
    try:
        with TestClient(app) as client:
            listing = client.get("/compositions").text
            detail = client.get(f"/compositions/{entry['seq']}?family={fams[0].name}").text
        row = listing.split(f'data-seq="{entry["seq"]}" data-family="{fams[0].name}"')[1].split("</tr>")[0]
        assert "not recorded" in row and "⚠" not in row
        assert "not recorded (an entry older than the check)" in detail and "no warning" not in detail
        assert 'id="composition-nearness-warning"' not in detail
    finally:
        for f in fams:
            if f.registry is not None:
                f.registry.close()
