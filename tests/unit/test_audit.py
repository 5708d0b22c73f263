"""Hash-chained audit log: intact logs verify, each kind of tampering gets its own diagnosis."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest

from server.audit import (
    ANCHOR_MISMATCH,
    BAD_HASH,
    BROKEN_CHAIN,
    GENESIS,
    NON_CANONICAL,
    SEQ_DUPLICATE,
    SEQ_GAP,
    SEQ_OUT_OF_ORDER,
    TORN_LINE,
    UNPARSEABLE,
    AuditLog,
    AuditLogCorruptError,
    entry_hash,
    head,
    line_hash,
    verify,
)
from server.auditreport import format_report, report

H = "ab" * 32


def _write_log(path: Path, n: int = 6) -> AuditLog:
    log = AuditLog(path)
    for i in range(n):
        log.append("registry.add", record_id=f"r{i}", blob_sha256=H, site="s1", bytes=100 + i)
    return log


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _put(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines))


def _sig(problems) -> set[tuple[str, int]]:
    return {(p.kind, p.line) for p in problems}


def test_untouched_log_verifies_and_entries_are_chained(tmp_path):
    path = tmp_path / "audit" / "audit.jsonl"
    log = _write_log(path)
    assert verify(path) == []
    entries = [json.loads(line) for line in _lines(path)]
    assert [e["seq"] for e in entries] == [1, 2, 3, 4, 5, 6]
    assert entries[0]["prev"] == GENESIS
    for a, b in zip(entries[:-1], entries[1:], strict=True):
        assert b["prev"] == line_hash(a)
    for e in entries:
        assert e["hash"] == entry_hash(e)
    # each line is the canonical JSON: sorted keys, no whitespace
    assert _lines(path)[0] == json.dumps(entries[0], sort_keys=True, separators=(",", ":"))
    got = log.append("submission.rejected", site="s2", reason="bad signature", bytes=np.int64(7))
    assert got["seq"] == 7 and got["bytes"] == 7 and verify(path) == []


def test_reopen_continues_the_chain(tmp_path):
    path = tmp_path / "audit.jsonl"
    _write_log(path, 3)
    entry = AuditLog(path).append("registry.remove", record_id="r0", reason="withdrawn")
    assert entry["seq"] == 4
    assert entry["prev"] == line_hash(json.loads(_lines(path)[2]))
    assert verify(path) == []


def test_edit_is_a_bad_hash_on_that_line(tmp_path):
    path = tmp_path / "audit.jsonl"
    _write_log(path)
    lines = _lines(path)
    e = json.loads(lines[2])
    e["bytes"] = 999
    lines[2] = json.dumps(e, sort_keys=True, separators=(",", ":"))
    _put(path, lines)
    problems = verify(path)
    assert _sig(problems) == {(BAD_HASH, 3), (BROKEN_CHAIN, 4)}
    assert next(p for p in problems if p.kind == BAD_HASH).seq == 3


def test_edit_with_recomputed_hash_still_breaks_the_next_link(tmp_path):
    path = tmp_path / "audit.jsonl"
    _write_log(path)
    lines = _lines(path)
    e = json.loads(lines[2])
    e["bytes"] = 999
    e["hash"] = entry_hash(e)
    lines[2] = json.dumps(e, sort_keys=True, separators=(",", ":"))
    _put(path, lines)
    assert _sig(verify(path)) == {(BROKEN_CHAIN, 4)}


def test_delete_is_a_seq_gap(tmp_path):
    path = tmp_path / "audit.jsonl"
    _write_log(path)
    lines = _lines(path)
    del lines[2]  # seq 3
    _put(path, lines)
    problems = verify(path)
    assert _sig(problems) == {(BROKEN_CHAIN, 3), (SEQ_GAP, 3)}
    gap = next(p for p in problems if p.kind == SEQ_GAP)
    assert gap.seq == 4 and "seq 3 missing" in gap.message


def test_delete_first_entry(tmp_path):
    path = tmp_path / "audit.jsonl"
    _write_log(path)
    _put(path, _lines(path)[1:])
    assert _sig(verify(path)) == {(BROKEN_CHAIN, 1), (SEQ_GAP, 1)}


def test_insert_is_a_duplicate_seq(tmp_path):
    path = tmp_path / "audit.jsonl"
    _write_log(path)
    lines = _lines(path)
    # a forger who knows the format: correct prev, correct own hash, plausible seq
    forged = {
        "seq": 3,
        "ts": "2025-01-01T00:00:00.000000Z",
        "event": "registry.add",
        "record_id": "evil",
        "blob_sha256": H,
        "prev": line_hash(json.loads(lines[1])),
    }
    forged["hash"] = entry_hash(forged)
    lines.insert(2, json.dumps(forged, sort_keys=True, separators=(",", ":")))
    _put(path, lines)
    problems = verify(path)
    assert _sig(problems) == {(SEQ_DUPLICATE, 4), (BROKEN_CHAIN, 4)}
    dup = next(p for p in problems if p.kind == SEQ_DUPLICATE)
    assert dup.seq == 3 and "line 3" in dup.message


def test_reorder_is_a_gap_then_out_of_order(tmp_path):
    path = tmp_path / "audit.jsonl"
    _write_log(path)
    lines = _lines(path)
    lines[2], lines[3] = lines[3], lines[2]
    _put(path, lines)
    problems = verify(path)
    assert _sig(problems) == {
        (SEQ_GAP, 3),
        (BROKEN_CHAIN, 3),
        (SEQ_OUT_OF_ORDER, 4),
        (BROKEN_CHAIN, 4),
        (BROKEN_CHAIN, 5),
    }


def test_the_four_tamperings_are_distinguishable(tmp_path):
    """Edit / delete / insert / reorder each have a check kind no other one produces."""
    kinds = {}
    for name in ("edit", "delete", "insert", "reorder"):
        path = tmp_path / f"{name}.jsonl"
        _write_log(path)
        lines = _lines(path)
        if name == "edit":
            lines[2] = lines[2].replace('"bytes":102', '"bytes":103')
        elif name == "delete":
            del lines[2]
        elif name == "insert":
            lines.insert(2, lines[1])  # a replayed copy of the entry before it
        else:
            lines[2], lines[3] = lines[3], lines[2]
        _put(path, lines)
        kinds[name] = {p.kind for p in verify(path)} - {BROKEN_CHAIN}
    assert kinds == {
        "edit": {BAD_HASH},
        "delete": {SEQ_GAP},
        "insert": {SEQ_DUPLICATE},
        "reorder": {SEQ_GAP, SEQ_OUT_OF_ORDER},
    }


def test_torn_final_line_is_detected_and_blocks_appends(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = _write_log(path, 3)
    with open(path, "ab") as fh:
        fh.write(b'{"seq":4,"ts":"2025')  # crash mid-write
    with pytest.raises(AuditLogCorruptError, match="verify"):
        AuditLog(path)
    with pytest.raises(AuditLogCorruptError, match="torn"):
        log.append("registry.remove", record_id="r1")
    assert _sig(verify(path)) == {(TORN_LINE, 4), (UNPARSEABLE, 4)}
    assert len(_lines(path)) == 4  # nothing was appended after the damage


def test_damaged_last_entry_blocks_appends(tmp_path):
    path = tmp_path / "audit.jsonl"
    _write_log(path, 3)
    lines = _lines(path)
    lines[-1] = lines[-1].replace('"bytes":102', '"bytes":1')
    _put(path, lines)
    with pytest.raises(AuditLogCorruptError, match="does not match its own hash"):
        AuditLog(path)


def test_reformatted_line_is_non_canonical(tmp_path):
    path = tmp_path / "audit.jsonl"
    _write_log(path, 3)
    lines = _lines(path)
    lines[0] = json.dumps(json.loads(lines[0]), indent=None)  # same content, with spaces
    _put(path, lines)
    assert _sig(verify(path)) == {(NON_CANONICAL, 1)}


def test_anchor_detects_truncation(tmp_path):
    path = tmp_path / "audit.jsonl"
    _write_log(path, 5)
    anchor = head(path)
    assert anchor["seq"] == 5
    assert verify(path, anchor=anchor) == []
    _put(path, _lines(path)[:-1])
    assert verify(path) == []  # truncation alone is invisible to the chain...
    assert _sig(verify(path, anchor=anchor)) == {(ANCHOR_MISMATCH, 4)}  # ...but not to the anchor


def test_append_validates_fields(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl")
    required = r"requires fields \['record_id', 'blob_sha256', 'bytes', 'z_sha256'\]"
    with pytest.raises(ValueError, match=required):
        log.append("submission.accepted", site="s1")
    with pytest.raises(ValueError, match="reserved"):
        log.append("custom.event", seq=5)
    with pytest.raises(ValueError, match="NaN"):
        log.append("custom.event", value=float("nan"))
    with pytest.raises(ValueError, match="equal lengths"):
        log.append(
            "composition",
            target="t",
            strategy="sim",
            retrieved=["a", "b"],
            distances=[1.0],
            weights=[0.5, 0.5],
            adapter_sha256=[H, H],
            output_sha256=H,
        )
    log.append("custom.event", value=[1, 2])  # unknown events are accepted unchecked
    assert verify(log.path) == []


def _append_many(path: str, tag: str, n: int) -> None:
    log = AuditLog(path)
    for i in range(n):
        log.append("custom.event", worker=tag, i=i)


def test_concurrent_processes_keep_one_linear_chain(tmp_path):
    path = tmp_path / "audit.jsonl"
    AuditLog(path)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(str(path), tag, 60)) for tag in "ab"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert verify(path) == []
    entries = [json.loads(line) for line in _lines(path)]
    assert [e["seq"] for e in entries] == list(range(1, 121))
    assert sorted(e["worker"] for e in entries) == ["a"] * 60 + ["b"] * 60


def test_report_summarises_sites_and_compositions(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    log.append(
        "submission.accepted",
        site="s1",
        record_id="r1",
        blob_sha256="11" * 32,
        bytes=1000,
        z_sha256="aa" * 32,
        run_id="run-1",
    )
    log.append("submission.accepted", site="s1", record_id="r2", blob_sha256="22" * 32, bytes=500, z_sha256="bb" * 32)
    log.append(
        "submission.rejected",
        site="s2",
        reason="unknown site",
        blob_sha256="33" * 32,
        bytes=70,
        record_id=None,
        z_sha256=None,
    )
    log.append("query.embedding", site="s3", z_sha256="cc" * 32, target="s3")
    log.append(
        "composition",
        target="s3",
        strategy="lin-l1",
        params={"lam2": 0.1},
        retrieved=["r1", "r2"],
        distances=[0.5, 1.5],
        weights=[0.8, 0.2],
        adapter_sha256=["11" * 32, "22" * 32],
        output_sha256="dd" * 32,
    )
    rep = report(path)
    assert rep["entries"] == 5 and rep["problems"] == []
    s1, s2 = rep["sites"]["s1"], rep["sites"]["s2"]
    assert (s1["accepted"], s1["rejected"], s1["bytes_accepted"]) == (2, 0, 1500)
    assert [s["blob_sha256"] for s in s1["submissions"]] == ["11" * 32, "22" * 32]
    assert (s2["accepted"], s2["rejected"], s2["bytes_rejected"]) == (0, 1, 70)
    assert s2["submissions"][0]["reason"] == "unknown site"
    (comp,) = rep["compositions"]
    assert comp["retrieved"] == ["r1", "r2"] and comp["weights"] == [0.8, 0.2]
    assert comp["adapter_sha256"] == ["11" * 32, "22" * 32] and comp["output_sha256"] == "dd" * 32
    assert rep["queries"] == {"s3": 1}
    assert rep["head"] == head(path)
    text = format_report(rep)
    assert "integrity: OK" in text and "site s1: 2 accepted (1500 bytes)" in text
    assert "r1: weight +0.8000" in text
    # a damaged log is reported as damaged
    lines = _lines(path)
    del lines[1]
    _put(path, lines)
    assert report(path)["problems"] and "INTEGRITY PROBLEMS" in format_report(report(path))
