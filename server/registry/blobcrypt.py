"""Optional encryption of adapter blobs at rest: AES-256-GCM with one key per registry.

Why: a registry directory holds every hospital's LoRA weights. Disk encryption protects a stolen
disk, not a copied backup or a misconfigured file share; with a blob key the adapter bytes on disk
are useless without the key, which the operator keeps elsewhere (a secrets mount, a 0600 file).

What is *not* encrypted: the embeddings z and the metadata in ``records.jsonl`` (the registry
needs z in memory for every retrieval and the metadata for filtering), ``registry.json`` and the
audit log. See ``server/registry/blobstore.py`` for how the registry uses this module.

Key: 32 random bytes, written as 64 hex digits (``new_key_file``, ``rpe blob-key new FILE``) or
given as standard base64 of 32 bytes (``openssl rand -base64 32``). ``load_blob_key`` takes, in
order: an explicit file path, ``$RPE_BLOB_KEY_FILE`` (a path), ``$RPE_BLOB_KEY`` (the key text).
A key file readable by group or others is refused, as ssh does. A key's ``key_id`` (16 hex of
``sha256(b"rpe-blob-key-v1" + key)``) names it in registry.json, records and the audit log; it
does not reveal the key.

Encrypted blob = ``MAGIC`` (16 bytes) + key_id (16 ASCII bytes) + nonce (12 random bytes) +
AES-GCM ciphertext and 16-byte tag, with associated data = MAGIC + key_id + the sha256 hex of the
plaintext (the blob's content address), so a blob moved or swapped to another name, or given
another header, fails authentication. Each encryption draws a fresh random nonce (at 2^32 blobs
per key the nonce-collision risk is still below 2^-32).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from common.files.durable import fsync_dir

ALG = "AES-256-GCM"
KEY_FILE_ENV = "RPE_BLOB_KEY_FILE"
KEY_ENV = "RPE_BLOB_KEY"
MAGIC = b"RPEBLOB-AESGCM1\n"
KEY_BYTES = 32
KEY_ID_LEN = 16
NONCE_BYTES = 12
TAG_BYTES = 16
HEADER_BYTES = len(MAGIC) + KEY_ID_LEN
#: encrypted size = plaintext size + OVERHEAD
OVERHEAD = HEADER_BYTES + NONCE_BYTES + TAG_BYTES
_KEY_ID_DOMAIN = b"rpe-blob-key-v1"
_HOW_TO_MAKE = "create one with `rpe blob-key new FILE` (or `(umask 077; openssl rand -hex 32 > FILE)`)"


class BlobKeyError(ValueError):
    """A blob key cannot be loaded, is malformed, or is not the key a blob was encrypted with."""


class BlobAuthError(BlobKeyError):
    """An encrypted blob fails authentication: altered, truncated, or stored under another name."""


@dataclass(frozen=True)
class BlobKey:
    """A 32-byte AES-256 key, its public ``key_id`` and where it came from (never the key in repr)."""

    key: bytes = field(repr=False)
    source: str = "memory"

    def __post_init__(self) -> None:
        if not isinstance(self.key, bytes) or len(self.key) != KEY_BYTES:
            raise BlobKeyError(f"a blob key is {KEY_BYTES} bytes; got {len(self.key)} ({self.source})")

    @property
    def key_id(self) -> str:
        """16 hex digits naming the key (recorded in registry.json, records and audit entries)."""
        return key_id_of(self.key)

    def describe(self) -> dict[str, str]:
        """``{"alg", "key_id"}``: what the registry records about the encryption (no secret)."""
        return {"alg": ALG, "key_id": self.key_id}


def key_id_of(key: bytes) -> str:
    """The public id of a raw 32-byte key."""
    return hashlib.sha256(_KEY_ID_DOMAIN + key).hexdigest()[:KEY_ID_LEN]


def parse_key_text(text: str, source: str) -> BlobKey:
    """A key from its text form (64 hex digits, or base64 of 32 bytes; surrounding whitespace ignored)."""
    s = "".join(text.split())
    raw: bytes | None = None
    if len(s) == 2 * KEY_BYTES:
        try:
            raw = bytes.fromhex(s)
        except ValueError:
            raw = None
    if raw is None:
        try:
            decoded = base64.b64decode(s, validate=True)
        except (binascii.Error, ValueError):
            decoded = b""
        raw = decoded if len(decoded) == KEY_BYTES else None
    if raw is None:
        raise BlobKeyError(
            f"{source} does not hold a blob key: expected 64 hex digits or base64 of {KEY_BYTES} bytes, got "
            f"{len(s)} characters that are neither; {_HOW_TO_MAKE}"
        )
    return BlobKey(raw, source)


def read_key_file(path: str | os.PathLike[str], source: str | None = None) -> BlobKey:
    """Load a key file; refuses a missing file or one readable by group/others (``chmod 600``)."""
    p = Path(path).expanduser()
    where = source or f"blob key file {p}"
    try:
        st = p.stat()
    except FileNotFoundError:
        raise BlobKeyError(f"{where} does not exist; {_HOW_TO_MAKE}") from None
    if not stat.S_ISREG(st.st_mode):
        raise BlobKeyError(f"{where} is not a regular file; {_HOW_TO_MAKE}")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise BlobKeyError(
            f"{where} has mode {mode:o}: a blob key must not be readable by group or others; run `chmod 600 {p}`"
        )
    try:
        text = p.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise BlobKeyError(f"{where} is unreadable ({type(exc).__name__}); {_HOW_TO_MAKE}") from None
    return parse_key_text(text, where)


def load_blob_key(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> BlobKey | None:
    """The configured blob key, or None when none is configured.

    Order: ``path`` (if given and not empty), else ``$RPE_BLOB_KEY_FILE`` (a key file path), else
    ``$RPE_BLOB_KEY`` (the key itself as 64 hex digits or base64). Raises ``BlobKeyError`` naming the
    source for a key that is malformed, missing, or in a file readable by group/others.
    """
    env = os.environ if env is None else env
    if path is not None and str(path) != "":
        return read_key_file(path)
    file_env = env.get(KEY_FILE_ENV, "")
    if file_env:
        return read_key_file(file_env, f"${KEY_FILE_ENV} ({file_env})")
    text = env.get(KEY_ENV, "")
    if text:
        return parse_key_text(text, f"${KEY_ENV}")
    return None


def new_key_file(path: str | os.PathLike[str]) -> BlobKey:
    """Write a fresh random key (64 hex digits) to ``path`` with mode 0600; never overwrites."""
    p = Path(path).expanduser()
    raw = secrets.token_bytes(KEY_BYTES)
    p.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise FileExistsError(
            f"{p} already exists; refusing to overwrite a blob key (a registry encrypted with it would "
            "become unreadable)"
        ) from None
    try:
        os.fchmod(fd, 0o600)  # in case the umask or filesystem widened it
        os.write(fd, (raw.hex() + "\n").encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(p.parent)
    return BlobKey(raw, f"blob key file {p}")


def is_encrypted(data: bytes) -> bool:
    """True when ``data`` starts with this module's header."""
    return data[: len(MAGIC)] == MAGIC


