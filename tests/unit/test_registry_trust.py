"""Issue 10 items 4–7, registry side: one commit per record and audit entry, records bound into the
chain, receipts as an outside witness, relative norm bounds, names and private files.

Everything runs on real files, a real registry and the real CLI; the full-disk trials on a real
tmpfs are in tests/integration/test_registry_fullfs.py.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from support.trust import BASE, DIM, SHAPES, adapter, make, meta, z

from common.trust.statements import verify_statement
from server import audit as audit_mod
from server.composer import CompositionNormError, compose_for_target
from server.crosscheck import cross_check
from server.registry import MetadataError, Registry
from server.registry.binding import check_binding
from server.registry.errors import BlobCorruptError, RegistryCorruptError, UpdateNormBoundError

ROOT = Path(__file__).resolve().parents[2]


def rpe_process(*args: str) -> subprocess.CompletedProcess:
    """The ``rpe`` CLI as its own process (each start costs the torch import: seconds on a busy CI box)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "deploy.cli", *args], capture_output=True, text=True, env=env, timeout=120
    )


def rpe(*args: str) -> subprocess.CompletedProcess:
    """The same entry point (``deploy.cli.main``) in this process: exit status, stdout and stderr as a process's."""
    import contextlib
    import io

    from deploy.cli import main

    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(args))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return subprocess.CompletedProcess(["rpe", *args], code, out.getvalue(), err.getvalue())


def lines(root: Path) -> list[dict]:
    return [json.loads(x) for x in (root / "records.jsonl").read_text().splitlines()]


def write_lines(root: Path, entries: list[dict]) -> None:
    (root / "records.jsonl").write_text(
        "".join(json.dumps(e, separators=(",", ":"), sort_keys=True) + "\n" for e in entries)
    )


# ---- item 4: one commit ----------------------------------------------------------------------


def test_record_without_audit_entry_is_rolled_back_on_reopen(tmp_path):
    root, ids = make(tmp_path, 2)
    before = (root / "records.jsonl").read_bytes()
    with Registry(root, chroma="off") as reg:
        extra = reg.add(adapter(9), z(9), meta("s9")).id
    # cut the audit log back to before that add: the record line is now without its entry
    audit_lines = (root / "audit.jsonl").read_bytes().splitlines(keepends=True)
    (root / "audit.jsonl").write_bytes(b"".join(audit_lines[:-1]))
    with Registry(root, chroma="off") as reg:
        assert reg.ids() == ids and extra not in reg
        assert reg.verify(full=True) == []
    assert (root / "records.jsonl").read_bytes() == before
    last = list(audit_mod.read_entries(root / "audit.jsonl"))[-1][1]
    assert last["event"] == "registry.repair" and last["dropped"] == [f"add:{extra}"]
    assert audit_mod.verify(root / "audit.jsonl") == []


def test_torn_audit_tail_is_repaired_by_reopening(tmp_path):
    root, ids = make(tmp_path, 2)
    with open(root / "audit.jsonl", "ab") as fh:
        fh.write(b'{"seq": 99, "event": "half')
    with Registry(root, chroma="off") as reg:
        assert reg.ids() == ids
        reg.add(adapter(5), z(5), meta("s5"))
    entries = [e for _, e in audit_mod.read_entries(root / "audit.jsonl")]
    repair = [e for e in entries if e["event"] == "registry.repair"]
    assert repair and repair[0]["file"] == "audit.jsonl" and repair[0]["truncated_bytes"] == 26
    assert audit_mod.verify(root / "audit.jsonl") == []


# ---- item 5: records bound into the chain ----------------------------------------------------


@pytest.mark.parametrize("tamper", ["z", "blob", "delete", "add", "meta"])
def test_verify_names_edited_deleted_repointed_and_added_records(tmp_path, tamper):
    root, ids = make(tmp_path, 3)
    entries = lines(root)
    if tamper == "z":  # z lives in the z column (z.f32): the bytes of the record's row change
        with open(root / "z.f32", "r+b") as fh:
            fh.seek(4096 + entries[1]["row"] * 4 * DIM)
            zz = np.frombuffer(fh.read(4 * DIM), "<f4").copy()
            zz[0] += 1.0
            fh.seek(4096 + entries[1]["row"] * 4 * DIM)
            fh.write(zz.tobytes())
        want = [f"record {ids[1]}", "z changed"]
    elif tamper == "blob":
        entries[1]["blob_sha256"] = entries[0]["blob_sha256"]
        want = [f"record {ids[1]}", "re-pointed"]
    elif tamper == "delete":
        del entries[1]
        want = [f"record {ids[1]}", "deleted"]
    elif tamper == "add":
        forged = dict(entries[0], id="s0:t:forged")
        entries.append(forged)
        want = ["record s0:t:forged", "added outside the registry"]
    else:
        entries[2]["meta"]["sample_count"] = 5000
        want = [f"record {ids[2]}", "edited"]
    write_lines(root, entries)
    problems = check_binding(root / "records.jsonl", root / "audit.jsonl")
    assert any(all(w in p for w in want) for p in problems), problems
    if tamper == "z":  # the row's crc32 no longer matches either: the registry refuses to open on it
        with pytest.raises(RegistryCorruptError, match="z column"):
            Registry(root, read_only=True)
    else:
        with Registry(root, read_only=True) as reg:
            assert any(all(w in p for w in want) for p in reg.verify())
    out = rpe("audit", "verify", "--log", str(root / "audit.jsonl"))
    assert out.returncode == 1 and want[1] in out.stdout, out.stdout + out.stderr


