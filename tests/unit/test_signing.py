"""Site identity: sign/verify round trip, every field is covered, allow-list, replay, staleness."""

from __future__ import annotations

import copy
import stat
import time

import numpy as np
import pytest

from common.trust.signing import (
    ReplayError,
    SignatureError,
    SigningError,
    StaleSubmissionError,
    UnknownSiteError,
    generate_keypair,
    load_private_key,
    load_public_key,
    sign_submission,
    submission_digest,
    verify_submission,
)
from server.allowlist import (
    AllowList,
    NonceLedger,
    authenticate_submission,
    check_nonce_fresh,
    check_run_id,
    make_nonce,
)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    priv, pub = generate_keypair(d, "site-a")
    priv_b, pub_b = generate_keypair(d, "site-b")
    return {"dir": d, "priv": priv, "pub": pub, "priv_b": priv_b, "pub_b": pub_b}


@pytest.fixture
def fields():
    return {
        "blob_sha256": "0123456789abcdef" * 4,
        "z": np.linspace(-1, 1, 16, dtype=np.float32),
        "metadata": {"task": "report-gen", "modality": "xray", "n_examples": 120, "base": "sha256:ab"},
        "run_id": "run-7",
        "nonce": make_nonce(),
    }


def test_keypair_files(keys):
    assert keys["priv"].name == "site-a.key" and keys["pub"].name == "site-a.pub"
    assert stat.S_IMODE(keys["priv"].stat().st_mode) == 0o600
    assert keys["priv"].read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert keys["pub"].read_text().startswith("-----BEGIN PUBLIC KEY-----")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        generate_keypair(keys["dir"], "site-a")
    with pytest.raises(ValueError, match="site id"):
        generate_keypair(keys["dir"], "../evil")


def test_sign_verify_round_trip(keys, fields):
    sig = sign_submission(load_private_key(keys["priv"]), **fields)
    assert isinstance(sig, str)
    verify_submission(load_public_key(keys["pub"]), sig, **fields)  # no exception
    # float64 z hashes like its float32 cast (what the wire carries)
    verify_submission(load_public_key(keys["pub"]), sig, **{**fields, "z": fields["z"].astype(np.float64)})
    # metadata key order does not matter (canonical JSON)
    reordered = dict(reversed(list(fields["metadata"].items())))
    verify_submission(load_public_key(keys["pub"]), sig, **{**fields, "metadata": reordered})


def _tampered(fields, which):
    f = copy.deepcopy(fields)
    if which == "blob_sha256":
        f["blob_sha256"] = "f" + f["blob_sha256"][1:]
    elif which == "z":
        f["z"] = f["z"].copy()
        f["z"][5] = np.nextafter(f["z"][5], np.float32(2))  # one ulp in one value
    elif which == "metadata":
        f["metadata"]["n_examples"] = 121
    elif which == "metadata_key":
        f["metadata"]["extra"] = True
    elif which == "run_id":
        f["run_id"] = "run-8"
    elif which == "nonce":
        f["nonce"] = make_nonce()
    return f


@pytest.mark.parametrize("which", ["blob_sha256", "z", "metadata", "metadata_key", "run_id", "nonce"])
def test_tampering_any_field_fails(keys, fields, which):
    sig = sign_submission(load_private_key(keys["priv"]), **fields)
    bad = _tampered(fields, which)
    assert submission_digest(**bad) != submission_digest(**fields)
    with pytest.raises(SignatureError, match="does not verify"):
        verify_submission(load_public_key(keys["pub"]), sig, **bad)


def test_wrong_key_and_malformed_signature(keys, fields):
    sig = sign_submission(load_private_key(keys["priv"]), **fields)
    with pytest.raises(SignatureError, match="does not verify"):
        verify_submission(load_public_key(keys["pub_b"]), sig, **fields)
    with pytest.raises(SignatureError, match="base64"):
        verify_submission(load_public_key(keys["pub"]), "not base64!!", **fields)
    with pytest.raises(SignatureError, match="64 bytes"):
        verify_submission(load_public_key(keys["pub"]), "AAAA", **fields)


def test_digest_is_length_prefixed_and_validated(fields):
    # moving a character between run_id and nonce must change the digest (injective encoding)
    a = submission_digest(**{**fields, "run_id": "ab", "nonce": "c"})
    b = submission_digest(**{**fields, "run_id": "a", "nonce": "bc"})
    assert a != b and len(a) == 32
    with pytest.raises(ValueError, match="blob_sha256"):
        submission_digest(**{**fields, "blob_sha256": "xyz"})
    with pytest.raises(ValueError, match="NaN"):
        submission_digest(**{**fields, "z": np.array([1.0, np.nan])})


