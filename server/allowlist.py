"""Who may submit, and whether a submission is fresh: the coordinator's side of site identity.

- ``AllowList``: the JSON file ``{site_id: public key PEM}``, re-read on every lookup, written
  with ``common.files.durable.atomic_write``.
- Freshness, kept deliberately simple: a *nonce* is ``"<unix seconds>.<32 hex random>"``
  (``make_nonce``); ``check_nonce_fresh`` rejects nonces older than ``max_age_s`` or too far in
  the future, so the ``NonceLedger`` of seen (site, nonce) pairs only has to be consulted, never
  trusted forever. A *run id* names the round the coordinator asked for; ``check_run_id``
  rejects submissions for runs it is not running now (a stale reply from an old round).
- ``NonceLedger``: the durable set of accepted (site, nonce) pairs (``common.files.durable.JsonlLog``).
- ``authenticate_submission`` runs all checks in the safe order (signature before nonce, so an
  attacker cannot burn a site's nonces with unsigned junk).

The error types and ``verify_submission`` stay in ``common/trust/signing.py``, shared with the site.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from common.files.durable import JsonlLog, atomic_write, complete_end
from common.trust.digests import canonical_json
from common.trust.nodekey import NodeKeyError, node_public_key, node_public_text
from common.trust.signing import (
    ReplayError,
    SignatureError,
    SigningError,
    StaleSubmissionError,
    UnknownSiteError,
    check_site_id,
    key_fingerprint,
    public_key_from_pem,
    public_key_pem,
    verify_submission,
)

__all__ = [
    "DEFAULT_MAX_AGE_S",
    "DEFAULT_MAX_SKEW_S",
    "NODE_KEYS_FILE",
    "NONCE_RE",
    "AllowList",
    "NodeKeys",
    "NonceLedger",
    "ReplayError",
    "SignatureError",
    "SigningError",
    "StaleSubmissionError",
    "UnknownSiteError",
    "authenticate_submission",
    "check_nonce_fresh",
    "check_run_id",
    "make_nonce",
    "nonce_timestamp",
]

NONCE_RE = re.compile(r"^(\d{1,12})\.([0-9a-f]{32})$")
DEFAULT_MAX_AGE_S = 24 * 3600.0
DEFAULT_MAX_SKEW_S = 300.0


# --------------------------------------------------------------------------------------------
# allow-list


class _SiteKeyFile:
    """A JSON file ``{site_id: key text}``, re-read on every lookup and written atomically (the
    allow-list and the SuperNode key record share it)."""

    WHAT = "site key file"
    VALUE = "key text"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def _load(self) -> dict[str, str]:
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except json.JSONDecodeError as exc:
            raise SigningError(f"{self.WHAT} {self.path} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise SigningError(f"{self.WHAT} {self.path} must be a JSON object of site id -> {self.VALUE}")
        return data

    def _save(self, data: dict[str, str]) -> None:
        atomic_write(self.path, json.dumps(data, indent=2, sort_keys=True) + "\n", mode=0o644)

    def sites(self) -> list[str]:
        """The site ids in the file, sorted."""
        return sorted(self._load())

    def __contains__(self, site_id: object) -> bool:
        return site_id in self._load()


class AllowList(_SiteKeyFile):
    """The coordinator's JSON file ``{site_id: public key PEM}``: who may submit.

    Re-read on every lookup, so an operator's edit (or ``rpe keygen`` on another shell) takes
    effect without a restart; written atomically (temp file + rename + fsync).
    """

    WHAT = "allow-list"
    VALUE = "PEM string"

    def add(self, site_id: str, pub_pem: str | bytes, replace: bool = False) -> None:
        """Allow ``site_id`` with this key. Re-adding the same key is a no-op; a *different* key
        needs ``replace=True`` (key rotation must be deliberate)."""
        check_site_id(site_id)
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

    @property
    def node_keys(self) -> NodeKeys:
        """The coordinator's record of each site's SuperNode key, beside this file."""
        return NodeKeys(self.path.with_name(NODE_KEYS_FILE))


NODE_KEYS_FILE = "supernode-keys.json"


class NodeKeys(_SiteKeyFile):
    """The coordinator's JSON file ``{site_id: SuperNode public key (OpenSSH line)}``.

    Written when a site's SuperNode key is registered with the SuperLink (``deploy/launch/``
    ``up`` / ``register``), re-read on every lookup. Once it names any site, discovery binds every
    site id to its recorded key: a whoami not signed with the SuperNode key recorded for the
    claimed site is refused (``server.messaging.verify_identity``).
    """

    WHAT = "SuperNode key record"
    VALUE = "OpenSSH key"

    def add(self, site_id: str, public_text: str | bytes, replace: bool = False) -> None:
        """Record ``site_id``'s SuperNode public key; a different key for a recorded site needs ``replace``."""
        check_site_id(site_id)
        try:
            line = node_public_text(node_public_key(public_text))
        except NodeKeyError as exc:
            raise SigningError(f"SuperNode key for site {site_id!r}: {exc}") from None
        data = self._load()
        if data.get(site_id) not in (None, line) and not replace:
            raise SigningError(
                f"site {site_id!r} already has another SuperNode key recorded in {self.path}; "
                "pass replace=True to rotate it"
            )
        data[site_id] = line
        self._save(data)

    def get(self, site_id: str) -> Any:
        """The recorded EC public key of ``site_id``, or None."""
        line = self._load().get(site_id)
        return node_public_key(line) if line is not None else None


