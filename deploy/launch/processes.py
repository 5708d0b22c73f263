"""Processes by PID: spawn a server in its own session (tied to its parent unless told otherwise),
check it by PID *and* kernel start time (a recycled PID is never mistaken for ours), stop it and the
helpers it spawned (SIGTERM, then SIGKILL), wait for a port. Nothing here knows Flower.
"""

from __future__ import annotations

import ctypes
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from deploy.launch.checks import error_line, log_lines, port_holders
from deploy.launch.errors import LaunchError


def flower_bin(name: str) -> str:
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


def _proc_stats() -> Iterator[tuple[int, list[str]]]:
    """(pid, the /proc/PID/stat fields after the command name) of every process now; fields[0] is
    the state, [1] the parent, [2] the process group, [19] the start time."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        yield int(entry.name), stat[stat.rindex(")") + 2 :].split()


def descendants(pid: int) -> list[tuple[int, int]]:
    """(pid, start time) of every live descendant of ``pid`` (via /proc parent links)."""
    children: dict[int, list[int]] = {}
    for child, fields in _proc_stats():
        children.setdefault(int(fields[1]), []).append(child)
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


def spawn(
    cmd: list[str],
    log: Path,
    env: dict[str, str],
    cwd: Path,
    nice: int = 0,
    account: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Start ``cmd`` (output appended to ``log``) with :func:`popen_tied`; the state-file record of it:
    pid, process group, kernel start time, command, log, cwd and whether it is tied to us.
    ``account`` (uid, gid): the process runs as that user with no supplementary groups (the kernel
    switches before the parent-death signal is set, which a credential change would clear)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    cwd.mkdir(parents=True, exist_ok=True)
    creds: dict[str, Any] = {}
    if account is not None and account != (os.geteuid(), os.getegid()):
        creds = {"user": account[0], "group": account[1], "extra_groups": []}
    with open(log, "ab") as fh:
        proc = popen_tied(
            cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=cwd, nice=nice, **creds
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


def group_members(pgid: int) -> list[tuple[int, int]]:
    """(pid, start time) of every live process in process group ``pgid`` (e.g. the helpers a
    server we started left behind when it died: they are no longer its descendants)."""
    return [(pid, int(f[19])) for pid, f in _proc_stats() if f[0] not in ("Z", "X") and int(f[2]) == pgid]


def stop_group_leftovers(proc: dict[str, Any], timeout: float = 5.0) -> None:
    """SIGTERM (then SIGKILL) what is left of the session we started for ``proc`` after it died."""
    pgid = int(proc.get("pgid") or proc["pid"])
    members = group_members(pgid)
    if not members:
        return
    _signal_group(pgid, signal.SIGTERM, members)
    for child, _ in _wait_gone(members, timeout):
        _signal(child, signal.SIGKILL)


def _ours(proc: dict[str, Any], holders: set[int]) -> bool:
    mine = {proc["pid"], *(pid for pid, _ in descendants(proc["pid"]))}
    return bool(holders & mine)


def wait_port(
    host: str, port: int, timeout: float, proc: dict[str, Any] | None = None, log_offset: int | None = None
) -> None:
    """Wait until ``proc`` (or, without it, something) accepts TCP connections on host:port.

    With ``proc``: a LaunchError with its log's own error line (from ``log_offset``) when it died,
    and the listener must be ``proc`` or one of its children, never another server that holds the
    port (when this account can see who listens)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not is_alive(proc["pid"], proc["start_time"]):
            stop_group_leftovers(proc)
            why = error_line(log_lines(proc["log"], log_offset or 0))
            raise LaunchError(f"{proc_name(proc)} exited during start-up: {why} (log: {proc['log']})")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                pass
        except OSError:
            time.sleep(0.2)
            continue
        if proc is None:
            return
        holders = set(port_holders(port))
        if not holders or _ours(proc, holders):  # nobody visible: another account's; trust the connect
            return
        time.sleep(0.2)
    where = f" (log: {proc['log']})" if proc else ""
    raise LaunchError(f"nothing of ours listens on {host}:{port} after {timeout:.0f} s{where}")


def proc_name(proc: dict[str, Any]) -> str:
    """``the SuperLink (PID 123)``, ``site a's SuperNode (PID 124)``, ``nginx (PID 125)``."""
    program = " ".join(proc.get("cmd", [])[:3])  # python -m MODULE, or nginx -p ...
    if "supernode" in program:
        what = f"site {proc['site']!r}'s SuperNode" if proc.get("site") else "the SuperNode"
    elif "superlink" in program:
        what = "the SuperLink"
    elif "nginx" in program:
        what = "nginx (the proxy)"
    else:
        what = "the process"
    return f"{what} (PID {proc['pid']})"


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port on ``host``, below the kernel's ephemeral range.

    A port the kernel hands out for ``bind(0)`` lies in the range it also uses for outgoing
    connections: with a dozen SuperNodes dialling the SuperLink at once, one of them could take
    the port before the server meant for it bound it ("address already in use", seen in the demo).
    Below the range only another server's explicit bind can race, which is rare."""
    low = _ephemeral_range()[0]
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # everything below the range is taken: fall back to the kernel's pick
        s.bind((host, 0))
        return int(s.getsockname()[1])


def cmdline(pid: int) -> list[str]:
    """The command line of ``pid`` ([] if it is gone or unreadable)."""
    try:
        return [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        return []