def test_allowlist(tmp_path, keys):
    al = AllowList(tmp_path / "allow.json")
    al.add("site-a", keys["pub"].read_text())
    al.add("site-a", keys["pub"].read_bytes())  # same key again: fine
    assert al.sites() == ["site-a"] and "site-a" in al
    assert al.get("site-a").public_bytes_raw() == load_public_key(keys["pub"]).public_bytes_raw()
    with pytest.raises(UnknownSiteError, match="'site-x' is not on the allow-list"):
        al.get("site-x")
    with pytest.raises(SigningError, match="replace=True"):
        al.add("site-a", keys["pub_b"].read_text())
    al.add("site-a", keys["pub_b"].read_text(), replace=True)
    assert al.get("site-a").public_bytes_raw() == load_public_key(keys["pub_b"]).public_bytes_raw()
    with pytest.raises(SigningError, match="not a PEM public key"):
        al.add("site-c", "garbage")
    al.remove("site-a")
    with pytest.raises(UnknownSiteError):
        al.get("site-a")


def test_nonce_ledger_refuses_replay_durably(tmp_path):
    path = tmp_path / "nonces.jsonl"
    ledger = NonceLedger(path)
    n = make_nonce()
    ledger.check_and_record("site-a", n)
    ledger.check_and_record("site-b", n)  # another site may (improbably) pick the same nonce
    with pytest.raises(ReplayError, match="already used by site 'site-a'"):
        ledger.check_and_record("site-a", n)
    # a second ledger object (another process, or after a restart) sees it too
    other = NonceLedger(path)
    assert other.seen("site-a", n)
    with pytest.raises(ReplayError):
        other.check_and_record("site-a", n)
    # and the first sees what the second records
    m = make_nonce()
    other.check_and_record("site-a", m)
    with pytest.raises(ReplayError):
        ledger.check_and_record("site-a", m)


def test_nonce_ledger_survives_torn_line(tmp_path):
    path = tmp_path / "nonces.jsonl"
    NonceLedger(path).check_and_record("site-a", "n1")
    with open(path, "ab") as fh:
        fh.write(b'{"nonce":"n2","si')  # crash mid-append: n2 never confirmed
    ledger = NonceLedger(path)
    ledger.check_and_record("site-a", "n2")
    ledger.check_and_record("site-a", "n3")
    assert not NonceLedger(path).seen("site-a", "n4")
    fresh = NonceLedger(path)
    for n in ("n1", "n2", "n3"):
        assert fresh.seen("site-a", n)


def test_freshness_checks():
    now = time.time()
    check_nonce_fresh(make_nonce(now), now=now)
    with pytest.raises(StaleSubmissionError, match="old"):
        check_nonce_fresh(make_nonce(now - 7200), max_age_s=3600, now=now)
    with pytest.raises(StaleSubmissionError, match="future"):
        check_nonce_fresh(make_nonce(now + 3600), now=now)
    with pytest.raises(StaleSubmissionError, match="form"):
        check_nonce_fresh("1234", now=now)
    check_run_id("run-7", {"run-7", "run-8"})
    with pytest.raises(StaleSubmissionError, match="'run-6' is not a current run"):
        check_run_id("run-6", {"run-7"})


def test_authenticate_submission_end_to_end(tmp_path, keys, fields):
    al = AllowList(tmp_path / "allow.json")
    al.add("site-a", keys["pub"].read_text())
    ledger = NonceLedger(tmp_path / "nonces.jsonl")
    sig = sign_submission(load_private_key(keys["priv"]), **fields)
    with pytest.raises(UnknownSiteError):
        authenticate_submission(al, ledger, "site-b", sig, **fields)
    # a forged signature must not burn the nonce
    forged = sign_submission(load_private_key(keys["priv_b"]), **fields)
    with pytest.raises(SignatureError):
        authenticate_submission(al, ledger, "site-a", forged, **fields)
    assert not ledger.seen("site-a", fields["nonce"])
    with pytest.raises(StaleSubmissionError):
        authenticate_submission(al, ledger, "site-a", sig, **fields, allowed_run_ids=["run-9"])
    authenticate_submission(al, ledger, "site-a", sig, **fields, allowed_run_ids=["run-7"])
    with pytest.raises(ReplayError):
        authenticate_submission(al, ledger, "site-a", sig, **fields, allowed_run_ids=["run-7"])
