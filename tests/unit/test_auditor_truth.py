"""Issue 26, class 1: the auditor's tools tell the truth.

A real run of both families (the ServerApp and every site's ClientApp, in-process, into one
registry root: enrolment, a delivered composition, a leave-one-site-out evaluation) → ``rpe audit
verify``, ``rpe audit cross-check`` for every site and the signed report all say OK. Then, on a
copy of the root each, every kind of damage — an edited record, an edited columns.snap, a
truncated log, an edited audit line, a forged composition (with a valid, re-chained hash) — and
each tool says no and names it. The console's side of the same runs in the real browser
(``tests/integration/test_console_truth.py``).
"""

from __future__ import annotations

import json

import pytest
from support.auditor import DAMAGE, SITES, _copy, _cross, _export, _report_log, _rpe, _verify
from support.grid import QueueGrid

from common.protocol import wire
from server.audit import AuditLog
from server.coordroot import family_registries
from server.crosscheck import cross_check
from server.messaging import exchange, request

pytestmark = pytest.mark.usefixtures("task_identity")  # as when the fixture was autouse here


@pytest.mark.slow
def test_a_clean_two_family_run_is_ok_in_every_tool(clean, capsys, tmp_path):
    root = clean["root"]
    assert len(family_registries(root)) == 2
    code, out = _verify(capsys, root)
    assert code == 0 and "every family OK (2 audit logs)" in out, out
    for site in SITES:
        code, out = _cross(capsys, root, site, clean["egress"][site])
        assert code == 0 and f"cross-check for site {site}: OK" in out and "0 unexplained" in out, out
    code, out = _rpe(capsys, "audit", "report", "--registry", str(root))
    assert code == 0
    report_part = out.split("== family ")[1]
    assert "registry: 2 added, 0 removed" in report_part, report_part  # a and b enrolled
    assert "compositions delivered to a site: 1" in report_part, report_part
    seg_part = out.split("== family ")[2]
    assert "registry: 2 added, 0 removed" in seg_part and "evaluation compositions" in seg_part, seg_part
    assert "compositions delivered to a site" not in seg_part, seg_part  # evaluation arms are no deliveries
    _, body = _export(capsys, root, clean, tmp_path / "report.json")
    assert body["body"]["ok"] is True and set(body["body"]["cross_checks"]) == set(SITES)
    html = tmp_path / "report.html"
    _export(capsys, root, clean, html)
    assert "every check OK" in html.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_each_kind_of_damage_is_named_by_verify_cross_check_and_the_report(kind, clean, capsys, tmp_path):
    root, logs = _copy(clean, tmp_path)
    name = DAMAGE[kind](root, logs)
    code, out = _verify(capsys, root)
    assert code == 1 and name in out and "PROBLEMS in" in out, out
    for site in ("a", "RUNMC"):
        code, out = _cross(capsys, root, site, clean["egress"][site])
        assert code == 1 and "MISMATCH" in out and name in out, out
    out_file = tmp_path / "report.json"
    _, doc = _export(capsys, root, clean, out_file)
    assert doc["body"]["ok"] is False
    assert any(name in f for fam in doc["body"]["verify"] for f in fam["findings"]), doc["body"]["verify"]


@pytest.mark.slow
def test_a_truncated_log_is_named_as_truncation(clean, capsys, tmp_path):
    root, logs = _copy(clean, tmp_path)
    log = _report_log(logs, root)
    family = next(f for f, p in logs.items() if p == log)
    anchor = clean["heads"][family]
    lines = log.read_text().splitlines()
    cut = next(n for n in range(len(lines) - 1, 0, -1) if '"event":"composition"' in lines[n])
    log.write_text("\n".join(lines[:cut]) + "\n")  # whole lines cut: the chain itself still holds
    code, out = _verify(capsys, root, "--anchor", f"{anchor['seq']}:{anchor['line_sha256']}")
    assert code == 1 and "anchor_mismatch" in out and "truncated" in out, out
    code, out = _cross(capsys, root, "a", clean["egress"]["a"])
    assert code == 1 and "TRUNCATED: the coordinator's audit log ends" in out, out


