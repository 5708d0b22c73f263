"""Start and stop a Flower 1.41 deployment (SuperLink + SuperNodes) by PID, with TLS and node auth.

One machine (the default, for demos and tests)::

    python -m deploy.launch up --workdir runs/fed --model-path /models/smollm2 \\
        --site a=/data/a.jsonl --site b=/data/b.jsonl --site c=/data/c.jsonl
    FLWR_HOME=runs/fed/flwr-home flwr run . rpe --stream --run-config "mode='enroll'"
    python -m deploy.launch status --workdir runs/fed
    python -m deploy.launch down --workdir runs/fed

Several machines: ``superlink`` + ``register`` on the coordinator, ``supernode`` on each site host
(see deploy/README.md). Every process is started in its own session with its output in
``<workdir>/logs/``; its PID and kernel start time go to ``<workdir>/launch-state.json`` so that
``down`` / ``stop-site`` signal exactly the processes this tool started (SIGTERM, then SIGKILL
after a timeout), together with the helper processes they spawned (SuperExec, ServerApp and
ClientApp processes), and never a process that merely reuses a recorded PID.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploy import tls

STATE_FILE = "launch-state.json"
FEDERATION = "rpe"
DEFAULT_SUPERLINK_PORT = 9093
DEFAULT_SUPERNODE_PORT = 9094


class LaunchError(RuntimeError):
    """A process did not start, did not become ready in time, or a command failed."""


@dataclass
class SiteSpec:
    """One SuperNode: its site id and the node config the ClientApp reads."""

    site: str
    data_path: str
    model_path: str = ""
    site_dir: str = ""
    port: int = 0
    threads: int = 0
    #: the site's privacy policy, node-config keys of ``common.privacy.POLICY_KEYS`` (off when empty)
    privacy: dict[str, float] = field(default_factory=dict)
    #: SHA-256 of the app bundle(s) the site approved (comma-separated); checked by client/pin.py
    app_sha256: str = ""
    #: the coordinator public key (PEM file) the site pins: it installs only deliveries signed with it
    coordinator_key: str = ""
    #: the site's release policy, node-config keys of ``client/policy.py`` (z-min-examples, z-layers,
    #: metrics-min-reports; the site's safe defaults when empty)
    release: dict[str, Any] = field(default_factory=dict)
    #: further node-config keys, e.g. a segmentation site's ``task``, ``seg-dataset``, ``seg-site``
    extra: dict[str, Any] = field(default_factory=dict)

    def node_config(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "site-id": self.site,
            "data-path": self.data_path,
            "model-path": self.model_path,
            "site-dir": self.site_dir,
        }
        if self.threads:
            out["threads"] = self.threads
        if self.app_sha256:
            out["app-sha256"] = self.app_sha256
        if self.coordinator_key:
            out["coordinator-key"] = self.coordinator_key
        out.update({k: float(v) for k, v in self.privacy.items()})
        out.update(self.release)
        out.update(self.extra)
        return out


def _privacy_args(items: list[str], site: str | None = None) -> dict[str, float]:
    """``--privacy [SITE:]KEY=VALUE`` flags as a checked policy (the same check the ClientApp makes);
    with ``site``, items prefixed with another site are skipped."""
    from common.privacy import POLICY_KEYS, PrivacyConfigError, check_policy

    policy: dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if ":" in key and site is not None:
            owner, key = key.split(":", 1)
            if owner != site:
                continue
        if not sep or key not in POLICY_KEYS:
            raise LaunchError(f"--privacy {item!r}: expected KEY=VALUE with KEY one of {list(POLICY_KEYS)}")
        try:
            policy[key] = float(value)
        except ValueError:
            raise LaunchError(f"--privacy {item!r}: {value!r} is not a number") from None
    try:
        return check_policy(policy)
    except PrivacyConfigError as exc:
        raise LaunchError(f"--privacy: {exc}") from None


# -- processes ------------------------------------------------------------------------------------
def _bin(name: str) -> str:
    """Flower's executables live next to this interpreter (the project's venv)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def process_env(flwr_home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower processes: the venv's bin first on PATH (the SuperLink and SuperNodes
    spawn ``flower-superexec``, ``flwr-serverapp`` and ``flwr-clientapp`` by name), our FLWR_HOME,
    and no runtime dependency installation."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    # the SuperExec of the SuperLink and of each SuperNode polls for work to launch (flwr's default
    # every 1 s): every run and every message a site answers waits half of that on average
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", str(SUPEREXEC_POLL_S))
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


def proc_start_time(pid: int) -> int | None:
    """Kernel start time (clock ticks since boot) of ``pid``, or None if it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def is_alive(pid: int, start_time: int | None) -> bool:
    """True if ``pid`` runs and is the process we recorded (same start time)."""
    _reap(pid)
    now = proc_start_time(pid)
    return now is not None and (start_time is None or now == start_time)


def descendants(pid: int) -> list[tuple[int, int]]:
    """(pid, start time) of every live descendant of ``pid`` (via /proc parent links)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out: list[tuple[int, int]] = []
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        start = proc_start_time(child)
        if start is not None:
            out.append((child, start))
        todo.extend(children.get(child, []))
    return out


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _signal_group(pgid: int, sig: int, members: list[tuple[int, int]]) -> None:
    """Signal process group ``pgid`` (the session we started) only while one of the verified
    ``members`` still belongs to it: a process group id cannot be reused while it has members, so
    this never reaches an unrelated group."""
    for child, start in members:
        try:
            if is_alive(child, start) and os.getpgid(child) == pgid:
                os.killpg(pgid, sig)
                return
        except (ProcessLookupError, PermissionError):
            continue


