"""Issue 26, class 3: no local user of the coordinator host runs code as the coordinator.

Before: the SuperLink's Control API listened on loopback (one-machine setup) or nginx forwarded it
from loopback (hardened setup), and "is loopback" was the only credential: uid 65534 with the
public ``ca.crt`` registered a node and ``flwr run`` an app whose ServerApp ran as root with
``RPE_REGISTRY`` in its environment. Now the Control and Runtime APIs answer only on a Unix socket
in a directory owned by the coordinator's account (``deploy/operator_socket.py``), the TCP ports
answer only the Fleet API (nginx forwards the Control API only to holders of an operator client
certificate), and ``--run-as`` runs the SuperLink and every ServerApp under their own account with
the registry readable by it alone.

The end-to-end tests run as root (they switch users): ``tests/_local_user_scenario.py`` in a
private mount namespace, where the virtual environment's interpreter is made reachable for other
accounts when a directory above it is closed (here it lives under ``/root``, mode 0700; the mount
is invisible outside the test). Everything runs on loopback, is bounded in time and stopped by PID.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from deploy import operator_socket, proxy

REPO = Path(__file__).resolve().parent.parent
SCENARIO = REPO / "tests" / "_local_user_scenario.py"
ACCOUNT = "rpe-coord"


# -- the parts, without root -------------------------------------------------------------------
def _asgi(path: str, server: tuple | None) -> int:
    """Status the middleware gives a request for ``path`` that arrived on ``server``."""
    seen: list[int] = []

    async def app(scope, receive, send):
        seen.append(200)

    async def send(message):
        if message["type"] == "http.response.start":
            seen.append(message["status"])

    async def receive():
        return {"type": "http.request", "body": b""}

    scope = {"type": "http", "path": path, "server": server, "method": "POST"}
    asyncio.run(operator_socket.FleetOnlyOverTcp(app)(scope, receive, send))
    return seen[0]


def test_the_tcp_port_answers_only_the_fleet_api():
    tcp, unix = ("127.0.0.1", 9093), ("/w/control/superlink.sock", None)
    for path in ("/v1/control/start-run", "/v1/control/create-node-cli", "/v1/runtime/pull-app-inputs", "/docs"):
        assert _asgi(path, tcp) == 403, path
        assert _asgi(path, unix) == 200, path
    for route in proxy.FLEET_ROUTES:
        assert _asgi(proxy.FLEET_PREFIX + route, tcp) == 200
    assert _asgi("/health", tcp) == 200
    # anything that is not clearly the Unix socket counts as TCP
    assert _asgi("/v1/control/start-run", None) == 403
    assert _asgi("/v1/control/start-run", ("::1", 0)) == 403


def test_the_socket_directory_is_the_credential(tmp_path):
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o755)
    open_dir.chmod(0o755)
    with pytest.raises(operator_socket.SocketError, match="other users"):
        operator_socket.bind_unix(open_dir / "s.sock")
    shut = tmp_path / "shut"
    shut.mkdir()
    shut.chmod(0o700)
    sock = operator_socket.bind_unix(shut / "s.sock")
    try:
        assert stat.S_IMODE(os.stat(shut / "s.sock").st_mode) == 0o660
    finally:
        sock.close()
    (shut / "file").write_text("x")
    with pytest.raises(operator_socket.SocketError, match="not a socket"):
        operator_socket.bind_unix(shut / "file")
    with pytest.raises(operator_socket.SocketError, match="longer than"):
        operator_socket.bind_unix(shut / ("x" * 120))


def test_nginx_forwards_the_control_api_only_for_an_operator_certificate(tmp_path):
    """No loopback exception any more; verified operators go to the socket, and the workers run as
    the account named (never nobody, the uid any local user can get)."""
    spec = proxy.ProxySpec(
        tmp_path / "p",
        "0.0.0.0",
        9093,
        10093,
        tmp_path / "s.pem",
        tmp_path / "s.key",
        tmp_path / "ca.crt",
        ["10.0.1.0/24"],
        tmp_path / "op-ca.crt",
        control_socket=tmp_path / "control" / "superlink.sock",
        worker_user="rpe-coord",
        worker_group="rpe-op",
    )
    conf = proxy.render_config(spec)
    assert conf.startswith("# generated") and "\nuser rpe-coord rpe-op;\n" in conf
    assert "$rpe_loopback" not in conf  # loopback opened the Control API before issue 26
    assert "map $ssl_client_verify $rpe_control_ok" in conf and '"~^1:"' not in conf
    control = conf.split("location /v1/control/ {")[1].split("}")[1]
    assert f"proxy_pass https://unix:{(tmp_path / 'control' / 'superlink.sock').resolve()}:;" in control
    assert "10093" not in control


@pytest.fixture
def open_tmp():
    """A temporary directory every account can enter (pytest's own temporary root is mode 0700)."""
    path = Path(tempfile.mkdtemp(prefix="rpe-open-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_the_launcher_names_what_the_coordinator_account_cannot_reach(open_tmp):
    """``--run-as``: checked from mode bits before anything starts, so a closed directory is an
    error naming it, not a SuperLink that dies (the allow-list needs reading only)."""
    from deploy.launch.account import Account, check_reachable, reachable
    from deploy.launch.errors import LaunchError

    tmp_path = open_tmp

    other = Account("someone", 54321, 54321)
    closed = tmp_path / "closed"
    closed.mkdir()
    closed.chmod(0o700)
    (closed / "allowlist.json").write_text("{}")
    assert not reachable(closed / "allowlist.json", other.uid, {other.gid}, 4)
    with pytest.raises(LaunchError, match="closed/allowlist.json"):
        check_reachable(other, [closed / "allowlist.json"], [])
    opened = tmp_path / "opened"
    opened.mkdir()
    opened.chmod(0o755)
    (opened / "allowlist.json").write_text("{}")
    (opened / "allowlist.json").chmod(0o644)
    assert reachable(opened / "allowlist.json", other.uid, {other.gid}, 4)
    assert not reachable(opened / "allowlist.json", other.uid, {other.gid}, 2)
    assert reachable(opened / "not-yet", other.uid, {other.gid}, 7)  # made later: its directory counts
    assert not reachable(opened, other.uid, {other.gid}, 7)  # a registry there: it must be its own


# -- end to end, as root -----------------------------------------------------------------------
def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "switching to uid 65534 and to the coordinator's account needs root"
    for tool in ("setpriv", "unshare", "useradd"):
        if shutil.which(tool) is None:
            return f"util-linux/passwd `{tool}` is not installed"
    probe = subprocess.run(
        [
            "unshare",
            "-m",
            "--propagation",
            "private",
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "true",
        ],
        capture_output=True,
        text=True,
        timeout=20,
    )
    if probe.returncode != 0:
        return f"the kernel refused a private mount namespace or a uid switch: {probe.stderr.strip()[:200]}"
    return None


def _closed_ancestor(path: Path) -> tuple[Path, Path] | None:
    """The highest directory above ``path`` that others cannot enter, and its child on the way."""
    parts = path.parents
    for parent in reversed(parts):
        if parent == Path("/"):
            continue
        if not os.stat(parent).st_mode & 0o001:
            child = next(p for p in [path, *parts] if p.parent == parent)
            return parent, child
    return None


def _run_scenario(setup: str, run_as: str) -> dict:
    reason = _unavailable()
    if reason:
        pytest.skip(reason)
    shell = ["set -e"]
    closed = _closed_ancestor(Path(os.path.realpath(sys.executable)))
    if closed:  # e.g. /root (0700) above a pyenv interpreter: open only the interpreter's tree
        top, child = closed
        hold = Path("/tmp") / f"rpe-hold-{os.getpid()}"
        shell += [
            f"mkdir -p {hold}",
            f"mount --bind {child} {hold}",
            f"mount -t tmpfs -o mode=0755,size=1m tmpfs {top}",
            f"mkdir -p {child}",
            f"mount --bind {hold} {child}",
        ]
    shell.append(f'exec "{sys.executable}" "{SCENARIO}" {setup} {run_as}')
    res = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", "\n".join(shell)],
        capture_output=True,
        text=True,
        timeout=420,
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)},
    )
    if closed:
        try:
            (Path("/tmp") / f"rpe-hold-{os.getpid()}").rmdir()
        except OSError:
            pass
    lines = [line for line in res.stdout.splitlines() if line.startswith("{")]
    assert res.returncode == 0 and lines, f"rc={res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    return json.loads(lines[-1])


