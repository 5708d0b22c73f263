"""The coordinator's side of onboarding: ``rpe coordinator init|admit|start|stop|status``.

A coordinator directory ``D`` is the ``deploy.launch`` workdir (``certs/``, ``flwr-home/``,
``logs/``, ``launch-state.json`` ...) plus ``D/coordinator.toml`` (every setting ``init`` took, so
later commands need only ``--dir D``), ``D/coordinator.pub`` (the public half of the registry's
signing key, what every site pins), ``D/allowlist.json`` and ``D/supernode-keys.json`` (who may
submit, and each site's SuperNode key), ``D/sites/<id>/`` (each admitted site's request, keys and
bundle) and, by default, the registry ``D/registry``.

``init`` makes everything up front (the CA, the SuperLink certificate, the registry with its
coordinator key), so a site's bundle carries the coordinator key from the start: before, the key
existed only after the first run and a target site refused its delivery (``no-coordinator-key``).
"""

from __future__ import annotations

import ipaddress
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from deploy import tls
from deploy.onboard.files import (
    BUNDLE_FORMAT,
    OnboardError,
    check_address,
    file_digest,
    now_iso,
    read_request,
    write_json,
)

SETTINGS_FILE = "coordinator.toml"
PUBLIC_KEY_FILE = "coordinator.pub"
ALLOWLIST_FILE = "allowlist.json"
#: the app the coordinator runs (``flwr run`` is started from it): this checkout by default
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class CoordinatorSettings:
    """What ``rpe coordinator init`` was given (``D/coordinator.toml``)."""

    address: str
    host: str = "0.0.0.0"
    tls_hosts: list[str] = field(default_factory=list)
    site_networks: list[str] = field(default_factory=list)
    registry: str = ""
    base_model: str = "smollm2-135m-instruct"
    #: other task families' base models (``--family-base segmentation=/models/sam``): their
    #: registries are made at init too, signing with the same coordinator key
    family_bases: dict[str, str] = field(default_factory=dict)
    app: str = str(REPO_ROOT)
    proxy: bool = True
    inner_port: int = 0
    operator_ca: str = ""
    run_as: str = ""
    operator_group: str = ""
    created: str = ""

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])

    def to_toml(self) -> str:
        return "# written by `rpe coordinator init`; read by rpe coordinator start|stop|status|admit\n" + tomli_w.dumps(
            asdict(self)
        )


def load_settings(directory: Path) -> CoordinatorSettings:
    """``D/coordinator.toml``; OnboardError if ``D`` is not a coordinator directory."""
    path = Path(directory) / SETTINGS_FILE
    if not path.is_file():
        raise OnboardError(
            f"{directory} is not a coordinator directory (no {SETTINGS_FILE}): create it with "
            f"`rpe coordinator init --dir {directory} --address HOST:PORT`"
        )
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        return CoordinatorSettings(**data)
    except (tomllib.TOMLDecodeError, TypeError) as exc:
        raise OnboardError(f"{path} is not a coordinator settings file ({exc}); re-run init with --force") from None


def registry_path(directory: Path, settings: CoordinatorSettings) -> Path:
    return Path(settings.registry) if settings.registry else Path(directory) / "registry"


def _check_settings(s: CoordinatorSettings) -> None:
    check_address(s.address, "--address")
    for net in s.site_networks:
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise OnboardError(f"--site-network {net!r} is not a network in CIDR notation, e.g. 10.0.1.0/24") from None
    try:
        tls._san_entries(s.tls_hosts)
    except tls.TlsError as exc:
        raise OnboardError(f"--tls-host: {exc}") from None
    if not (Path(s.app) / "pyproject.toml").is_file():
        raise OnboardError(f"--app {s.app}: no pyproject.toml there; give the directory `flwr run` is started from")
    from common.families import FAMILIES

    for family in s.family_bases:
        if family not in FAMILIES or family == "report-text":
            others = [f for f in FAMILIES if f != "report-text"]
            raise OnboardError(
                f"--family-base {family}=...: expected one of {others} (the report family's base is --base-model)"
            )
    if s.operator_ca and not Path(s.operator_ca).is_file():
        raise OnboardError(f"--operator-ca {s.operator_ca} does not exist")


