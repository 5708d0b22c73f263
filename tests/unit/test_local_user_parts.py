"""Issue 26, class 3, the parts without root: the Fleet-only middleware on the TCP port, the
operator socket's directory as the credential, nginx forwarding the Control API only for an
operator certificate, the launcher's reach check for --run-as. (End to end, as root:
tests/integration/test_local_user.py.)
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest

from deploy import operator_socket, proxy


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
