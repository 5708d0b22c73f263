"""``Registry.verify`` checks the blobs of superseded records (H2 item 5): ``gc`` keeps them for the
audit trail (issue 27), so one deleted or cut short by hand is damage. ``rpe audit verify``, ``rpe
audit cross-check`` and the console's integrity banner all say so (they run the one check), naming
the superseded record and its blob; the record that superseded it is not flagged.

On both task families over the real two-family registry root (``support.two_family``): clean after a
re-enrolment -> intact; the superseded record's blob deleted -> not intact, named; cut short ->
named; content changed -> named by the full check; a blob an audited ``registry.gc`` of an older
version deleted -> no damage.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from support.cli import rpe as _rpe
from support.two_family import FAMILIES, SEG_DIR, _adapter, build

from server.registry import AdapterMeta, Registry

#: per family: the site that re-enrols (not site a, whose egress log the cross-check reads)
SITE = {"report": "b", "seg": "RUNMC"}


def family_dir(root: Path, key: str) -> Path:
    return root / SEG_DIR if key == "seg" else root


def _blob_file(reg_dir: Path, sha: str) -> Path:
    return reg_dir / "blobs" / "sha256" / sha[:2] / sha


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build(tmp_path_factory.mktemp("verify-superseded"))


@pytest.fixture
def tree(built, tmp_path):
    """A copy of the two-family tree in which, per family, one site re-enrolled (its old record
    superseded, out of retrieval, its blob kept): ``{key: (old record, new record id)}``."""
    shutil.copytree(built["root"].parent, tmp_path / "t", ignore=shutil.ignore_patterns(".lock"))
    root = tmp_path / "t" / built["root"].name
    egress = tmp_path / "t" / built["egress"].relative_to(built["root"].parent)
    superseded = {}
    for n, (key, spec) in enumerate(FAMILIES.items()):
        with Registry(family_dir(root, key), chroma="off") as reg:
            (old,) = reg.list(site=SITE[key])
            meta = AdapterMeta(
                site=SITE[key], task=spec["task"], modality="text", base_fingerprint=spec["base"], sample_count=9
            )
            new = reg.add(_adapter(spec["shapes"], seed=300 + n), (old.z + 0.05).astype(np.float32), meta)
            assert [r.id for r in reg.supersede(new.id, run_id=f"re-{key}")] == [old.id]
            assert _blob_file(family_dir(root, key), old.blob_sha256).is_file()
            superseded[key] = (old, new.id)
    return {"root": root, "egress": egress, "superseded": superseded}


def _verify(reg_dir: Path, full: bool = False) -> list[str]:
    with Registry(reg_dir, chroma="off", read_only=True) as reg:
        return reg.verify(full=full)


def _auditor(capsys, tree) -> tuple[int, str, int, str]:
    """(rpe audit verify's exit code and output, rpe audit cross-check's for site a)."""
    root = str(tree["root"])
    code_v, out_v = _rpe(capsys, "audit", "verify", "--registry", root)
    code_c, out_c = _rpe(
        capsys, "audit", "cross-check", "--egress", str(tree["egress"]), "--site", "a", "--registry", root
    )
    return code_v, out_v, code_c, out_c


def _console(root: Path) -> tuple[str, dict[str, dict[str, list[str]]]]:
    """The overview page's integrity banner and the records each family's findings flag."""
    from starlette.testclient import TestClient

    from server.console.app import create_app

    app = create_app(root)
    try:
        with TestClient(app) as client:
            page = client.get("/").text
        flags = app.state.console.integrity().records
    finally:
        for f in app.state.console.families:
            if f.registry is not None:
                f.registry.close()
    return page.split('id="integrity-banner"')[1].split("</div>")[0], flags


def test_clean_after_a_re_enrolment_is_intact_everywhere(capsys, tree):
    for key in FAMILIES:
        assert _verify(family_dir(tree["root"], key), full=True) == [], key
    code_v, out_v, code_c, out_c = _auditor(capsys, tree)
    assert code_v == 0, out_v
    assert code_c == 0 and "cross-check for site a: OK" in out_c, out_c
    banner, _ = _console(tree["root"])
    assert 'data-ok="1"' in banner, banner


@pytest.mark.parametrize("key", list(FAMILIES))
def test_a_superseded_blob_deleted_by_hand_is_named_by_every_tool(capsys, tree, key):
    reg_dir = family_dir(tree["root"], key)
    old, new_id = tree["superseded"][key]
    _blob_file(reg_dir, old.blob_sha256).unlink()
    want = f"superseded record {old.id} (out of retrieval;"
    problems = _verify(reg_dir)
    assert len(problems) == 1 and problems[0].startswith(want), problems
    assert f"blob {old.blob_sha256} is missing" in problems[0] and new_id not in problems[0]
    other = next(k for k in FAMILIES if k != key)
    assert _verify(family_dir(tree["root"], other)) == []  # the other family is untouched

    code_v, out_v, code_c, out_c = _auditor(capsys, tree)
    assert code_v == 1 and want in out_v and old.blob_sha256 in out_v, out_v
    assert code_c == 1 and "MISMATCH" in out_c and want in out_c and old.blob_sha256 in out_c, out_c
    banner, flags = _console(tree["root"])
    assert 'data-ok="0"' in banner and old.id in banner and old.blob_sha256 in banner, banner
    flagged = {rid for fam in flags.values() for rid in fam}
    assert new_id not in flagged  # the successor is sound: only the damaged record is named


@pytest.mark.parametrize("key", list(FAMILIES))
def test_a_superseded_blob_cut_short_or_altered_is_named(tree, key):
    reg_dir = family_dir(tree["root"], key)
    old, _ = tree["superseded"][key]
    path = _blob_file(reg_dir, old.blob_sha256)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    (problem,) = _verify(reg_dir)
    assert problem.startswith(f"superseded record {old.id}") and f"has {len(data) // 2} bytes" in problem
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))  # same size, other content
    assert _verify(reg_dir) == []  # the quick check looks at sizes only, as for live records
    (problem,) = _verify(reg_dir, full=True)
    assert problem.startswith(f"superseded record {old.id}") and "does not match its hash" in problem


def test_a_blob_an_audited_gc_deleted_is_no_damage(tree):
    """A version of gc that did not keep superseded blobs yet deleted them with a ``registry.gc``
    entry naming each: that registry is not damaged (only a deletion by hand is)."""
    for key in FAMILIES:
        reg_dir = family_dir(tree["root"], key)
        old, _ = tree["superseded"][key]
        _blob_file(reg_dir, old.blob_sha256).unlink()
        with Registry(reg_dir, chroma="off") as reg:
            reg.audit.append("registry.gc", blobs=[old.blob_sha256])
        assert _verify(reg_dir, full=True) == [], key