def init(directory: Path, settings: CoordinatorSettings, force: bool = False) -> dict[str, Any]:
    """Create the coordinator directory: CA + SuperLink certificate, the registry (with its
    coordinator key) for ``base_model``, ``coordinator.pub``, an empty allow-list and
    ``coordinator.toml``. Refuses an existing coordinator without ``force`` (its CA and registry are
    then reused, never replaced: sites already hold the CA and the key)."""
    d = Path(directory).resolve()
    if (d / SETTINGS_FILE).exists() and not force:
        raise OnboardError(
            f"{d} already holds a coordinator ({SETTINGS_FILE}); pass --force to rewrite its settings "
            "(the CA, keys and registry are kept)"
        )
    host = settings.address.rpartition(":")[0].strip("[]")
    settings.tls_hosts = list(dict.fromkeys([host, *settings.tls_hosts]))
    settings.app = str(Path(settings.app).resolve())
    if settings.operator_ca:
        settings.operator_ca = str(Path(settings.operator_ca).resolve())
    _check_settings(settings)
    registry = registry_path(d, settings).resolve()
    settings.registry = str(registry)
    settings.created = settings.created or now_iso()
    d.mkdir(parents=True, exist_ok=True)
    bundle = tls.generate(d / "certs", [], settings.tls_hosts)
    _ensure_registry(registry, registry, "report-text", settings.base_model)
    for family, model in settings.family_bases.items():
        from common.families import family_registry_dir

        _ensure_registry(registry, family_registry_dir(registry, family), family, model)
    from server.registry.coordkey import key_paths

    shutil.copyfile(key_paths(registry)[1], d / PUBLIC_KEY_FILE)
    allow = d / ALLOWLIST_FILE
    if not allow.exists():
        write_json(allow, {})
    (d / SETTINGS_FILE).write_text(settings.to_toml(), encoding="utf-8")
    return {
        "dir": str(d),
        "ca_cert": str(bundle.ca_cert),
        "server_cert": str(bundle.server_cert),
        "coordinator_key": str(d / PUBLIC_KEY_FILE),
        "registry": str(registry),
        "address": settings.address,
    }


def _ensure_registry(root: Path, path: Path, family_name: str, base_model: str) -> None:
    """An empty registry of ``family_name`` at ``path`` bound to ``base_model`` (kept if it already
    exists). Opening the root registry writable creates the coordinator's signing key; a family's
    own directory under it gets a copy of that key (``server.bootstrap.share_coordinator_key``), so
    a delivery of any family verifies against the one ``coordinator.pub`` the sites pin."""
    from common.families import get_family
    from server.bootstrap import share_coordinator_key
    from server.registry import Registry

    if not (path / "registry.json").is_file():
        family = get_family(family_name)
        try:
            base = family.registry_base(base_model)
        except (OSError, ValueError) as exc:
            raise OnboardError(f"base model {base_model!r} of {family_name}: cannot read it ({exc})") from None
        Registry.init(
            path,
            base_fingerprint=base.fingerprint,
            module_shapes=base.module_shapes,
            embedding_dim=base.embedding_dim,
            representation=family.registry.representation,
            base_name=base.base_name,
        ).close()
    if path != root:
        share_coordinator_key(root, path)
    else:
        Registry(path, chroma="off", sync_index=False).close()  # creates a missing key


# -- admit ---------------------------------------------------------------------------------------


def admit(directory: Path, request_path: Path, out: Path | None = None, replace: bool = False) -> dict[str, Any]:
    """Check a join request, register the site's SuperNode key with the running SuperLink,
    allow-list its signing key and record site <-> SuperNode key in one step, write the join bundle
    and audit both files' digests. Nothing is changed when a check fails."""
    from client.pin import fab_sha256
    from deploy import launch
    from server.allowlist import AllowList

    d = Path(directory).resolve()
    s = load_settings(d)
    request = read_request(Path(request_path))
    site = request["site_id"]
    allow = AllowList(d / ALLOWLIST_FILE)
    nodes = allow.node_keys
    node_line, signing = request["supernode_public_key"], request["signing_public_key"]
    _check_clash(allow, site, node_line, signing, replace)
    state = launch.load_state(d)
    link = state.get("superlink")
    if not link or not launch.is_alive(link["pid"], link["start_time"]):
        raise OnboardError(f"the coordinator's SuperLink is not running: `rpe coordinator start --dir {d}` first")
    try:
        app_hash = fab_sha256(Path(s.app))
    except Exception as exc:  # flwr's builder raises its own errors for a bad app directory
        raise OnboardError(f"cannot hash the app {s.app} ({type(exc).__name__}: {exc})") from None
    ca_pem = Path(state.get("ca_cert") or d / "certs" / tls.CA_CERT).read_text()
    coord_pub = (d / PUBLIC_KEY_FILE).read_text()
    site_dir = d / "sites" / site
    site_dir.mkdir(parents=True, exist_ok=True)
    node_pub = site_dir / f"{site}_auth.pub"
    node_pub.write_text(node_line + "\n")
    before = nodes.path.read_bytes() if nodes.path.exists() else None
    try:
        node_ids = launch.register_sites(d, {site: node_pub}, record=allow.path)
        allow.add(site, signing, replace=True)
    except BaseException:
        if before is None:
            nodes.path.unlink(missing_ok=True)
        else:
            nodes.path.write_bytes(before)
        raise
    bundle = {
        "format": BUNDLE_FORMAT,
        "site_id": site,
        "superlink": s.address,
        "ca_cert": ca_pem,
        "coordinator_public_key": coord_pub,
        "app_sha256": app_hash,
        "request_sha256": file_digest(request),
        "created": now_iso(),
    }
    out = Path(out) if out else site_dir / "join-bundle.json"
    write_json(site_dir / "join-request.json", request)
    write_json(out, bundle)
    entry = _audit(
        registry_path(d, s),
        "site.admitted",
        site=site,
        request_sha256=bundle["request_sha256"],
        bundle_sha256=file_digest(bundle),
        supernode_key_sha256=request["fingerprints"]["supernode"],
        signing_key_sha256=request["fingerprints"]["signing"],
        app_sha256=app_hash,
        node_id=node_ids.get(site),
    )
    return {"site": site, "bundle": str(out), "node_id": node_ids.get(site), "audit_seq": entry.get("seq"), **bundle}


