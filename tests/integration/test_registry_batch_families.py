"""Issue 29: the enrolment round of BOTH task families is stored as one registry commit
(``server/modes/enroll.py`` -> ``Registry.add_submissions``), through the real ServerApp and the
real ClientApp handlers over the in-process grid (``support.seg.local``): one fsync of the
family's records.jsonl and one of its audit.jsonl for the whole round, one ``submission.accepted``
entry per site with the wire fields (run, nonce, record digests), consecutive in the audit chain
(written by one append), the tombstones of the adapters they supersede in the same commit.
The measured round is a re-enrolment (the first round creates the registry). ``os.fsync`` is wrapped to count by path. Rejections inside a batch:
``test_registry_batch.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from support.seg import SEG_SITES, report_config, run_local, seg_config

#: in-process (no real processes), but the two-family federation fixture and four training rounds take
#: 30-85 s on two shared cores: kept out of the fast loop (tests/README.md), run by the full suite
pytestmark = [pytest.mark.integration, pytest.mark.slow]

FAMILIES = ("report-text", "segmentation")


def _setup(local: dict, family: str) -> tuple[dict, Path, list[str]]:
    if family == "report-text":
        return report_config(local), local["registry"], ["a", "b"]
    return seg_config(local["registry"], local["sam"]), local["registry"] / "segmentation", list(SEG_SITES[:2])


@pytest.mark.parametrize("family", FAMILIES)
def test_an_enrolment_round_is_one_commit_on_both_families(local, family, monkeypatch):
    from server.registry import Registry

    rc, reg_dir, sites = _setup(local, family)
    run = 700 if family == "report-text" else 800
    first = run_local(local, run, {**rc, "mode": "enroll", "sites": ",".join(sites)})  # creates the registry
    assert {s: r["status"] for s, r in first["enroll"].items()} == dict.fromkeys(sites, "accepted"), first["enroll"]
    run += 1  # the round measured: every site enrols again (another seed) and supersedes its first adapter
    audit_path = reg_dir / "audit.jsonl"
    n_before = len(audit_path.read_text().splitlines()) if audit_path.exists() else 0
    synced: list[str] = []
    real = os.fsync

    def counting(fd: int) -> None:
        try:
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
        real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    report = run_local(local, run, {**rc, "mode": "enroll", "sites": ",".join(sites), "seed": 7})
    monkeypatch.undo()
    assert {s: r["status"] for s, r in report["enroll"].items()} == dict.fromkeys(sites, "accepted"), report["enroll"]
    records, audit = str(reg_dir.resolve() / "records.jsonl"), str(reg_dir.resolve() / "audit.jsonl")
    # one commit for the round: records.jsonl once; audit.jsonl once for the round's entries
    # (plus the run's own entries around it: start, discovery, end)
    assert synced.count(records) == 1, synced.count(records)
    entries = [json.loads(x) for x in (reg_dir / "audit.jsonl").read_text().splitlines()]
    acc = [e for e in entries if e["event"] == "submission.accepted" and e.get("run_id") == str(run)]
    assert sorted(e["site"] for e in acc) == sorted(sites)
    assert [e["seq"] for e in acc] == list(range(acc[0]["seq"], acc[0]["seq"] + len(sites)))  # one append
    assert all(e["nonce"] and e["record_digests"] and e["line_sha256"] for e in acc)
    assert [r["superseded"] for r in (report["enroll"][s] for s in sites)] == [
        [first["enroll"][s]["record_id"]] for s in sites
    ]  # the tombstones are part of the same records.jsonl append
    new_entries = len(entries) - n_before  # one fsync each, but the round's accepted entries share one
    assert synced.count(audit) <= new_entries - (len(sites) - 1), (synced.count(audit), new_entries)
    with Registry(reg_dir, chroma="off") as reg:
        assert reg.verify() == []
        assert {r.meta.site for r in reg.list()} >= set(sites)