def encrypted_size(plaintext_size: int) -> int:
    """Size on disk of an encrypted blob of ``plaintext_size`` bytes."""
    return plaintext_size + OVERHEAD


def _aad(header: bytes, sha_hex: str) -> bytes:
    return header + sha_hex.encode("ascii")


def encrypt(key: BlobKey, plaintext: bytes, sha_hex: str) -> bytes:
    """MAGIC + key_id + nonce + AES-GCM(plaintext), bound to ``sha_hex`` (the plaintext's sha256)."""
    header = MAGIC + key.key_id.encode("ascii")
    nonce = secrets.token_bytes(NONCE_BYTES)
    return header + nonce + AESGCM(key.key).encrypt(nonce, plaintext, _aad(header, sha_hex))


def blob_key_id(data: bytes) -> str | None:
    """The key id an encrypted blob names (None if ``data`` is not an encrypted blob)."""
    if not is_encrypted(data) or len(data) < HEADER_BYTES:
        return None
    return data[len(MAGIC) : HEADER_BYTES].decode("ascii", errors="replace")


def decrypt(key: BlobKey, data: bytes, sha_hex: str) -> bytes:
    """The plaintext of an ``encrypt`` result stored under ``sha_hex``.

    ``BlobKeyError`` if it was encrypted with another key; ``BlobAuthError`` if it is not an
    encrypted blob, is truncated, was altered, or belongs to another content address."""
    if not is_encrypted(data) or len(data) < OVERHEAD:
        raise BlobAuthError(f"not an encrypted blob ({len(data)} bytes without the {ALG} header)")
    got = blob_key_id(data)
    if got != key.key_id:
        raise BlobKeyError(f"blob was encrypted with key {got}, the registry was opened with key {key.key_id}")
    header = data[:HEADER_BYTES]
    nonce = data[HEADER_BYTES : HEADER_BYTES + NONCE_BYTES]
    body = data[HEADER_BYTES + NONCE_BYTES :]
    try:
        return AESGCM(key.key).decrypt(nonce, body, _aad(header, sha_hex))
    except InvalidTag:
        raise BlobAuthError(
            f"encrypted blob fails {ALG} authentication for content address {sha_hex[:16]}…: it was altered, "
            "truncated, or moved from another name"
        ) from None