def test_a_probe_answered_after_the_main_reply_is_expected_not_a_mismatch(tmp_path, task_identity):
    """The site is busy with ``query.embed``; the coordinator's liveness probe is queued behind it and
    answered after the main reply, when the coordinator has stopped waiting. The probe was audited
    when sent, so the site's whoami line is expected; without that entry it would be unexplained."""
    from client.egress import EgressLog

    reqs = [request("a", 7, wire.EMBED, {"task": "reports", "embed_layer": -1})]
    grid = QueueGrid({wire.EMBED: 1.2, wire.WHOAMI: 0.8}, set(), {r.nonce: r.key for r in reqs})
    audit = AuditLog(tmp_path / "audit.jsonl")
    out = exchange(grid, reqs, timeout=30.0, poll_s=0.05, probe_after=0.3, audit=audit, run_id="9")
    assert out["a"].ok
    sent = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    probes = [e for e in sent if e["event"] == "probe.sent"]
    assert probes and not [e for e in sent if e["event"] == "probe.answered"]
    from common.trust.digests import record_digests

    egress = EgressLog(tmp_path / "egress.jsonl", full_records=("whoami",))
    main_reply = {"meta": {"site": "a"}}
    egress.record("query.embed", main_reply, run_id="9", extra={"nonce": reqs[0].nonce})
    audit.append(
        "query.embedding",
        site="a",
        z_sha256="0" * 64,
        run_id="9",
        nonce=reqs[0].nonce,
        message_type=wire.EMBED,
        record_digests=record_digests(main_reply),
    )
    egress.record("query.whoami", {"whoami": {"site": "a", "nonce": probes[0]["nonce"]}}, run_id="9")
    rep = cross_check(egress.path, tmp_path / "audit.jsonl", "a")
    assert rep.ok and len(rep.expected) == 1 and "liveness probe" in rep.format(), rep.format()
    egress.record("query.whoami", {"whoami": {"site": "a", "nonce": "not-a-probe"}}, run_id="9")
    rep = cross_check(egress.path, tmp_path / "audit.jsonl", "a")
    assert not rep.ok and rep.unexplained == 1, rep.format()


@pytest.mark.parametrize("style", ["claimed_site", "old-site-field"])
def test_an_impostors_refused_claim_does_not_fail_the_genuine_sites_cross_check(tmp_path, style):
    """Node 99 claims to be site a and is refused. The genuine site's cross-check lists the refusal as
    expected (an impostor), never as a mismatch; a log written before the fix (refusal under
    ``site``) is read the same way. A refusal of the site's own reply still matches its egress line."""
    from client.egress import EgressLog

    audit = AuditLog(tmp_path / "audit.jsonl")
    who = {"site": None, "claimed_site": "a"} if style == "claimed_site" else {"site": "a"}
    audit.append(
        "identity.refused",
        **who,
        node_id="99",
        reason="signed by another key",
        run_id="5",
        nonce="n-imp",
        message_type=wire.WHOAMI,
        record_digests={"whoami": "ab" * 32},
    )
    egress = EgressLog(tmp_path / "egress.jsonl", full_records=("whoami",))
    egress.record("query.whoami", {"whoami": {"site": "a", "nonce": "n-own"}}, run_id="5")
    from common.trust.digests import record_digests

    audit.append(
        "identity.verified",
        site="a",
        node_id="7",
        run_id="5",
        nonce="n-own",
        message_type=wire.WHOAMI,
        record_digests=record_digests({"whoami": {"site": "a", "nonce": "n-own"}}),
    )
    rep = cross_check(egress.path, tmp_path / "audit.jsonl", "a")
    assert rep.ok, rep.format()
    assert len(rep.expected) == 1 and "node 99 claimed to be a and was refused" in rep.format()


@pytest.mark.parametrize("fmt", ["json", "html"])
def test_check_report_refuses_an_altered_or_foreign_report(fmt, tmp_path, capsys):
    """A signed report whose verdict was turned from PROBLEMS to OK, or one signed by another key, is
    NOT GENUINE (exit 1); the untouched one is accepted offline with the public key alone."""
    from common.trust.signing import generate_keypair, load_private_key
    from server import auditsign

    key_file, pub = generate_keypair(tmp_path / "k", "coordinator")
    _, other_pub = generate_keypair(tmp_path / "other", "coordinator")
    body = {
        "created": "2026-12-07T00:00:00Z",
        "root": "/r",
        "ok": False,
        "verify": [],
        "report": {},
        "cross_checks": {},
    }
    doc = auditsign.sign(load_private_key(key_file), body)
    out = auditsign.write(doc, tmp_path / f"report.{fmt}")
    code, text = _rpe(capsys, "audit", "check-report", str(out), "--key", str(pub))
    assert code == 0 and "signature OK" in text and "PROBLEMS FOUND" in text, text
    code, text = _rpe(capsys, "audit", "check-report", str(out), "--key", str(other_pub))
    assert code == 1 and "NOT GENUINE" in text and "not the given key" in text, text
    raw = out.read_text()
    forged = (
        raw.replace('"ok": false', '"ok": true')
        if fmt == "json"
        else raw.replace("&quot;ok&quot;: false", "&quot;ok&quot;: true")
    )
    assert forged != raw
    out.write_text(forged)
    code, text = _rpe(capsys, "audit", "check-report", str(out), "--key", str(pub))
    assert code == 1 and "NOT GENUINE" in text and "altered" in text, text
