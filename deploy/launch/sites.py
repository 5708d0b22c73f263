"""The sites' processes: one SuperNode per site (its node config, the site's own pinned
``flwr-clientapp`` first on PATH, lower CPU priority), waiting for them to be online, stopping one,
and restarting one that died or was stopped, with the same key, node config and port.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import tomli_w

from client.pin import AppNotApproved, parse_pins
from deploy import tls
from deploy.launch import checks
from deploy.launch.errors import LaunchError
from deploy.launch.flower_cli import supernode_status
from deploy.launch.processes import (
    SITE_NICE,
    free_port,
    is_alive,
    proc_name,
    process_env,
    spawn,
    stop_group_leftovers,
    stop_process,
)
from deploy.launch.state import FEDERATION, SiteSpec, load_state, save_state, spec_from_node_config
from deploy.warm_clientapp import ENV as WARM_ENV
from deploy.warm_clientapp import OFF as WARM_OFF
from deploy.warm_clientapp import install_wrapper

#: the repository root: the site's ``flwr-clientapp`` wrapper runs the app from here
REPO_ROOT = Path(__file__).resolve().parents[2]


def check_site_inputs(
    spec: SiteSpec, root_cert: Path, private_key: Path, require_coordinator_key: bool = False
) -> None:
    """Everything a SuperNode of ``spec`` reads, checked before anything is written or started: a
    LaunchError naming the input, what was expected (``deploy/launch/checks.py``)."""
    tls.check_site_id(spec.site)
    checks.check_ca_cert(root_cert)
    checks.check_private_key(private_key)
    checks.check_exists(spec.data_path, "--data-path", "the site's data (a JSONL file or a directory)")
    if spec.model_path:
        checks.check_model(spec.model_path)
    if spec.coordinator_key and (require_coordinator_key or Path(spec.coordinator_key).exists()):
        checks.check_public_key(spec.coordinator_key)
    elif spec.coordinator_key:
        print(
            f"warning: site {spec.site!r}: --coordinator-key {spec.coordinator_key} does not exist (yet): the site "
            "refuses every delivery until it does (`rpe coordinator init` makes coordinator.pub up front)",
            file=sys.stderr,
            flush=True,
        )
    try:
        parse_pins(spec.app_sha256)
    except (ValueError, AppNotApproved) as exc:
        raise LaunchError(f"site {spec.site!r}: {exc}") from None
    if spec.port:
        checks.check_port_free("127.0.0.1", spec.port, "--port (the SuperNode's local ClientApp port)")


def start_supernode(
    workdir: Path,
    spec: SiteSpec,
    superlink: str,
    root_cert: Path,
    private_key: Path,
    flwr_home: Path | None = None,
    wait: float = 60.0,
    require_coordinator_key: bool = False,
    warm: bool = True,
) -> dict[str, Any]:
    """One SuperNode for ``spec``: own port, node config as a TOML file, cwd = the site directory.

    ``warm=False`` starts its ClientApps cold (no warm starter, ``deploy/warm_clientapp.py``).

    Its inputs are checked first (:func:`check_site_inputs`; nothing is written when one is wrong).
    With ``wait`` > 0 it returns only once the SuperNode has connected to the SuperLink (its log says
    ``SuperNode ID``); a SuperNode that died (wrong CA, key refused: exit code 305) or did not connect
    in ``wait`` seconds is stopped and a LaunchError carries its log's own error line.
    A ``coordinator-key`` that does not exist yet is a warning (the site refuses deliveries until it
    does; ``rpe site start`` refuses it itself), an error with ``require_coordinator_key``; one that
    exists must be a public key."""
    workdir = Path(workdir).resolve()
    check_site_inputs(spec, root_cert, private_key, require_coordinator_key)
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
    # the site's own flwr-clientapp (checks the app bundle against app-sha256) comes first on PATH
    wrapper_dir = install_wrapper(site_dir / "bin", sys.executable, str(REPO_ROOT)).parent
    env = process_env(home)
    env["PATH"] = f"{wrapper_dir}{os.pathsep}{env['PATH']}"
    if not warm:
        env[WARM_ENV] = WARM_OFF
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
    log = workdir / "logs" / f"supernode-{spec.site}.log"
    offset = checks.log_size(log)
    proc = spawn(cmd, log, env, site_dir, nice=SITE_NICE)
    proc.update(site=spec.site, port=port, node_config=node_config, private_key=str(private_key), log_offset=offset)
    state = load_state(workdir)
    state.setdefault("sites", {})[spec.site] = proc
    save_state(workdir, state)
    if wait > 0:
        wait_connected(proc, superlink, wait)
    return proc


#: what flwr 1.41's SuperNode logs once the SuperLink accepted it (registered, authenticated)
CONNECTED_LINE = "SuperNode ID:"


def wait_connected(proc: dict[str, Any], superlink: str, timeout: float) -> None:
    """Until ``proc``'s log (from its start) says the SuperNode is connected; a LaunchError with the
    log's own error line if it died, or with its last line if it did not connect in ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        lines = checks.log_lines(proc["log"], proc.get("log_offset", 0))
        if any(CONNECTED_LINE in line for line in lines):
            return
        if not is_alive(proc["pid"], proc["start_time"]):
            stop_group_leftovers(proc)
            raise LaunchError(
                f"{proc_name(proc)} exited before it connected to {superlink}: {checks.error_line(lines)} "
                f"(log: {proc['log']})"
            )
        if time.monotonic() > deadline:
            stop_process(proc["pid"], proc["start_time"])
            stop_group_leftovers(proc)
            raise LaunchError(
                f"{proc_name(proc)} did not connect to {superlink} in {timeout:.0f} s (stopped it): "
                f"{checks.error_line(lines)}; is the SuperLink running and reachable from here? (log: {proc['log']})"
            )
        time.sleep(0.2)


