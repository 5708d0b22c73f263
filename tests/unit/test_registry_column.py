"""The registry's z column (``z.f32``): old base64 registries migrate, a z edited in the column is
caught against its z_sha256, orphan column rows (crash between column and record line) are
harmless, re-added records keep record-row tie order, and ExactTopK's persisted state is reused
and rejected when it does not match the column."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from support.registry import DIM, brute_force, make_adapter, make_meta, new_registry

from common.trust.digests import canonical_json
from server.registry import Registry
from server.registry.errors import RegistryCorruptError


def _fill(root: Path, n: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    Z = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    with new_registry(root) as reg:
        ids = [r.id for r in reg.add_many([(make_adapter(i % 5), Z[i], make_meta(i)) for i in range(n)])]
    return Z, ids


def _to_old_format(root: Path) -> None:
    """Rewrite a registry as the pre-column format: z as base64 in each add line, no column files."""
    col = np.memmap(root / "z.f32", dtype="<f4", mode="r", offset=4096)
    M = col.reshape(-1, DIM)
    out = []
    for raw in (root / "records.jsonl").read_text().splitlines():
        e = json.loads(raw)
        if e["op"] == "add":
            e["z_b64"] = base64.b64encode(np.ascontiguousarray(M[e.pop("row")]).tobytes()).decode()
        out.append(canonical_json(e) + "\n")
    del col, M
    data = "".join(out).encode()
    (root / "records.jsonl").write_bytes(data)
    for name in ("z.f32", "z.f32.crc", "zindex.npz"):
        (root / name).unlink(missing_ok=True)
    # the audit log as the pre-column writer left it: the same entries, each bulk add bound to the
    # base64 lines it wrote (one add_many in ``_fill``: the whole file)
    from server.audit import AuditLog, read_entries
    from server.registry.writer import span_fields

    entries = [e for _, e in read_entries(root / "audit.jsonl")]
    (root / "audit.jsonl").unlink()
    log = AuditLog(root / "audit.jsonl")
    for e in entries:
        fields = {k: v for k, v in e.items() if k not in ("seq", "ts", "event", "prev", "hash")}
        if e["event"] == "registry.bulk_add":
            fields.update(span_fields(0, len(data), data))
        log.append(e["event"], **fields)


def test_old_base64_registry_is_read_and_migrated(tmp_path):
    root = tmp_path / "r"
    Z, ids = _fill(root, 60)
    _to_old_format(root)
    q = Z[3] + 0.01
    order, dist = brute_force(Z, q, 5)
    with Registry(root, read_only=True) as ro:  # read as it is, nothing written
        assert [h.record.id for h in ro.query(q, 5)] == [ids[o] for o in order]
    assert not (root / "z.f32").exists()
    with Registry(root) as reg:  # the first writable open migrates
        assert reg.ids() == ids
        np.testing.assert_array_equal(reg.embeddings(ids), Z)
        assert [h.record.id for h in reg.query(q, 5)] == [ids[o] for o in order]
    assert (root / "z.f32").exists() and '"z_b64"' not in (root / "records.jsonl").read_text()
    events = [json.loads(x)["event"] for x in (root / "audit.jsonl").read_text().splitlines()]
    assert "registry.migrate" in events
    with Registry(root) as reg:
        np.testing.assert_allclose([h.distance for h in reg.query(q, 5)], dist, rtol=1e-12)


def test_interrupted_migration_is_redone(tmp_path):
    """A column left beside a still-old log (crash between the two renames) is rebuilt, not trusted."""
    root = tmp_path / "r"
    Z, ids = _fill(root, 20)
    _to_old_format(root)
    (root / "z.f32").write_bytes(os.urandom(8192))  # a leftover that must not be used
    (root / "z.f32.crc").write_bytes(b"")
    with Registry(root) as reg:
        np.testing.assert_array_equal(reg.embeddings(ids), Z)


def test_z_edited_in_the_column_is_caught(tmp_path):
    root = tmp_path / "r"
    Z, ids = _fill(root, 100)

    def edit(row: int) -> None:  # change a record's z in place (its crc left stale)
        with open(root / "z.f32", "r+b") as fh:
            fh.seek(4096 + row * 4 * DIM)
            fh.write(np.full(DIM, 9.0, dtype="<f4").tobytes())

    edit(4)  # outside the rows checked on open: caught when used
    with Registry(root) as reg:
        with pytest.raises(RegistryCorruptError, match="z_sha256"):
            reg.get(ids[4])
        assert any("does not match its z_sha256" in p for p in reg.verify(full=True))
        assert reg.get(ids[5]).id == ids[5]
    edit(95)  # among the last 64 rows: opening refuses
    with pytest.raises(RegistryCorruptError, match="crc32"):
        Registry(root)


def test_record_naming_a_missing_row_is_corrupt(tmp_path):
    root = tmp_path / "r"
    _fill(root, 10)
    (root / "z.f32").unlink()
    with pytest.raises(RegistryCorruptError, match="z.f32"):
        Registry(root)


def test_crash_after_column_leaves_only_orphan_rows(tmp_path):
    root = tmp_path / "r"
    Z, ids = _fill(root, 10)
    code = textwrap.dedent(f"""
        import sys, numpy as np
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        from support.registry import make_adapter, make_meta, DIM
        from server.registry import Registry
        reg = Registry({str(root)!r})
        reg.add(make_adapter(99), np.ones(DIM, dtype=np.float32), make_meta(99))
    """)
    env = {**os.environ, "RPE_CRASH_AT": "after_column", "ANONYMIZED_TELEMETRY": "False"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=Path(__file__).resolve().parents[2], timeout=300)
    assert proc.returncode == -signal.SIGKILL
    with Registry(root) as reg:
        assert reg.ids() == ids  # the row is in the column, no record names it
        rec = reg.add(make_adapter(99), np.ones(DIM, dtype=np.float32), make_meta(99))
        for method in ("auto", "brute", "index"):
            assert reg.query(np.ones(DIM, dtype=np.float32), 1, method=method)[0].record.id == rec.id
        assert [p for p in reg.verify(full=True) if not p.startswith("orphan blob")] == []


def test_readded_record_keeps_its_row_order_on_ties(tmp_path):
    """A removed record added again gets a new column row but keeps its record row, which breaks ties."""
    root = tmp_path / "r"
    z = np.zeros(DIM, dtype=np.float32)
    with new_registry(root) as reg:
        first = reg.add(make_adapter(0), z, make_meta(0))
        others = [reg.add(make_adapter(i), z, make_meta(i)).id for i in range(1, 6)]
        reg.remove(first.id)
        again = reg.add(make_adapter(0), z, make_meta(0))
        assert again.id == first.id
        for method in ("auto", "brute"):
            got = [h.record.id for h in reg.query(z, 3, method=method)]
            assert got == [first.id] + others[:2], method


def test_search_state_persists_and_is_checked(tmp_path):
    root = tmp_path / "r"
    Z, ids = _fill(root, 3000, seed=5)
    q = Z[10] + 0.01
    order, _ = brute_force(Z, q, 8)
    with Registry(root, chroma="off") as reg:
        assert [h.record.id for h in reg.query(q, 8)] == [ids[o] for o in order]
    assert (root / "zindex.npz").exists()
    with Registry(root, chroma="off") as reg:
        assert [h.record.id for h in reg.query(q, 8)] == [ids[o] for o in order]
        assert reg._search.topk is not None and reg._search.topk.n == 3000 and not reg._search.dirty
    # a state from another column (digest differs) is ignored and rebuilt
    with np.load(root / "zindex.npz") as f:
        st = {k: f[k] for k in f.files}
    st["col_digest"] = np.asarray("0" * 64)
    with open(root / "zindex.npz", "wb") as fh:
        np.savez(fh, **st)
    with Registry(root, chroma="off") as reg:
        assert [h.record.id for h in reg.query(q, 8)] == [ids[o] for o in order]
        assert reg._search.dirty is False or reg._search.topk.n == 3000


def test_migration_keeps_the_records_bound_into_the_audit_chain(tmp_path):
    """The rewritten log is bound by the ``registry.migrate`` entry: verify is clean afterwards, a
    later hand edit is still caught, and an old log that no longer matches its audit entries is
    not migrated (that would bind the edit) but can still be read."""
    from server.registry.binding import check_binding

    root = tmp_path / "r"
    Z, ids = _fill(root, 12)
    _to_old_format(root)
    with Registry(root) as reg:
        assert reg.verify() == []
    assert check_binding(root / "records.jsonl", root / "audit.jsonl") == []
    lines = (root / "records.jsonl").read_text().splitlines()
    lines[3] = lines[3].replace('"sample_count":', '"sample_count":1')
    (root / "records.jsonl").write_text("\n".join(lines) + "\n")
    problems = check_binding(root / "records.jsonl", root / "audit.jsonl")
    assert problems and "edited" in problems[0]

    other = tmp_path / "o"
    _fill(other, 6, seed=1)
    _to_old_format(other)
    lines = (other / "records.jsonl").read_text().splitlines()
    lines[2] = lines[2].replace('"sample_count":', '"sample_count":9')
    (other / "records.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(RegistryCorruptError, match="not rewritten for the z column"):
        Registry(other)
    assert '"z_b64"' in (other / "records.jsonl").read_text()  # nothing was changed
    with Registry(other, read_only=True) as ro:
        assert len(ro) == 6
