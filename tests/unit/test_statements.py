"""Signed statements (common/trust/statements.py): identity challenges, audit receipts, signed deliveries."""

from __future__ import annotations

import copy
import os

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.trust.statements import StatementError, check_receipts, sign_statement, verify_statement


@pytest.fixture
def keys():
    return Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()


def test_a_genuine_statement_verifies_and_returns_its_body(keys):
    site, _ = keys
    st = sign_statement(site, "identity", {"site": "a", "run_id": "7", "challenge": "c1"})
    assert verify_statement(site.public_key(), st, "identity", {"run_id": "7", "challenge": "c1"})["site"] == "a"


def test_another_key_an_edit_a_replay_or_another_kind_is_refused(keys):
    site, impostor = keys
    st = sign_statement(site, "identity", {"site": "a", "run_id": "7", "challenge": "c1"})
    with pytest.raises(StatementError, match="not the expected key"):
        verify_statement(impostor.public_key(), st, "identity")
    forged = sign_statement(impostor, "identity", {"site": "a", "run_id": "7", "challenge": "c1"})
    with pytest.raises(StatementError):
        verify_statement(site.public_key(), forged, "identity")
    edited = copy.deepcopy(st)
    edited["body"]["site"] = "b"
    with pytest.raises(StatementError, match="altered"):
        verify_statement(site.public_key(), edited, "identity")
    with pytest.raises(StatementError, match="challenge"):
        verify_statement(site.public_key(), st, "identity", {"challenge": "c2"})  # replay on a new challenge
    with pytest.raises(StatementError, match="expected a 'delivery'"):
        verify_statement(site.public_key(), st, "delivery")
    for junk in (None, "x", {"kind": "identity"}, {**st, "extra": 1}):
        with pytest.raises(StatementError):
            verify_statement(site.public_key(), junk, "identity")


def _log(n):
    return [(i, {"seq": i, "h": f"{i:064x}"}) for i in range(1, n + 1)]


def _lh(entry):
    return entry["h"]


def test_receipts_detect_truncation_and_rewrite():
    receipts = [{"seq": 3, "line_sha256": f"{3:064x}"}, {"seq": 5, "line_sha256": f"{5:064x}"}]
    assert check_receipts(receipts, _log(6), _lh) == []
    assert "truncated" in check_receipts(receipts, _log(4), _lh)[0]
    rewritten = _log(6)
    rewritten[2] = (3, {"seq": 3, "h": "f" * 64})
    assert "rewritten" in check_receipts(receipts, rewritten, _lh)[0]


# -- SuperNode keys (common/trust/nodekey.py) -----------------------------------------------------------
def test_a_supernode_key_signs_a_statement_digest_and_only_it_verifies(tmp_path):
    from common.trust.nodekey import (
        NodeKeyError,
        load_node_private_key,
        node_key_fingerprint,
        node_public_key,
        node_sign,
        node_verify,
    )
    from common.trust.statements import statement_digest
    from deploy.tls import make_supernode_keys

    a, b = make_supernode_keys(tmp_path / "a", "a"), make_supernode_keys(tmp_path / "b", "b")
    key_a = load_node_private_key(a.private_key)
    pub_a, pub_b = node_public_key(a.public_key.read_text()), node_public_key(b.public_key.read_text())
    assert node_key_fingerprint(pub_a) == node_key_fingerprint(key_a.public_key()) != node_key_fingerprint(pub_b)
    body = {
        "site": "a",
        "run_id": "1",
        "challenge": "c" * 64,
        "node_id": "7",
        "supernode_key": node_key_fingerprint(pub_a),
    }
    sig = node_sign(key_a, statement_digest("identity", body))
    node_verify(pub_a, statement_digest("identity", body), sig)
    for key, digest, s in (
        (pub_b, statement_digest("identity", body), sig),  # another site's key
        (pub_a, statement_digest("identity", {**body, "node_id": "8"}), sig),  # altered
        (pub_a, statement_digest("receipt", body), sig),  # another kind
        (pub_a, statement_digest("identity", body), None),
        (pub_a, statement_digest("identity", body), "not base64!"),
    ):
        with pytest.raises(NodeKeyError):
            node_verify(key, digest, s)


def test_node_keys_must_be_p384_and_readable(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from common.trust.nodekey import NodeKeyError, load_node_private_key, node_public_key
    from common.trust.signing import generate_keypair

    _, ed_pub = generate_keypair(tmp_path / "ed", "a")
    p256 = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "p256").write_bytes(
        p256.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
    )
    (tmp_path / "junk").write_text("ssh-rsa AAAA nonsense")
    os.mkfifo(tmp_path / "fifo")
    for bad in (ed_pub.read_text(), "ssh-rsa AAAA nonsense", ""):
        with pytest.raises(NodeKeyError):
            node_public_key(bad)
    for bad in ("p256", "junk", "fifo", "missing"):
        with pytest.raises(NodeKeyError):
            load_node_private_key(tmp_path / bad)


def test_the_coordinator_record_of_supernode_keys_refuses_silent_rotation(tmp_path):
    from common.trust.signing import SigningError
    from deploy.tls import make_supernode_keys
    from server.allowlist import AllowList

    records = AllowList(tmp_path / "allowlist.json").node_keys
    a1, a2 = make_supernode_keys(tmp_path / "1", "a"), make_supernode_keys(tmp_path / "2", "a")
    records.add("a", a1.public_key.read_text())
    records.add("a", a1.public_key.read_text())  # the same key again: no-op
    with pytest.raises(SigningError, match="another SuperNode key"):
        records.add("a", a2.public_key.read_text())
    with pytest.raises(SigningError, match="SuperNode key for site 'b'"):
        records.add("b", "not a key")
    assert records.sites() == ["a"] and records.path.name == "supernode-keys.json"
    records.add("a", a2.public_key.read_text(), replace=True)
    from common.trust.nodekey import node_key_fingerprint, node_public_key

    assert node_key_fingerprint(records.get("a")) == node_key_fingerprint(node_public_key(a2.public_key.read_text()))
    assert records.get("b") is None
