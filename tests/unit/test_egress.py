"""Site egress log, the shared record digests, and the egress ↔ audit cross-check."""

from __future__ import annotations

import json

import numpy as np
import pytest

from client.egress import EgressLog
from common.protocol.egress import MAX_LOGGED_STR, read_egress
from common.trust.digests import array_sha256, record_digest, record_digests, z_sha256
from server.audit import AuditLog
from server.crosscheck import cross_check

ENROLMENT = ("train",)  # these tests pin down the enrolment matching


def _adapter_record(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "base_model.model.layers.0.q_proj.lora_A.weight": rng.normal(size=(4, 16)).astype(np.float32),
        "base_model.model.layers.0.q_proj.lora_B.weight": rng.normal(size=(16, 4)).astype(np.float32),
    }


def _reply(seed: int = 0, n_examples: int = 120) -> dict[str, dict]:
    rng = np.random.default_rng(100 + seed)
    return {
        "adapter": _adapter_record(seed),
        "z": {"z": rng.normal(size=32).astype(np.float32)},
        "metadata": {"task": "report-gen", "modality": "xray", "n_examples": n_examples, "lora_alpha": 16.0},
        "metrics": {"train_loss": 1.25, "steps": 50},
    }


# --------------------------------------------------------------------------------------------
# digests


def test_array_hash_is_little_endian_c_contiguous():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert array_sha256(a) == array_sha256(a.astype(">f4"))  # byte order does not matter
    assert array_sha256(np.asfortranarray(a)) == array_sha256(a)  # memory layout does not matter
    assert array_sha256(a.T) != array_sha256(a)  # but the logical C order does
    assert z_sha256(np.ones(4)) == z_sha256(np.ones(4, dtype=np.float32))  # z is hashed as float32


def test_record_digest_pins_every_value_but_not_the_kind():
    rec = _reply()["adapter"]
    d = record_digest(rec)
    assert d == record_digest(dict(reversed(list(rec.items()))))  # key order irrelevant
    bumped = {k: v.copy() for k, v in rec.items()}
    first = next(iter(bumped))
    bumped[first][0, 0] = np.nextafter(bumped[first][0, 0], np.float32(10))
    assert record_digest(bumped) != d
    assert record_digest({k: v.reshape(-1) for k, v in rec.items()}) != d  # shape is hashed
    assert record_digest({k: v.astype(np.float64) for k, v in rec.items()}) != d  # dtype is hashed
    cfg = {"a": 1, "b": 1.0, "c": True, "d": "x", "e": b"\x00", "f": [1, 2]}
    assert record_digest(cfg) != record_digest({**cfg, "a": 1.0})  # int vs float
    assert record_digest(cfg) != record_digest({**cfg, "c": 1})  # bool vs int
    assert record_digest({"x": float("nan")}) == record_digest({"x": float("nan")})  # NaN-safe
    with pytest.raises(TypeError, match="unsupported record value"):
        record_digest({"x": object()})


def test_flower_records_digest_like_plain_dicts():
    flwr_app = pytest.importorskip("flwr.app")
    reply = _reply()
    arrays = flwr_app.ArrayRecord({k: flwr_app.Array(v) for k, v in reply["adapter"].items()})
    config = flwr_app.ConfigRecord(reply["metadata"])
    metrics = flwr_app.MetricRecord(reply["metrics"])
    assert record_digest(arrays) == record_digest(reply["adapter"])
    assert record_digest(config) == record_digest(reply["metadata"])
    assert record_digest(metrics) == record_digest(reply["metrics"])
    # the coordinator's side: what it received, converted back to numpy
    received = {k: arrays[k].numpy() for k in arrays}
    assert record_digest(received) == record_digest(arrays)


# --------------------------------------------------------------------------------------------
# egress log


