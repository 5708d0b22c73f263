"""Issue 29: the nginx proxy keeps its TLS connections to the SuperLink open.

Every idle SuperNode polls the Fleet API once per poll interval; without an upstream ``keepalive``
nginx opened a new TCP + TLS connection to the SuperLink for each of those requests, and the
SuperLink's Python paid a TLS handshake per poll. Real nginx (the config ``deploy/proxy.py``
writes) in front of a real TLS HTTP/1.1 server that counts the connections it accepts.
"""

from __future__ import annotations

import shutil
import ssl
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from deploy import launch, proxy, tls

pytestmark = pytest.mark.integration

REQUESTS = 30


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as uvicorn

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


class _CountingServer(ThreadingHTTPServer):
    daemon_threads = True
    connections = 0

    def get_request(self):  # type: ignore[no-untyped-def]
        sock, addr = super().get_request()
        type(self).connections += 1
        return sock, addr


@pytest.mark.skipif(not (shutil.which("nginx") or Path("/usr/sbin/nginx").exists()), reason="needs nginx")
def test_fleet_requests_through_the_proxy_reuse_the_connection_to_the_superlink(tmp_path: Path) -> None:
    bundle = tls.generate(tmp_path / "certs", [], ["127.0.0.1"])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(bundle.server_cert, bundle.server_key)
    _CountingServer.connections = 0
    upstream = _CountingServer(("127.0.0.1", 0), _Handler)
    upstream.socket = ctx.wrap_socket(upstream.socket, server_side=True)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    port = launch.free_port()
    spec = proxy.ProxySpec(
        tmp_path / "proxy",
        "127.0.0.1",
        port,
        upstream.server_address[1],
        bundle.server_cert,
        bundle.server_key,
        bundle.ca_cert,
        ["127.0.0.0/8"],
    )
    conf = proxy.write_config(spec)
    prefix = str(spec.prefix.resolve())
    nginx = launch.popen_tied(
        [launch.nginx_binary(), "-p", prefix, "-c", str(conf), "-e", f"{prefix}/logs/error.log"], tie=True
    )
    try:
        launch.wait_port("127.0.0.1", port, 30.0)
        client = ssl.create_default_context(cafile=str(bundle.ca_cert))
        for _ in range(REQUESTS):  # one SuperNode's polls, each its own client connection as httpx may make
            req = urllib.request.Request(f"https://127.0.0.1:{port}/v1/fleet/pull-messages", data=b"x", method="POST")
            with urllib.request.urlopen(req, context=client, timeout=10) as resp:
                assert resp.status == 200
        # without upstream keepalive: one connection per request (30)
        assert _CountingServer.connections <= 3, f"{_CountingServer.connections} connections for {REQUESTS} requests"
    finally:
        nginx.terminate()
        nginx.wait(10)
        upstream.shutdown()
