"""Issue 29: an enrolment round stored as ONE registry commit (``server/registry/batch.py``,
``Registry.add_submissions``).

* fsyncs: a batch of N submissions fsyncs records.jsonl once, audit.jsonl once and the z column
  once (each new blob still its own file, fsynced before any record names it: the blob contract),
  where N single ``add`` calls fsync each log N times (the z column: data, then its row count). ``os.fsync`` is wrapped to count by path:
  the one fault-free way to see how often the disk is asked to commit.
* a rejected submission (bad z, unknown base, norm bound, mismatched hash) changes nothing (no
  record, no blob) and has its ``submission.rejected`` entry with its audit fields; the others of the
  batch are stored; each accepted one has its own ``submission.accepted`` entry binding its line.
* supersede in the batch: a site's earlier adapter is tombstoned in the same commit (one
  ``registry.remove`` + one ``record.superseded`` entry), ``verify()`` is clean before and after reopen.
* crash consistency: a forked child is SIGKILLed at each write point of the batch; reopening gives
  every record of the batch or none, an audit log that says which (a ``registry.repair`` entry
  naming what was cut), ``verify()`` clean apart from orphan blobs ``gc`` removes; a crash in the
  middle of the audit append (a torn audit line with unaudited record lines, what cutting the audit
  log's end also leaves) makes the writable open refuse, changing nothing, as for a single add.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
from support.registry import BASE, DIM, SHAPES, audit_lines, make_adapter

from common.adapters import adapter_to_bytes
from server.registry import (
    AdapterMeta,
    Registry,
    RegistryCorruptError,
    Submission,
    UnknownBaseError,
    UpdateNormBoundError,
)

TASK = "xray-chest"


def _meta(site: str, **kw) -> AdapterMeta:
    return AdapterMeta(
        site=site, task=TASK, modality="xray", base_fingerprint=kw.pop("base", BASE), sample_count=10, **kw
    )


def _sub(i: int, site: str, scale: float = 1.0, **kw) -> Submission:
    adapter = make_adapter(i)
    if scale != 1.0:
        for m in adapter.modules.values():
            m.B.mul_(scale)
    blob = adapter_to_bytes(adapter)
    z = np.random.default_rng(i).standard_normal(DIM).astype(np.float32)
    return Submission(blob, z, _meta(site, **kw), None, {"run_id": "r1", "nonce": f"n{i}", "message_type": "train"})


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry holding sites p, q, r (one adapter each), Chroma off."""
    root = tmp_path_factory.mktemp("batch") / "reg"
    Registry.init(root, base_fingerprint=BASE, module_shapes=SHAPES, embedding_dim=DIM).close()
    with Registry(root, chroma="off") as reg:
        for i, site in enumerate(("p", "q", "r")):
            reg.add(_sub(100 + i, site).adapter, _sub(100 + i, site).z, _meta(site))
    return root