def _wait_gone(procs: list[tuple[int, int]], timeout: float) -> list[tuple[int, int]]:
    deadline = time.monotonic() + timeout
    alive = [p for p in procs if is_alive(*p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [p for p in alive if is_alive(*p)]
    return alive


def stop_process(pid: int, start_time: int | None, timeout: float = 15.0) -> str:
    """SIGTERM ``pid`` (and, after it exits, its leftover descendants); SIGKILL after ``timeout``.

    Returns "stopped", "killed" or "not running".
    """
    if not is_alive(pid, start_time):
        return "not running"
    me = (pid, start_time if start_time is not None else proc_start_time(pid) or 0)
    family = descendants(pid)
    _signal(pid, signal.SIGTERM)
    result = "stopped"
    if _wait_gone([me], timeout):
        _signal(pid, signal.SIGKILL)
        result = "killed"
        _wait_gone([me], 5.0)
    leftovers = [p for p in family if is_alive(*p)]
    _signal_group(pid, signal.SIGTERM, leftovers)
    for child, _ in leftovers:
        _signal(child, signal.SIGTERM)
    for child, _ in _wait_gone(leftovers, 5.0):
        _signal(child, signal.SIGKILL)
    _wait_gone(leftovers, 5.0)
    return result


#: Processes started by this module get PR_SET_PDEATHSIG (see :func:`tie_to_parent`) unless this is
#: False: the ``python -m deploy.launch up|superlink|supernode`` CLI turns it off (its servers must
#: outlive the short CLI process; ``--attach`` keeps it on), library callers and tests keep it on.
TIE_TO_PARENT = True
_PR_SET_PDEATHSIG = 1


def tie_to_parent(sig: int = signal.SIGTERM) -> Any:
    """A ``preexec_fn`` that asks the kernel to send ``sig`` to the child when its parent dies.

    Why: a test run killed with SIGKILL (or a crashed launcher) cannot run any clean-up, so without
    this a SuperLink, SuperNode, Chroma or nginx would keep running and holding ports. The
    death signal fires when the *thread* that forked exits, so spawn from a long-lived thread (the
    main thread). If the parent already died between fork and ``prctl``, the child kills itself.
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()

    def preexec() -> None:
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            os._exit(126)
        if os.getppid() != parent:
            os.kill(os.getpid(), sig)

    return preexec


#: niceness of a SuperNode (and of the ClientApps it starts, which inherit it): see ``start_site``
SITE_NICE = 10
#: seconds between a SuperExec's polls for a ServerApp/ClientApp to launch (flwr's default: 1.0)
SUPEREXEC_POLL_S = 0.5


def popen_tied(cmd: list[str], tie: bool | None = None, nice: int = 0, **kwargs: Any) -> subprocess.Popen[bytes]:
    """``subprocess.Popen`` in a new session (own process group, so it is stopped by process group)
    and, when ``tie`` (default :data:`TIE_TO_PARENT`), with a parent-death signal; ``nice`` > 0
    lowers its CPU priority. Tests use this for any server they start themselves."""
    kwargs.setdefault("start_new_session", True)
    tied = tie_to_parent() if (TIE_TO_PARENT if tie is None else tie) else None
    if tied is not None or nice:

        def preexec() -> None:
            if tied is not None:
                tied()
            if nice:
                os.nice(nice)

        kwargs["preexec_fn"] = preexec
    return subprocess.Popen(cmd, **kwargs)


def _spawn(cmd: list[str], log: Path, env: dict[str, str], cwd: Path, nice: int = 0) -> dict[str, Any]:
    log.parent.mkdir(parents=True, exist_ok=True)
    cwd.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        proc = popen_tied(
            cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=cwd, nice=nice
        )
    start = None
    for _ in range(50):
        start = proc_start_time(proc.pid)
        if start is not None:
            break
        time.sleep(0.01)
    return {
        "pid": proc.pid,
        "pgid": proc.pid,
        "start_time": start,
        "cmd": cmd,
        "log": str(log),
        "cwd": str(cwd),
        "tied": TIE_TO_PARENT,
    }


def wait_port(host: str, port: int, timeout: float, proc: dict[str, Any] | None = None) -> None:
    """Wait until something accepts TCP connections on host:port (or the process died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not is_alive(proc["pid"], proc["start_time"]):
            raise LaunchError(f"process {proc['pid']} exited during start-up; see {proc['log']}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise LaunchError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port on ``host`` (for tests; a race is possible but unlikely)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# -- Flower CLI / config ----------------------------------------------------------------------------
def write_flwr_config(
    flwr_home: Path, name: str, address: str, root_certificates: Path | None, make_default: bool = True
) -> Path:
    """Add/replace ``[superlink.<name>]`` in ``$FLWR_HOME/config.toml``, keeping other entries."""
    import tomli_w

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    data: dict[str, Any] = tomllib.loads(path.read_text()) if path.exists() else {}
    superlink = data.setdefault("superlink", {})
    entry: dict[str, Any] = {"address": address}
    if root_certificates is None:
        entry["insecure"] = True
    else:
        entry["root-certificates"] = str(Path(root_certificates).resolve())
    superlink[name] = entry
    if make_default or "default" not in superlink:
        superlink["default"] = name
    tmp = path.with_suffix(".tmp")
    tmp.write_text(tomli_w.dumps(data))
    os.replace(tmp, path)
    return path


#: Prepended to every ``flwr`` CLI command, e.g. ``["ip", "netns", "exec", "coord"]`` to act as an
#: operator inside another network namespace (the multi-host tests).
CLI_PREFIX: list[str] = []


def flwr_cli(args: list[str], flwr_home: Path, timeout: float = 60.0) -> dict[str, Any]:
    """Run ``flwr <args> --format json``; return the parsed JSON (``flwr`` exits 0 even on failure)."""
    cmd = [*CLI_PREFIX, _bin("flwr"), *args, "--format", "json"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=process_env(flwr_home), timeout=timeout)
    text = res.stdout.strip()
    start = text.find("{")
    try:
        out = json.loads(text[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        out = {}
    if not out:
        raise LaunchError(f"{' '.join(cmd)} printed no JSON (rc={res.returncode}): {res.stdout}{res.stderr}")
    return out


def run_app(
    flwr_home: Path,
    app: Path,
    config: dict[str, Any],
    registry: Path,
    timeout: float,
    federation: str = FEDERATION,
    poll_s: float = 60.0,
) -> dict[str, Any]:
    """``flwr run <app> <federation> --run-config <toml>``, then wait until the run has finished.

    Returns ``{"run_id", "status", "details", "report"}``: ``status`` / ``details`` as ``flwr ls``
    says (e.g. ``finished:failed`` / "No heartbeat received from the task" when the SuperLink was
    restarted under the run), ``report`` the ServerApp's ``<registry>/runs/<run-id>-<mode>.json``
    (written when the ServerApp ends, also when it fails; one stopped with its SuperLink writes
    ``"status": "running"`` and the phases it finished under ``timings``).
    ``flwr ls`` is a whole CLI process (1-2 s of CPU): it is asked every ``poll_s`` and as soon as
    the report exists; SuperNodes and SuperExec that died are restarted (a PID check) every few
    seconds. Raises ``LaunchError`` if the run cannot be submitted or outlives ``timeout``.
    """
    import tomli_w

    cfg_file = Path(flwr_home) / f"run-{time.monotonic_ns()}.toml"
    cfg_file.write_text(tomli_w.dumps(config))
    res = subprocess.run(
        [*CLI_PREFIX, _bin("flwr"), "run", str(app), federation, "--format", "json", "--run-config", str(cfg_file)],
        capture_output=True,
        text=True,
        env=process_env(Path(flwr_home)),
        timeout=120,
    )
    start = res.stdout.find("{")
    try:
        out = json.loads(res.stdout[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        out = {}
    if not out.get("success"):
        raise LaunchError(f"flwr run failed (rc={res.returncode}): {res.stdout}{res.stderr}")
    run_id = out["run-id"]
    report_path = Path(registry) / "runs" / f"{run_id}-{config['mode']}.json"
    deadline = time.monotonic() + timeout
    last_ls = 0.0
    status, details = "?", ""
    workdir = Path(flwr_home).parent
    last_check = 0.0
    while True:
        if (workdir / STATE_FILE).exists() and time.monotonic() - last_check > 5.0:
            last_check = time.monotonic()
            ensure_superexec(workdir)
            ensure_supernodes(workdir)
        if report_path.exists() or time.monotonic() - last_ls > poll_s:
            last_ls = time.monotonic()
            try:
                ls = flwr_cli(["ls", federation, "--run-id", run_id], Path(flwr_home))
            except LaunchError:  # the SuperLink is restarting: ask again at the next poll
                ls = {}
            status = ls["runs"][0]["status"] if ls.get("runs") else "?"
            details = str(ls["runs"][0].get("status-details", "")) if ls.get("runs") else ""
            if status.startswith("finished"):
                break
        if time.monotonic() > deadline:
            raise LaunchError(f"run {run_id} still {status} after {timeout:.0f} s")
        time.sleep(0.5)
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    return {"run_id": run_id, "status": status, "details": details, "report": report}


def register_site(flwr_home: Path, public_key: Path, site: str, federation: str = FEDERATION) -> int | None:
    """``flwr supernode register``; returns the node id, or None if the key was registered before."""
    out = flwr_cli(["supernode", "register", str(public_key), federation, "--name", f"site-{site}"], flwr_home)
    if out.get("success"):
        return int(out["node-id"])
    message = str(out.get("error-message", ""))
    if "already in use" in message:
        return None
    raise LaunchError(f"registering site {site!r} failed: {message}")


def supernode_status(flwr_home: Path, federation: str = FEDERATION) -> dict[int, str]:
    """{node id: status} from ``flwr supernode ls``."""
    out = flwr_cli(["supernode", "ls", federation], flwr_home)
    if not out.get("success"):
        raise LaunchError(f"flwr supernode ls failed: {out.get('error-message')}")
    return {int(n["node-id"]): str(n["status"]) for n in out.get("nodes", [])}


# -- state ----------------------------------------------------------------------------------------
def load_state(workdir: Path) -> dict[str, Any]:
    path = Path(workdir) / STATE_FILE
    if not path.exists():
        return {"workdir": str(Path(workdir).resolve()), "superlink": None, "sites": {}}
    return json.loads(path.read_text())


def save_state(workdir: Path, state: dict[str, Any]) -> None:
    path = Path(workdir) / STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
    os.replace(tmp, path)


# -- high-level operations --------------------------------------------------------------------------
def start_superlink(
    workdir: Path,
    host: str = "127.0.0.1",
    port: int = DEFAULT_SUPERLINK_PORT,
    tls_hosts: list[str] | None = None,
    sites: list[str] | None = None,
    registry: str | None = None,
    federation: str = FEDERATION,
    timeout: float = 60.0,
    allowlist: Path | None = None,
    proxy: bool = False,
    site_networks: list[str] | None = None,
    inner_port: int | None = None,
    operator_ca: Path | None = None,
) -> dict[str, Any]:
    """Certificates (reused if present), the SuperLink with TLS + SuperNode auth, and config.toml.

    With ``proxy`` the SuperLink listens on 127.0.0.1:``inner_port`` (default ``port`` + 1000) only
    and nginx (:func:`start_proxy`) is the public ``host:port``: sites (``site_networks``) reach the
    Fleet API, only loopback or an operator-CA client certificate reaches the Control API.
    """
    workdir = Path(workdir).resolve()
    state = load_state(workdir)
    if state.get("superlink") and is_alive(state["superlink"]["pid"], state["superlink"]["start_time"]):
        raise LaunchError(f"a SuperLink from this workdir already runs (PID {state['superlink']['pid']})")
    certs = workdir / "certs"
    bundle = tls.generate(certs, list(sites or []), [h for h in [*(tls_hosts or []), host] if h != "0.0.0.0"])
    flwr_home = workdir / "flwr-home"
    extra = {"RPE_REGISTRY": str(Path(registry).resolve())} if registry else {}
    if allowlist is not None:
        extra["RPE_ALLOWLIST"] = str(Path(allowlist).resolve())
    cmd = [
        sys.executable,
        "-m",
        "deploy.superlink_main",  # flower-superlink, waiting longer for sqlite's lock
        "--ssl-ca-certfile",
        str(bundle.ca_cert),
        "--ssl-certfile",
        str(bundle.server_cert),
        "--ssl-keyfile",
        str(bundle.server_key),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--database",
        str(workdir / "superlink.db"),
    ]
    link_host, link_port = host, port
    if proxy:
        link_host, link_port = "127.0.0.1", inner_port or port + 1000
    cmd += ["--host", link_host, "--port", str(link_port)]
    proc = _spawn(cmd, workdir / "logs" / "superlink.log", process_env(flwr_home, extra), workdir)
    connect_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    proc.update(address=f"{connect_host}:{port}", host=link_host, port=link_port)
    state.update(
        superlink=proc,
        flwr_home=str(flwr_home),
        certs=str(certs),
        federation=federation,
        ca_cert=str(bundle.ca_cert),
        proxy=None,
    )
    save_state(workdir, state)
    try:
        wait_port("127.0.0.1" if link_host in ("0.0.0.0", "::") else link_host, link_port, timeout, proc)
        if proxy:
            state["proxy"] = start_proxy(workdir, host, port, link_port, bundle, site_networks, operator_ca)
            save_state(workdir, state)
        write_flwr_config(flwr_home, federation, proc["address"], bundle.ca_cert)
        deadline = time.monotonic() + timeout
        while True:  # the port opens before the Control API answers
            try:
                supernode_status(flwr_home, federation)
                break
            except LaunchError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        state["superexec_argv"] = _superexec_argv(proc["pid"], timeout=15.0)
        save_state(workdir, state)
    except BaseException:
        if state.get("proxy"):
            stop_process(state["proxy"]["pid"], state["proxy"]["start_time"])
        stop_process(proc["pid"], proc["start_time"])
        raise
    return state


def _cmdline(pid: int) -> list[str]:
    try:
        return [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        return []


def _live_superexec(superlink_pid: int) -> bool:
    """A live ``flower-superexec`` serving this SuperLink: its child, or one ``ensure_superexec``
    restarted (not a child, but watching the same ``--parent-pid``)."""
    if any(any(a.endswith("flower-superexec") for a in _cmdline(pid)) for pid, _ in descendants(superlink_pid)):
        return True
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and proc_start_time(int(entry.name)) is not None:
            argv = _cmdline(int(entry.name))
            if (
                any(a.endswith("flower-superexec") for a in argv)
                and "--parent-pid" in argv
                and argv[argv.index("--parent-pid") + 1 :][:1] == [str(superlink_pid)]
            ):
                return True
    return False


def _superexec_argv(superlink_pid: int, timeout: float) -> list[str]:
    """The command line of the SuperExec the SuperLink started for its ServerApps ([] if none showed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid, _ in descendants(superlink_pid):
            argv = _cmdline(pid)
            if any(a.endswith("flower-superexec") for a in argv):
                return argv
        time.sleep(0.2)
    return []


def ensure_superexec(workdir: Path) -> bool:
    """Restart the SuperLink's SuperExec if it died; True if it was restarted.

    Why: in flwr 1.41 the SuperExec that launches ServerApps has no error handling around its
    ``AcquireTask`` poll; one HTTP 500 from the SuperLink (sqlite "database is locked" under load,
    seen in the main job with 10 SuperNodes on 2 cores) kills it, the SuperLink never starts it
    again, and every later run stays ``pending`` forever. The restarted one has the same command
    line (its ``--parent-pid`` is the SuperLink's, so it still dies with it)."""
    state = load_state(workdir)
    link, argv = state.get("superlink"), state.get("superexec_argv")
    if not link or not argv or not is_alive(link["pid"], link["start_time"]) or _live_superexec(link["pid"]):
        return False
    log_path = Path(workdir) / "logs" / "superexec-restarted.log"
    try:  # the SuperLink's own environment (e.g. $RPE_ALLOWLIST, $RPE_REGISTRY): what the first one inherited
        raw = Path(f"/proc/{link['pid']}/environ").read_bytes()
        env = dict(item.decode().split("=", 1) for item in raw.split(b"\0") if b"=" in item)
    except OSError:
        env = process_env(Path(state["flwr_home"]))
    with open(log_path, "ab") as log:
        subprocess.Popen(
            argv,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=workdir,
        )
    print(
        f"[launch] the SuperLink's SuperExec had exited (flwr 1.41 dies on one HTTP 500 from the SuperLink); "
        f"restarted it (log: {log_path})",
        file=sys.stderr,
        flush=True,
    )
    return True


def nginx_binary() -> str:
    """Debian's nginx (``apt-get install nginx``); its default site config is never used."""
    import shutil

    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if not found:
        raise LaunchError("the reverse proxy needs nginx: apt-get install nginx (or pass --no-proxy on one machine)")
    return found


def start_proxy(
    workdir: Path,
    listen_host: str,
    listen_port: int,
    upstream_port: int,
    bundle: tls.TlsBundle,
    site_networks: list[str] | None = None,
    operator_ca: Path | None = None,
    timeout: float = 30.0,
) -> dict[str, Any]:
    """nginx in front of the SuperLink (see deploy/proxy.py for what it forwards from where),
    with its own prefix directory ``<workdir>/proxy`` and config, started and stopped by PID."""
    from deploy import proxy

    spec = proxy.ProxySpec(
        Path(workdir) / "proxy",
        listen_host,
        listen_port,
        upstream_port,
        bundle.server_cert,
        bundle.server_key,
        bundle.ca_cert,
        list(site_networks or []),
        operator_ca,
    )
    conf = proxy.write_config(spec)
    prefix = str(spec.prefix.resolve())
    check = subprocess.run(
        [nginx_binary(), "-t", "-q", "-p", prefix, "-c", str(conf), "-e", f"{prefix}/logs/error.log"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if check.returncode != 0:
        raise LaunchError(f"nginx rejected {conf}: {check.stderr.strip()}")
    cmd = [nginx_binary(), "-p", prefix, "-c", str(conf), "-e", f"{prefix}/logs/error.log"]
    proc = _spawn(cmd, Path(workdir) / "logs" / "proxy.log", dict(os.environ), Path(workdir))
    connect_host = "127.0.0.1" if listen_host in ("0.0.0.0", "::") else listen_host
    proc.update(
        host=listen_host,
        port=listen_port,
        upstream_port=upstream_port,
        config=str(conf),
        site_networks=spec.site_networks,
        operator_ca=str(operator_ca) if operator_ca else None,
    )
    try:
        wait_port(connect_host, listen_port, timeout, proc)
    except BaseException:
        stop_process(proc["pid"], proc["start_time"])
        raise
    return proc


def register_sites(workdir: Path, public_keys: dict[str, Path], record: Path | None = None) -> dict[str, int | None]:
    """Register each site's public key with the SuperLink of this workdir (in parallel: each
    ``flwr`` call is a CLI process of its own). With ``record`` (the coordinator's allow-list
    file), the keys are also written to the coordinator's own record of site -> SuperNode key
    beside it (``server.allowlist.NodeKeys``), which discovery binds every site id to."""
    from concurrent.futures import ThreadPoolExecutor

    if record is not None:
        from server.allowlist import AllowList

        node_keys = AllowList(record).node_keys
        for site, key in public_keys.items():
            node_keys.add(tls.check_site_id(site), Path(key).read_text(), replace=True)
    state = load_state(workdir)
    flwr_home = Path(state["flwr_home"])
    federation = state.get("federation", FEDERATION)
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(public_keys)))) as pool:
        futures = {
            site: pool.submit(register_site, flwr_home, key, site, federation) for site, key in public_keys.items()
        }
        node_ids = {site: f.result() for site, f in futures.items()}
    known = state.setdefault("registered", {})
    for site, node_id in node_ids.items():
        if node_id is not None:
            known[site] = node_id
    save_state(workdir, state)
    return {site: known.get(site) for site in public_keys}


def start_supernode(
    workdir: Path, spec: SiteSpec, superlink: str, root_cert: Path, private_key: Path, flwr_home: Path | None = None
) -> dict[str, Any]:
    """One SuperNode for ``spec``: own port, node config as a TOML file, cwd = the site directory."""
    import tomli_w

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
    from client.pin import install_wrapper, parse_pins

    try:
        parse_pins(spec.app_sha256)
    except ValueError as exc:
        raise LaunchError(f"site {spec.site!r}: {exc}") from None
    # the site's own flwr-clientapp (checks the app bundle against app-sha256) comes first on PATH
    wrapper_dir = install_wrapper(site_dir / "bin", sys.executable, str(Path(__file__).resolve().parents[1])).parent
    env = process_env(home)
    env["PATH"] = f"{wrapper_dir}{os.pathsep}{env['PATH']}"
    cmd = [
        sys.executable,
        "-m",
        "deploy.supernode_main",  # flower-supernode, polling every 1 s when idle, not 3 s
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
    proc = _spawn(cmd, workdir / "logs" / f"supernode-{spec.site}.log", env, site_dir, nice=SITE_NICE)
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


def signing_keys(workdir: Path, sites: list[SiteSpec]) -> Path:
    """Each site's Ed25519 submission key in ``<site-dir>/keys/`` (kept if present) and the
    coordinator's allow-list ``<workdir>/allowlist.json`` of their public keys."""
    from common.trust.signing import generate_keypair
    from server.allowlist import AllowList

    allow = AllowList(Path(workdir) / "allowlist.json")
    for spec in sites:
        keys = Path(spec.site_dir) / "keys"
        if not (keys / f"{spec.site}.key").exists():
            generate_keypair(keys, spec.site)
        allow.add(spec.site, (keys / f"{spec.site}.pub").read_text())
    return allow.path


def coordinator_public_key(registry: str | os.PathLike[str]) -> Path:
    """The public key file the sites pin as ``coordinator-key``: ``<registry>/coordinator.pub``.
    The ServerApp makes the key on its first delivery (``server/coordkey.py``), after the registry
    exists; a site reads the file when a delivery arrives. On another machine, copy it to the site."""
    from server.coordkey import public_key_path

    return public_key_path(Path(registry).resolve())


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
) -> dict[str, Any]:
    """Everything on one machine: SuperLink, key registration, one SuperNode per site, all online.

    ``proxy`` (default: on unless ``host`` is loopback) puts nginx in front of the SuperLink.

    With ``sign`` (default) every site also gets an Ed25519 key for signing its submissions, and
    the SuperLink's ServerApp finds their allow-list through ``$RPE_ALLOWLIST``.
    """
    workdir = Path(workdir).resolve()
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
    )
    try:
        certs = Path(state["certs"])
        register_sites(workdir, {s.site: certs / f"{s.site}_auth.pub" for s in sites}, record=allowlist)
        for spec in sites:
            start_supernode(
                workdir, spec, state["superlink"]["address"], certs / tls.CA_CERT, certs / f"{spec.site}_auth"
            )
        wait_online(workdir, [s.site for s in sites], timeout)
    except BaseException:
        down(workdir)
        raise
    return load_state(workdir)


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


#: node-config keys that are :class:`SiteSpec` fields of their own (the rest go to ``extra``)
_SPEC_KEYS = frozenset(
    {"site-id", "data-path", "model-path", "site-dir", "threads", "app-sha256", "coordinator-key", "supernode-key"}
)


def spec_from_node_config(site: str, nc: dict[str, Any], port: int = 0) -> SiteSpec:
    """The :class:`SiteSpec` whose ``node_config()`` is ``nc`` again: every key kept (release policy,
    privacy policy, task family, compute dtype...), so a restarted SuperNode is the same site."""
    from common.privacy import POLICY_KEYS

    return SiteSpec(
        site,
        nc["data-path"],
        nc.get("model-path", ""),
        nc.get("site-dir", ""),
        port,
        int(nc.get("threads", 0)),
        {k: float(nc[k]) for k in POLICY_KEYS if k in nc},
        str(nc.get("app-sha256", "")),
        str(nc.get("coordinator-key", "")),
        extra={k: v for k, v in nc.items() if k not in _SPEC_KEYS and k not in POLICY_KEYS},
    )


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


def status(workdir: Path) -> dict[str, Any]:
    """Which recorded processes run, and what the SuperLink says about each registered node."""
    state = load_state(workdir)
    out: dict[str, Any] = {"workdir": state.get("workdir"), "processes": {}, "nodes": {}}
    link = state.get("superlink")
    if link:
        out["processes"]["superlink"] = {
            "pid": link["pid"],
            "address": link.get("address"),
            "running": is_alive(link["pid"], link["start_time"]),
        }
    for site, proc in state.get("sites", {}).items():
        out["processes"][f"supernode-{site}"] = {
            "pid": proc["pid"],
            "port": proc["port"],
            "running": is_alive(proc["pid"], proc["start_time"]),
        }
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


# -- CLI --------------------------------------------------------------------------------------------
def _parse_site(text: str, model_path: str) -> SiteSpec:
    """``ID=DATA_PATH`` (a JSONL file or a directory of them)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--site expects ID=DATA_PATH, got {text!r}")
    site, data = text.split("=", 1)
    return SiteSpec(tls.check_site_id(site), str(Path(data).expanduser().resolve()), model_path)


def _wait_for_signal(workdir: Path) -> None:
    """``--attach``: block until SIGINT/SIGTERM, then stop everything of ``workdir``."""
    stop = {"now": False}

    def handler(signum: int, frame: Any) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    while not stop["now"]:
        time.sleep(0.5)
    down(workdir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.launch",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def workdir_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--workdir",
            type=Path,
            required=True,
            help="state, logs, certificates, SuperLink database and FLWR_HOME live here",
        )

    p_up = sub.add_parser("up", help="SuperLink + one SuperNode per --site on this machine (TLS, node auth)")
    workdir_arg(p_up)
    p_up.add_argument("--site", action="append", default=[], required=True, metavar="ID=DATA_PATH")
    p_up.add_argument(
        "--model-path",
        default="smollm2-135m-instruct",
        help="base model directory (or the packaged name) every site loads",
    )
    p_up.add_argument("--host", default="127.0.0.1", help="SuperLink bind address (default loopback)")
    p_up.add_argument("--port", type=int, default=DEFAULT_SUPERLINK_PORT)
    p_up.add_argument(
        "--supernode-port", type=int, default=DEFAULT_SUPERNODE_PORT, help="first ClientApp port; site i gets this + i"
    )
    p_up.add_argument("--tls-host", action="append", default=[], help="extra SAN for the SuperLink certificate")
    p_up.add_argument("--registry", help="registry directory, exported to the ServerApp as RPE_REGISTRY")
    p_up.add_argument("--threads", type=int, default=0, help="torch threads per ClientApp (node config 'threads')")
    p_up.add_argument(
        "--privacy",
        action="append",
        default=[],
        metavar="[SITE:]KEY=VALUE",
        help="privacy policy for every site, or for SITE only (repeatable); keys as for `supernode "
        "--privacy`, e.g. --privacy b:z-epsilon=4 --privacy b:z-clip=2000",
    )
    p_up.add_argument(
        "--proxy",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="nginx in front of the SuperLink (default: on unless --host is loopback)",
    )
    p_up.add_argument(
        "--site-network",
        action="append",
        default=[],
        metavar="CIDR",
        help="with --proxy: networks allowed to use the Fleet API (default: any)",
    )
    p_up.add_argument("--app-sha256", default="", help="pin every site to this app bundle (see `supernode`)")
    p_up.add_argument(
        "--no-sign", action="store_true", help="do not create Ed25519 submission keys / the allow-list ($RPE_ALLOWLIST)"
    )

    p_link = sub.add_parser("superlink", help="only the SuperLink (coordinator of a multi-machine federation)")
    workdir_arg(p_link)
    p_link.add_argument("--host", default="127.0.0.1", help="bind address; 0.0.0.0 to accept remote sites")
    p_link.add_argument("--port", type=int, default=DEFAULT_SUPERLINK_PORT)
    p_link.add_argument(
        "--tls-host",
        action="append",
        default=[],
        help="DNS name / IP the sites use to reach this host (certificate SAN)",
    )
    p_link.add_argument("--registry", help="registry directory, exported to the ServerApp as RPE_REGISTRY")
    p_link.add_argument(
        "--no-proxy",
        action="store_true",
        help="expose the SuperLink itself (its Control API is open to anyone who reaches it!)",
    )
    p_link.add_argument(
        "--inner-port",
        type=int,
        default=None,
        help="loopback port of the SuperLink behind the proxy (default --port + 1000)",
    )
    p_link.add_argument(
        "--site-network",
        action="append",
        default=[],
        metavar="CIDR",
        help="network the sites connect from (repeatable); only these reach the Fleet API",
    )
    p_link.add_argument(
        "--operator-ca",
        type=Path,
        default=None,
        help="CA whose client certificates may use the Control API from off the host",
    )

    p_reg = sub.add_parser("register", help="register SuperNode auth keys and allow submission-signing keys")
    workdir_arg(p_reg)
    p_reg.add_argument(
        "keys",
        nargs="*",
        metavar="SITE=AUTH_PUB",
        help="the site's SuperNode auth public key (SITE_auth.pub, EC P-384 OpenSSH)",
    )
    p_reg.add_argument(
        "--signing-key",
        action="append",
        default=[],
        metavar="SITE=PEM",
        help="the site's Ed25519 submission key (keys/SITE.pub) for <workdir>/allowlist.json",
    )

    p_node = sub.add_parser("supernode", help="only one SuperNode (run on the site's own host)")
    workdir_arg(p_node)
    p_node.add_argument("--superlink", required=True, help="coordinator address host:port")
    p_node.add_argument("--root-certificates", required=True, type=Path, help="the federation's ca.crt")
    p_node.add_argument("--auth-key", required=True, type=Path, help="this site's private key (SITE_auth)")
    p_node.add_argument("--site-id", required=True)
    p_node.add_argument("--data-path", required=True)
    p_node.add_argument("--model-path", default="smollm2-135m-instruct")
    p_node.add_argument("--site-dir", default="", help="adapters, egress log (default WORKDIR/sites/ID)")
    p_node.add_argument("--port", type=int, default=DEFAULT_SUPERNODE_PORT, help="local ClientApp port")
    p_node.add_argument("--threads", type=int, default=0, help="torch threads per ClientApp")
    p_node.add_argument(
        "--app-sha256",
        default="",
        help="SHA-256 of the app bundle this site approved (`python -m client.pin hash APP`); "
        "runs of any other code are refused before it is installed",
    )
    p_node.add_argument(
        "--coordinator-key",
        default="",
        help="the coordinator's public key (<registry>/coordinator.pub): the site installs only "
        "train.apply deliveries signed with it",
    )
    p_node.add_argument(
        "--release",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="the site's release policy, repeatable: z-min-examples, z-layers, metrics-min-reports "
        "(client/policy.py; safe defaults when absent)",
    )
    p_node.add_argument(
        "--privacy",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="the site's privacy policy, repeatable: dp-noise-multiplier, dp-max-grad-norm, "
        "dp-delta (DP-SGD for the adapter); z-clip with z-noise-multiplier or z-epsilon, "
        "z-delta (Gaussian mechanism on z); privacy-budget (total ε). Off by default; see README "
        "'Privacy options'",
    )

    for name, text in (
        ("down", "stop every process recorded in the workdir"),
        ("status", "show recorded processes and node status"),
    ):
        workdir_arg(sub.add_parser(name, help=text))
    p_stop = sub.add_parser("stop-site", help="stop one SuperNode")
    workdir_arg(p_stop)
    p_stop.add_argument("site")
    p_start = sub.add_parser("start-site", help="restart a stopped SuperNode")
    workdir_arg(p_start)
    p_start.add_argument("site")

    for p in (p_up, p_link, p_node):
        p.add_argument(
            "--attach",
            action="store_true",
            help="stay in the foreground; the servers get SIGTERM when this process dies or gets "
            "Ctrl-C (default: they keep running until `down`)",
        )
    args = parser.parse_args(argv)
    global TIE_TO_PARENT
    TIE_TO_PARENT = bool(getattr(args, "attach", False))
    try:
        if args.command == "up":
            specs = [_parse_site(s, args.model_path) for s in args.site]
            for i, spec in enumerate(specs):
                spec.port = args.supernode_port + i
                spec.threads = args.threads
                spec.privacy = _privacy_args(args.privacy, spec.site)
                spec.app_sha256 = args.app_sha256
            state = up(
                args.workdir,
                specs,
                args.host,
                args.port,
                args.registry,
                args.tls_host,
                sign=not args.no_sign,
                proxy=args.proxy,
                site_networks=args.site_network,
            )
            print(json.dumps(status(args.workdir), indent=2))
            print(f"\nexport FLWR_HOME={state['flwr_home']}\nflwr run . {state['federation']} --stream")
        elif args.command == "superlink":
            state = start_superlink(
                args.workdir,
                args.host,
                args.port,
                args.tls_host,
                [],
                args.registry,
                allowlist=Path(args.workdir) / "allowlist.json",
                proxy=not args.no_proxy,
                site_networks=args.site_network,
                inner_port=args.inner_port,
                operator_ca=args.operator_ca,
            )
            print(
                f"SuperLink PID {state['superlink']['pid']} on {args.host}:{args.port}; "
                f"CA for the sites: {state['ca_cert']}\nexport FLWR_HOME={state['flwr_home']}"
            )
            if args.registry:
                print(f"coordinator key for the sites (--coordinator-key): {coordinator_public_key(args.registry)}")
        elif args.command == "register":
            keys = {}
            for item in args.keys:
                site, _, path = item.partition("=")
                keys[tls.check_site_id(site)] = Path(path)
            if keys:
                print(
                    json.dumps(
                        register_sites(args.workdir, keys, record=Path(args.workdir) / "allowlist.json"), indent=2
                    )
                )
            if args.signing_key:
                from server.allowlist import AllowList

                allow = AllowList(Path(args.workdir) / "allowlist.json")
                for item in args.signing_key:
                    site, _, path = item.partition("=")
                    allow.add(tls.check_site_id(site), Path(path).read_text())
                print(f"allow-list {allow.path}: {allow.sites()}")
        elif args.command == "supernode":
            spec = SiteSpec(
                args.site_id,
                str(Path(args.data_path).resolve()),
                args.model_path,
                args.site_dir,
                args.port,
                args.threads,
                _privacy_args(args.privacy),
                args.app_sha256,
                str(Path(args.coordinator_key).resolve()) if args.coordinator_key else "",
                dict(item.split("=", 1) for item in args.release),
            )
            proc = start_supernode(args.workdir, spec, args.superlink, args.root_certificates, args.auth_key)
            keys = Path(spec.site_dir) / "keys"
            if not (keys / f"{spec.site}.key").exists():
                from common.trust.signing import generate_keypair

                generate_keypair(keys, spec.site)
            print(
                f"SuperNode for site {args.site_id!r}: PID {proc['pid']}, log {proc['log']}\n"
                f"submission-signing public key for the coordinator's allow-list: {keys / (spec.site + '.pub')}"
            )
        elif args.command == "down":
            print(json.dumps(down(args.workdir), indent=2))
        elif args.command == "status":
            print(json.dumps(status(args.workdir), indent=2))
        elif args.command == "stop-site":
            print(stop_site(args.workdir, args.site))
        elif args.command == "start-site":
            print(f"PID {restart_site(args.workdir, args.site)['pid']}")
        if getattr(args, "attach", False):
            _wait_for_signal(args.workdir)
    except (LaunchError, FileExistsError, tls.TlsError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
