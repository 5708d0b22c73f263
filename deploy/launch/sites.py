"""The sites' processes: one SuperNode per site (its node config, the site's own pinned
``flwr-clientapp`` first on PATH, lower CPU priority), waiting for them to be online, stopping one,
and restarting one that died or was stopped, with the same key, node config and port.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import tomli_w

from client.pin import install_wrapper, parse_pins
from deploy import tls
from deploy.launch.errors import LaunchError
from deploy.launch.flower_cli import supernode_status
from deploy.launch.processes import SITE_NICE, free_port, is_alive, process_env, spawn, stop_process
from deploy.launch.state import FEDERATION, SiteSpec, load_state, save_state, spec_from_node_config

#: the repository root: the site's ``flwr-clientapp`` wrapper runs the app from here
REPO_ROOT = Path(__file__).resolve().parents[2]


def start_supernode(
    workdir: Path, spec: SiteSpec, superlink: str, root_cert: Path, private_key: Path, flwr_home: Path | None = None
) -> dict[str, Any]:
    """One SuperNode for ``spec``: own port, node config as a TOML file, cwd = the site directory."""
    workdir = Path(workdir).resolve()
    tls.check_site_id(spec.site)
    site_dir = Path(spec.site_dir or workdir / "sites" / spec.site).resolve()
    spec.site_dir = str(site_dir)
    site_dir.mkdir(parents=True, exist_ok=True)
    node_config_file = site_dir / "node-config.toml"
    # the ClientApp signs its identity with the SuperNode's own key too (client/handlers.py)
    node_config = {**spec.node_config(), "supernode-key": str(Path(private_key).resolve())}
    node_config_file.write_text(tomli_w.dumps(node_config))
    port = spec.port or free_port()
    spec.port = port
    home = flwr_home or site_dir / "flwr-home"
    try:
        parse_pins(spec.app_sha256)
    except ValueError as exc:
        raise LaunchError(f"site {spec.site!r}: {exc}") from None
    # the site's own flwr-clientapp (checks the app bundle against app-sha256) comes first on PATH
    wrapper_dir = install_wrapper(site_dir / "bin", sys.executable, str(REPO_ROOT)).parent
    env = process_env(home)
    env["PATH"] = f"{wrapper_dir}{os.pathsep}{env['PATH']}"
    cmd = [
        sys.executable,
        "-m",
        "deploy.supernode_main",  # flower-supernode; idle poll: node config 'poll-interval' (default 1 s, not 3)
        "--superlink",
        superlink,
        "--root-certificates",
        str(Path(root_cert).resolve()),
        "--auth-supernode-private-key",
        str(Path(private_key).resolve()),
        "--node-config",
        str(node_config_file),
        "--port",
        str(port),
    ]
    # Site compute runs below the control plane: on a small machine shared by the SuperLink and many
    # SuperNodes, training at equal priority starved the SuperLink until its sqlite state timed out
    # ("database is locked" after 5 s), and flwr 1.41's SuperNodes and SuperExec exit on that HTTP 500.
    proc = spawn(cmd, workdir / "logs" / f"supernode-{spec.site}.log", env, site_dir, nice=SITE_NICE)
    proc.update(site=spec.site, port=port, node_config=node_config, private_key=str(private_key))
    state = load_state(workdir)
    state.setdefault("sites", {})[spec.site] = proc
    save_state(workdir, state)
    return proc


def wait_online(workdir: Path, sites: list[str], timeout: float = 60.0) -> dict[str, int]:
    """Wait until the SuperLink reports each site's registered node as online."""
    state = load_state(workdir)
    flwr_home = Path(state["flwr_home"])
    wanted = {s: state.get("registered", {}).get(s) for s in sites}
    deadline = time.monotonic() + timeout
    while True:
        status = supernode_status(flwr_home, state.get("federation", FEDERATION))
        pending = [s for s, nid in wanted.items() if nid is not None and status.get(nid) != "online"]
        unknown = [s for s, nid in wanted.items() if nid is None]  # registered in an earlier life
        online_unknown = sum(1 for nid, st in status.items() if st == "online" and nid not in wanted.values())
        if online_unknown < len(unknown):
            pending += unknown
        for s in pending:
            proc = state["sites"].get(s)
            if proc and not is_alive(proc["pid"], proc["start_time"]):
                raise LaunchError(f"SuperNode of site {s!r} exited; see {proc['log']}")
        if not pending:
            return {s: int(nid) for s, nid in wanted.items() if nid is not None}
        if time.monotonic() > deadline:
            raise LaunchError(f"sites {pending} not online after {timeout:.0f} s (status: {status})")
        time.sleep(2.0)  # each `flwr supernode ls` is a CLI process: poll gently


def stop_site(workdir: Path, site: str, timeout: float = 15.0) -> str:
    """Stop one SuperNode (the site goes offline; its registration stays)."""
    state = load_state(workdir)
    proc = state.get("sites", {}).get(site)
    if proc is None:
        raise LaunchError(f"no SuperNode for site {site!r} in {workdir}")
    proc["stopped"] = True  # on purpose: ensure_supernodes leaves it down
    save_state(workdir, state)
    return stop_process(proc["pid"], proc["start_time"], timeout)


def ensure_supernodes(workdir: Path) -> list[str]:
    """Restart every SuperNode of this workdir that died without being stopped; returns their sites.

    Why: a flwr 1.41 SuperNode exits ("terminated gracefully") on one HTTP 500 from the SuperLink's
    ``pull-messages`` (sqlite "database is locked" under load): in the main job, nine of ten
    SuperNodes went this way during evaluation and their sites showed as offline. The restarted
    SuperNode has the same key, node config and port, so the SuperLink sees the same node again."""
    state = load_state(workdir)
    link = state.get("superlink")
    if not link or not is_alive(link["pid"], link["start_time"]):
        return []
    restarted = []
    for site, proc in state.get("sites", {}).items():
        if proc.get("stopped") or is_alive(proc["pid"], proc["start_time"]):
            continue
        restart_site(workdir, site)
        restarted.append(site)
    if restarted:
        print(
            f"[launch] SuperNode(s) of {', '.join(restarted)} had exited without being stopped (flwr 1.41 "
            "exits on one HTTP 500 from the SuperLink); restarted them",
            file=sys.stderr,
            flush=True,
        )
    return restarted


def restart_site(workdir: Path, site: str) -> dict[str, Any]:
    """Start a stopped site's SuperNode again with the same node config and key."""
    state = load_state(workdir)
    proc = state["sites"][site]
    if is_alive(proc["pid"], proc["start_time"]):
        return proc
    return start_supernode(
        workdir,
        spec_from_node_config(site, proc["node_config"], proc["port"]),
        state["superlink"]["address"],
        Path(state["ca_cert"]),
        Path(proc["private_key"]),
    )