def _assert_attacker_got_nothing(r: dict) -> None:
    for name, attempt in r["attacker_flwr"].items():
        assert not attempt.get("success"), (name, attempt)
    http = r["attacker_http"]
    for key, status in http.items():
        if key == "socket":
            assert "PermissionError" in status and "errno 13" in status, http
        elif "/v1/fleet/" not in key:  # the Fleet API answers (SuperNode auth refuses the request)
            assert status in (403, 404), (key, http)
    assert r["attacker_reads_registry"]["rc"] != 0 and "PermissionError" in str(r["attacker_reads_registry"])
    assert r["nodes_unchanged"], r
    assert r["runs_before_operator"] == 0, r  # the attacker's runs never existed


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("setup", ["one-machine", "hardened"])
def test_a_local_user_can_neither_register_a_node_nor_run_an_app(setup):
    """uid 65534 on the coordinator host, with only ``ca.crt``: ``flwr supernode register`` and
    ``flwr run`` fail against every TCP port and through the socket (EACCES), raw Control/Runtime
    requests answer 403/404, the registry is unreadable, nothing was registered or run. The
    operator's own registration and run succeed, and the ServerApp runs as the coordinator's
    account, not as root."""
    r = _run_scenario(setup, ACCOUNT)
    _assert_attacker_got_nothing(r)
    uid, gid = r["account"]
    assert uid != 0 and r["superlink_uid"] == uid
    assert r["registry_mode"] == "0o700" and r["registry_uid"] == uid
    assert isinstance(r["operator_register"]["a"], int), r
    assert r["operator_run_submitted"][0], r
    app = r["serverapp"]
    assert app is not None, r
    assert (app["uid"], app["euid"], app["gid"]) == (uid, uid, gid) and app["groups"] in ([], [gid]), app
    assert app["registry_listable"], app


@pytest.mark.slow
@pytest.mark.integration
def test_without_run_as_the_socket_still_keeps_local_users_out():
    """The launcher's own account (root here; the invoking user in the one-machine demo): the socket
    directory is 0700, so a local user still cannot register or run (the ServerApp runs as the
    launcher's user, which is what ``--run-as`` exists to avoid)."""
    r = _run_scenario("one-machine", "-")
    _assert_attacker_got_nothing(r)
    assert r["serverapp"] is not None and r["serverapp"]["uid"] == 0
