"""A real run of both task families into one registry root (the ServerApp and each site's ClientApp,
in-process): the auditor's tools pointed at the root say yes for every site's untampered replies,
and no, naming family and line, once one family's log is edited. And the tests' toy family (its own
metric) shows up in the console and the audit tools like the real ones.

Every run asks every site ``query.whoami`` first, so a segmentation site answers the report run too
(and a report site the segmentation run): its replies sit in both families' audit logs, and a
cross-check over one family's log alone cannot account for them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.cli import rpe as _rpe
from support.seg import report_config, run_local, seg_config
from support.toy import SITES as TOY_SITES
from support.toy import run as run_toy

from server.coordroot import audit_sources, family_registries
from server.crosscheck import cross_check


@pytest.mark.slow
def test_a_real_two_family_run_verifies_and_cross_checks_on_the_root(local, capsys):
    reg_dir: Path = local["registry"]
    report_rc = report_config(local)
    assert run_local(local, 31, {**report_rc, "mode": "enroll"})["status"] == "completed"
    seg = run_local(local, 32, seg_config(reg_dir, local["sam"], mode="enroll", sites="RUNMC,BMC"))
    assert {s: r["status"] for s, r in seg["enroll"].items()} == {"RUNMC": "accepted", "BMC": "accepted"}
    fams = family_registries(reg_dir)
    assert len(fams) == 2 and not [p for p in reg_dir.rglob("*") if p.is_symlink()]

    code, out = _rpe(capsys, "audit", "verify", "--registry", str(reg_dir))
    assert code == 0 and "every family OK (2 audit logs)" in out, out

    logs = {s.family: s.log for s in audit_sources(registry=reg_dir)}
    sites = local["tmp"] / "sites"
    for site in ("a", "b", "RUNMC", "BMC"):
        egress = sites / site / "egress.jsonl"
        code, out = _rpe(
            capsys, "audit", "cross-check", "--egress", str(egress), "--site", site, "--registry", str(reg_dir)
        )
        assert code == 0 and f"cross-check for site {site}: OK" in out, out
        types = {m["message_type"] for m in cross_check(egress, logs, site).matched}
        assert "query.whoami" in types and "train" in types
        for family, log in logs.items():  # one family's log alone leaves the other run's replies unaccounted
            assert not cross_check(egress, {family: log}, site).ok, (site, family)

    # an edit in the segmentation family's log: verify and RUNMC's cross-check name it
    seg_name, seg_log = next((f, p) for f, p in logs.items() if p.parent != reg_dir)
    text = seg_log.read_text().splitlines()
    i = next(n for n, line in enumerate(text) if '"site":"RUNMC"' in line and "submission.accepted" in line)
    entry = json.loads(text[i])
    text[i] = text[i].replace('"bytes":', '"bytes":1', 1)
    seg_log.write_text("\n".join(text) + "\n")
    code, out = _rpe(capsys, "audit", "verify", "--registry", str(reg_dir))
    assert code == 1 and f"family {seg_name}: {seg_log}: line {i + 1} (seq {entry['seq']}): bad_hash" in out, out
    egress = sites / "RUNMC" / "egress.jsonl"
    code, out = _rpe(
        capsys, "audit", "cross-check", "--egress", str(egress), "--site", "RUNMC", "--registry", str(reg_dir)
    )
    assert code == 1 and "MISMATCH" in out and f"{seg_name}: line {i + 1} (seq {entry['seq']}): bad_hash" in out, out


@pytest.mark.slow
def test_a_toy_family_appears_in_the_tools_with_its_own_metric(toy, capsys):
    """The tests' toy family (one folder, one table line; metric ``accuracy``) after a real enrol and
    evaluate: the console's evaluation page heads its table with the family's own metric title and
    shows results.csv's numbers, and the audit tools cover its registry under the root."""
    import csv

    from starlette.testclient import TestClient

    from common.families import get_family
    from server.console.app import create_app

    sites = ",".join(TOY_SITES)
    assert run_toy(toy, 51, mode="enroll", sites=sites)["status"] == "completed"
    evaluated = run_toy(toy, 52, mode="evaluate", k=2, **{"eval-strategies": "sim"})
    assert evaluated["status"] == "completed", evaluated.get("error")
    root: Path = toy["registry"]
    assert list(family_registries(root)) == ["toy"]

    code, out = _rpe(capsys, "audit", "verify", "--registry", str(root))
    assert code == 0 and f"{root / 'toy' / 'audit.jsonl'}: OK" in out, out
    egress = toy["tmp"] / "sites" / "h1" / "egress.jsonl"
    code, out = _rpe(capsys, "audit", "cross-check", "--egress", str(egress), "--site", "h1", "--registry", str(root))
    assert code == 0 and "cross-check for site h1: OK" in out, out

    with open(evaluated["evaluate"]["outputs"]["csv"], newline="") as fh:
        rows = list(csv.DictReader(fh))
    run_id = Path(evaluated["evaluate"]["outputs"]["csv"]).parent.name
    app = create_app(root)
    try:
        with TestClient(app) as client:
            assert 'data-family="toy"' in client.get("/").text
            runs = client.get("/evaluations").text
            assert f'href="/evaluations/{run_id}?family=toy"' in runs
            page = client.get(f"/evaluations/{run_id}?family=toy").text
    finally:
        for f in app.state.console.families:
            f.registry.close()
    title = get_family("toy").metric_title
    assert f'<span id="eval-metric" data-metric="accuracy">{title}</span>' in page
    assert f'<th class="metric" data-metric="accuracy">{title}</th>' in page
    for r in rows:
        assert f'<td class="num" data-metric="accuracy">{r["accuracy"]}</td>' in page
    sim = [float(r["accuracy"]) for r in rows if r["method"] == "sim" and r["accuracy"]]
    assert f"<b>{float(sum(sim) / len(sim)):.4g}</b>" in page  # the sim column's mean, as the page formats it
