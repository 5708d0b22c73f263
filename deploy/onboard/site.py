"""A hospital site's side of onboarding: ``rpe site init|join|start|stop``.

A site directory ``S`` holds:

- ``S/certs/<id>_auth`` + ``.pub``: the SuperNode key pair (EC P-384, OpenSSH; ``deploy/tls.py``);
- ``S/keys/<id>.key`` + ``.pub``: the Ed25519 key the site signs its submissions with;
- ``S/join-request.json``: the two public keys for the coordinator (``init``);
- after ``join``: ``S/join-bundle.json``, ``S/ca.crt`` (the federation CA, pinned for TLS) and
  ``S/coordinator.pub`` (deliveries are installed only when signed with it);
- after ``start``: what ``deploy.launch supernode`` keeps (``launch-state.json``, ``logs/``,
  ``node-config.toml``, ``bin/``, ``flwr-home/``) and what the ClientApp writes: ``egress.jsonl``
  and received adapters under ``adapters/``. ``S`` is the site directory ``rpe site status`` reads.

No CA and no server certificate are made at a site (``deploy.tls --site a`` made a second CA and
``ca.crt`` there, and picking the wrong one failed silently).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common.trust.signing import generate_keypair
from deploy import tls
from deploy.onboard.files import (
    OnboardError,
    ca_fingerprint,
    check_ca,
    read_bundle,
    read_json,
    write_json,
)

REQUEST_FILE = "join-request.json"
BUNDLE_FILE = "join-bundle.json"
CA_FILE = "ca.crt"
COORDINATOR_KEY_FILE = "coordinator.pub"


def auth_key(directory: Path, site: str) -> Path:
    """The SuperNode private key of the site directory."""
    return Path(directory) / "certs" / f"{site}_auth"


def site_id(directory: Path) -> str:
    """The site id of ``S`` (from its join request); OnboardError if ``S`` is not a site directory."""
    d = Path(directory)
    if not (d / REQUEST_FILE).is_file():
        raise OnboardError(
            f"{d} is not a site directory (no {REQUEST_FILE}): create it with `rpe site init --dir {d} --site-id ID`"
        )
    site = read_json(d / REQUEST_FILE, "join request").get("site_id")
    if not isinstance(site, str):
        raise OnboardError(f"{d / REQUEST_FILE} names no site_id; re-run `rpe site init --force`")
    return site


def init(directory: Path, site: str, force: bool = False) -> dict[str, Any]:
    """The site's SuperNode key pair and signing key, and ``S/join-request.json``."""
    from deploy.onboard.files import check_site_id, make_request

    site = check_site_id(site, "--site-id")
    d = Path(directory).resolve()
    if (d / REQUEST_FILE).exists() and not force:
        raise OnboardError(
            f"{d} already holds site {site_id(d)!r} ({REQUEST_FILE}); its keys are kept. Send that "
            "request, or pass --force to make NEW keys (the coordinator must then admit the site again)"
        )
    d.mkdir(parents=True, exist_ok=True)
    node = tls.make_supernode_keys(d / "certs", site, force=force)
    keys = d / "keys"
    if force:
        for p in (keys / f"{site}.key", keys / f"{site}.pub"):
            p.unlink(missing_ok=True)
    _, signing_pub = generate_keypair(keys, site)
    request = make_request(site, node.public_key.read_text(), signing_pub.read_text())
    write_json(d / REQUEST_FILE, request)
    return {"dir": str(d), "request": str(d / REQUEST_FILE), **request}


def join(directory: Path, bundle_path: Path, force: bool = False) -> dict[str, Any]:
    """Check the coordinator's join bundle for this site and store it (CA, coordinator key, address,
    app hash); returns what was pinned."""
    d = Path(directory).resolve()
    site = site_id(d)
    bundle = read_bundle(Path(bundle_path), site)
    old = d / BUNDLE_FILE
    if old.exists() and not force:
        previous = read_json(old, "join bundle")
        if previous != bundle:
            raise OnboardError(
                f"{d} already joined with another bundle ({old}); pass --force to replace it "
                "(the site then trusts the new CA and coordinator key)"
            )
    (d / CA_FILE).write_text(bundle["ca_cert"])
    (d / COORDINATOR_KEY_FILE).write_text(bundle["coordinator_public_key"])
    write_json(old, bundle)
    from common.trust.signing import key_fingerprint, public_key_from_pem

    return {
        "site": site,
        "superlink": bundle["superlink"],
        "ca_sha256": ca_fingerprint(check_ca(bundle["ca_cert"], "ca_cert")),
        "coordinator_key_sha256": key_fingerprint(public_key_from_pem(bundle["coordinator_public_key"])),
        "app_sha256": bundle["app_sha256"],
        "ca_cert": str(d / CA_FILE),
        "coordinator_key": str(d / COORDINATOR_KEY_FILE),
    }


def start(
    directory: Path,
    data_path: str,
    model_path: str,
    threads: int = 0,
    no_deliveries: bool = False,
    port: int = 0,
    superlink: str = "",
    release: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The site's SuperNode from ``S``'s files (``deploy.launch.start_supernode``)."""
    from deploy import launch
    from deploy.launch.state import DEFAULT_SUPERNODE_PORT, SiteSpec

    d = Path(directory).resolve()
    site = site_id(d)
    if not (d / BUNDLE_FILE).is_file():
        raise OnboardError(
            f"site {site!r} has not joined a federation ({d / BUNDLE_FILE} is missing): import the "
            f"coordinator's bundle with `rpe site join --dir {d} BUNDLE.json` first"
        )
    bundle = read_bundle(d / BUNDLE_FILE, site)
    key = auth_key(d, site)
    if not key.is_file():
        raise OnboardError(
            f"the SuperNode key {key} is missing: restore it from the site's backup (the coordinator "
            "registered its public half), or make new keys with `rpe site init --force` and be admitted again"
        )
    ca = d / CA_FILE
    if not ca.is_file():
        raise OnboardError(f"{ca} is missing: run `rpe site join --dir {d} BUNDLE.json` again")
    coord_key = d / COORDINATOR_KEY_FILE
    if not no_deliveries and not coord_key.is_file():
        raise OnboardError(
            f"{coord_key} is missing, so this site could not check a delivered adapter: run `rpe site join` "
            "again, or pass --no-deliveries if this site never receives adapters"
        )
    spec = SiteSpec(
        site,
        str(Path(data_path).expanduser().resolve()),
        model_path,
        str(d),
        port or DEFAULT_SUPERNODE_PORT,
        threads,
        {},
        bundle["app_sha256"],
        "" if no_deliveries else str(coord_key),
        dict(release or {}),
    )
    proc = launch.start_supernode(d, spec, superlink or bundle["superlink"], ca, key)
    return {"site": site, "pid": proc["pid"], "log": proc.get("log"), "superlink": superlink or bundle["superlink"]}


def stop(directory: Path) -> dict[str, Any]:
    """Stop the site's SuperNode (and whatever it started)."""
    from deploy import launch

    d = Path(directory).resolve()
    site_id(d)
    return launch.down(d)
