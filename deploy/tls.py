"""TLS material and SuperNode authentication keys for a Flower 1.41 deployment, with `cryptography` only.

Two independent mechanisms protect the federation (see deploy/README.md):

- **TLS** (transport): a private CA signs the SuperLink's server certificate; every SuperNode and the
  `flwr` CLI verify the SuperLink against ``ca.crt`` (``--root-certificates`` / ``root-certificates``
  in ``$FLWR_HOME/config.toml``). The server certificate's SANs must contain every name or address
  the sites use to reach the coordinator (127.0.0.1 and localhost are always added).
- **SuperNode authentication** (who may join): each site holds an EC P-384 key pair in OpenSSH
  format; the coordinator registers the *public* key with ``flwr supernode register`` and starts the
  SuperLink with ``--enable-supernode-auth``. A SuperNode whose key is not registered is refused.

Private keys are written with mode 0600 and never overwritten unless ``force=True``: regenerating a
site key silently would lock that site out of a SuperLink that registered the old one.

Usage::

    python -m deploy.tls --out certs --host coordinator.example.org --site a --site b
    python -m deploy.tls --out opcerts --operator alice   # Control API client certificate (see the proxy)
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
OPERATOR_CA_CERT = "operator-ca.crt"
OPERATOR_CA_KEY = "operator-ca.key"
DEFAULT_HOSTS = ("127.0.0.1", "localhost")
_SITE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class TlsError(ValueError):
    """Bad input for certificate or key generation (e.g. an invalid site id or host name)."""


@dataclass(frozen=True)
class SiteKeys:
    """A site's SuperNode authentication key pair (OpenSSH format)."""

    site: str
    private_key: Path
    public_key: Path


@dataclass
class TlsBundle:
    """Paths of everything :func:`generate` wrote."""

    out_dir: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    sites: dict[str, SiteKeys] = field(default_factory=dict)


def check_site_id(site: str) -> str:
    """Site ids become file names, node-config values and SuperNode names: keep them plain."""
    if not _SITE_RE.match(site):
        raise TlsError(
            f"site id {site!r} is not allowed: use 1-63 letters, digits, '_', '.', '-' "
            "(starting with a letter or digit)"
        )
    return site


def _write_private(path: Path, data: bytes, force: bool) -> None:
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; pass force=True (--force) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _san_entries(hosts: list[str]) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = []
    seen: set[str] = set()
    for host in [*DEFAULT_HOSTS, *hosts]:
        host = host.strip()
        if not host or host in seen:
            continue
        seen.add(host)
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not re.match(r"^[A-Za-z0-9*][A-Za-z0-9.-]*$", host):
                raise TlsError(f"{host!r} is neither an IP address nor a DNS name") from None
            entries.append(x509.DNSName(host))
    return entries


def make_ca(
    out_dir: Path,
    common_name: str = "RPE federation CA",
    days: int = 3650,
    force: bool = False,
    cert_name: str = CA_CERT,
    key_name: str = CA_KEY,
) -> tuple[Path, Path]:
    """Create a self-signed CA (EC P-384); return (ca.crt, ca.key)."""
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    ca_key, ca_cert = Path(out_dir) / key_name, Path(out_dir) / cert_name
    _write_private(ca_key, _pem_key(key), force)
    _write_public(ca_cert, cert.public_bytes(serialization.Encoding.PEM))
    return ca_cert, ca_key


