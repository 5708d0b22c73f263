"""A real run of both task families into one registry root (the ServerApp and each site's ClientApp,
in-process): the auditor's tools pointed at the root say yes for every site's untampered replies,
and no, naming family and line, once one family's log is edited.

Every run asks every site ``query.whoami`` first, so a segmentation site answers the report run too
(and a report site the segmentation run): its replies sit in both families' audit logs, and a
cross-check over one family's log alone cannot account for them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_seg_federation import local, run_local, seg_config, tiny_sam_dir  # noqa: F401 - fixtures

from deploy.cli import main
from server.coordroot import audit_sources, family_registries
from server.crosscheck import cross_check


def _rpe(capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    try:
        main(list(argv))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().out


@pytest.mark.slow
def test_a_real_two_family_run_verifies_and_cross_checks_on_the_root(local, capsys):  # noqa: F811
    reg_dir: Path = local["registry"]
    report_rc = {
        "registry-dir": str(reg_dir),
        "base-model": str(local["model"]),
        "chroma": "off",
        "steps": 2,
        "lora-r": 4,
        "lora-alpha": 8.0,
        "max-length": 128,
        "max-eval": 2,
        "sites": "a,b",
    }
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
