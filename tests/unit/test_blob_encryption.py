"""Optional AES-256-GCM encryption of adapter blobs at rest (``server/registry/blobcrypt.py`` + the registry).

Synthetic adapters against a synthetic base, as in test_registry.py (whose helpers are reused); one
crash case in a subprocess, and the CLI on the tiny model."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from support import tiny_adapter
from support.registry import DIM, audit_lines, make_adapter, make_meta, new_registry, state

from common.adapters import adapter_to_bytes, save_peft_adapter
from deploy.cli import build_parser, main
from server.audit import verify as audit_verify
from server.registry import (
    BlobCorruptError,
    BlobKeyError,
    EmbeddingDimensionError,
    Registry,
    RegistryError,
    blobcrypt,
)
from server.registry.blobcrypt import BlobAuthError, BlobKey, load_blob_key, new_key_file

ROOT = Path(__file__).resolve().parents[2]
PRIVACY = {"dp_sgd": True, "epsilon": 8.0, "delta": 1e-5}
ENV_VARS = (blobcrypt.KEY_FILE_ENV, blobcrypt.KEY_ENV)


@pytest.fixture(autouse=True)
def _no_env_key(monkeypatch):
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def key_file(tmp_path) -> Path:
    path = tmp_path / "keys" / "blob.key"
    new_key_file(path)
    return path


@pytest.fixture
def enc(tmp_path, key_file):
    """An encrypted registry holding two records (the second one with DP privacy metadata)."""
    root = tmp_path / "reg"
    key = load_blob_key(key_file)
    reg = new_registry(root, blob_key=key)
    blobs = [adapter_to_bytes(make_adapter(i)) for i in (1, 2)]
    recs = [
        reg.add(blobs[0], np.zeros(DIM), make_meta(0)),
        reg.add(make_adapter(2), np.ones(DIM), make_meta(1, privacy=PRIVACY)),
    ]
    yield reg, root, key, blobs, recs
    reg.close()


def _header(blob: bytes) -> bytes:
    n = int.from_bytes(blob[:8], "little")
    return blob[8 : 8 + n]


# ---- keys -----------------------------------------------------------------------------------


def test_key_sources_formats_and_permissions(tmp_path, key_file):
    key = load_blob_key(key_file)
    assert key is not None and len(key.key) == 32 and stat_mode(key_file) == 0o600
    assert key.key_id == hashlib.sha256(b"rpe-blob-key-v1" + key.key).hexdigest()[:16]
    assert key.key.hex() not in repr(key) and key.describe() == {"alg": "AES-256-GCM", "key_id": key.key_id}
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        new_key_file(key_file)
    # explicit path > $RPE_BLOB_KEY_FILE > $RPE_BLOB_KEY; base64 and hex are both accepted
    other = BlobKey(bytes(range(32)))
    b64 = base64.b64encode(other.key).decode()
    assert load_blob_key(env={}) is None
    assert load_blob_key(env={"RPE_BLOB_KEY": f"  {b64}\n"}).key == other.key
    assert load_blob_key(env={"RPE_BLOB_KEY": other.key.hex().upper()}).key == other.key
    assert load_blob_key(env={"RPE_BLOB_KEY_FILE": str(key_file), "RPE_BLOB_KEY": b64}).key == key.key
    assert load_blob_key(key_file, env={"RPE_BLOB_KEY": b64}).key == key.key
    # refused: wrong length / format (the key text is never echoed), group-readable file, missing file
    for bad in ("abcd", "zz" * 32, base64.b64encode(b"x" * 31).decode()):
        with pytest.raises(
            blobcrypt.BlobKeyError,
            match=r"\$RPE_BLOB_KEY does not hold a blob key: expected 64 "
            r"hex digits .*rpe blob-key new FILE",
        ) as info:
            load_blob_key(env={"RPE_BLOB_KEY": bad})
        assert bad not in str(info.value)
    bad_file = tmp_path / "bad.key"
    bad_file.write_text("not a key\n")
    bad_file.chmod(0o600)
    with pytest.raises(blobcrypt.BlobKeyError, match=re.escape(f"blob key file {bad_file} does not hold a blob key")):
        load_blob_key(bad_file)
    key_file.chmod(0o644)
    with pytest.raises(blobcrypt.BlobKeyError, match="mode 644.*" + re.escape(f"chmod 600 {key_file}")):
        load_blob_key(env={"RPE_BLOB_KEY_FILE": str(key_file)})
    with pytest.raises(blobcrypt.BlobKeyError, match="does not exist.*rpe blob-key new"):
        load_blob_key(tmp_path / "absent.key")


def stat_mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o777


def test_encrypt_decrypt_binds_key_and_content_address():
    k1, k2 = BlobKey(b"\x01" * 32), BlobKey(b"\x02" * 32)
    plain = b"adapter bytes" * 10
    sha = hashlib.sha256(plain).hexdigest()
    ct = blobcrypt.encrypt(k1, plain, sha)
    assert blobcrypt.is_encrypted(ct) and len(ct) == blobcrypt.encrypted_size(len(plain)) and plain not in ct
    assert ct != blobcrypt.encrypt(k1, plain, sha)  # fresh nonce every time
    assert blobcrypt.decrypt(k1, ct, sha) == plain
    with pytest.raises(
        blobcrypt.BlobKeyError, match=f"encrypted with key {k1.key_id}, the registry was opened with key {k2.key_id}"
    ):
        blobcrypt.decrypt(k2, ct, sha)
    with pytest.raises(BlobAuthError, match="authentication"):
        blobcrypt.decrypt(k1, ct, "0" * 64)  # stored under another name
    flipped = bytearray(ct)
    flipped[-20] ^= 1
    with pytest.raises(BlobAuthError, match="authentication"):
        blobcrypt.decrypt(k1, bytes(flipped), sha)
    with pytest.raises(BlobAuthError, match="not an encrypted blob"):
        blobcrypt.decrypt(k1, plain, sha)


# ---- the registry ---------------------------------------------------------------------------


def test_blobs_are_ciphertext_and_round_trip(enc):
    reg, root, key, blobs, recs = enc
    assert json.loads((root / "registry.json").read_text())["blob_encryption"] == key.describe()
    for blob, rec in zip(blobs, recs):
        on_disk = reg.blob_path(rec.id).read_bytes()
        assert rec.blob_sha256 == hashlib.sha256(blob).hexdigest() == reg.blob_path(rec.id).name
        assert rec.bytes == len(blob) and len(on_disk) == blobcrypt.encrypted_size(len(blob))
        assert on_disk.startswith(blobcrypt.MAGIC) and _header(blob) not in on_disk
        assert not any(blob[i : i + 32] in on_disk for i in range(len(_header(blob)) + 8, len(blob) - 32, 997))
        assert reg.load_blob(rec.id) == blob
        assert adapter_to_bytes(reg.load_adapter(rec.id)) == blob
    assert reg.verify(full=True) == [] and reg.stats()["blob_encryption"] == key.describe()


def test_records_and_audit_carry_encryption_and_privacy(enc):
    reg, root, key, blobs, recs = enc
    lines = [json.loads(x) for x in (root / "records.jsonl").read_text().splitlines()]
    assert [x["blob_encryption"] for x in lines] == [key.describe()] * 2
    accepted = [e for e in audit_lines(root) if e["event"] == "submission.accepted"]
    assert [e["blob_encryption"] for e in accepted] == [key.describe()] * 2
    assert [e["privacy"] for e in accepted] == ["none", PRIVACY]
    # an idempotent re-add writes nothing, and its audit entry says the same
    snap = state(root)
    again = reg.add(make_adapter(2), np.ones(DIM), make_meta(1, privacy=PRIVACY))
    assert again.id == recs[1].id and state(root) == snap
    last = audit_lines(root)[-1]
    assert last["duplicate"] is True and last["privacy"] == PRIVACY and last["blob_encryption"] == key.describe()
    # bulk: a new record sharing an existing (encrypted) blob, plus a new blob
    out = reg.add_many(
        [(blobs[0], np.full(DIM, 2.0), make_meta(2)), (make_adapter(3), np.full(DIM, 3.0), make_meta(3))]
    )
    assert [reg.load_blob(r.id) for r in out] == [blobs[0], adapter_to_bytes(make_adapter(3))]
    bulk = audit_lines(root)[-1]
    assert bulk["event"] == "registry.bulk_add" and bulk["blob_encryption"] == key.describe()
    assert audit_verify(root / "audit.jsonl") == []
    main(["audit", "verify", "--log", str(root / "audit.jsonl")])


def test_reopen_with_key_from_file_and_each_env_var(enc, key_file, monkeypatch):
    reg, root, key, blobs, recs = enc
    reg.close()
    hex_key = key_file.read_text().strip()
    for how in ("arg", "RPE_BLOB_KEY_FILE", "RPE_BLOB_KEY", "RPE_BLOB_KEY(base64)"):
        with monkeypatch.context() as m:
            if how == "RPE_BLOB_KEY_FILE":
                m.setenv("RPE_BLOB_KEY_FILE", str(key_file))
            elif how == "RPE_BLOB_KEY":
                m.setenv("RPE_BLOB_KEY", hex_key)
            elif how.endswith("(base64)"):
                m.setenv("RPE_BLOB_KEY", base64.b64encode(bytes.fromhex(hex_key)).decode())
            with Registry(root, blob_key=load_blob_key(key_file) if how == "arg" else None, chroma="off") as r2:
                assert r2.has_blob_key, how
                assert r2.load_blob(recs[1].id) == blobs[1], how


def test_without_the_key_search_works_but_blobs_do_not(enc):
    reg, root, key, blobs, recs = enc
    reg.close()
    for ro in (True, False):
        with Registry(root, read_only=ro, chroma="off") as r2:
            assert not r2.has_blob_key and r2.blob_encryption == key.describe()
            assert [h.record.id for h in r2.query(np.ones(DIM), 2)] == [recs[1].id, recs[0].id]
            assert len(r2.list()) == 2 and r2.get(recs[0].id).bytes == len(blobs[0])
            assert r2.verify() == []
            for call in (
                lambda: r2.load_blob(recs[0].id),
                lambda: r2.load_adapter(recs[0].id),
                lambda: r2.verify(full=True),
            ):
                with pytest.raises(BlobKeyError, match=f"key {key.key_id}.*RPE_BLOB_KEY_FILE.*--blob-key-file"):
                    call()
            if not ro:
                snap = state(root)
                with pytest.raises(BlobKeyError, match="storing adapters needs that key"):
                    r2.add(make_adapter(5), np.zeros(DIM), make_meta(4))
                assert state(root) == snap
                r2.remove(recs[0].id)  # no blob bytes needed


def test_wrong_key_or_stray_key_refused_at_open(enc, tmp_path, monkeypatch):
    reg, root, key, blobs, recs = enc
    reg.close()
    wrong = BlobKey(b"\x07" * 32, "test key")
    with pytest.raises(
        BlobKeyError, match=f"encrypted with key {key.key_id}, but the key from test key is key {wrong.key_id}"
    ):
        Registry(root, blob_key=wrong, chroma="off")
    with pytest.raises(BlobKeyError, match="encrypted with key"):
        new_registry(root, blob_key=wrong, exist_ok=True)
    with new_registry(tmp_path / "plain") as plain:
        assert plain.blob_encryption is None and plain.has_blob_key
    with pytest.raises(BlobKeyError, match="unencrypted, but a blob key was given.*rpe registry init --blob-key-file"):
        Registry(tmp_path / "plain", blob_key=key, chroma="off")
    monkeypatch.setenv("RPE_BLOB_KEY", "short")
    with pytest.raises(BlobKeyError, match=r"\$RPE_BLOB_KEY does not hold a blob key"):
        Registry(root, chroma="off")


def test_tampered_or_swapped_blobs_are_detected(enc):
    reg, root, key, blobs, recs = enc
    p0, p1 = reg.blob_path(recs[0].id), reg.blob_path(recs[1].id)
    c0, c1 = p0.read_bytes(), p1.read_bytes()
    assert len(c0) == len(c1)  # same shapes and rank: a swap keeps every size right
    for path in (p0, p1):
        path.chmod(0o644)
    p0.write_bytes(c1)
    p1.write_bytes(c0)
    for rec in recs:
        with pytest.raises(BlobCorruptError, match="fails AES-256-GCM authentication"):
            reg.load_blob(rec.id)
    assert sum("cannot be decrypted" in p for p in reg.verify(full=True)) == 2
    assert reg.verify() == []  # sizes alone cannot tell
    flipped = bytearray(c0)
    flipped[len(flipped) // 2] ^= 0x10
    p0.write_bytes(c0)
    p1.write_bytes(c1)
    assert reg.verify(full=True) == []
    p0.write_bytes(bytes(flipped))
    with pytest.raises(BlobCorruptError, match="altered"):
        reg.load_adapter(recs[0].id)
    assert [p for p in reg.verify(full=True) if recs[0].blob_sha256 in p]


def test_rejected_submission_changes_nothing(enc):
    reg, root, key, blobs, recs = enc
    before = state(root)
    with pytest.raises(EmbeddingDimensionError):
        reg.add(make_adapter(9), np.zeros(DIM + 1), make_meta(3))
    with pytest.raises(EmbeddingDimensionError, match="^item 1"):
        reg.add_many([(make_adapter(9), np.zeros(DIM), make_meta(3)), (make_adapter(8), np.zeros(3), make_meta(4))])
    assert state(root) == before and len(reg) == 2
    assert audit_lines(root)[-1]["event"] == "submission.rejected"


CRASH_CHILD = """
import sys
sys.path.insert(0, sys.argv[2])
import numpy as np
from support.registry import DIM, make_adapter, make_meta
from server.registry import Registry
reg = Registry(sys.argv[1], chroma="off")
reg.add(make_adapter(11), np.full(DIM, 5.0), make_meta(3))
"""


@pytest.mark.integration
def test_crash_after_encrypted_blob_then_retry(enc, key_file):
    reg, root, key, blobs, recs = enc
    reg.close()
    env = {
        **os.environ,
        "RPE_CRASH_AT": "after_blob",
        "RPE_BLOB_KEY_FILE": str(key_file),
        "ANONYMIZED_TELEMETRY": "False",
    }
    out = subprocess.run(
        [sys.executable, "-c", CRASH_CHILD, str(root), str(ROOT / "tests")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == -9, out.stderr
    blob = adapter_to_bytes(make_adapter(11))
    with Registry(root, blob_key=key, chroma="off") as r2:
        assert r2.ids() == [r.id for r in recs]
        orphan = r2._blobs.path(hashlib.sha256(blob).hexdigest())
        assert orphan.read_bytes().startswith(blobcrypt.MAGIC) and _header(blob) not in orphan.read_bytes()
        assert [p for p in r2.verify(full=True) if p.startswith("orphan blob")]
        snap = state(root)["blobs"]
        rec = r2.add(make_adapter(11), np.full(DIM, 5.0), make_meta(3))  # the retry claims the orphan
        assert state(root)["blobs"] == snap and r2.load_blob(rec.id) == blob and r2.verify(full=True) == []


# ---- the coordinator's run config and the CLI -----------------------------------------------


def test_server_run_config_blob_key_file(enc, key_file):
    from server.app import Settings, open_registry

    reg, root, key, blobs, recs = enc
    reg.close()
    s = Settings.from_run_config({"mode": "compose", "registry-dir": str(root), "chroma": "off"})
    assert s.blob_key_file == ""
    with pytest.raises(ValueError, match="blob-key-file"):
        open_registry(s)
    s = Settings.from_run_config(
        {"mode": "compose", "registry-dir": str(root), "chroma": "off", "blob-key-file": str(key_file)}
    )
    with open_registry(s) as r2:
        assert r2.load_blob(recs[0].id) == blobs[0]
    s = Settings.from_run_config({"mode": "whoami", "registry-dir": str(root), "chroma": "off"})
    open_registry(s).close()  # no blob needed


def test_cli_blob_key_new_and_encrypted_init(tmp_path, tiny_model_dir, capsys):
    for cmd in (["blob-key"], ["blob-key", "new"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args([*cmd, "--help"])
        assert "usage: rpe" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        build_parser().parse_args(["registry", "init", "--help"])
    assert "--blob-key-file" in capsys.readouterr().out
    keyf = tmp_path / "blob.key"
    main(["blob-key", "new", str(keyf)])
    out = capsys.readouterr().out
    key = load_blob_key(keyf)
    assert key.key_id in out and "--blob-key-file" in out and stat_mode(keyf) == 0o600
    reg = tmp_path / "reg"
    main(["registry", "init", "--registry", str(reg), "--base", str(tiny_model_dir), "--blob-key-file", str(keyf)])
    assert f"key {key.key_id}" in capsys.readouterr().out
    assert json.loads((reg / "registry.json").read_text())["blob_encryption"]["key_id"] == key.key_id
    peft = save_peft_adapter(tiny_adapter(tiny_model_dir, 0), tmp_path / "peft")
    np.save(tmp_path / "z.npy", np.ones(64, dtype=np.float32))
    add = [
        "registry",
        "add",
        "--registry",
        str(reg),
        "--adapter",
        str(peft),
        "--embedding",
        str(tmp_path / "z.npy"),
        "--site",
        "a",
        "--task",
        "t",
        "--samples",
        "3",
    ]
    with pytest.raises(SystemExit) as exit_:
        main(add)
    assert exit_.value.code == 2 and "BlobKeyError" in capsys.readouterr().err
    main([*add, "--blob-key-file", str(keyf)])
    capsys.readouterr()
    main(["registry", "ls", "--registry", str(reg), "--json"])  # listing needs no key
    assert json.loads(capsys.readouterr().out)[0]["meta"]["site"] == "a"
    with pytest.raises(SystemExit) as exit_:
        main(["blob-key", "new", str(keyf)])
    assert exit_.value.code == 2 and "refusing to overwrite" in capsys.readouterr().err
    assert issubclass(BlobKeyError, RegistryError) and issubclass(BlobKeyError, blobcrypt.BlobKeyError)
