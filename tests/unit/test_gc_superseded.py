"""``Registry.gc`` keeps the blobs of superseded records (issue 27: a superseded adapter is "kept in
the audit log and blob store, not retrievable") and still deletes true orphans and explicitly
removed records' blobs; the auditor's tools (``rpe audit verify``, ``rpe audit cross-check``) stay
green after gc on both task families.

gc kept only the blobs of *live* records, so a re-enrolment followed by gc deleted the adapter an
audited composition had used, and the blob the ``record.superseded`` entry names.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from support.cli import rpe as _rpe
from support.registry import DIM, make_adapter, make_meta, new_registry
from support.two_family import FAMILIES, _adapter, build

from client.egress import EgressLog
from common.adapters import adapter_to_arrays
from common.trust.digests import record_digests
from server.registry import AdapterMeta, Registry


def _blob_file(root: Path, sha: str) -> Path:
    return root / "blobs" / "sha256" / sha[:2] / sha


def _orphan(root: Path, byte: str) -> str:
    """A blob file no record line names (what an interrupted add leaves)."""
    name = byte * 32
    path = _blob_file(root, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"left by an interrupted add")
    return name


def test_gc_keeps_superseded_blobs_and_deletes_orphans_and_removed(tmp_path):
    root = tmp_path / "reg"
    rng = np.random.default_rng(1)
    z = rng.standard_normal((4, DIM)).astype(np.float32)
    with new_registry(root) as reg:
        a1 = reg.add(make_adapter(1), z[0], make_meta(0, site="a", task="ct-head"))
        b1 = reg.add(make_adapter(2), z[1], make_meta(1, site="b", task="ct-head"))
        gone = reg.add(make_adapter(3), z[2], make_meta(2, site="c", task="ct-head"))
        a2 = reg.add(make_adapter(4), z[3], make_meta(3, site="a", task="ct-head"))
        assert [r.id for r in reg.supersede(a2.id, run_id="7")] == [a1.id]
        reg.remove(gone.id, reason="site withdrew")
        orphan = _orphan(root, "ee")
        expected = sorted([gone.blob_sha256, orphan])
        assert sorted(reg.gc(dry_run=True)) == expected and _blob_file(root, orphan).is_file()
        assert sorted(reg.gc()) == expected
        assert _blob_file(root, a1.blob_sha256).is_file()  # superseded: kept for the audit trail
        assert not _blob_file(root, gone.blob_sha256).exists() and not _blob_file(root, orphan).exists()
        assert reg.gc() == []  # a second gc finds nothing more
        assert reg.verify(full=True) == []
        assert {r.id for r in reg.list()} == {b1.id, a2.id}  # still not retrievable
    with Registry(root, chroma="off") as reg:  # reopened (from the columns snapshot): the same answer
        assert reg.gc(dry_run=True) == []


def test_gc_keeps_blobs_superseded_by_a_batch_commit(tmp_path):
    """An enrolment round stored as one commit (``add_submissions``) supersedes through its own
    lines and entries; gc keeps those blobs too."""
    from server.registry.batch import Submission

    root = tmp_path / "reg"
    rng = np.random.default_rng(2)
    z = rng.standard_normal((3, DIM)).astype(np.float32)
    with new_registry(root) as reg:
        a1 = reg.add(make_adapter(1), z[0], make_meta(0, site="a", task="ct-head"))
        outcomes = reg.add_submissions(
            [
                Submission(make_adapter(5), z[1], make_meta(1, site="a", task="ct-head")),
                Submission(make_adapter(6), z[2], make_meta(2, site="b", task="ct-head")),
            ]
        )
        assert [r.id for r in outcomes[0].superseded] == [a1.id] and a1.id not in reg
        orphan = _orphan(root, "c1")
        assert reg.gc() == [orphan]
        assert _blob_file(root, a1.blob_sha256).is_file()
        assert reg.verify(full=True) == []


def _reenrol(reg: Registry, family: str, site: str, egress: EgressLog | None, seed: int) -> tuple[str, str]:
    """``site`` sends a new adapter for the same task and base, as an enrolment run does (site a
    logs its reply and the coordinator's receipt in its egress log); it supersedes the old one.
    Returns (the old record's blob, the new record's id)."""
    spec = FAMILIES[family]
    (old,) = reg.list(site=site)
    adapter = _adapter(spec["shapes"], seed=seed)
    z = (old.z + 0.05).astype(np.float32)
    run_id = f"{family}-reenrol-{site}"
    fields: dict = {}
    reply = None
    if egress is not None:
        arrays, _ = adapter_to_arrays(adapter)
        reply = {"adapter": arrays, "embedding": {"z": z}, "meta": {"site": site, "task": spec["task"]}}
        fields = {
            "run_id": run_id,
            "nonce": f"{run_id}-n",
            "record_digests": record_digests(reply),
            "message_type": "train",
        }
    meta = AdapterMeta(site=site, task=spec["task"], modality="text", base_fingerprint=spec["base"], sample_count=9)
    new = reg.add(adapter, z, meta, audit_fields=fields)
    assert [r.id for r in reg.supersede(new.id, run_id=run_id)] == [old.id]
    if egress is not None and reply is not None:
        extra = {"outcome": "ok", "nonce": f"{run_id}-n", "receipt": reg.receipt(new.id, run_id=run_id)}
        egress.record("train", reply, run_id=run_id, extra=extra)
    return old.blob_sha256, new.id


@pytest.fixture(scope="module")
def two_family(tmp_path_factory):
    return build(tmp_path_factory.mktemp("gc-two-family"))


def test_auditor_stays_green_after_gc_on_both_families(two_family, tmp_path, capsys):
    tree = tmp_path / "tree"
    shutil.copytree(two_family["root"].parent, tree, ignore=shutil.ignore_patterns(".lock"))
    root = tree / two_family["root"].name
    egress = EgressLog(tree / two_family["egress"].relative_to(two_family["root"].parent), full_records=("meta",))
    kept: dict[str, list[tuple[Path, str]]] = {}
    for n, (family, spec) in enumerate(FAMILIES.items()):
        path = root / spec["subdir"] if spec["subdir"] else root
        composed = two_family["compositions"][family].sites  # an audited composition used these adapters
        with Registry(path, chroma="off") as reg:
            kept[family] = [(path, _reenrol(reg, family, "a", egress, seed=100 + n)[0])]
            kept[family] += [
                (path, _reenrol(reg, family, s, None, seed=200 + 10 * n + i)[0])
                for i, s in enumerate(composed)
                if s != "a"
            ]
            orphan = _orphan(path, "d0")
            assert reg.gc() == [orphan], family  # the orphan only
            assert reg.verify(full=True) == []
        for where, sha in kept[family]:
            assert _blob_file(where, sha).is_file(), (family, sha)
    code, out = _rpe(capsys, "audit", "verify", "--registry", str(root))
    assert code == 0, out
    code, out = _rpe(
        capsys, "audit", "cross-check", "--egress", str(egress.path), "--site", "a", "--registry", str(root)
    )
    assert code == 0 and "cross-check for site a: OK (4 matched, 0 coordinator-only, 0 site-only)" in out, out
