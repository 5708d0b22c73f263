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

import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
#: what ``rpe site start`` writes (by ``deploy.launch.start_supernode``) and the SuperNode reads
NODE_CONFIG_FILE = "node-config.toml"

if TYPE_CHECKING:
    from deploy.launch.state import SiteSpec


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


def family_settings(tasks: Sequence[str] = (), options: Sequence[str] = ()) -> dict[str, str]:
    """The node-config keys of ``--task`` and ``--option KEY=VALUE``: the task families (default
    report-text) and their own keys (``Family.node_config_keys``), the keys ``rpe data check
    --node-config`` reads. An unknown family or key is an OnboardError naming the closest one."""
    from common.families import family_names, get_family

    known = family_names()
    names = [n.strip() for item in tasks for n in str(item).split(",") if n.strip()]
    for name in names:
        if name not in known:
            raise OnboardError(
                f"--task {name!r} is not a task family{_near(name, known)}; the families are: {', '.join(known)}"
            )
    names = list(dict.fromkeys(names)) or [known[0]]
    keys = [k for n in names for k in get_family(n).node_config_keys]
    out = {"task": ",".join(names)}
    for item in options:
        key, sep, value = str(item).partition("=")
        key = key.strip()
        if not sep or not key or not value.strip():
            raise OnboardError(
                f"--option {item!r} is not KEY=VALUE (e.g. report-columns=prompt=Findings,target=Impression)"
            )
        if key not in keys:
            owner = [n for n in known if n not in names and key in get_family(n).node_config_keys]
            hint = f" (a key of the {owner[0]} family: add --task {owner[0]})" if owner else _near(key, keys)
            raise OnboardError(
                f"--option {key!r} is not a node-config key of {', '.join(names)}{hint}; "
                f"{'it takes' if len(names) == 1 else 'they take'}: {', '.join(keys) or 'none'}"
            )
        if key in out:
            raise OnboardError(f"--option {key} is given twice; give each key once")
        out[key] = value
    return out


def _near(name: str, choices: Sequence[str]) -> str:
    near = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {near[0]!r}?)" if near else ""


def site_spec(
    directory: Path,
    data_path: str,
    model_path: str = "",
    threads: int = 0,
    no_deliveries: bool = False,
    port: int = 0,
    release: dict[str, Any] | None = None,
    tasks: Sequence[str] = (),
    options: Sequence[str] = (),
    joined: bool = True,
) -> SiteSpec:
    """The :class:`SiteSpec` (hence the node config) ``rpe site start`` runs the SuperNode with.
    With ``joined`` the site's bundle, keys and coordinator key must be there (OnboardError);
    without it (``--check`` before joining) what is missing is left out of the node config."""
    from common.families import get_family
    from deploy.launch.state import DEFAULT_SUPERNODE_PORT, SiteSpec

    d = Path(directory).resolve()
    site = site_id(d)
    extra: dict[str, Any] = family_settings(tasks, options)
    model = model_path or get_family(extra["task"].split(",")[0]).default_model
    app_sha256, coord = "", ""
    if joined or (d / BUNDLE_FILE).is_file():
        if not (d / BUNDLE_FILE).is_file():
            raise OnboardError(
                f"site {site!r} has not joined a federation ({d / BUNDLE_FILE} is missing): import the "
                f"coordinator's bundle with `rpe site join --dir {d} BUNDLE.json` first"
            )
        app_sha256 = read_bundle(d / BUNDLE_FILE, site)["app_sha256"]
        if not no_deliveries and (joined or (d / COORDINATOR_KEY_FILE).is_file()):
            coord = str(d / COORDINATOR_KEY_FILE)
    if joined:
        key = auth_key(d, site)
        if not key.is_file():
            raise OnboardError(
                f"the SuperNode key {key} is missing: restore it from the site's backup (the coordinator "
                "registered its public half), or make new keys with `rpe site init --force` and be admitted again"
            )
        if not (d / CA_FILE).is_file():
            raise OnboardError(f"{d / CA_FILE} is missing: run `rpe site join --dir {d} BUNDLE.json` again")
        if coord and not Path(coord).is_file():
            raise OnboardError(
                f"{coord} is missing, so this site could not check a delivered adapter: run `rpe site join` "
                "again, or pass --no-deliveries if this site never receives adapters"
            )
    return SiteSpec(
        site,
        str(Path(data_path).expanduser().resolve()),
        model,
        str(d),
        port or DEFAULT_SUPERNODE_PORT,
        threads,
        {},
        app_sha256,
        coord,
        dict(release or {}),
        extra,
    )


def start(
    directory: Path, data_path: str, model_path: str = "", superlink: str = "", **settings: Any
) -> dict[str, Any]:
    """The site's SuperNode from ``S``'s files (``deploy.launch.start_supernode``) with the node
    config of :func:`site_spec` (``settings``: its keyword arguments), written to
    ``S/node-config.toml``."""
    from deploy import launch

    spec = site_spec(directory, data_path, model_path, joined=True, **settings)
    d = Path(spec.site_dir)
    bundle = read_bundle(d / BUNDLE_FILE, spec.site)
    address = superlink or bundle["superlink"]
    proc = launch.start_supernode(d, spec, address, d / CA_FILE, auth_key(d, spec.site))
    return {
        "site": spec.site,
        "pid": proc["pid"],
        "log": proc.get("log"),
        "superlink": address,
        "node_config": str(d / NODE_CONFIG_FILE),
        "task": spec.extra["task"],
    }


def check(directory: Path, data_path: str, model_path: str = "", **settings: Any) -> tuple[dict[str, Any], list[Any]]:
    """``rpe site start --check``: the node config start would write and ``rpe data check`` of it
    (the same reader, ``client.datacheck.check_site``). Nothing is written in ``S``, nothing started;
    the site need not have joined yet."""
    import tempfile

    import tomli_w

    from client.datacheck import check_site

    spec = site_spec(directory, data_path, model_path, joined=False, **settings)
    nc = {**spec.node_config(), "supernode-key": str(auth_key(Path(spec.site_dir), spec.site))}
    with tempfile.TemporaryDirectory(prefix="rpe-site-check-") as tmp:
        path = Path(tmp) / NODE_CONFIG_FILE
        path.write_text(tomli_w.dumps(nc))
        return nc, check_site(node_config=path)


def stop(directory: Path) -> dict[str, Any]:
    """Stop the site's SuperNode (and whatever it started)."""
    from deploy import launch

    d = Path(directory).resolve()
    site_id(d)
    return launch.down(d)
