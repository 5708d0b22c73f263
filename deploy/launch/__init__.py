"""Start and stop a Flower 1.41 deployment (SuperLink + SuperNodes) by PID, with TLS and node auth.

``python -m deploy.launch {up,superlink,register,supernode,down,status,stop-site,start-site}``
(``commandline.py``; deploy/README.md shows each). The parts, one reason to change each:

- ``checks.py`` — what a start checks first (CA, keys, paths, free ports, who holds a port) and the
  log's own error line of a process that died
- ``processes.py`` — spawn in a session, PID + start time, stop by PID (SIGTERM, SIGKILL), wait
- ``state.py`` — ``<workdir>/launch-state.json``, ``SiteSpec`` and node configs
- ``flower_cli.py`` — the ``flwr`` CLI as functions (config.toml, register, supernode ls)
- ``runs.py`` — ``flwr run`` and following a run to its end
- ``coordinator.py`` — SuperLink, its SuperExec, nginx, key registration
- ``account.py`` — ``--run-as``: the coordinator's own account, its private directories, the
  operator socket's directory (the socket itself: ``deploy/operator_socket.py``)
- ``sites.py`` — SuperNodes: start, wait online, stop, restart
- ``federation.py`` — everything on one machine: ``up``, ``down``, ``status``
- ``commandline.py`` — argparse and ``main``

Every name callers use is importable from ``deploy.launch`` itself (``from deploy import launch``;
``launch.up``, ``launch.run_app``, ``launch.stop_process`` ...).
"""

from deploy.launch.commandline import main
from deploy.launch.coordinator import (
    coordinator_public_key,
    ensure_superexec,
    live_superexec,
    nginx_binary,
    register_sites,
    signing_keys,
    start_proxy,
    start_superlink,
)
from deploy.launch.errors import LaunchError
from deploy.launch.federation import down, status, up
from deploy.launch.flower_cli import (
    CLI_PREFIX,
    flwr_cli,
    operator_flwr,
    register_site,
    supernode_status,
    write_flwr_config,
)
from deploy.launch.processes import (
    SITE_NICE,
    SUPEREXEC_POLL_S,
    cmdline,
    descendants,
    flower_bin,
    free_port,
    is_alive,
    popen_tied,
    proc_start_time,
    process_env,
    spawn,
    stop_process,
    tie_to_parent,
    wait_port,
)
from deploy.launch.runs import run_app
from deploy.launch.sites import (
    check_site_inputs,
    ensure_supernodes,
    restart_site,
    start_supernode,
    stop_site,
    wait_connected,
    wait_online,
)
from deploy.launch.state import (
    DEFAULT_SUPERLINK_PORT,
    DEFAULT_SUPERNODE_PORT,
    FEDERATION,
    STATE_FILE,
    SiteSpec,
    load_state,
    privacy_args,
    save_state,
    spec_from_node_config,
)

# the names the tests and older callers use for the functions above
_bin = flower_bin
_spawn = spawn
_cmdline = cmdline
_live_superexec = live_superexec
_privacy_args = privacy_args

__all__ = [
    "CLI_PREFIX",
    "DEFAULT_SUPERLINK_PORT",
    "DEFAULT_SUPERNODE_PORT",
    "FEDERATION",
    "SITE_NICE",
    "STATE_FILE",
    "SUPEREXEC_POLL_S",
    "LaunchError",
    "SiteSpec",
    "check_site_inputs",
    "cmdline",
    "coordinator_public_key",
    "descendants",
    "down",
    "ensure_superexec",
    "ensure_supernodes",
    "flower_bin",
    "flwr_cli",
    "free_port",
    "is_alive",
    "live_superexec",
    "load_state",
    "main",
    "nginx_binary",
    "operator_flwr",
    "popen_tied",
    "privacy_args",
    "proc_start_time",
    "process_env",
    "register_site",
    "register_sites",
    "restart_site",
    "run_app",
    "save_state",
    "signing_keys",
    "spawn",
    "spec_from_node_config",
    "start_proxy",
    "start_superlink",
    "start_supernode",
    "status",
    "stop_process",
    "stop_site",
    "supernode_status",
    "tie_to_parent",
    "up",
    "wait_connected",
    "wait_online",
    "wait_port",
    "write_flwr_config",
]
