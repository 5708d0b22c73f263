"""The two files a site and the coordinator exchange: the join request and the join bundle.

- **join request** (site -> coordinator, ``rpe site init`` writes ``S/join-request.json``): the
  site id, the SuperNode public key (EC P-384, OpenSSH line), the Ed25519 submission-signing
  public key (PEM), their fingerprints and when it was made. Only public keys: it may travel by
  e-mail; the coordinator operator compares the fingerprints with the site by phone.
- **join bundle** (coordinator -> site, ``rpe coordinator admit`` writes it): the federation CA
  certificate the site pins for TLS, the coordinator's public key (deliveries and receipts are
  signed with it), the SuperLink address to dial, the SHA-256 of the app bundle the coordinator
  runs (the site pins it, ``client/pin.py``), the site id it was issued for and the digest of the
  request it answers. Public too; it grants nothing without the site's private keys.

Each reader checks everything before anything is written or registered (:class:`OnboardError`
names the file, the field and what was expected); the digests of both files go into the
coordinator's audit log.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import re
from pathlib import Path
from typing import Any

from cryptography import x509

from common.trust.digests import canonical_json
from common.trust.nodekey import NodeKeyError, node_key_fingerprint, node_public_key, node_public_text
from common.trust.signing import SigningError, key_fingerprint, public_key_from_pem, public_key_pem
from deploy import tls

REQUEST_FORMAT = "rpe-join-request/1"
BUNDLE_FORMAT = "rpe-join-bundle/1"
REQUEST_FIELDS = ("format", "site_id", "supernode_public_key", "signing_public_key", "fingerprints", "created")
BUNDLE_FIELDS = (
    "format",
    "site_id",
    "superlink",
    "ca_cert",
    "coordinator_public_key",
    "app_sha256",
    "request_sha256",
    "created",
)
MAX_FILE_BYTES = 256 * 1024
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252})$")


class OnboardError(ValueError):
    """A join request, join bundle or onboarding directory is not what was expected (the message
    names the file, the field, what was expected and what to do); nothing was changed."""


def now_iso() -> str:
    """UTC time, seconds, ISO 8601 (``2026-12-07T19:40:00Z``)."""
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def file_digest(data: dict[str, Any]) -> str:
    """sha256 hex of a request's or bundle's canonical JSON: the name the audit log gives it."""
    return hashlib.sha256(canonical_json(data).encode("utf-8")).hexdigest()


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from ``path``; OnboardError (naming ``what``) if missing, too large or not JSON."""
    p = Path(path)
    if not p.is_file():
        raise OnboardError(f"{what} {p} does not exist (or is not a file)")
    if p.stat().st_size > MAX_FILE_BYTES:
        raise OnboardError(f"{what} {p} is larger than {MAX_FILE_BYTES} bytes: not a {what}")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OnboardError(f"{what} {p} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise OnboardError(f"{what} {p} must hold a JSON object")
    return data


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` (indented, sorted keys) to ``path`` crash-safely (``common.files.durable``:
    fsynced temporary file, rename, directory fsync); readable by others, as these files are public
    keys, certificates and settings that are exchanged or read by other accounts."""
    from common.files.durable import atomic_write

    atomic_write(path, json.dumps(data, indent=2, sort_keys=True) + "\n", mode=0o644)


def _fields(data: dict[str, Any], names: tuple[str, ...], fmt: str, where: str) -> None:
    if data.get("format") != fmt:
        raise OnboardError(f"{where}: field 'format' is {data.get('format')!r}, expected {fmt!r}")
    missing = [n for n in names if n not in data]
    if missing:
        raise OnboardError(f"{where}: missing field(s) {missing}; expected {list(names)}")
    extra = sorted(set(data) - set(names))
    if extra:
        raise OnboardError(f"{where}: unknown field(s) {extra}; expected only {list(names)}")
    for name in names:
        if name != "fingerprints" and not isinstance(data[name], str):
            raise OnboardError(f"{where}: field {name!r} must be a string, got {type(data[name]).__name__}")


def check_site_id(site: Any, where: str) -> str:
    """A site id both the TLS tooling and the allow-list accept."""
    try:
        return tls.check_site_id(str(site)) if isinstance(site, str) else tls.check_site_id("")
    except tls.TlsError as exc:
        raise OnboardError(f"{where}: {exc}") from None


# -- join request ------------------------------------------------------------------------------


def make_request(site: str, supernode_pub: str, signing_pub: str) -> dict[str, Any]:
    """The join request for ``site`` from its two public keys (checked as the coordinator will)."""
    request = {
        "format": REQUEST_FORMAT,
        "site_id": site,
        "supernode_public_key": node_public_text(node_public_key(supernode_pub)),
        "signing_public_key": public_key_pem(public_key_from_pem(signing_pub)),
        "created": now_iso(),
    }
    request["fingerprints"] = fingerprints(request)
    check_request(request, "join request")
    return request


def fingerprints(request: dict[str, Any]) -> dict[str, str]:
    """sha256 fingerprints of the request's two keys (what the operators read to each other)."""
    return {
        "supernode": node_key_fingerprint(node_public_key(request["supernode_public_key"])),
        "signing": key_fingerprint(public_key_from_pem(request["signing_public_key"])),
    }


def check_request(data: dict[str, Any], where: str) -> dict[str, Any]:
    """The request itself if well-formed (schema, site id, both keys parse, fingerprints match)."""
    _fields(data, REQUEST_FIELDS, REQUEST_FORMAT, where)
    check_site_id(data["site_id"], f"{where}: field 'site_id'")
    try:
        node_public_key(data["supernode_public_key"])
    except NodeKeyError as exc:
        raise OnboardError(
            f"{where}: field 'supernode_public_key' is not the site's SuperNode key (EC P-384, OpenSSH): {exc}"
        ) from None
    try:
        public_key_from_pem(data["signing_public_key"])
    except SigningError as exc:
        raise OnboardError(f"{where}: field 'signing_public_key' is not an Ed25519 PEM public key: {exc}") from None
    if not isinstance(data["fingerprints"], dict) or data["fingerprints"] != fingerprints(data):
        raise OnboardError(
            f"{where}: field 'fingerprints' does not match the keys in the request (edited or damaged); "
            "ask the site for a fresh `rpe site init` request"
        )
    return data


def read_request(path: Path) -> dict[str, Any]:
    """A checked join request from ``path``."""
    return check_request(read_json(path, "join request"), f"join request {path}")


# -- join bundle -------------------------------------------------------------------------------


def check_address(address: Any, where: str) -> str:
    """``HOST:PORT`` (an IPv4/IPv6 literal or a DNS name; ``[v6]:port`` for IPv6)."""
    text = str(address) if isinstance(address, str) else ""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    ok = bool(sep) and port.isdigit() and 0 < int(port) < 65536 and bool(host)
    if ok:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            ok = bool(_HOST.match(host)) and host not in ("0.0.0.0",)
    if not ok or host in ("0.0.0.0", "::"):
        raise OnboardError(
            f"{where}: {address!r} is not an address a site can dial: expected HOST:PORT, e.g. coord.example.org:9093"
        )
    return text


def check_ca(pem: Any, where: str) -> x509.Certificate:
    """A PEM CA certificate (basic constraints CA=true), as the site pins for TLS."""
    try:
        cert = x509.load_pem_x509_certificate(str(pem).encode("ascii", "replace"))
    except ValueError as exc:
        raise OnboardError(f"{where}: not a PEM X.509 certificate ({exc})") from None
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise OnboardError(f"{where}: the certificate is not a CA certificate (the federation's ca.crt is)")
    return cert


def ca_fingerprint(cert: x509.Certificate) -> str:
    """sha256 hex of the certificate's DER bytes."""
    from cryptography.hazmat.primitives import hashes

    return cert.fingerprint(hashes.SHA256()).hex()


def check_bundle(data: dict[str, Any], where: str, site: str | None = None) -> dict[str, Any]:
    """The bundle itself if well-formed and (with ``site``) issued for that site."""
    _fields(data, BUNDLE_FIELDS, BUNDLE_FORMAT, where)
    got = check_site_id(data["site_id"], f"{where}: field 'site_id'")
    if site is not None and got != site:
        raise OnboardError(
            f"{where} was issued for site {got!r}, but this directory is site {site!r}: "
            "ask the coordinator for the bundle made from this site's join request"
        )
    check_address(data["superlink"], f"{where}: field 'superlink'")
    check_ca(data["ca_cert"], f"{where}: field 'ca_cert'")
    try:
        public_key_from_pem(data["coordinator_public_key"])
    except SigningError as exc:
        raise OnboardError(f"{where}: field 'coordinator_public_key' is not an Ed25519 PEM public key: {exc}") from None
    for name in ("app_sha256", "request_sha256"):
        if not _HEX64.match(data[name]):
            raise OnboardError(f"{where}: field {name!r} must be 64 lower-case hex digits, got {data[name]!r}")
    return data


def read_bundle(path: Path, site: str | None = None) -> dict[str, Any]:
    """A checked join bundle from ``path``."""
    return check_bundle(read_json(path, "join bundle"), f"join bundle {path}", site)