def test_clean_registry_verifies_and_anchor_detects_truncation(tmp_path):
    root, _ = make(tmp_path, 3)
    out = rpe_process("audit", "verify", "--log", str(root / "audit.jsonl"))
    assert out.returncode == 0 and "every record" in out.stdout, out.stdout + out.stderr
    head = audit_mod.head(root / "audit.jsonl")
    anchor = f"{head['seq']}:{head['line_sha256']}"
    assert rpe("audit", "verify", "--log", str(root / "audit.jsonl"), "--anchor", anchor).returncode == 0
    # drop the last audit entry, its record line and its blob: chain and binding are consistent, the
    # anchor is not (the blob left behind would be named: verify lists an orphan blob since issue 26)
    (root / "audit.jsonl").write_bytes(b"".join((root / "audit.jsonl").read_bytes().splitlines(True)[:-1]))
    gone = lines(root)[-1]["blob_sha256"]
    write_lines(root, lines(root)[:-1])
    blob = root / "blobs" / "sha256" / gone[:2] / gone
    blob.chmod(0o600)
    blob.unlink()
    assert rpe("audit", "verify", "--log", str(root / "audit.jsonl")).returncode == 0
    out = rpe("audit", "verify", "--log", str(root / "audit.jsonl"), "--anchor", anchor)
    assert out.returncode == 1 and "anchor_mismatch" in out.stdout
    bad = rpe("audit", "verify", "--log", str(root / "audit.jsonl"), "--anchor", "3:nothex")
    assert bad.returncode == 2 and bad.stderr.startswith("rpe: error:")


def test_receipts_witness_a_truncated_or_rewritten_coordinator_log(tmp_path):
    root = tmp_path / "reg"
    Registry.init(root, base_fingerprint=BASE, module_shapes=SHAPES, embedding_dim=DIM).close()
    egress = tmp_path / "egress.jsonl"
    out = []
    with Registry(root, chroma="off") as reg:
        for i in range(3):
            rec = reg.add(adapter(i), z(i), meta("s0"), audit_fields={"run_id": f"r{i}"})
            r = reg.receipt(rec.id, run_id=f"r{i}")
            pub = audit_mod_pub(reg)
            body = verify_statement(pub, r, "receipt", expect={"record_id": rec.id, "site": "s0"})
            assert body["seq"] == audit_mod.head(root / "audit.jsonl")["seq"]
            out.append(
                {
                    "v": 1,
                    "ts": "2026-01-01T00:00:00Z",
                    "message_type": "train",
                    "run_id": f"r{i}",
                    "total_bytes": 0,
                    "records": [],
                    "extra": {"receipt": r, "blob_sha256": rec.blob_sha256, "z_sha256": rec.z_sha256},
                }
            )
    egress.write_text("".join(json.dumps(e) + "\n" for e in out))
    keyfile = root / "coordinator.pub"
    assert stat.S_IMODE((root / "coordinator.key").stat().st_mode) == 0o600
    rep = cross_check(egress, root / "audit.jsonl", "s0", coordinator_key=keyfile)
    assert rep.receipts_checked == 3 and rep.receipt_problems == [] and rep.ok, str(rep)
    raw = (root / "audit.jsonl").read_bytes().splitlines(True)
    (root / "audit.jsonl").write_bytes(b"".join(raw[:-1]))  # truncate the tail
    rep = cross_check(egress, root / "audit.jsonl", "s0", coordinator_key=keyfile)
    assert not rep.ok and any("truncated" in p for p in rep.receipt_problems + rep.truncation)
    # rewrite the last entry consistently (a coordinator re-chaining its own log)
    last = json.loads(raw[-2])
    last["site"] = "someone-else"
    last["hash"] = audit_mod.entry_hash(last)
    (root / "audit.jsonl").write_bytes(b"".join(raw[:-2]) + audit_mod.canonical_json(last).encode() + b"\n")
    rep = cross_check(egress, root / "audit.jsonl", "s0", coordinator_key=keyfile)
    assert any("rewritten" in p for p in rep.receipt_problems), rep.receipt_problems


def audit_mod_pub(reg: Registry):
    from common.trust.signing import load_public_key

    return load_public_key(reg.coordinator_public_key_path)