def unsigned_claim_refusal(allow: AllowList | None, site: str, node_id: object) -> str | None:
    """Why an *unsigned* claim to be ``site`` is refused whatever ``require-signatures`` says, or None.

    Issue 26 class 7: with ``require-signatures=false`` an unsigned whoami was accepted for a site
    whose SuperNode key is recorded, so an impostor received that site's ``query.embed`` and
    ``train.apply``. The switch only lets sites that hold *no* key take part; a site that has a
    signing key on the allow-list, or any site once SuperNode keys are recorded (node binding), can
    only be claimed with a statement signed by its keys: an unsigned claim cannot prove it holds them.
    """
    if allow is None:
        return None
    nodes = allow.node_keys
    if nodes.sites():
        return (
            f"node {node_id} claims site {site!r} without a signed identity statement, but this coordinator "
            f"binds every site to its SuperNode key ({nodes.path}): an unsigned claim cannot prove it holds that "
            "key, and node binding does not depend on require-signatures. If this node is the site, give the "
            "site its key (its signing key on the allow-list and its SuperNode key) so that it signs its whoami"
        )
    if site in allow:
        return (
            f"node {node_id} claims site {site!r} without a signed identity statement, but site {site!r} has a "
            f"signing key on the allow-list {allow.path}: its claims must be signed with it, whatever "
            "require-signatures says. If this node is the site, give the site its key (the private key matching "
            "the allow-list entry) so that it signs its whoami"
        )
    return None


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

    A ``common.files.durable.JsonlLog``: appended under an exclusive ``flock`` and fsynced before
    ``check_and_record`` returns, so a nonce is never accepted twice, even by two coordinator
    processes or across a crash. Under the lock it first reads what other processes appended
    since its last look. A torn final line (crash mid-append) is truncated away before the next
    append: that nonce was never confirmed as recorded, so its submission was never accepted.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.log = JsonlLog(self.path)
        self._seen: set[tuple[str, str]] = set()
        self._offset = 0

    def _catch_up(self, fh: IO[bytes]) -> None:
        data = self.log.read_from(self._offset, fh)
        complete = complete_end(data)
        for raw in data[:complete].splitlines():
            try:
                rec = json.loads(raw)
                self._seen.add((rec["site"], rec["nonce"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # an unreadable line was never a confirmed nonce
        self._offset += complete

    def seen(self, site_id: str, nonce: str) -> bool:
        """True if this site already used this nonce (reads the file, shared lock)."""
        with self.log.locked(shared=True) as fh:
            self._catch_up(fh)
        return (site_id, nonce) in self._seen

    def check_and_record(self, site_id: str, nonce: str) -> None:
        """Record (site, nonce) durably; ``ReplayError`` if it was recorded before."""
        if not isinstance(nonce, str) or not nonce:
            raise ReplayError("nonce must be a non-empty string")
        with self.log.locked() as fh:
            self._catch_up(fh)
            if (site_id, nonce) in self._seen:
                raise ReplayError(f"nonce {nonce!r} was already used by site {site_id!r}: replayed submission")
            self.log.repair(self._offset, fh)  # a torn tail: cut it so our line starts clean
            _, self._offset = self.log.append(
                [canonical_json({"site": site_id, "nonce": nonce, "ts": time.time()})], fh=fh
            )
            self._seen.add((site_id, nonce))


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
