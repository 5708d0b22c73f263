"""The SuperLink keeps an idle connection open longer than any of its clients keeps it for reuse.

CI failed a run with "ServerApp failed with exception: [SSL: UNEXPECTED_EOF_WHILE_READING]": uvicorn
closes an idle keep-alive connection after 5 s and httpx reuses one for up to 5 s, so now and then a
client sent its request into a connection the server was closing, and flwr gives up at once on any
error that names SSL. The server now waits :data:`SERVER_KEEPALIVE_S`, the socket clients reuse for
:data:`CLIENT_KEEPALIVE_S` only.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
import uvicorn

from deploy import operator_socket as ops
from deploy.launch import free_port

pytestmark = pytest.mark.integration  # a real uvicorn server held idle for 6 s


async def hello(scope, receive, send):  # a minimal ASGI app
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


def _get(sock: socket.socket) -> bytes:
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    while not data.endswith(b"ok"):
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk
    return data


def test_an_idle_connection_outlives_the_clients_reuse_window_by_far(tmp_path: Path, monkeypatch):
    assert ops.SERVER_KEEPALIVE_S >= 10 * ops.CLIENT_KEEPALIVE_S
    servers: list[uvicorn.Server] = []

    class Recording(uvicorn.Server):
        def __init__(self, config):
            super().__init__(config)
            servers.append(self)

    monkeypatch.setattr(uvicorn, "Server", Recording)
    sock_dir = tmp_path / "control"
    sock_dir.mkdir(mode=0o700)
    path = str(sock_dir / "s.sock")
    run = ops.serve_tcp_and_socket(path)
    thread = threading.Thread(
        target=run, kwargs={"app": hello, "host": "127.0.0.1", "port": free_port(), "log_level": "warning"}, daemon=True
    )
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not (servers and servers[0].started) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert servers and servers[0].started
        assert servers[0].config.timeout_keep_alive >= ops.SERVER_KEEPALIVE_S
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(path)
            assert _get(s).startswith(b"HTTP/1.1 200")
            time.sleep(6)  # longer than uvicorn's default keep-alive (5 s): the old server closed here
            assert _get(s).startswith(b"HTTP/1.1 200"), "the server closed an idle connection a client may reuse"
    finally:
        if servers:
            servers[0].should_exit = True
        thread.join(15)
    assert not thread.is_alive()


def test_socket_clients_give_up_idle_connections_first(tmp_path: Path, monkeypatch):
    httpx = pytest.importorskip("httpx")
    from flwr.supercore.protobuf import client as pc

    monkeypatch.setattr(pc.ProtobufClient, "__init__", pc.ProtobufClient.__init__)
    ops.route_to_socket(str(tmp_path / "s.sock"))
    try:
        client = pc.ProtobufClient("https://127.0.0.1:9093")
        pool = client._client._transport._pool
        assert pool._keepalive_expiry == ops.CLIENT_KEEPALIVE_S < ops.SERVER_KEEPALIVE_S
        assert isinstance(client._client, httpx.Client)
    finally:
        monkeypatch.delattr(pc.ProtobufClient, "_rpe_socket", raising=False)
