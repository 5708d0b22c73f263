"""Issue 26 class 5 (registry part): read commands write nothing; repairs never destroy what was
acknowledged.

Before: ``rpe registry ls`` after 30 bytes were cut off ``audit.jsonl`` removed the last committed
record as if its append had been interrupted (and ``rpe audit verify`` then passed); read commands
rewrote Chroma's sqlite and the lock file. Now a read-only open (the API, ``rpe registry ls`` /
``show``) leaves every file byte-for-byte and mtime-for-mtime as it was, and a writable open that
finds a cut audit log refuses, naming the damage, instead of cutting committed records.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from support.registry import DIM, make_adapter, make_meta, new_registry

from server.registry import Registry, RegistryCorruptError, snapshot

ROOT = Path(__file__).resolve().parents[2]


def _state(root: Path) -> dict[str, tuple[str, int, int]]:
    """Every file under the registry: (sha256, size, mtime_ns); directories by their mtime."""
    out = {}
    for dirpath, _dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        out[str(d.relative_to(root)) + "/"] = ("dir", 0, d.stat().st_mtime_ns)
        for name in filenames:
            p = d / name
            st = p.stat()
            out[str(p.relative_to(root))] = (hashlib.sha256(p.read_bytes()).hexdigest(), st.st_size, st.st_mtime_ns)
    return out


def _build(root: Path, monkeypatch: pytest.MonkeyPatch, chroma: str | None = None) -> list[str]:
    monkeypatch.setattr(snapshot, "MIN_RECORDS", 1)  # a columns.snap too
    Z = np.random.default_rng(0).standard_normal((8, DIM)).astype(np.float32)
    kw = {} if chroma is None else {"chroma": chroma}
    new_registry(root).close()
    with Registry(root, **kw) as reg:
        ids = [reg.add(make_adapter(i % 4), Z[i], make_meta(i)).id for i in range(6)]
        reg.remove(ids[2], reason="consent withdrawn")
    return ids


def _data(state: dict) -> dict:
    """The state without the writer lock file (an attempted writable open takes the lock: its pid)."""
    return {k: v for k, v in state.items() if k != ".lock"}


def _rpe(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "deploy.cli", *args], capture_output=True, text=True, env=env, timeout=180
    )


def _read_everything(root: Path) -> None:
    with Registry(root, read_only=True) as ro:
        ids = ro.ids()
        assert len(ro) == len(ids) == 5
        ro.get(ids[0])
        ro.list(task=make_meta(0).task)
        ro.query(np.ones(DIM, np.float32), 2)
        ro.stats()
        assert ro.verify() == []


def test_a_read_only_open_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "reg"
    ids = _build(root, monkeypatch)
    assert (root / "chroma").is_dir() and (root / snapshot.SNAP_NAME).is_file()
    before = _state(root)
    _read_everything(root)
    assert _state(root) == before
    for args in (("ls",), ("show", ids[0]), ("ls", "--json")):
        out = _rpe("registry", *args[:1], "--registry", str(root), *args[1:])
        assert out.returncode == 0, out.stderr
    after = _state(root)
    assert after == before, {
        k: (before.get(k), after.get(k)) for k in set(before) | set(after) if before.get(k) != after.get(k)
    }


def test_a_read_only_open_creates_no_audit_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "reg"
    _build(root, monkeypatch)
    (root / "audit.jsonl").unlink()
    before = _state(root)
    try:
        with Registry(root, read_only=True) as ro:
            ro.ids()
    except Exception:  # noqa: BLE001 - refusing is fine too; writing is not
        pass
    assert not (root / "audit.jsonl").exists()
    assert _state(root) == before


def test_a_cut_audit_log_is_never_repaired_by_cutting_committed_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "reg"
    Z = np.random.default_rng(1).standard_normal((4, DIM)).astype(np.float32)
    new_registry(root).close()
    with Registry(root, chroma="off") as reg:
        rec = [reg.add(make_adapter(i), Z[i], make_meta(i)) for i in range(3)]
    audit = root / "audit.jsonl"
    data = audit.read_bytes()
    last = json.loads(data.splitlines()[-1])
    assert last["event"] == "submission.accepted" and last["record_id"] == rec[-1].id
    audit.write_bytes(data[:-30])  # the attack: 30 bytes off the end
    before = _state(root)
    out = _rpe("registry", "ls", "--registry", str(root))  # a read command
    assert out.returncode == 0, out.stderr
    assert rec[-1].id in out.stdout
    assert _state(root) == before  # read: nothing repaired, nothing cut
    with pytest.raises(
        RegistryCorruptError,
        match=r"(?s)audit.jsonl ends in a torn line.*" + rec[-1].id.split(":", 1)[1] + r".*Nothing was cut",
    ):
        Registry(root, chroma="off")  # a writing open refuses and names the damage
    assert _data(_state(root)) == _data(before)
    problems = Registry(root, read_only=True).verify()
    assert any(rec[-1].id in p for p in problems), problems


def _three(root: Path) -> list:
    Z = np.random.default_rng(2).standard_normal((4, DIM)).astype(np.float32)
    new_registry(root).close()
    with Registry(root, chroma="off") as reg:
        return [reg.add(make_adapter(i), Z[i], make_meta(i)) for i in range(3)]


def test_whole_audit_lines_cut_from_several_commits_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "reg"
    rec = _three(root)
    audit = root / "audit.jsonl"
    lines = audit.read_bytes().splitlines(keepends=True)
    audit.write_bytes(b"".join(lines[:-2]))  # two acknowledged single adds lose their entries
    before = _state(root)
    with pytest.raises(RegistryCorruptError, match=r"not the lines of one interrupted commit.*Nothing was cut"):
        Registry(root, chroma="off")
    assert _data(_state(root)) == _data(before)
    problems = Registry(root, read_only=True).verify()
    assert any(rec[-1].id in p for p in problems) and any(rec[-2].id in p for p in problems), problems


def test_one_interrupted_commit_is_rolled_back_but_kept_aside(tmp_path: Path) -> None:
    root = tmp_path / "reg"
    rec = _three(root)
    audit = root / "audit.jsonl"
    records = (root / "records.jsonl").read_bytes()
    last_line = records.splitlines(keepends=True)[-1]
    lines = audit.read_bytes().splitlines(keepends=True)
    audit.write_bytes(b"".join(lines[:-1]))  # exactly what a crash between the two appends leaves
    with Registry(root, chroma="off") as reg:
        assert rec[-1].id not in reg and len(reg) == 2
    entry = json.loads(audit.read_bytes().splitlines()[-1])
    assert entry["event"] == "registry.repair" and entry["kept_in"].startswith("records.jsonl.cut-")
    assert (root / entry["kept_in"]).read_bytes() == last_line  # nothing destroyed
    assert (root / "records.jsonl").read_bytes() == records[: -len(last_line)]


def test_a_torn_audit_tail_alone_is_cut_but_kept_aside(tmp_path: Path) -> None:
    root = tmp_path / "reg"
    _three(root)
    audit = root / "audit.jsonl"
    with open(audit, "ab") as fh:
        fh.write(b'{"seq": 99, "event": "half')
    size = audit.stat().st_size
    with Registry(root, chroma="off") as reg:
        assert len(reg) == 3
    entry = json.loads(audit.read_bytes().splitlines()[-1])
    assert entry["event"] == "registry.repair" and entry["kept_in"] == f"audit.jsonl.cut-{size - 26}"
    assert (root / entry["kept_in"]).read_bytes() == b'{"seq": 99, "event": "half'