def _check_clash(allow: Any, site: str, node_line: str, signing: str, replace: bool) -> None:
    """Refuse a key another site holds, and (without ``replace``) another key for an admitted site."""
    from common.trust.nodekey import node_public_key, node_public_text
    from common.trust.signing import public_key_from_pem, public_key_pem

    nodes = allow.node_keys
    node_canon = node_public_text(node_public_key(node_line))
    sign_canon = public_key_pem(public_key_from_pem(signing))
    for other in nodes.sites():
        if other != site and node_public_text(nodes.get(other)) == node_canon:
            raise OnboardError(f"the request's SuperNode key is already site {other!r}'s: one key per site")
    for other in allow.sites():
        if other != site and public_key_pem(allow.get(other)) == sign_canon:
            raise OnboardError(f"the request's signing key is already site {other!r}'s: one key per site")
    if replace:
        return
    old_node = nodes.get(site)
    if old_node is not None and node_public_text(old_node) != node_canon:
        raise OnboardError(
            f"site {site!r} is already admitted with another SuperNode key; pass --replace to rotate it "
            "(after checking the new key's fingerprint with the site)"
        )
    if site in allow and public_key_pem(allow.get(site)) != sign_canon:
        raise OnboardError(
            f"site {site!r} is already admitted with another signing key; pass --replace to rotate it "
            "(after checking the new key's fingerprint with the site)"
        )


def _audit(registry: Path, event: str, **fields: Any) -> dict[str, Any]:
    """One entry in the registry's hash-chained audit log (its own file lock; no registry lock)."""
    from server.audit import AuditLog
    from server.registry import config as cfg

    return AuditLog(Path(registry) / cfg.AUDIT_NAME).append(event, **fields)


# -- start / stop / status -------------------------------------------------------------------------


def start(directory: Path, timeout: float = 60.0) -> dict[str, Any]:
    """The SuperLink (and nginx in front of it) with the settings of ``D/coordinator.toml``."""
    from deploy import launch

    d = Path(directory).resolve()
    s = load_settings(d)
    return launch.start_superlink(
        d,
        s.host,
        s.port,
        s.tls_hosts,
        [],
        s.registry or None,
        timeout=timeout,
        allowlist=d / ALLOWLIST_FILE,
        proxy=s.proxy,
        site_networks=s.site_networks,
        inner_port=s.inner_port or None,
        operator_ca=Path(s.operator_ca) if s.operator_ca else None,
        run_as=s.run_as or None,
        operator_group=s.operator_group or None,
    )


def stop(directory: Path) -> dict[str, Any]:
    """Stop every process recorded in ``D`` (SuperLink, proxy, their helpers)."""
    from deploy import launch

    d = Path(directory).resolve()
    load_settings(d)
    return launch.down(d)


def status(directory: Path) -> dict[str, Any]:
    """``deploy.launch status`` of ``D`` with the admitted sites."""
    from deploy import launch
    from server.allowlist import AllowList

    d = Path(directory).resolve()
    s = load_settings(d)
    out = launch.status(d)
    out["address"] = s.address
    out["registry"] = s.registry
    out["admitted"] = AllowList(d / ALLOWLIST_FILE).node_keys.sites()
    return out
