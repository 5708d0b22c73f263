"""The ``update-norm`` record of a ``composition`` audit entry where people look (H2 item 2): the
auditor's ``rpe audit report`` (text and ``--json``) and the console's compositions list and detail
page show the mode and, for ``frobenius``, each retrieved adapter's norm and scale c_i, on both task
families, over the real two-family registry root (``support.two_family``).

A ``frobenius`` composition shows its norms and scales (the recorded ones); a ``none`` one says none
(no scale columns); an entry older than the option says "not recorded", never "none"; a record that is
not what the coordinator writes is shown as not understood.
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

from common.adapters.normalise import describe_record
from server.registry import Registry


def family_dir(root: Path, key: str) -> Path:
    return root / SEG_DIR if key == "seg" else root


def _fmt6(x: float) -> str:
    return f"{x:.6g}"  # the console's number format (server/console/app.py _fmt, 6 digits)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """The two-family root with, per family, a frobenius composition, and one composition entry as it
    was written before the option existed (no ``normalisation``; appended through the real log)."""
    from server.composer import compose_for_target

    tmp = tmp_path_factory.mktemp("update-norm-surfaces")
    built = build(tmp)
    entries: dict[str, dict] = {}
    for key in FAMILIES:
        path = family_dir(built["root"], key)
        with Registry(path, chroma="off") as reg:
            Z = np.stack([r.z for r in reg.list()]).astype(np.float32)
            res = compose_for_target(reg, Z.mean(axis=0), k=3, target=f"fro-{key}", update_norm="frobenius")
            assert res.normalisation["mode"] == "frobenius" and len(res.normalisation["scales"]) == 3
            assert max(res.normalisation["scales"]) / min(res.normalisation["scales"]) > 1.2  # they differ
            log = [json.loads(x) for x in (path / "audit.jsonl").read_text().splitlines()]
            fro = [e for e in log if e["event"] == "composition" and e["target"] == f"fro-{key}"][-1]
            none = [e for e in log if e["event"] == "composition" and e["target"] == f"t-{key}"][-1]
            assert none["normalisation"] == {"mode": "none"}
            old = {k: v for k, v in none.items() if k not in ("seq", "ts", "prev", "hash", "event", "normalisation")}
            older = reg.audit.append("composition", **{**old, "target": f"old-{key}"})
            entries[key] = {"fro": fro, "none": none, "old": older}
    return {**built, "tmp": tmp, "entries": entries}


def family_names(root: Path) -> dict[str, str]:
    """``{FAMILIES key: the family's name}`` as the auditor's commands and the console label them."""
    from server.coordroot import family_registries

    where = {d.resolve(): name for name, d in family_registries(root).items()}
    return {key: where[family_dir(root, key).resolve()] for key in FAMILIES}


def _report_part(text: str, family: str, seq: int) -> str:
    """The lines of one composition of one family in ``rpe audit report``'s text."""
    section = text.split(f"== family {family} ==")[1].split("\n== family ")[0]
    part = section.split(f"composition seq {seq} for ")[1]
    return part.split("\ncomposition seq ")[0].split("\nembedding queries")[0]


@pytest.mark.parametrize("key", list(FAMILIES))
def test_audit_report_shows_mode_norms_and_scales(capsys, tree, key):
    root = tree["root"]
    family = family_names(root)[key]
    code, text, err = rpe(capsys, "audit", "report", "--registry", str(root))
    assert code == 0, err
    fro, none, old = (tree["entries"][key][k] for k in ("fro", "none", "old"))
    norm = fro["normalisation"]
    part = _report_part(text, family, fro["seq"])
    assert (
        "update-norm frobenius: each retrieved update s·B·A rescaled by c_i to the median total norm "
        f"‖δ‖_F = {norm['reference']:.4g}"
    ) in part
    for rid, n, c in zip(fro["retrieved"], norm["norms"], norm["scales"], strict=True):
        line = part.split(f"\n  {rid}: weight ")[1].split("\n")[0]
        assert f"norm {n:.4g}, scale {c:.4g}, blob " in line
    part = _report_part(text, family, none["seq"])
    assert "update-norm none (the strategy's weights as they are)" in part and "scale " not in part
    part = _report_part(text, family, old["seq"])
    assert "update-norm not recorded (an entry older than the option)" in part and "update-norm none" not in part

    code, out, _ = rpe(capsys, "audit", "report", "--registry", str(root), "--json")
    assert code == 0
    comps = {c["seq"]: c for c in json.loads(out)["families"][family]["compositions"]}
    assert comps[fro["seq"]]["normalisation"] == norm  # exactly what the entry recorded
    assert comps[none["seq"]]["normalisation"] == {"mode": "none"}
    assert comps[old["seq"]]["normalisation"] is None


def test_the_console_shows_mode_norms_and_scales_for_both_families(tree, tmp_path):
    from starlette.testclient import TestClient

    from server.console.app import create_app

    root = tmp_path / "root"
    shutil.copytree(tree["root"], root, symlinks=True, ignore=shutil.ignore_patterns(".lock"))
    app = create_app(root)
    fams = app.state.console.families
    by_name = {name: key for key, name in family_names(tree["root"]).items()}
    try:
        with TestClient(app) as client:
            listing = client.get("/compositions").text
            seen = set()
            for f in fams:
                key = by_name[f.name]
                seen.add(key)
                for which, mode in (("fro", "frobenius"), ("none", "none"), ("old", "")):
                    e = tree["entries"][key][which]
                    row = listing.split(f'data-seq="{e["seq"]}" data-family="{f.name}"')[1].split("</tr>")[0]
                    cell = row.split('class="update-norm"')[1].split("</td>")[0]
                    assert f'data-mode="{mode}"' in cell and (mode or "not recorded") in cell
                    page = client.get(f"/compositions/{e['seq']}?family={f.name}")
                    assert page.status_code == 200
                    shown = page.text.split('id="comp-update-norm"')[1].split("</td>")[0]
                    assert f'data-mode="{mode}"' in shown
                    assert describe_record(e.get("normalisation"), len(e["retrieved"]))["text"] in html.unescape(shown)
                    table = page.text.split('id="retrieved"')[1].split("</table>")[0]
                    assert ("scale c_i" in table) is (mode == "frobenius")
                    if mode != "frobenius":
                        assert 'class="num scale"' not in table
                        continue
                    norm = e["normalisation"]
                    for rid, n, c in zip(e["retrieved"], norm["norms"], norm["scales"], strict=True):
                        tr = table.split(f'data-id="{rid}"')[1].split("</tr>")[0]
                        assert f'<td class="num update-norm">{_fmt6(n)}</td>' in tr
                        assert f'<td class="num scale">{_fmt6(c)}</td>' in tr
            assert seen == set(FAMILIES)
    finally:
        for f in fams:
            if f.registry is not None:
                f.registry.close()


def test_a_record_that_is_not_the_coordinators_is_never_shown_as_clean():
    ok = {"mode": "frobenius", "reference": 2.0, "norms": [1.0, 4.0], "scales": [2.0, 0.5]}
    view = describe_record(ok, 2)
    assert view["mode"] == "frobenius" and view["rows"] == [{"norm": 1.0, "scale": 2.0}, {"norm": 4.0, "scale": 0.5}]
    assert describe_record({"mode": "none"}, 2)["text"].startswith("update-norm none")
    assert describe_record(None, 2)["text"].startswith("update-norm not recorded")
    for bad in (
        {"mode": "none", "scales": [3.0, 1.0]},  # scales under a "none" label
        {"mode": "l2", "reference": 1.0, "norms": [1.0, 1.0], "scales": [1.0, 1.0]},
        {**ok, "scales": [1.0]},  # one scale for two adapters
        {**ok, "norms": "many"},
        "frobenius",
        [],
    ):
        view = describe_record(bad, 2)
        assert view["text"].startswith("update-norm record not understood"), bad
        assert all(r == {"norm": None, "scale": None} for r in view["rows"])
    assert describe_record({**ok, "scales": [float("nan"), "x"]}, 2)["rows"][0]["scale"] is None
