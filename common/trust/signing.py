"""Site identity: Ed25519 keys, a canonical submission digest, and the checks around a signature.

Why: TLS and SuperNode authentication prove which *connection* a reply came over; they do not
leave a verifiable statement behind. A site signs what it submits — the adapter blob's hash,
its mean embedding z, its metadata, the run it answers and a fresh nonce — so the coordinator
can (a) reject forged or altered submissions, (b) reject replays of an old, genuine submission,
and (c) keep the signature next to the record as proof of origin.

Digest (``submission_digest``) = sha256 over, in order, each field as an 8-byte big-endian
length followed by its bytes:

    b"rpe-submission-v1"                (domain separation: never valid for another protocol)
    blob_sha256                         (64 lowercase hex chars, ASCII)
    z                                   (little-endian float32 bytes, what the wire carries)
    canonical_json(metadata)            (sorted keys, no whitespace, ASCII)
    run_id                              (UTF-8)
    nonce                               (UTF-8)

Length prefixes make the encoding injective (no two field lists give the same bytes).

What only the coordinator needs — the allow-list, nonces and their freshness, the replay
ledger and ``authenticate_submission`` — lives in ``server/allowlist.py``; this module is what
both sides share (keys, the digest, sign and verify, the error types).

Files: ``generate_keypair`` writes ``<site>.key`` (PKCS#8 PEM, mode 0600) and ``<site>.pub``
(SubjectPublicKeyInfo PEM).
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import stat
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.files.durable import fsync_dir
from common.trust.digests import canonical_json, is_sha256_hex, z_bytes

DOMAIN_TAG = b"rpe-submission-v1"
SITE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class SigningError(Exception):
    """Base class: a submission failed an identity or freshness check."""


class SignatureError(SigningError):
    """The signature is malformed or does not verify for this key and these fields."""


class UnknownSiteError(SigningError):
    """The site is not on the coordinator's allow-list."""


class ReplayError(SigningError):
    """This (site, nonce) pair was already used."""


class StaleSubmissionError(SigningError):
    """The nonce is too old (or from the future), or the run id is not a current run."""


def check_site_id(site_id: str) -> str:
    if not isinstance(site_id, str) or not SITE_ID_RE.match(site_id):
        raise ValueError(
            f"site id {site_id!r} is invalid: use 1-64 characters from A-Z a-z 0-9 . _ - "
            "starting with a letter or digit (it becomes a file name)"
        )
    return site_id


# --------------------------------------------------------------------------------------------
# keys


def generate_keypair(directory: str | os.PathLike[str], site_id: str) -> tuple[Path, Path]:
    """Create ``<dir>/<site_id>.key`` (private, mode 0600) and ``<dir>/<site_id>.pub``.

    Refuses to overwrite either file (``FileExistsError``): silently replacing a site's identity
    would lock it out of the allow-list, or worse, let someone swap it. The private key is
    created with ``O_EXCL`` and mode 0600 from the start, never world-readable even briefly.
    """
    check_site_id(site_id)
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = d / f"{site_id}.key", d / f"{site_id}.pub"
    for p in (priv_path, pub_path):
        if p.exists():
            raise FileExistsError(f"{p} already exists; refusing to overwrite a site key (move it away)")
    key = Ed25519PrivateKey.generate()
    priv_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # in case the umask or filesystem widened it
        os.write(fd, priv_pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    fd = os.open(pub_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, public_key_pem(key.public_key()).encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(d)
    return priv_path, pub_path


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Load a site's Ed25519 private key (PEM). Warns if the file is readable by others."""
    p = Path(path)
    mode = stat.S_IMODE(p.stat().st_mode)
    if mode & 0o077:
        warnings.warn(f"{p} has mode {mode:o}; a private key should be 0600 (chmod 600 {p})", stacklevel=2)
    key = serialization.load_pem_private_key(p.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"{p} holds a {type(key).__name__}, not an Ed25519 private key")
    return key


def public_key_from_pem(pem: str | bytes) -> Ed25519PublicKey:
    """Parse a PEM public key, insisting on Ed25519 (another algorithm is a configuration error)."""
    data = pem.encode("ascii") if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise SigningError(f"not a PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise SigningError(f"expected an Ed25519 public key; got {type(key).__name__}")
    return key


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """Load an Ed25519 public key from a PEM file."""
    return public_key_from_pem(Path(path).read_bytes())


def public_key_pem(key: Ed25519PublicKey) -> str:
    """SubjectPublicKeyInfo PEM text of a public key (what the allow-list stores)."""
    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem.decode("ascii")


def key_fingerprint(key: Ed25519PublicKey) -> str:
    """sha256 hex of the raw 32-byte public key: a short name for a key in logs and prompts."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    h = hashes.Hash(hashes.SHA256())
    h.update(raw)
    return h.finalize().hex()


# --------------------------------------------------------------------------------------------
# digest, sign, verify


def _field(data: bytes) -> bytes:
    return len(data).to_bytes(8, "big") + data


def submission_digest(blob_sha256: str, z: np.ndarray, metadata: Mapping[str, Any], run_id: str, nonce: str) -> bytes:
    """The 32-byte sha256 that a site signs for one submission (encoding in the module docstring)."""
    if not is_sha256_hex(blob_sha256):
        raise ValueError(f"blob_sha256 must be 64 lowercase hex characters; got {blob_sha256!r}")
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a mapping; got {type(metadata).__name__}")
    for name, value in (("run_id", run_id), ("nonce", nonce)):
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a string; got {type(value).__name__}")
    h = hashes.Hash(hashes.SHA256())
    for part in (
        DOMAIN_TAG,
        blob_sha256.encode("ascii"),
        z_bytes(z),
        canonical_json(dict(metadata)).encode("ascii"),
        run_id.encode("utf-8"),
        nonce.encode("utf-8"),
    ):
        h.update(_field(part))
    return h.finalize()


def sign_submission(
    private_key: Ed25519PrivateKey,
    blob_sha256: str,
    z: np.ndarray,
    metadata: Mapping[str, Any],
    run_id: str,
    nonce: str,
) -> str:
    """Base64 Ed25519 signature over ``submission_digest(...)``."""
    digest = submission_digest(blob_sha256, z, metadata, run_id, nonce)
    return base64.b64encode(private_key.sign(digest)).decode("ascii")


def verify_submission(
    public_key: Ed25519PublicKey,
    signature: str,
    blob_sha256: str,
    z: np.ndarray,
    metadata: Mapping[str, Any],
    run_id: str,
    nonce: str,
) -> None:
    """Return None if ``signature`` is the site's signature over these exact fields.

    Raises ``SignatureError`` for a wrong key, any changed field, or a malformed signature;
    a field that cannot even be encoded (bad hash format, NaN in z) is also a SignatureError,
    because to the coordinator it is simply an unverifiable submission.
    """
    try:
        sig = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise SignatureError(f"signature is not valid base64: {exc}") from exc
    if len(sig) != 64:
        raise SignatureError(f"an Ed25519 signature is 64 bytes; got {len(sig)}")
    try:
        digest = submission_digest(blob_sha256, z, metadata, run_id, nonce)
    except (TypeError, ValueError) as exc:
        raise SignatureError(f"submission fields cannot be encoded: {exc}") from exc
    try:
        public_key.verify(sig, digest)
    except InvalidSignature as exc:
        raise SignatureError(
            "signature does not verify: wrong key, or the blob hash, z, metadata, run id or nonce changed"
        ) from exc
