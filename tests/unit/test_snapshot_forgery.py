"""Issue 26 class 4: the open-time cache (``columns.snap``) cannot be forged.

It carried only a plain sha256 that whoever edits it recomputes: a consent-withdrawn record was made
live again, a live record hidden and a site-a record given site-c's filter code (so leave-one-out
exclusion of site a returned it), and every open served that while ``rpe audit verify`` said OK.
Now a snapshot is used only when its ``registry.snapshot`` audit entry binds it, a writable open
refuses an unbound one (moved aside, audited), and ``Registry.verify`` — the one check
``rpe audit verify`` and the console run — compares it with a full replay and names each forgery.
Real registry, real files.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from support.registry import DIM, make_adapter, make_meta, new_registry, rewrite_snapshot

from server import audit as audit_mod
from server.registry import Registry, snapshot
from server.registry.columns import KEYS


@pytest.fixture(autouse=True)
def _small_snapshots(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(snapshot, "MIN_RECORDS", 1)


def _meta(i: int, site: str) -> dict:
    m = make_meta(i)
    m = m if isinstance(m, dict) else m.to_dict()
    return {**m, "site": site, "task": "t"}


@pytest.fixture
def built(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    root = tmp_path / "reg"
    Z = np.random.default_rng(3).standard_normal((12, DIM)).astype(np.float32)
    new_registry(root).close()
    with Registry(root, chroma="off") as reg:
        recs = [reg.add(make_adapter(i % 4), Z[i], _meta(i, "abc"[i % 3])) for i in range(9)]
        reg.remove(recs[0].id, reason="consent withdrawn")  # a site-a record
    assert (root / snapshot.SNAP_NAME).is_file()
    ids = {"withdrawn": recs[0].id, "live_a": recs[3].id, "live_b": recs[1].id}
    return root, ids


def _row(root: Path, rid: str) -> int:
    raw = (root / snapshot.SNAP_NAME).read_bytes()
    m = len(snapshot.MAGIC)
    hl = int.from_bytes(raw[m : m + 8], "little")
    head = json.loads(raw[m + 8 : m + 8 + hl])
    ids = raw[m + 8 + hl : m + 8 + hl + head["ids_bytes"]].decode().split("\n")
    return ids.index(rid)


def _set_live(row: int, value: int) -> Callable[[dict, bytearray], None]:
    def edit(head: dict, body: bytearray) -> None:
        body[head["ids_bytes"] + 8 * head["n"] + row] = value

    return edit


def _set_site(row: int, site: str) -> Callable[[dict, bytearray], None]:
    def edit(head: dict, body: bytearray) -> None:
        n = head["n"]
        at = head["ids_bytes"] + 17 * n + 4 * n * list(KEYS).index("site")
        codes = np.frombuffer(bytes(body[at : at + 4 * n]), dtype="<i4").copy()
        codes[row] = head["vocab"]["site"][site]
        body[at : at + 4 * n] = codes.tobytes()

    return edit


FORGERIES = {
    "withdrawn-made-live": lambda root, ids: _set_live(_row(root, ids["withdrawn"]), 1),
    "live-hidden": lambda root, ids: _set_live(_row(root, ids["live_b"]), 0),
    "site-a-given-site-c": lambda root, ids: _set_site(_row(root, ids["live_a"]), "c"),
}
#: what Registry.verify must name for each, besides "not bound to the audit log"
NAMED = {"withdrawn-made-live": "liveness", "live-hidden": "liveness", "site-a-given-site-c": "filter fields"}


def _served(reg: Registry, ids: dict[str, str]) -> dict:
    q = np.zeros(DIM, np.float32)
    return {
        "ids": reg.ids(),
        "not_a": sorted(h.record.id for h in reg.query(q, 5, exclude_site="a")),
        "site_a": sorted(r.id for r in reg.list(site="a")),
    }


@pytest.mark.parametrize("forgery", sorted(FORGERIES))
def test_a_forged_snapshot_is_never_served_and_verify_names_it(built, forgery: str) -> None:
    root, ids = built
    with Registry(root, read_only=True) as ro:
        honest = _served(ro, ids)
        assert ro.verify() == []
    assert ids["withdrawn"] not in honest["ids"] and ids["live_a"] not in honest["not_a"]
    rewrite_snapshot(root / snapshot.SNAP_NAME, FORGERIES[forgery](root, ids))
    # verify (read-only, what `rpe audit verify` and the console call) names the forgery
    with Registry(root, read_only=True) as ro:
        assert _served(ro, ids) == honest  # a read-only open does not use it either
        problems = ro.verify()
    assert any("columns.snap" in p and "not bound to the audit log" in p for p in problems), problems
    assert any("columns.snap" in p and NAMED[forgery] in p for p in problems), problems
    # the ServerApp's (writable) open serves the replay, moves the forged file aside and audits it
    forged = (root / snapshot.SNAP_NAME).read_bytes()
    with Registry(root, chroma="off") as reg:
        assert _served(reg, ids) == honest
    refused = [e for _, e in audit_mod.read_entries(root / "audit.jsonl") if e["event"] == "registry.cache_refused"]
    assert len(refused) == 1 and "not bound to the audit log" in refused[0]["reason"]
    assert (root / refused[0]["kept_in"]).read_bytes() == forged
    with Registry(root, read_only=True) as ro:  # the close wrote an honest, bound snapshot
        assert ro._log.snap_end > 0 and ro.verify() == []  # noqa: SLF001
    assert audit_mod.verify(root / "audit.jsonl") == []


def test_a_forger_who_also_appends_an_audit_entry_is_still_named_by_verify(built) -> None:
    """The limit of the binding: an operator who can write files may also append a matching
    ``registry.snapshot`` entry at the chain's end (the chain is not keyed). The open then uses the
    forged cache, but ``Registry.verify`` compares it with the replay and names it."""
    root, ids = built
    p = root / snapshot.SNAP_NAME
    rewrite_snapshot(p, FORGERIES["withdrawn-made-live"](root, ids))
    raw = p.read_bytes()
    m = len(snapshot.MAGIC)
    hl = int.from_bytes(raw[m : m + 8], "little")
    head, body = json.loads(raw[m + 8 : m + 8 + hl]), raw[m + 8 + hl :]
    head["audit_offset"] = (root / "audit.jsonl").stat().st_size
    entry = audit_mod.AuditLog(root / "audit.jsonl").append(
        snapshot.EV_SNAPSHOT, **{k: head[k] for k in snapshot.BOUND_FIELDS}, live=0
    )
    head["audit_seq"] = entry["seq"]
    h = json.dumps(head, sort_keys=True).encode()
    p.write_bytes(snapshot.MAGIC + len(h).to_bytes(8, "little") + h + body)
    with Registry(root, read_only=True) as ro:
        problems = ro.verify()
    assert any("columns.snap" in x and "liveness" in x and ids["withdrawn"] in x for x in problems), problems


def test_a_snapshot_without_binding_is_not_used(built, tmp_path: Path) -> None:
    """A snapshot written before the binding (no audit_offset) is replayed past, never trusted."""
    root, _ = built
    rewrite_snapshot(root / snapshot.SNAP_NAME, lambda head, body: head.pop("audit_offset"))
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    with Registry(copy, read_only=True) as ro:
        assert ro._log.snap_end == 0  # noqa: SLF001
        assert any("names no registry.snapshot audit entry" in p for p in ro.verify())