def _copy(seeded: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "reg"
    shutil.copytree(seeded, dst)
    return dst


class FsyncCounter:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.paths: list[str] = []
        real = os.fsync

        def counting(fd: int) -> None:
            try:
                self.paths.append(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                self.paths.append("?")
            real(fd)

        monkeypatch.setattr(os, "fsync", counting)

    def count(self, name: str) -> int:
        return sum(1 for p in self.paths if Path(p).name == name)


def test_a_batch_fsyncs_each_log_once_where_single_adds_fsync_it_per_submission(seeded, tmp_path, monkeypatch):
    n = 8
    subs = [_sub(i, f"s{i}") for i in range(n)]
    one = _copy(seeded, tmp_path / "one")
    many = _copy(seeded, tmp_path / "many")
    fs = FsyncCounter(monkeypatch)
    with Registry(one, chroma="off") as reg:
        fs.paths.clear()
        for s in subs:
            reg.add(s.adapter, s.z, s.meta, audit_fields=dict(s.audit_fields))
        single = {name: fs.count(name) for name in ("records.jsonl", "audit.jsonl", "z.f32")}
    with Registry(many, chroma="off") as reg:
        fs.paths.clear()
        out = reg.add_submissions(subs, supersede=False)
        batch = {name: fs.count(name) for name in ("records.jsonl", "audit.jsonl", "z.f32")}
        blob_fsyncs = sum(1 for p in fs.paths if "/blobs/" in p)
        assert all(o.record is not None and o.error is None for o in out)
        assert len(reg) == 3 + n and reg.verify() == []
    per_z = single["z.f32"] // n  # the column's data, then its published row count
    assert single == {"records.jsonl": n, "audit.jsonl": n, "z.f32": n * per_z} and per_z >= 1, single
    assert batch == {"records.jsonl": 1, "audit.jsonl": 1, "z.f32": per_z}, batch
    assert blob_fsyncs >= n  # every new blob file is still fsynced on its own before its record line
    # the same records, the same per-submission audit entries (with their run fields) either way
    for root in (one, many):
        acc = [e for e in audit_lines(root) if e["event"] == "submission.accepted" and e.get("run_id") == "r1"]
        assert [e["site"] for e in acc] == [f"s{i}" for i in range(n)]
        assert all(e["line_sha256"] and e["records_span"] and e["nonce"] for e in acc)
    with Registry(one, chroma="off") as a, Registry(many, chroma="off", read_only=True) as b:
        assert sorted(a.ids()) == sorted(b.ids())


def test_a_rejected_submission_changes_nothing_and_is_audited_the_rest_are_stored(seeded, tmp_path):
    root = _copy(seeded, tmp_path)
    bad_z = _sub(20, "badz")
    bad_z.z = np.zeros(DIM + 1, dtype=np.float32)
    subs = [
        _sub(21, "ok1"),
        bad_z,
        _sub(22, "unknown-base", base="sha256:" + "00" * 32),
        _sub(23, "huge", scale=20.0),  # far above 10 x the median of the registry and the batch
        _sub(24, "hash"),
        _sub(25, "ok2"),
    ]
    subs[4] = Submission(subs[4].adapter, subs[4].z, _meta("hash"), "ab" * 32, subs[4].audit_fields)
    blobs_before = {p.name for p in (root / "blobs").rglob("*") if p.is_file()}
    with Registry(root, chroma="off") as reg:
        out = reg.add_submissions(subs)
        assert [o.error is None for o in out] == [True, False, False, False, False, True]
        assert isinstance(out[2].error, UnknownBaseError) and isinstance(out[3].error, UpdateNormBoundError)
        assert sorted(r.meta.site for r in reg.list()) == ["ok1", "ok2", "p", "q", "r"]
        assert reg.verify() == []
    blobs_after = {p.name for p in (root / "blobs").rglob("*") if p.is_file()}
    assert blobs_after - blobs_before == {out[0].record.blob_sha256, out[5].record.blob_sha256}
    rejected = {e["site"]: e for e in audit_lines(root) if e["event"] == "submission.rejected"}
    assert set(rejected) == {"badz", "unknown-base", "huge", "hash"}
    assert rejected["huge"]["error"] == "UpdateNormBoundError" and rejected["huge"]["nonce"] == "n23"
    assert "records_span" not in rejected["badz"]


def test_supersede_in_the_batch_is_part_of_the_one_commit(seeded, tmp_path, monkeypatch):
    root = _copy(seeded, tmp_path)
    with Registry(root, chroma="off") as reg:
        old_p = reg.list(site="p")[0].id
        fs = FsyncCounter(monkeypatch)
        out = reg.add_submissions([_sub(30, "p"), _sub(31, "new")], supersede=True)
        assert fs.count("records.jsonl") == 1 and fs.count("audit.jsonl") == 1
        assert [r.id for r in out[0].superseded] == [old_p] and out[1].superseded == []
        assert old_p not in reg and reg.list(site="p")[0].id == out[0].record.id
        assert reg.verify() == []
    entries = audit_lines(root)
    rm = [e for e in entries if e["event"] == "registry.remove"]
    sup = [e for e in entries if e["event"] == "record.superseded"]
    assert [e["record_id"] for e in rm] == [old_p] and rm[0]["superseded_by"] == out[0].record.id
    assert sup[0]["superseded"] == [old_p] and sup[0]["run_id"] == "r1"
    with Registry(root, chroma="off") as reg:  # the replay agrees
        assert old_p not in reg and sorted(r.meta.site for r in reg.list()) == ["new", "p", "q", "r"]
        assert reg.verify() == []
        # the same round again: duplicates, nothing new written to records.jsonl
        size = (root / "records.jsonl").stat().st_size
        again = reg.add_submissions([_sub(30, "p"), _sub(31, "new")], supersede=True)
        assert all(o.duplicate for o in again) and (root / "records.jsonl").stat().st_size == size


CRASH_POINTS = ["after_blob", "after_column", "mid_record", "after_record", "after_audit"]


def _crash_child(root: Path, point: str, subs: list[Submission]) -> int:
    """Fork; the child runs the batch with RPE_CRASH_AT=point; returns the child's wait status."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 3
        try:
            os.environ["RPE_CRASH_AT"] = point
            with Registry(root, chroma="off") as reg:
                reg.add_submissions(subs)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return status


@pytest.mark.parametrize("point", [*CRASH_POINTS, "mid_audit"])
def test_a_crash_mid_batch_leaves_all_of_it_or_none(seeded, tmp_path, point):
    root = _copy(seeded, tmp_path)
    with Registry(root, chroma="off") as reg:
        old_p = reg.list(site="p")[0].id
    subs = [_sub(40, "p"), _sub(41, "x"), _sub(42, "y")]
    status = _crash_child(root, point, subs)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (point, status)
    if point == "mid_audit":
        # a torn audit line with unaudited record lines: what cutting the log's end leaves too;
        # the writable open refuses and changes nothing, read-only commands still work
        before = {p: p.read_bytes() for p in (root / "records.jsonl", root / "audit.jsonl")}
        with pytest.raises(RegistryCorruptError, match="torn line"):
            Registry(root, chroma="off")
        assert {p: p.read_bytes() for p in before} == before
        with Registry(root, read_only=True) as ro:
            assert len(ro) >= 3
        return
    with Registry(root, chroma="off") as reg:
        sites = sorted(r.meta.site for r in reg.list())
        problems = [p for p in reg.verify() if not p.startswith("orphan blob")]
        assert problems == [], problems
        if point == "after_audit":  # every entry durable: the whole batch is stored
            assert sites == ["p", "q", "r", "x", "y"] and old_p not in reg
        else:  # none of it, and the audit log says what was cut
            assert sites == ["p", "q", "r"] and old_p in reg
            if point in ("mid_record", "after_record"):
                repairs = [e for e in audit_lines(root) if e["event"] in ("registry.repair", "registry.recover")]
                assert repairs, [e["event"] for e in audit_lines(root)]
        # and the registry takes the same round afterwards
        out = reg.add_submissions(subs)
        assert [o.error for o in out] == [None, None, None]
        assert sorted(r.meta.site for r in reg.list()) == ["p", "q", "r", "x", "y"]
        assert [p for p in reg.verify() if not p.startswith("orphan blob")] == []
    accepted = [e for e in audit_lines(root) if e["event"] == "submission.accepted" and e.get("run_id") == "r1"]
    assert sorted(json.dumps(e["site"]) for e in accepted).count('"x"') in (1, 2)


def test_the_chroma_mirror_follows_a_batch_with_supersedes(seeded, tmp_path):
    """With the embedded Chroma mirror on: the batch's records are upserted and the superseded one
    deleted, so ``verify()`` (which compares Chroma with the live records) is clean and an index
    query answers like the exact one."""
    root = _copy(seeded, tmp_path)
    with Registry(root) as reg:
        old_p = reg.list(site="p")[0].id
        out = reg.add_submissions([_sub(50, "p"), _sub(51, "m"), _sub(52, "n")])
        assert [r.id for r in out[0].superseded] == [old_p]
        assert reg.index_ready and reg.verify() == []
        q = _sub(51, "m").z
        assert [h.record.id for h in reg.query(q, 3, method="index")] == [
            h.record.id for h in reg.query(q, 3, method="brute")
        ]
