"""The whole federation on one machine: ``up`` (SuperLink, keys, one SuperNode per site, all
online), ``down`` (every recorded process, by PID) and ``status``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from deploy import tls
from deploy.launch import checks
from deploy.launch.coordinator import (
    coordinator_public_key,
    live_superexec,
    register_sites,
    signing_keys,
    start_superlink,
)
from deploy.launch.errors import LaunchError
from deploy.launch.flower_cli import supernode_status
from deploy.launch.processes import is_alive, stop_process
from deploy.launch.sites import start_supernode, wait_online
from deploy.launch.state import DEFAULT_SUPERLINK_PORT, FEDERATION, SiteSpec, load_state
from deploy.warm_clientapp import MAX_SITES_ENV, max_warm_sites


def up(
    workdir: Path,
    sites: list[SiteSpec],
    host: str = "127.0.0.1",
    port: int = DEFAULT_SUPERLINK_PORT,
    registry: str | None = None,
    tls_hosts: list[str] | None = None,
    timeout: float = 90.0,
    sign: bool = True,
    proxy: bool | None = None,
    site_networks: list[str] | None = None,
    run_as: str | None = None,
    operator_group: str | None = None,
) -> dict[str, Any]:
    """Everything on one machine: SuperLink, key registration, one SuperNode per site, all online.

    ``run_as`` / ``operator_group``: see :func:`deploy.launch.start_superlink` (default: the
    invoking user runs everything, and only it can use the operator socket).

    ``proxy`` (default: on unless ``host`` is loopback) puts nginx in front of the SuperLink.

    With ``sign`` (default) every site also gets an Ed25519 key for signing its submissions, and
    the SuperLink's ServerApp finds their allow-list through ``$RPE_ALLOWLIST``.
    """
    workdir = Path(workdir).resolve()
    # what can be checked before anything is written (the CA and site keys are made below)
    try:
        warm_limit = max_warm_sites()
    except ValueError as exc:
        raise LaunchError(str(exc)) from None
    seen_ports: set[int] = set()
    for spec in sites:
        tls.check_site_id(spec.site)
        checks.check_exists(
            spec.data_path, f"site {spec.site!r}: data path", "the site's data (a JSONL file or a directory)"
        )
        if spec.model_path:
            checks.check_model(spec.model_path)
        if spec.port:
            if spec.port in seen_ports or spec.port == port:
                raise LaunchError(f"site {spec.site!r}: port {spec.port} is given twice (--port, --supernode-port)")
            seen_ports.add(spec.port)
            checks.check_port_free("127.0.0.1", spec.port, f"site {spec.site!r}: --supernode-port")
    pinned = str(coordinator_public_key(registry)) if registry else ""
    for spec in sites:
        spec.site_dir = str(Path(spec.site_dir or workdir / "sites" / spec.site).resolve())
        spec.coordinator_key = spec.coordinator_key or pinned
    allowlist = signing_keys(workdir, sites) if sign else None
    if proxy is None:
        proxy = host not in ("127.0.0.1", "localhost", "::1")
    state = start_superlink(
        workdir,
        host,
        port,
        tls_hosts,
        [s.site for s in sites],
        registry,
        timeout=timeout,
        allowlist=allowlist,
        proxy=proxy,
        site_networks=site_networks,
        run_as=run_as,
        operator_group=operator_group,
    )
    try:
        certs = Path(state["certs"])
        register_sites(workdir, {s.site: certs / f"{s.site}_auth.pub" for s in sites}, record=allowlist)
        warm = len(sites) <= warm_limit
        if not warm:
            print(
                f"{len(sites)} sites on this machine: their ClientApps start cold (a warm starter holds "
                f"~310 MB per site; ${MAX_SITES_ENV}={warm_limit} is the limit)",
                file=sys.stderr,
            )
        for spec in sites:
            start_supernode(  # all started, then all waited for (wait_online): not one after the other
                workdir,
                spec,
                state["superlink"]["address"],
                certs / tls.CA_CERT,
                certs / f"{spec.site}_auth",
                wait=0,
                warm=warm,
            )
        wait_online(workdir, [s.site for s in sites], timeout)
    except BaseException:
        down(workdir)
        raise
    return load_state(workdir)


def down(workdir: Path, timeout: float = 15.0) -> dict[str, str]:
    """Stop every SuperNode, then the SuperLink, recorded in the workdir's state file."""
    state = load_state(workdir)
    result: dict[str, str] = {}
    for site, proc in state.get("sites", {}).items():
        result[f"supernode-{site}"] = stop_process(proc["pid"], proc["start_time"], timeout)
    if state.get("proxy"):
        result["proxy"] = stop_process(state["proxy"]["pid"], state["proxy"]["start_time"], timeout)
    if state.get("superlink"):
        result["superlink"] = stop_process(state["superlink"]["pid"], state["superlink"]["start_time"], timeout)
    return result


def _entry(proc: dict[str, Any], **extra: Any) -> dict[str, Any]:
    alive = is_alive(proc["pid"], proc["start_time"])
    return {
        "pid": proc["pid"],
        **extra,
        "running": alive,
        "state": "alive" if alive else "dead",
        "log": proc.get("log"),
    }


def status(workdir: Path) -> dict[str, Any]:
    """Every recorded process (SuperLink, its SuperExec, the nginx proxy, each SuperNode) alive or
    dead, and what the SuperLink says about each registered node."""
    state = load_state(workdir)
    out: dict[str, Any] = {"workdir": state.get("workdir"), "processes": {}, "nodes": {}}
    link = state.get("superlink")
    if link:
        out["processes"]["superlink"] = _entry(link, address=link.get("address"), port=link.get("port"))
        alive = out["processes"]["superlink"]["running"]
        out["processes"]["superexec"] = {
            "parent_pid": link["pid"],
            "running": alive and live_superexec(link["pid"]),
            "state": "alive" if alive and live_superexec(link["pid"]) else "dead",
        }
    if state.get("proxy"):
        proxy = state["proxy"]
        out["processes"]["proxy"] = _entry(proxy, address=f"{proxy.get('host')}:{proxy.get('port')}", kind="nginx")
    for site, proc in state.get("sites", {}).items():
        out["processes"][f"supernode-{site}"] = _entry(proc, port=proc.get("port"))
        if proc.get("stopped"):
            out["processes"][f"supernode-{site}"]["stopped_on_purpose"] = True
    if link and out["processes"]["superlink"]["running"]:
        try:
            nodes = supernode_status(Path(state["flwr_home"]), state.get("federation", FEDERATION))
        except LaunchError as exc:
            nodes = {}
            out["error"] = str(exc)
        names = {nid: s for s, nid in state.get("registered", {}).items()}
        out["nodes"] = {str(nid): {"site": names.get(nid), "status": st} for nid, st in nodes.items()}
    if state.get("flwr_home"):
        out["flwr_home"] = state["flwr_home"]
    return out