def test_egress_line_format(tmp_path):
    log = EgressLog(tmp_path / "site" / "egress.jsonl")
    reply = _reply()
    long_text = "x" * (MAX_LOGGED_STR + 1)
    reply["metadata"]["description"] = long_text  # metadata is logged in full...
    reply["notes"] = {"free_text": long_text, "blob": b"\x01\x02"}  # ...other long strings are not
    entry = log.record("train", reply, run_id="run-1", extra={"blob_sha256": "ab" * 32})
    ((lineno, on_disk),) = read_egress(log.path)[0]
    assert lineno == 1 and on_disk == entry
    assert entry["message_type"] == "train" and entry["run_id"] == "run-1" and entry["v"] == 1
    assert entry["extra"] == {"blob_sha256": "ab" * 32}
    recs = {r["name"]: r for r in entry["records"]}
    assert [r["name"] for r in entry["records"]] == ["adapter", "z", "metadata", "metrics", "notes"]
    assert {n: r["kind"] for n, r in recs.items()} == {
        "adapter": "arrays",
        "z": "arrays",
        "metadata": "config",
        "metrics": "metrics",
        "notes": "config",
    }
    a = recs["adapter"]
    assert a["bytes"] == 2 * 4 * 16 * 4
    item = a["items"][0]
    key = sorted(reply["adapter"])[0]
    assert item == {
        "key": key,
        "dtype": "float32",
        "shape": [4, 16],
        "bytes": 256,
        "sha256": array_sha256(reply["adapter"][key]),
    }
    for name, rec in reply.items():
        assert recs[name]["sha256"] == record_digest(rec)
    meta = {i["key"]: i for i in recs["metadata"]["items"]}
    assert meta["task"]["value"] == "report-gen" and meta["task"]["type"] == "str"
    assert meta["n_examples"] == {"key": "n_examples", "type": "int", "bytes": 8, "value": 120}
    assert meta["description"]["value"] == long_text
    notes = {i["key"]: i for i in recs["notes"]["items"]}
    assert "value" not in notes["free_text"] and notes["free_text"]["len"] == len(long_text)
    assert "value" not in notes["blob"] and notes["blob"]["len"] == 2
    assert entry["total_bytes"] == sum(r["bytes"] for r in entry["records"])
    # array contents never appear in the log
    assert "0.1" not in json.dumps(recs["adapter"])


def test_egress_appends_and_reports_damaged_lines(tmp_path):
    log = EgressLog(tmp_path / "egress.jsonl")
    log.record("query.whoami", {"info": {"site": "s1"}})
    log.record("train", _reply(), run_id="r", kinds={"metrics": "config"})
    with open(log.path, "ab") as fh:
        fh.write(b'{"v":1,"ts"')  # torn last line
    entries, bad = read_egress(log.path)
    assert [n for n, _ in entries] == [1, 2] and bad == [3]
    assert {r["name"]: r["kind"] for r in entries[1][1]["records"]}["metrics"] == "config"
    with pytest.raises(ValueError, match="kind must be one of"):
        log.record("train", _reply(), kinds={"adapter": "weights"})
    with pytest.raises(ValueError, match="message_type"):
        log.record("", {})


def test_a_torn_last_line_is_set_aside_before_the_next_append_and_the_budget_still_reads(tmp_path):
    """Issue 26 class 5: a crash mid-append leaves a fragment; the next reply's line used to be glued
    onto it, and every later budget check and ``rpe privacy spent`` failed until a hand edit."""
    from common.privacy import read_egress as budget_lines
    from common.privacy import spent_from_egress

    log = EgressLog(tmp_path / "egress.jsonl")
    log.record("query.whoami", {"info": {"site": "s1"}})
    log.record("train", _reply(), run_id="r1")
    good_end = log.path.stat().st_size
    with open(log.path, "ab") as fh:
        fh.write(b'{"v":1,"ts":"2026-')  # the crash
    log.record("train", _reply(1), run_id="r2")
    entries, bad = read_egress(log.path)
    assert bad == [] and [e["run_id"] for _, e in entries] == [None, "r1", "r2"]
    spent_from_egress(budget_lines(log.path))  # no "is not an egress line"
    aside = tmp_path / f"egress.jsonl.torn-{good_end}"
    assert aside.read_bytes() == b'{"v":1,"ts":"2026-'
    (note,) = [json.loads(x) for x in (tmp_path / "egress.repairs.jsonl").read_text().splitlines()]
    assert note["event"] == "egress.torn-tail-repaired" and note["offset"] == good_end and note["kept_at"] == aside.name
    log.record("query.whoami", {"info": {"site": "s1"}})  # a whole log: nothing more is repaired
    assert len((tmp_path / "egress.repairs.jsonl").read_text().splitlines()) == 1


