"""Signed statements (common/statements.py): identity challenges, audit receipts, signed deliveries."""

from __future__ import annotations

import copy

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.statements import StatementError, check_receipts, sign_statement, verify_statement


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
