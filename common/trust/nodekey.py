"""A site's SuperNode key as its identity: the EC P-384 key the SuperLink authenticates it by.

Flower's SuperNode authentication (``flower-supernode --auth-supernode-private-key``, keys
registered with ``flwr supernode register``) proves to the SuperLink that node N holds key K.
The ServerApp is not told which key a node holds, so the coordinator keeps its own record of
site -> SuperNode public key (``server.allowlist.NodeKeys``, written when the key is registered)
and asks for proof: the site's answer to a ``query.whoami`` challenge is also signed with its
SuperNode private key (``node_sign``), over the same digest as the identity statement, whose
body names node N and the key's fingerprint. A node that does not hold the SuperNode key
registered for site S cannot produce it, so it cannot be bound to S, and nothing meant for S is
sent to it.

Keys are read in the formats ``deploy/tls.py`` writes (OpenSSH), or PEM.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from common.files.safeio import read_regular_file

__all__ = [
    "NodeKeyError",
    "load_node_private_key",
    "node_key_fingerprint",
    "node_public_key",
    "node_public_text",
    "node_sign",
    "node_verify",
]

MAX_KEY_BYTES = 64 * 1024


class NodeKeyError(ValueError):
    """A SuperNode key is unreadable or not EC P-384, or a node signature does not verify."""


def _check_curve(key: object, where: str) -> None:
    if not isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) or not isinstance(
        key.curve, ec.SECP384R1
    ):
        raise NodeKeyError(
            f"{where}: a SuperNode key is EC P-384 (as `flwr supernode register` expects); got {type(key).__name__}"
        )


def load_node_private_key(path: str | os.PathLike[str]) -> ec.EllipticCurvePrivateKey:
    """The SuperNode's private key (OpenSSH or PEM, unencrypted), as passed to ``flower-supernode``."""
    p = Path(path)
    try:
        data = read_regular_file(p, MAX_KEY_BYTES)
    except (OSError, ValueError) as exc:
        raise NodeKeyError(f"SuperNode key {p}: {exc}") from None
    try:
        key = (
            serialization.load_ssh_private_key(data, password=None)
            if b"OPENSSH" in data[:64]
            else serialization.load_pem_private_key(data, password=None)
        )
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise NodeKeyError(f"SuperNode key {p} is not an unencrypted OpenSSH or PEM private key ({exc})") from None
    _check_curve(key, str(p))
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def node_public_key(text: str | bytes) -> ec.EllipticCurvePublicKey:
    """Parse a SuperNode public key: an OpenSSH line (``SITE_auth.pub``) or PEM."""
    data = text.encode("ascii", "replace") if isinstance(text, str) else bytes(text)
    data = data.strip()
    try:
        key = (
            serialization.load_pem_public_key(data)
            if data.startswith(b"-----")
            else serialization.load_ssh_public_key(data)
        )
    except (ValueError, TypeError, binascii.Error, UnsupportedAlgorithm) as exc:
        raise NodeKeyError(f"not an OpenSSH or PEM public key ({exc})") from None
    _check_curve(key, "public key")
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


def node_public_text(key: ec.EllipticCurvePublicKey) -> str:
    """The canonical OpenSSH line of a public key (what the coordinator's record stores)."""
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode("ascii")


def node_key_fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    """sha256 hex of the key's OpenSSH wire blob (``ssh-keygen -l -E sha256`` hashes the same bytes)."""
    blob = base64.b64decode(node_public_text(key).split()[1])
    return hashlib.sha256(blob).hexdigest()


def node_sign(key: ec.EllipticCurvePrivateKey, digest: bytes) -> str:
    """Base64 ECDSA-SHA384 signature of ``digest`` (a statement digest)."""
    return base64.b64encode(key.sign(digest, ec.ECDSA(hashes.SHA384()))).decode("ascii")


def node_verify(key: ec.EllipticCurvePublicKey, digest: bytes, signature: object) -> None:
    """NodeKeyError unless ``signature`` is the node key's signature of ``digest``."""
    if not isinstance(signature, str) or len(signature) > 512:
        raise NodeKeyError("the node signature is missing or not a short base64 string")
    try:
        key.verify(base64.b64decode(signature, validate=True), digest, ec.ECDSA(hashes.SHA384()))
    except (InvalidSignature, binascii.Error, ValueError):
        raise NodeKeyError("the node signature does not verify with the SuperNode key recorded for the site") from None