def wait_online(workdir: Path, sites: list[str], timeout: float = 60.0) -> dict[str, int]:
    """Wait until the SuperLink reports each site's registered node as online."""
    state = load_state(workdir)
    flwr_home = Path(state["flwr_home"])
    wanted = {s: state.get("registered", {}).get(s) for s in sites}
    deadline = time.monotonic() + timeout
    while True:
        try:
            status = supernode_status(flwr_home, state.get("federation", FEDERATION))
        except subprocess.TimeoutExpired:  # a CLI process on a loaded machine (issue 29: 50 sites starting
            if time.monotonic() > deadline:  # on 2 cores): a slow answer is not a failure, the deadline is
                raise LaunchError(
                    f"`flwr supernode ls` did not answer in time; sites not online after {timeout:.0f} s"
                ) from None
            continue
        pending = [s for s, nid in wanted.items() if nid is not None and status.get(nid) != "online"]
        unknown = [s for s, nid in wanted.items() if nid is None]  # registered in an earlier life
        online_unknown = sum(1 for nid, st in status.items() if st == "online" and nid not in wanted.values())
        if online_unknown < len(unknown):
            pending += unknown
        for s in pending:
            proc = state["sites"].get(s)
            if proc and not is_alive(proc["pid"], proc["start_time"]):
                why = checks.error_line(checks.log_lines(proc["log"], proc.get("log_offset", 0)))
                raise LaunchError(f"{proc_name(proc)} exited: {why} (log: {proc['log']})")
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
        restart_site(workdir, site, wait=0)  # inside a run's loop: wait_online-free, as before
        restarted.append(site)
    if restarted:
        print(
            f"[launch] SuperNode(s) of {', '.join(restarted)} had exited without being stopped (flwr 1.41 "
            "exits on one HTTP 500 from the SuperLink); restarted them",
            file=sys.stderr,
            flush=True,
        )
    return restarted


def restart_site(workdir: Path, site: str, wait: float = 60.0) -> dict[str, Any]:
    """Start a stopped site's SuperNode again with the same node config and key (``wait``: see
    :func:`start_supernode`)."""
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
        wait=wait,
        require_coordinator_key=False,
    )