# ---- item 6: one site cannot steer ----------------------------------------------------------


def test_oversized_update_refused_relative_to_the_registry(tmp_path):
    root, _ = make(tmp_path, 4)
    with Registry(root, chroma="off") as reg:
        with pytest.raises(UpdateNormBoundError, match=r"site 'evil'.*more than 10 × the median of the 4 adapters"):
            reg.add(adapter(50, scale=500.0), z(50), meta("evil"))
        rejected = [e for _, e in audit_mod.read_entries(root / "audit.jsonl")][-1]
        assert rejected["event"] == "submission.rejected" and rejected["error"] == "UpdateNormBoundError"
        ok = reg.add(adapter(51, scale=2.0), z(51), meta("fine"))
        norms = reg._cols.meta[reg._cols.row[ok.id]]["update_norms"]
        assert norms["__total__"] > 0 and set(SHAPES) <= set(norms)
        assert "update_norms" not in ok.meta.to_dict()
        # computed once, by the validation, and equal to the bound module's own definition
        from server.bounds import adapter_norms

        want = adapter_norms(adapter(51, scale=2.0))
        assert set(norms) == set(want)
        for name, value in want.items():
            assert norms[name] == pytest.approx(value, rel=1e-5)
        # another task has no reference yet: only the absolute cap applies
        reg.add(adapter(52, scale=500.0), z(52), meta("other", task="t2"))


def test_composed_adapter_checked_and_max_l1_audited(tmp_path):
    root, _ = make(tmp_path, 4)
    with Registry(root, chroma="off") as reg:
        res = compose_for_target(reg, z(0), strategy="lin", k=3, strategy_params={"max_l1": 2.0}, target="x")
        entry = [e for _, e in audit_mod.read_entries(root / "audit.jsonl")][-1]
        assert entry["event"] == "composition" and entry["max_l1"] == 2.0
        assert entry["weights_l1"] <= 2.0 + 1e-6 and entry["update_norm"] > 0
        assert float(np.abs(res.weights).sum()) <= 2.0 + 1e-6
        # with the bound off, lin on near-duplicate z cancels wildly: the composed update is refused
        base_z = z(0)
        for i in range(3):
            reg.add(
                adapter(60 + i), base_z + np.float32(1e-4) * np.float32(i + 1) * np.ones(DIM, np.float32), meta(f"d{i}")
            )
        with pytest.raises(CompositionNormError, match=r"'lin' composition for target 'x2'.*median"):
            compose_for_target(
                reg,
                base_z + 0.5,
                strategy="lin",
                k=3,
                strategy_params={"max_l1": float("inf")},
                target="x2",
                exclude_site="s0",
            )


# ---- item 7: names, files ------------------------------------------------------------------


@pytest.mark.parametrize("site", ["a\u202eb", "a\u200bb", "a\x07b"])
def test_names_with_bidi_zero_width_or_control_refused(tmp_path, site):
    root, _ = make(tmp_path, 1)
    with Registry(root, chroma="off") as reg, pytest.raises(MetadataError, match="U\\+|control characters"):
        reg.add(adapter(1), z(1), meta(site))


def test_names_are_nfc_normalised(tmp_path):
    root, _ = make(tmp_path, 1)
    with Registry(root, chroma="off") as reg:
        a = reg.add(adapter(7), z(7), meta("caf\u00e9"))
        b = reg.add(adapter(7), z(7), meta("cafe\u0301"))
        assert a.id == b.id and a.meta.site == "caf\u00e9"


def test_coordinator_files_private_and_fifo_blob_refused(tmp_path):
    root, ids = make(tmp_path, 1)
    for p in [root, root / "blobs"]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o700, p
    for p in [root / "records.jsonl", root / "audit.jsonl", root / "registry.json", root / "coordinator.key"]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    with Registry(root, chroma="off") as reg:
        blob = reg.blob_path(ids[0])
        assert stat.S_IMODE(blob.stat().st_mode) == 0o400
        blob.unlink()
        os.mkfifo(blob)
        with pytest.raises(BlobCorruptError, match="FIFO"):
            reg.load_blob(ids[0])


@pytest.mark.parametrize("damage", ["nested-config", "fifo-records", "fifo-config"])
def test_malformed_registry_files_give_a_typed_error_fast(tmp_path, damage):
    import time

    root, _ = make(tmp_path, 1)
    if damage == "nested-config":
        (root / "registry.json").write_text("[" * 100_000 + "]" * 100_000)
    else:
        name = "records.jsonl" if damage == "fifo-records" else "registry.json"
        (root / name).unlink()
        os.mkfifo(root / name)
    t0 = time.monotonic()
    out = rpe_process("registry", "ls", "--registry", str(root))
    assert out.returncode == 2 and out.stderr.startswith("rpe: error:"), out.stderr[-2000:]
    assert "Traceback" not in out.stderr and time.monotonic() - t0 < 60
