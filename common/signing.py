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

Freshness, kept deliberately simple:
- a *nonce* is ``"<unix seconds>.<32 hex random>"`` (``make_nonce``). ``check_nonce_fresh``
  rejects nonces older than ``max_age_s`` or too far in the future, so the ``NonceLedger`` of
  seen (site, nonce) pairs only has to be consulted, never trusted forever;
- a *run id* names the round the coordinator asked for; ``check_run_id`` rejects submissions
  for runs the coordinator is not currently running (a stale reply from an old round).
``authenticate_submission`` runs all checks in the safe order (signature before nonce, so an
attacker cannot burn a site's nonces with unsigned junk).

Files: ``generate_keypair`` writes ``<site>.key`` (PKCS#8 PEM, mode 0600) and ``<site>.pub``
(SubjectPublicKeyInfo PEM). The coordinator's ``AllowList`` is a JSON file ``{site_id: PEM}``.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import json
import os
import re
import secrets
import stat
import tempfile
import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.digests import canonical_json, is_sha256_hex, z_bytes
from common.durable import fsync_dir

DOMAIN_TAG = b"rpe-submission-v1"
SITE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
NONCE_RE = re.compile(r"^(\d{1,12})\.([0-9a-f]{32})$")
DEFAULT_MAX_AGE_S = 24 * 3600.0
DEFAULT_MAX_SKEW_S = 300.0


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


def _check_site_id(site_id: str) -> str:
    if not isinstance(site_id, str) or not SITE_ID_RE.match(site_id):
        raise ValueError(
            f"site id {site_id!r} is invalid: use 1-64 characters from A-Z a-z 0-9 . _ - "
            "starting with a letter or digit (it becomes a file name)"
        )
    return site_id


_fsync_dir = fsync_dir


# --------------------------------------------------------------------------------------------
# keys


def generate_keypair(directory: str | os.PathLike[str], site_id: str) -> tuple[Path, Path]:
    """Create ``<dir>/<site_id>.key`` (private, mode 0600) and ``<dir>/<site_id>.pub``.

    Refuses to overwrite either file (``FileExistsError``): silently replacing a site's identity
    would lock it out of the allow-list, or worse, let someone swap it. The private key is
    created with ``O_EXCL`` and mode 0600 from the start, never world-readable even briefly.
    """
    _check_site_id(site_id)
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
    _fsync_dir(d)
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


def submission_digest(
    blob_sha256: str, z: np.ndarray, metadata: Mapping[str, Any], run_id: str, nonce: str
) -> bytes:
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


# --------------------------------------------------------------------------------------------
# allow-list


class AllowList:
    """The coordinator's JSON file ``{site_id: public key PEM}``: who may submit.

    Re-read on every lookup, so an operator's edit (or ``rpe keygen`` on another shell) takes
    effect without a restart; written atomically (temp file + rename + fsync).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def _load(self) -> dict[str, str]:
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except json.JSONDecodeError as exc:
            raise SigningError(f"allow-list {self.path} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise SigningError(f"allow-list {self.path} must be a JSON object of site id -> PEM string")
        return data

    def _save(self, data: dict[str, str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".allowlist-")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(data, fh, indent=2, sort_keys=True)
                fh.write("\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(self.path.parent)

    def add(self, site_id: str, pub_pem: str | bytes, replace: bool = False) -> None:
        """Allow ``site_id`` with this key. Re-adding the same key is a no-op; a *different* key
        needs ``replace=True`` (key rotation must be deliberate)."""
        _check_site_id(site_id)
        key = public_key_from_pem(pub_pem)
        pem = public_key_pem(key)
        data = self._load()
        old = data.get(site_id)
        if old is not None and old != pem and not replace:
            raise SigningError(
                f"site {site_id!r} is already allowed with another key "
                f"({key_fingerprint(public_key_from_pem(old))[:16]}…); pass replace=True to rotate it"
            )
        data[site_id] = pem
        self._save(data)

    def remove(self, site_id: str) -> None:
        """Revoke a site; raises ``UnknownSiteError`` if it was not allowed."""
        data = self._load()
        if site_id not in data:
            raise UnknownSiteError(f"site {site_id!r} is not on the allow-list {self.path}")
        del data[site_id]
        self._save(data)

    def get(self, site_id: str) -> Ed25519PublicKey:
        """The site's public key; ``UnknownSiteError`` if the site is not allowed."""
        data = self._load()
        if site_id not in data:
            known = ", ".join(sorted(data)) or "none"
            msg = f"site {site_id!r} is not on the allow-list {self.path} (allowed: {known})"
            raise UnknownSiteError(msg)
        return public_key_from_pem(data[site_id])

    def sites(self) -> list[str]:
        """Allowed site ids, sorted."""
        return sorted(self._load())

    def __contains__(self, site_id: object) -> bool:
        return site_id in self._load()


# --------------------------------------------------------------------------------------------
# freshness


def make_nonce(now: float | None = None) -> str:
    """``"<unix seconds>.<32 random hex>"``: unique (128 random bits) and datable."""
    ts = int(time.time() if now is None else now)
    return f"{ts}.{secrets.token_hex(16)}"


def nonce_timestamp(nonce: str) -> int:
    """The unix time inside a nonce made by ``make_nonce``; ``StaleSubmissionError`` if malformed."""
    m = NONCE_RE.match(nonce) if isinstance(nonce, str) else None
    if m is None:
        raise StaleSubmissionError(f"nonce {nonce!r} is not of the form '<unix seconds>.<32 hex>'")
    return int(m.group(1))


def check_nonce_fresh(
    nonce: str,
    max_age_s: float = DEFAULT_MAX_AGE_S,
    now: float | None = None,
    max_skew_s: float = DEFAULT_MAX_SKEW_S,
) -> None:
    """Reject a nonce older than ``max_age_s`` or more than ``max_skew_s`` in the future."""
    ts = nonce_timestamp(nonce)
    t = time.time() if now is None else now
    if ts < t - max_age_s:
        raise StaleSubmissionError(f"nonce is {t - ts:.0f} s old; the limit is {max_age_s:.0f} s")
    if ts > t + max_skew_s:
        raise StaleSubmissionError(f"nonce is {ts - t:.0f} s in the future; check the site's clock")


def check_run_id(run_id: str, allowed_run_ids: Iterable[str]) -> None:
    """Reject a submission for a run the coordinator is not running now (a stale or foreign reply)."""
    allowed = set(allowed_run_ids)
    if run_id not in allowed:
        raise StaleSubmissionError(
            f"run id {run_id!r} is not a current run (current: {', '.join(sorted(allowed)) or 'none'})"
        )


class NonceLedger:
    """Durable record of every (site, nonce) pair accepted, to refuse replays.

    A JSON-lines file, appended with an exclusive ``flock`` and fsynced before ``check_and_record``
    returns, so a nonce is never accepted twice, even by two coordinator processes or across a
    crash. Under the lock it first reads what other processes appended since its last look.
    A torn final line (crash mid-append) is terminated and ignored: that nonce was never
    confirmed as recorded, so its submission was never accepted either.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._seen: set[tuple[str, str]] = set()
        self._offset = 0
        if not self.path.exists():
            self.path.touch()
            _fsync_dir(self.path.parent)

    def _catch_up(self, fh: Any) -> None:
        fh.seek(self._offset)
        data = fh.read()
        complete = data.rfind(b"\n") + 1
        for raw in data[:complete].splitlines():
            try:
                rec = json.loads(raw)
                self._seen.add((rec["site"], rec["nonce"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a terminated torn line
        self._offset += complete

    def seen(self, site_id: str, nonce: str) -> bool:
        """True if this site already used this nonce (reads the file, shared lock)."""
        with open(self.path, "rb") as fh:
            fcntl.flock(fh, fcntl.LOCK_SH)
            try:
                self._catch_up(fh)
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
        return (site_id, nonce) in self._seen

    def check_and_record(self, site_id: str, nonce: str) -> None:
        """Record (site, nonce) durably; ``ReplayError`` if it was recorded before."""
        if not isinstance(nonce, str) or not nonce:
            raise ReplayError("nonce must be a non-empty string")
        with open(self.path, "a+b") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                self._catch_up(fh)
                if (site_id, nonce) in self._seen:
                    msg = f"nonce {nonce!r} was already used by site {site_id!r}: replayed submission"
                    raise ReplayError(msg)
                size = fh.seek(0, os.SEEK_END)
                prefix = b""
                if size > self._offset:  # torn tail: terminate it so our line starts clean
                    prefix = b"\n"
                rec = canonical_json({"site": site_id, "nonce": nonce, "ts": time.time()})
                line = prefix + (rec + "\n").encode("ascii")
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())
                self._offset = size + len(line)
                self._seen.add((site_id, nonce))
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


def authenticate_submission(
    allowlist: AllowList,
    ledger: NonceLedger,
    site_id: str,
    signature: str,
    blob_sha256: str,
    z: np.ndarray,
    metadata: Mapping[str, Any],
    run_id: str,
    nonce: str,
    allowed_run_ids: Iterable[str] | None = None,
    max_age_s: float | None = DEFAULT_MAX_AGE_S,
) -> None:
    """All coordinator-side checks for one submission, in the order that is safe.

    1. the site is allowed (``UnknownSiteError``); 2. the signature verifies (``SignatureError``);
    3. the run id is current, if ``allowed_run_ids`` is given, and the nonce is fresh, if
    ``max_age_s`` is not None (``StaleSubmissionError``); 4. only then is the nonce recorded
    (``ReplayError`` on reuse) — recording last means unauthenticated junk cannot burn nonces.
    """
    key = allowlist.get(site_id)
    verify_submission(key, signature, blob_sha256, z, metadata, run_id, nonce)
    if allowed_run_ids is not None:
        check_run_id(run_id, allowed_run_ids)
    if max_age_s is not None:
        check_nonce_fresh(nonce, max_age_s=max_age_s)
    ledger.check_and_record(site_id, nonce)