def test_read_egress_uses_the_bounded_reader(tmp_path):
    """A 200,000-deep line is a bad line (never a RecursionError); a FIFO is a clear error, not a hang."""
    import os

    from common.files.safeio import UnsafeInputError

    log = EgressLog(tmp_path / "egress.jsonl")
    log.record("query.whoami", {"info": {"site": "s1"}})
    with open(log.path, "ab") as fh:
        fh.write(b"[" * 200_000 + b"]" * 200_000 + b"\n")
        fh.write(b'{"records": [], "x": NaN}\n')
    entries, bad = read_egress(log.path)
    assert len(entries) == 1 and bad == [2, 3]
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(UnsafeInputError, match="FIFO"):
        read_egress(fifo)


# --------------------------------------------------------------------------------------------
# cross-check


def _submit(
    audit: AuditLog,
    egress: EgressLog,
    site: str,
    reply: dict,
    run_id: str,
    accepted: bool = True,
    log_digests: bool = True,
) -> None:
    """Simulate one train round trip: the site logs what it sends, the coordinator what it got."""
    blob, zh = "cd" * 32, z_sha256(reply["z"]["z"])
    egress.record("train", reply, run_id=run_id, extra={"blob_sha256": blob, "z_sha256": zh})
    fields = {"site": site, "run_id": run_id, "blob_sha256": blob, "bytes": 512, "z_sha256": zh}
    if log_digests:
        fields["record_digests"] = record_digests(reply)
    if accepted:
        audit.append("submission.accepted", record_id=f"rec-{run_id}", **fields)
    else:
        audit.append("submission.rejected", reason="base model mismatch", **fields)


def test_cross_check_all_matched(tmp_path):
    audit, egress = AuditLog(tmp_path / "audit.jsonl"), EgressLog(tmp_path / "egress.jsonl")
    _submit(audit, egress, "s1", _reply(0), "run-1")
    _submit(audit, egress, "s1", _reply(1), "run-2", accepted=False)
    _submit(audit, egress, "s1", _reply(2), "run-3", log_digests=False)  # matched on blob/z hashes
    egress.record("query.embed", {"z": {"z": np.zeros(4, np.float32)}})  # not a submission
    audit.append(
        "submission.accepted", site="s2", record_id="x", blob_sha256="ee" * 32, bytes=1, z_sha256="ee" * 32
    )  # another site's submission is not ours to match
    rep = cross_check(egress.path, audit.path, "s1", ENROLMENT)
    assert rep.ok, str(rep)
    assert [(m["seq"], m["egress_line"]) for m in rep.matched] == [(1, 1), (2, 2), (3, 3)]
    assert "OK (3 matched" in str(rep)
    assert rep.to_dict()["ok"] is True


def test_cross_check_coordinator_only_entry(tmp_path):
    """The coordinator claims a submission the site never sent (or got altered in transit)."""
    audit, egress = AuditLog(tmp_path / "audit.jsonl"), EgressLog(tmp_path / "egress.jsonl")
    _submit(audit, egress, "s1", _reply(0), "run-1")
    sent = _reply(1)
    egress.record("train", sent, run_id="run-2")
    received = _reply(1, n_examples=5000)  # metadata changed between the site and the registry
    audit.append(
        "submission.accepted",
        site="s1",
        record_id="rec-2",
        blob_sha256="cd" * 32,
        bytes=512,
        z_sha256=z_sha256(received["z"]["z"]),
        run_id="run-2",
        record_digests=record_digests(received),
    )
    rep = cross_check(egress.path, audit.path, "s1", ENROLMENT)
    assert not rep.ok
    assert [c["seq"] for c in rep.coordinator_only] == [2]
    assert "closest egress line 2 differs in metadata: coordinator" in rep.coordinator_only[0]["detail"]
    assert [s["line"] for s in rep.site_only] == [2]  # and the real reply is unaccounted for
    assert len(rep.matched) == 1


def test_cross_check_site_only_line(tmp_path):
    """The site sent a reply the coordinator never recorded."""
    audit, egress = AuditLog(tmp_path / "audit.jsonl"), EgressLog(tmp_path / "egress.jsonl")
    _submit(audit, egress, "s1", _reply(0), "run-1")
    egress.record("train", _reply(1), run_id="run-2")
    rep = cross_check(egress.path, audit.path, "s1", ENROLMENT)
    assert not rep.ok and rep.coordinator_only == []
    (only,) = rep.site_only
    assert only["line"] == 2 and only["run_id"] == "run-2"
    assert set(only["records"]) == {"adapter", "z", "metadata", "metrics"}
    assert "site sent egress line 2" in str(rep)