def _issue_leaf(
    ca_cert: Path, ca_key: Path, common_name: str, days: int, extensions: list[tuple[x509.ExtensionType, bool]]
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new EC P-256 key and its certificate signed by the CA: ``extensions`` as (extension, critical),
    then the authority key identifier; valid from five minutes ago for ``days``."""
    ca = x509.load_pem_x509_certificate(Path(ca_cert).read_bytes())
    signer = serialization.load_pem_private_key(Path(ca_key).read_bytes(), password=None)
    if not isinstance(signer, ec.EllipticCurvePrivateKey):
        raise TlsError(f"{ca_key} is not an EC private key")
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
    )
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical=critical)
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False
    )
    return key, builder.sign(signer, hashes.SHA384())


def make_server_cert(
    out_dir: Path, ca_cert: Path, ca_key: Path, hosts: list[str] | None = None, days: int = 825, force: bool = False
) -> tuple[Path, Path]:
    """Issue the SuperLink's TLS certificate (EC P-256) for 127.0.0.1, localhost and ``hosts``."""
    sans = _san_entries(list(hosts or []))
    key, cert = _issue_leaf(
        ca_cert,
        ca_key,
        f"superlink {sans[0].value}",
        days,
        [
            (x509.SubjectAlternativeName(sans), False),
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
        ],
    )
    server_key, server_cert = out_dir / SERVER_KEY, out_dir / SERVER_CERT
    _write_private(server_key, _pem_key(key), force)
    _write_public(server_cert, cert.public_bytes(serialization.Encoding.PEM))
    return server_cert, server_key


def make_operator_ca(out_dir: Path, days: int = 3650, force: bool = False) -> tuple[Path, Path]:
    """A CA of its own for operator client certificates (``operator-ca.crt`` / ``operator-ca.key``).

    Why separate from the federation CA: ``ca.crt`` is public (every site gets it) and signs the
    SuperLink's server certificate; the proxy's ``--operator-ca`` must admit only certificates the
    operator issued for the Control API, so nothing the federation CA ever signed may pass.
    """
    out = Path(out_dir)
    cert, key = out / OPERATOR_CA_CERT, out / OPERATOR_CA_KEY
    if cert.exists() and key.exists() and not force:
        return cert, key
    return make_ca(out, "RPE federation operator CA", days, True, OPERATOR_CA_CERT, OPERATOR_CA_KEY)


def make_operator_cert(
    out_dir: Path, name: str, ca_cert: Path, ca_key: Path, days: int = 365, force: bool = False
) -> tuple[Path, Path]:
    """Issue a TLS *client* certificate (EC P-256, EKU clientAuth) for operator ``name``.

    Writes ``operator-<name>.crt`` and ``operator-<name>.key`` (0600). The proxy forwards the
    Control API to a non-loopback client only when it presents a certificate that chains to the
    ``--operator-ca`` it was started with; a short validity (one year by default) limits a lost key.
    """
    check_site_id(name)
    key, cert = _issue_leaf(
        ca_cert,
        ca_key,
        f"operator {name}",
        days,
        [
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False),
            (
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                True,
            ),
        ],
    )
    out = Path(out_dir)
    cert_path, key_path = out / f"operator-{name}.crt", out / f"operator-{name}.key"
    _write_private(key_path, _pem_key(key), force)
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def make_supernode_keys(out_dir: Path, site: str, force: bool = False) -> SiteKeys:
    """EC P-384 key pair in OpenSSH format: ``<site>_auth`` (private) and ``<site>_auth.pub``."""
    check_site_id(site)
    key = ec.generate_private_key(ec.SECP384R1())
    priv = out_dir / f"{site}_auth"
    pub = out_dir / f"{site}_auth.pub"
    _write_private(
        priv,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
        force,
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write_public(pub, public + f" rpe-site-{site}\n".encode())
    return SiteKeys(site, priv, pub)


def generate(
    out_dir: str | os.PathLike[str], sites: list[str], hosts: list[str] | None = None, force: bool = False
) -> TlsBundle:
    """CA + SuperLink certificate + one auth key pair per site; existing CA and site keys are reused.

    Re-running with new ``hosts`` re-issues only the server certificate (from the existing CA), and
    new ``sites`` only add key pairs, so already-registered sites keep working.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for site in sites:
        check_site_id(site)
    if force or not (out / CA_CERT).exists() or not (out / CA_KEY).exists():
        ca_cert, ca_key = make_ca(out, force=True)
    else:
        ca_cert, ca_key = out / CA_CERT, out / CA_KEY
    server_cert, server_key = make_server_cert(out, ca_cert, ca_key, hosts, force=True)
    bundle = TlsBundle(out, ca_cert, ca_key, server_cert, server_key)
    for site in sites:
        priv, pub = out / f"{site}_auth", out / f"{site}_auth.pub"
        if priv.exists() and pub.exists() and not force:
            bundle.sites[site] = SiteKeys(site, priv, pub)
        else:
            bundle.sites[site] = make_supernode_keys(out, site, force=True)
    return bundle


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m deploy.tls --out DIR [--host H]... [--site S]...``."""
    parser = argparse.ArgumentParser(
        prog="python -m deploy.tls",
        description="Generate a CA, the SuperLink TLS certificate and SuperNode auth keys (EC P-384, OpenSSH). "
        "This is the coordinator's tool (it always makes a CA in --out): at a hospital site use "
        "`rpe site init`, which makes the site's keys only; the CA comes from the coordinator's join bundle.",
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory (private keys get mode 0600)")
    parser.add_argument(
        "--host",
        action="append",
        default=[],
        help="extra SAN for the SuperLink certificate (DNS name or IP); repeatable",
    )
    parser.add_argument("--site", action="append", default=[], help="site id to create an auth key pair for")
    parser.add_argument(
        "--operator",
        action="append",
        default=[],
        help="issue a Control API client certificate for this operator (signed by "
        "operator-ca.crt in --out, created if missing; give the proxy --operator-ca "
        "OUT/operator-ca.crt); repeatable. With only --operator, nothing else is made",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing CA and site keys")
    args = parser.parse_args(argv)
    if args.operator and not (args.site or args.host):
        ca_cert, ca_key = make_operator_ca(args.out)
        for name in args.operator:
            cert, key = make_operator_cert(args.out, name, ca_cert, ca_key, force=args.force)
            print(f"operator {name:<8} {cert} (key {key}); proxy: --operator-ca {ca_cert}")
        return 0
    if args.site and not args.host and not args.force and not (args.out / CA_CERT).exists():
        # only site keys asked for where there is no CA: that is a site, and a site must never get
        # a second CA (a second ca.crt beside the coordinator's is one wrong pick from a silent failure)
        for site in args.site:
            check_site_id(site)
        for site in args.site:
            priv, pub = args.out / f"{site}_auth", args.out / f"{site}_auth.pub"
            keys = SiteKeys(site, priv, pub) if priv.exists() and pub.exists() else make_supernode_keys(args.out, site)
            print(f"site {keys.site:<12} {keys.private_key}  (give the coordinator {keys.public_key})")
        print(
            f"No CA was made: {args.out} has none and no --host was given, so this is a site. The "
            "federation CA comes from the coordinator (`rpe site join`); `rpe site init` makes a site's keys "
            "and its join request in one step."
        )
        return 0
    bundle = generate(args.out, args.site, args.host, force=args.force)
    if args.operator:
        ca_cert, ca_key = make_operator_ca(args.out)
        for name in args.operator:
            cert, key = make_operator_cert(args.out, name, ca_cert, ca_key, force=args.force)
            print(f"operator {name:<8} {cert} (key {key}); proxy: --operator-ca {ca_cert}")
    print(f"CA:                {bundle.ca_cert}")
    print(f"SuperLink cert:    {bundle.server_cert} (key {bundle.server_key})")
    for keys in bundle.sites.values():
        print(f"site {keys.site:<12} {keys.private_key}  (register {keys.public_key})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
