"""The columns snapshot (``columns.snap``, ``server.registry.snapshot``): a reopen restored from it
holds exactly what a full replay of records.jsonl holds, lines appended after it are replayed, it
is ignored when records.jsonl's prefix changed or its own checksum fails, and a snapshot altered
on disk is caught (on use, or by ``Registry.verify``)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from support.registry import DIM, make_adapter, make_meta, new_registry, rewrite_snapshot

from server.registry import Registry, snapshot
from server.registry.errors import RegistryCorruptError


@pytest.fixture(autouse=True)
def _small_snapshots(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(snapshot, "MIN_RECORDS", 1)  # snapshots for small registries too


def _state(reg: Registry) -> dict:
    """Everything a reader can see, gathered through the public API."""
    ids = reg.ids()
    q = np.random.default_rng(5).standard_normal(DIM).astype(np.float32)
    return {
        "ids": ids,
        "records": [reg.get(i).to_dict() if hasattr(reg.get(i), "to_dict") else repr(reg.get(i)) for i in ids],
        "hits": [(h.record.id, round(h.distance, 6)) for h in reg.query(q, 5)],
        "filtered": [h.record.id for h in reg.query(q, 3, task="ct-head")],
        "stats": {k: v for k, v in reg.stats().items() if k != "index_ready"},
    }  # Chroma, not the columns


def _full_replay(root: Path) -> dict:
    """The state a replay of the whole log gives (the snapshot moved aside for the read)."""
    snap = root / snapshot.SNAP_NAME
    hold = root.parent / "snap.hold"
    if snap.exists():
        shutil.move(snap, hold)
    try:
        with Registry(root, read_only=True) as ro:
            assert ro._log.snap_end == 0
            return _state(ro)
    finally:
        if hold.exists():
            shutil.move(hold, snap)


def _build(root: Path, n: int = 30) -> list[str]:
    Z = np.random.default_rng(0).standard_normal((n + 5, DIM)).astype(np.float32)
    with new_registry(root) as reg:
        ids = [r.id for r in reg.add_many([(make_adapter(i % 4), Z[i], make_meta(i)) for i in range(n)])]
        reg.remove(ids[3], reason="withdrawn")
        reg.remove(ids[7])
        reg.add(make_adapter(3), Z[3], make_meta(3))  # a re-add: the same row, a new add line
    return ids


def test_reopen_from_snapshot_equals_full_replay(tmp_path: Path) -> None:
    root = tmp_path / "r"
    _build(root)
    assert (root / snapshot.SNAP_NAME).is_file()
    with Registry(root) as reg:
        assert reg._log.snap_end == (root / "records.jsonl").stat().st_size  # nothing replayed
        assert _state(reg) == _full_replay(root)
        assert reg.verify() == []


def test_lines_after_the_snapshot_are_replayed(tmp_path: Path) -> None:
    """A crash after the last snapshot (here: the snapshot of an earlier close put back) loses
    nothing: the lines after it are replayed on top of it."""
    root = tmp_path / "r"
    ids = _build(root)
    old = (root / snapshot.SNAP_NAME).read_bytes()
    Z = np.random.default_rng(9).standard_normal((4, DIM)).astype(np.float32)
    with Registry(root) as reg:
        reg.add_many([(make_adapter(i), Z[i], make_meta(40 + i)) for i in range(4)])
        reg.remove(ids[0])
        reg.remove(ids[3])
        reg.add(
            make_adapter(3), np.random.default_rng(0).standard_normal((35, DIM)).astype(np.float32)[3], make_meta(3)
        )
    (root / snapshot.SNAP_NAME).write_bytes(old)
    with Registry(root) as reg:
        assert 0 < reg._log.snap_end < (root / "records.jsonl").stat().st_size
        got = _state(reg)
    assert got == _full_replay(root)
    assert ids[0] not in got["ids"] and ids[3] in got["ids"] and len(got["ids"]) == 32
    with Registry(root) as reg:  # the close above wrote a snapshot covering everything
        assert reg._log.snap_end == (root / "records.jsonl").stat().st_size
        assert _state(reg) == got and reg.verify() == []


def test_snapshot_is_ignored_when_records_prefix_changed(tmp_path: Path) -> None:
    """An edit inside the prefix the snapshot covers means a full replay: the edit is seen and
    reported exactly as without a snapshot (here a damaged middle line stops the open)."""
    root = tmp_path / "r"
    _build(root)
    lines = (root / "records.jsonl").read_bytes().split(b"\n")
    lines[2] = lines[2][:-5] + b"XXXXX"
    (root / "records.jsonl").write_bytes(b"\n".join(lines))
    with pytest.raises(RegistryCorruptError, match="line 3"):
        Registry(root)


def test_damaged_snapshot_is_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "r"
    _build(root)
    p = root / snapshot.SNAP_NAME
    raw = bytearray(p.read_bytes())
    raw[-3] ^= 0xFF  # bit rot / a cut write: the body checksum fails
    p.write_bytes(bytes(raw))
    with Registry(root) as reg:
        assert reg._log.snap_end == 0 or reg._log.snap_end == (root / "records.jsonl").stat().st_size
        assert "checksum" in caplog.text
        assert _state(reg) == _full_replay(root)


def test_altered_snapshot_is_caught(tmp_path: Path) -> None:
    """A snapshot edited with a valid checksum cannot change what is served: it is no longer bound
    to its ``registry.snapshot`` audit entry, so no open uses it (issue 26 class 4: before, the
    altered cache was served), and ``verify`` reports the liveness change and the swapped lines."""
    root = tmp_path / "r"
    ids = _build(root)
    p = root / snapshot.SNAP_NAME
    keep = p.read_bytes()

    def kill_row(head: dict, body: bytearray) -> None:  # mark record 5 removed
        body[head["ids_bytes"] + 8 * head["n"] + 5] = 0

    rewrite_snapshot(p, kill_row)
    with Registry(root, read_only=True) as reg:
        assert ids[5] in reg.ids()  # the altered cache says removed; it is not used
        problems = reg.verify()
    assert any("columns.snap" in x and "not bound to the audit log" in x for x in problems)
    assert any("columns.snap" in x and "liveness" in x and ids[5] in x for x in problems)

    p.write_bytes(keep)

    def swap_lines(head: dict, body: bytearray) -> None:  # rows 1 and 2 point at each other's line
        n, at = head["n"], head["ids_bytes"] + 9 * head["n"]
        off = np.frombuffer(bytes(body[at : at + 8 * n]), dtype="<i8").copy()
        off[[1, 2]] = off[[2, 1]]
        body[at : at + 8 * n] = off.tobytes()

    rewrite_snapshot(p, swap_lines)
    with Registry(root, read_only=True) as reg:
        assert reg.get(ids[1]).id == ids[1]  # not used: each row reads its own line
        assert any("columns.snap" in x and "another line" in x for x in reg.verify())


def test_fifo_in_place_of_the_snapshot_does_not_block(tmp_path: Path) -> None:
    root = tmp_path / "r"
    _build(root)
    p = root / snapshot.SNAP_NAME
    p.unlink()
    os.mkfifo(p)
    with Registry(root, read_only=True) as reg:  # O_NONBLOCK open, refused as not a regular file
        assert reg._log.snap_end == 0 and len(reg.ids()) == 29