def test_cross_check_run_id_must_agree(tmp_path):
    audit, egress = AuditLog(tmp_path / "audit.jsonl"), EgressLog(tmp_path / "egress.jsonl")
    reply = _reply(0)
    egress.record("train", reply, run_id="run-1")
    audit.append(
        "submission.accepted",
        site="s1",
        record_id="r",
        blob_sha256="cd" * 32,
        bytes=1,
        z_sha256="00" * 32,
        run_id="run-9",
        record_digests=record_digests(reply),
    )
    rep = cross_check(egress.path, audit.path, "s1", ENROLMENT)
    assert "no unmatched egress line for run 'run-9'" in rep.coordinator_only[0]["detail"]
    assert len(rep.site_only) == 1


def test_cross_check_flags_tampered_audit_log(tmp_path):
    audit, egress = AuditLog(tmp_path / "audit.jsonl"), EgressLog(tmp_path / "egress.jsonl")
    _submit(audit, egress, "s1", _reply(0), "run-1")
    assert cross_check(egress.path, audit.path, "s1", ENROLMENT).ok
    lines = audit.path.read_text().splitlines()
    lines[0] = lines[0].replace('"bytes":512', '"bytes":513')
    audit.path.write_text("\n".join(lines) + "\n")
    rep = cross_check(egress.path, audit.path, "s1", ENROLMENT)
    assert any("bad_hash" in p for p in rep.audit_problems) and not rep.ok


def test_cross_check_as_the_server_app_logs_it(tmp_path):
    """The ServerApp's pattern: one entry per submission, written by the registry with the app's
    ``audit_fields`` (run id, nonce, record digests) on it, accepted or rejected; a reply refused
    by the site and an offline site produce rejections without data hashes."""
    audit, egress = AuditLog(tmp_path / "audit.jsonl"), EgressLog(tmp_path / "egress.jsonl")
    ok, bad = _reply(0), _reply(1)
    egress.record("train", ok, run_id="7", extra={"outcome": "ok", "nonce": "n1"})
    audit.append(
        "submission.accepted",
        site="s1",
        record_id="s1:t:abc",
        blob_sha256="cd" * 32,
        bytes=512,
        z_sha256=z_sha256(ok["z"]["z"]),
        task="t",
        run_id="7",
        nonce="n1",
        message_type="train",
        record_digests=record_digests(ok),
    )
    # run 8: the registry refused the reply (its one rejection entry carries what arrived)
    egress.record("train", bad, run_id="8", extra={"outcome": "ok", "nonce": "n2"})
    audit.append(
        "submission.rejected",
        site="s1",
        reason="site 's1' sent 20 values, the registry holds 16",
        error="EmbeddingDimensionError",
        run_id="8",
        nonce="n2",
        record_digests=record_digests(bad),
        blob_sha256="ef" * 32,
        z_sha256=z_sha256(bad["z"]["z"]),
    )
    # run 9: the site refused (no records); run 10: the site was offline
    egress.record("train", {}, run_id="9", extra={"outcome": "refused", "reason": "no data for task"})
    audit.append("submission.rejected", site="s1", reason="refused: no data for task", run_id="9", nonce="n3")
    audit.append("submission.rejected", site="s1", reason="offline", run_id="10")
    rep = cross_check(egress.path, audit.path, "s1", ENROLMENT)
    assert rep.ok, str(rep)
    assert [(m["seq"], m["egress_line"], m["matched_on"]) for m in rep.matched] == [
        (1, 1, "record_digests"),
        (2, 2, "record_digests"),
        (3, 3, "run_id (no data)"),
    ]
    assert [u["seq"] for u in rep.unverifiable] == [4]
    # the entry's own nonce is checked: a different nonce on the site's side fails
    egress2 = EgressLog(tmp_path / "egress2.jsonl")
    egress2.record("train", ok, run_id="7", extra={"outcome": "ok", "nonce": "other"})
    rep2 = cross_check(egress2.path, audit.path, "s1", ENROLMENT)
    assert 1 in [c["seq"] for c in rep2.coordinator_only]
    assert "nonce: coordinator n1 vs site other" in str(rep2)


