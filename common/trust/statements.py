"""Signed statements: small JSON claims that one party signs and the other checks later, offline.

Three are used in the federation (issue 10):

- ``identity`` — a site's answer to the coordinator's ``query.whoami`` challenge: "I am site S, I
  answer run R, challenge C", signed with the site's allow-listed Ed25519 key. A node that cannot
  produce it cannot claim S, so every message for S goes to the node that proved it.
- ``receipt`` — the coordinator's acknowledgement of an accepted submission: the audit head
  (seq, line hash) right after the record and its audit entry were committed, signed with the
  coordinator's key. The site keeps it in its egress log; if the coordinator later truncates or
  rewrites its log, ``check_receipts`` against the log shows it.
- ``delivery`` — what the coordinator sends with ``train.apply``: the composed adapter's sha256,
  the target, the run, and a challenge-derived nonce, signed with the coordinator's key, so a
  site only installs adapters the coordinator stands behind.

A statement is ``{"kind", "body": {...}, "key_id", "signature"}``; the signature is Ed25519 over
sha256(b"rpe-statement-v1" ‖ kind ‖ canonical_json(body)), length-prefixed like the submission
digest, so a statement of one kind can never be replayed as another.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.trust.digests import canonical_json, is_sha256_hex
from common.trust.signing import key_fingerprint

DOMAIN_TAG = b"rpe-statement-v1"
KINDS = ("identity", "receipt", "delivery")


class StatementError(ValueError):
    """A statement is malformed, of the wrong kind, signed by another key, or altered."""


def statement_digest(kind: str, body: Mapping[str, Any]) -> bytes:
    """What a statement's signature covers (also what a site's SuperNode key signs: ``common.trust.nodekey``)."""
    return _digest(kind, body)


def _digest(kind: str, body: Mapping[str, Any]) -> bytes:
    h = hashes.Hash(hashes.SHA256())
    for part in (DOMAIN_TAG, kind.encode("ascii"), canonical_json(dict(body)).encode("ascii")):
        h.update(len(part).to_bytes(8, "big") + part)
    return h.finalize()


def sign_statement(private_key: Ed25519PrivateKey, kind: str, body: Mapping[str, Any]) -> dict[str, Any]:
    """A signed statement of ``kind`` over ``body`` (JSON values only)."""
    if kind not in KINDS:
        raise ValueError(f"unknown statement kind {kind!r}; expected one of {', '.join(KINDS)}")
    sig = private_key.sign(_digest(kind, body))
    return {
        "kind": kind,
        "body": dict(body),
        "key_id": key_fingerprint(private_key.public_key()),
        "signature": base64.b64encode(sig).decode("ascii"),
    }


def verify_statement(
    public_key: Ed25519PublicKey, statement: Any, kind: str, expect: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The statement's body if it is a ``kind`` statement signed by ``public_key`` and matches ``expect``.

    ``expect`` lists body fields that must have exactly these values (e.g. the run id and the
    challenge the verifier sent), so a genuine statement for another run or challenge is refused.
    """
    if not isinstance(statement, Mapping) or set(statement) != {"kind", "body", "key_id", "signature"}:
        raise StatementError("a statement is an object with exactly kind, body, key_id and signature")
    if statement["kind"] != kind:
        raise StatementError(f"expected a {kind!r} statement, got {statement['kind']!r}")
    body = statement["body"]
    if not isinstance(body, Mapping):
        raise StatementError("the statement body is not an object")
    if statement["key_id"] != key_fingerprint(public_key):
        raise StatementError(
            f"the {kind} statement is signed by key {str(statement['key_id'])[:16]}…, "
            f"not the expected key {key_fingerprint(public_key)[:16]}…"
        )
    try:
        sig = base64.b64decode(statement["signature"], validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise StatementError("the statement signature is not valid base64") from None
    try:
        public_key.verify(sig, _digest(kind, body))
    except (InvalidSignature, ValueError, TypeError):
        raise StatementError(f"the {kind} statement's signature does not verify: it was altered") from None
    for key, value in (expect or {}).items():
        if body.get(key) != value:
            raise StatementError(f"the {kind} statement says {key}={body.get(key)!r}, expected {value!r}")
    return dict(body)


def check_receipts(
    receipts: Iterable[Mapping[str, Any]], entries: Iterable[tuple[int, Mapping[str, Any]]], line_hash: Any
) -> list[str]:
    """Problems of a coordinator audit log against the receipts a site kept (empty list = consistent).

    ``entries`` are ``(line number, entry)`` of the log, ``line_hash(entry)`` the hash a receipt
    names. A receipt whose seq is past the log's end means the log was truncated; one whose seq
    is present with another line hash means the log was rewritten from there on.
    """
    by_seq: dict[int, str] = {}
    last = 0
    for _, entry in entries:
        seq = entry.get("seq")
        if isinstance(seq, int):
            by_seq.setdefault(seq, line_hash(entry))
            last = max(last, seq)
    problems = []
    for r in receipts:
        seq, want = r.get("seq"), r.get("line_sha256")
        if not isinstance(seq, int) or not is_sha256_hex(want):
            problems.append(f"receipt {r!r} is malformed")
        elif seq > last:
            problems.append(f"truncated: the site holds a receipt for audit entry {seq}, the log ends at {last}")
        elif by_seq.get(seq) != want:
            problems.append(
                f"rewritten: audit entry {seq} is not the entry the coordinator signed a receipt for "
                f"(receipt {want[:16]}…, log {str(by_seq.get(seq))[:16]}…)"
            )
    return problems