def test_cross_check_with_legacy_companion_events(tmp_path):
    """Older ServerApp logs: the registry logged submission.accepted (blob, z, no run id) and the
    app a companion enroll.received with the record digests; these still cross-check."""
    audit, egress = AuditLog(tmp_path / "audit.jsonl"), EgressLog(tmp_path / "egress.jsonl")
    reply = _reply(0)
    extra = {"outcome": "ok", "nonce": "n1", "blob_sha256": "cd" * 32}
    egress.record("train", reply, run_id="7", extra=extra)
    audit.append(
        "submission.accepted",
        site="s1",
        record_id="s1:t:abc",
        blob_sha256="cd" * 32,
        bytes=512,
        z_sha256=z_sha256(reply["z"]["z"]),
        task="t",
    )
    audit.append(
        "enroll.received", site="s1", record_id="s1:t:abc", run_id="7", nonce="n1", record_digests=record_digests(reply)
    )
    # run 8: the site refused (no records); the coordinator logged the rejection with run and nonce
    egress.record("train", {}, run_id="8", extra={"outcome": "refused", "reason": "no data for task"})
    audit.append("submission.rejected", site="s1", reason="refused: no data for task", run_id="8", nonce="n2")
    # run 9: the site was offline, nothing was sent or received
    audit.append("submission.rejected", site="s1", reason="offline", run_id="9")
    rep = cross_check(egress.path, audit.path, "s1", ENROLMENT)
    assert rep.ok, str(rep)
    assert [(m["seq"], m["egress_line"], m["matched_on"]) for m in rep.matched] == [
        (1, 1, "record_digests"),
        (3, 2, "run_id (no data)"),
    ]
    assert [u["seq"] for u in rep.unverifiable] == [4] and "offline" in str(rep)
    # the companion's digests are really checked: a different nonce on the site's side fails
    egress2 = EgressLog(tmp_path / "egress2.jsonl")
    egress2.record("train", reply, run_id="7", extra={"outcome": "ok", "nonce": "other"})
    rep2 = cross_check(egress2.path, audit.path, "s1", ENROLMENT)
    assert [c["seq"] for c in rep2.coordinator_only] == [1]
    assert "nonce: coordinator n1 vs site other" in rep2.coordinator_only[0]["detail"]


def test_rejection_without_digests_of_a_data_reply_is_a_mismatch(tmp_path):
    """If the coordinator rejects a reply that carried data but logs no digest of it, the
    site's line stays unaccounted for: the cross-check cannot tell what was received."""
    audit, egress = AuditLog(tmp_path / "audit.jsonl"), EgressLog(tmp_path / "egress.jsonl")
    egress.record("train", _reply(0), run_id="7")
    audit.append("submission.rejected", site="s1", reason="BaseModelMismatchError: ...")
    rep = cross_check(egress.path, audit.path, "s1", ENROLMENT)
    assert not rep.ok and [s["line"] for s in rep.site_only] == [1]
    assert "neither record_digests nor blob_sha256" in rep.unverifiable[0]["detail"]


def test_resubmitted_identical_adapter_pairs_each_companion_in_order(tmp_path):
    """Same adapter twice → same record id, two submission.accepted + two companions."""
    audit, egress = AuditLog(tmp_path / "audit.jsonl"), EgressLog(tmp_path / "egress.jsonl")
    for run, nonce in (("7", "n1"), ("8", "n2")):
        reply = _reply(0)
        reply["metadata"]["nonce"] = nonce  # the signed metadata differs per submission
        egress.record("train", reply, run_id=run, extra={"nonce": nonce})
        audit.append(
            "submission.accepted",
            site="s1",
            record_id="s1:t:same",
            blob_sha256="cd" * 32,
            bytes=512,
            z_sha256=z_sha256(reply["z"]["z"]),
            duplicate=run == "8",
        )
        audit.append(
            "enroll.received",
            site="s1",
            record_id="s1:t:same",
            run_id=run,
            nonce=nonce,
            record_digests=record_digests(reply),
        )
    rep = cross_check(egress.path, audit.path, "s1", ENROLMENT)
    assert rep.ok, str(rep)
    assert [(m["seq"], m["egress_line"]) for m in rep.matched] == [(1, 1), (3, 2)]
