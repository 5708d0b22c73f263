"""The coordinator's Unix socket: the only way to the SuperLink's Control and Runtime APIs.

Why: in Flower 1.41 the SuperLink serves the Fleet API (sites), the Control API (``flwr run``,
``flwr supernode register``: whoever reaches it runs code as the coordinator) and the Runtime API
(its own SuperExec and ServerApp processes) over HTTPS on one TCP port, and the open-source build
authenticates no Control API caller. "Listens on loopback" keeps other hosts out but lets every
local user of the coordinator host in: uid 65534 with only the public ``ca.crt`` registered a node
and ran an app whose ServerApp held the registry (issue 26, class 3). The ``flwr`` CLI cannot
present a client certificate, so the operator credential on the host is a file permission:

- the SuperLink (``deploy/superlink_main.py``) serves the same app on its TCP port **and** on a
  Unix socket ``<workdir>/control/superlink.sock``; over TCP it answers only the Fleet routes and
  ``/health`` (:class:`FleetOnlyOverTcp`), everything else answers 403;
- the socket's directory is owned by the SuperLink's account, mode 0700, or 2750 with the operator
  group (``--operator-group``): the kernel refuses ``connect()`` to everyone else (EACCES);
- the SuperLink's own clients (``flower-superexec``, ``flwr-serverapp``, started by name from
  ``<workdir>/bin`` first on PATH) and the operator's ``python -m deploy.flwr_main`` (= ``flwr``)
  reach the SuperLink through that socket (:func:`route_to_socket`); TLS still runs inside it.

Nothing here imports Flower at module level (``deploy.launch`` writes the wrappers without it).
"""

from __future__ import annotations

import os
import socket
import stat
import sys
from pathlib import Path
from typing import Any

from deploy.proxy import FLEET_PREFIX, FLEET_ROUTES

#: environment variable naming the socket (set for the SuperLink and inherited by its SuperExec
#: and ServerApps; the operator's FLWR_HOME names it in :data:`SOCKET_FILE` instead)
SOCKET_ENV = "RPE_SUPERLINK_SOCKET"
#: file in the operator's ``$FLWR_HOME`` holding the socket path (written by ``deploy.launch``)
SOCKET_FILE = "superlink-socket"
#: longest path a Unix socket address can hold on Linux (sun_path is 108 bytes with the NUL)
MAX_SOCKET_PATH = 107
#: how long a client keeps an idle connection for reuse (httpx's default is 5 s) ...
CLIENT_KEEPALIVE_S = 2.0
#: ... and how long the SuperLink keeps it open (uvicorn's default is also 5 s). The server must
#: wait clearly longer than any client: with equal timeouts a client reuses a connection in the very
#: instant the server closes it, the request fails with "[SSL: UNEXPECTED_EOF_WHILE_READING]", and
#: flwr gives up at once on any error naming SSL (its ServerApp then fails the run; seen in CI).
SERVER_KEEPALIVE_S = 65
#: what the TCP port still answers (exact paths, as the SuperLink's router matches them)
TCP_PATHS = frozenset({"/health", *(FLEET_PREFIX + r for r in FLEET_ROUTES)})
#: the console scripts the SuperLink side starts by name, and their entry points
ENTRY_POINTS = {
    "flwr": ("flwr.cli.app", "app"),
    "flower-superexec": ("flwr.supercore.cli", "flower_superexec"),
    "flwr-serverapp": ("flwr.superlink.cli", "flwr_serverapp"),
}


class SocketError(RuntimeError):
    """The operator socket's path or directory is unsafe or unusable."""


def check_socket_dir(directory: Path) -> None:
    """Refuse a socket directory that others can enter or write: it is the operator credential."""
    st = os.stat(directory)
    if not stat.S_ISDIR(st.st_mode):
        raise SocketError(f"{directory} is not a directory")
    if st.st_mode & 0o007:
        raise SocketError(
            f"{directory} has mode {stat.S_IMODE(st.st_mode):o}: other users could reach the SuperLink's "
            "Control API through it; make it 0700 (or 2750 with the operator group)"
        )
    if st.st_uid not in (os.geteuid(), 0):
        raise SocketError(f"{directory} belongs to uid {st.st_uid}, not to this account: it could swap the socket")
    if st.st_mode & 0o020:
        raise SocketError(f"{directory} is group-writable (mode {stat.S_IMODE(st.st_mode):o}); make it 2750")


def bind_unix(path: str | os.PathLike[str]) -> socket.socket:
    """A listening Unix socket at ``path`` (a stale socket there is replaced; anything else is an
    error), mode 0660 from the start, in a directory :func:`check_socket_dir` accepts."""
    path = Path(path)
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise SocketError(f"socket path {path} is longer than {MAX_SOCKET_PATH} bytes: use a shorter --workdir")
    check_socket_dir(path.parent)
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise SocketError(f"{path} exists and is not a socket; remove it by hand")
        path.unlink()
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o117)  # never world-connectable, not even between bind() and chmod()
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o660)
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class FleetOnlyOverTcp:
    """ASGI middleware: a request that arrived over TCP (uvicorn's scope ``server`` is
    ``(host, port)``; over a Unix socket it is ``(path, None)``) may use only :data:`TCP_PATHS`;
    anything else (Control API, Runtime API, docs) answers 403 without reaching the app."""

    def __init__(self, app: Any) -> None:
        self.app = app

    @staticmethod
    def over_unix_socket(scope: dict[str, Any]) -> bool:
        server = scope.get("server")
        return isinstance(server, (tuple, list)) and len(server) == 2 and server[1] is None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan" or self.over_unix_socket(scope):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "http" and scope.get("path") in TCP_PATHS:
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = b'{"detail": "only the Fleet API answers on this port; operators use the coordinator\'s Unix socket"}'
        await send(
            {
                "type": "http.response.start",
                "status": 403,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


def serve_tcp_and_socket(socket_path: str) -> Any:
    """A stand-in for ``uvicorn.run`` (flwr's SuperLink calls ``uvicorn.run(app=..., host=...,
    port=..., ssl_keyfile=..., ...)``): the same server on its TCP port, Fleet-only, and on the
    Unix socket with every API."""

    def run(app: Any, **kwargs: Any) -> None:
        import uvicorn  # lazy: only the SuperLink process needs it

        kwargs["timeout_keep_alive"] = max(int(kwargs.get("timeout_keep_alive") or 0), SERVER_KEEPALIVE_S)
        config = uvicorn.Config(FleetOnlyOverTcp(app), **kwargs)
        server = uvicorn.Server(config)
        unix = bind_unix(socket_path)
        tcp = config.bind_socket()
        try:
            server.run(sockets=[tcp, unix])
        finally:
            try:
                os.unlink(socket_path)
            except OSError:
                pass

    return run


def socket_path() -> str | None:
    """The socket this process should use: ``$RPE_SUPERLINK_SOCKET``, else the path written in
    ``$FLWR_HOME/superlink-socket`` (None: plain TCP, as stock ``flwr``)."""
    if os.environ.get(SOCKET_ENV):
        return os.environ[SOCKET_ENV]
    home = Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr")
    try:
        text = (home / SOCKET_FILE).read_text().strip()
    except OSError:
        return None
    return text or None


def route_to_socket(path: str) -> None:
    """Make every Flower protobuf-over-HTTP client of this process (Control, Runtime and Fleet
    clients all derive from ``ProtobufClient``) connect through the Unix socket ``path``; the URL,
    and so the TLS server name checked against the certificate, stays the configured address."""
    import httpx
    from flwr.supercore.protobuf import client as pc

    if getattr(pc.ProtobufClient, "_rpe_socket", None) == path:
        return
    original = pc.ProtobufClient.__init__

    def __init__(self: Any, base_url: str, **kwargs: Any) -> None:
        original(self, base_url, **kwargs)
        self._client.close()
        verify = kwargs.get("verify", True)
        self._client = httpx.Client(
            transport=httpx.HTTPTransport(
                uds=path, verify=verify, limits=httpx.Limits(keepalive_expiry=CLIENT_KEEPALIVE_S)
            ),
            timeout=kwargs.get("timeout", 30.0),
            follow_redirects=True,
        )

    pc.ProtobufClient.__init__ = __init__  # type: ignore[method-assign]
    pc.ProtobufClient._rpe_socket = path  # type: ignore[attr-defined]


def _refused(path: str) -> str | None:
    """Why this account may not use the operator socket ``path`` (None: it may, or the socket is
    not there, which flwr reports itself): the kernel refuses ``connect()`` without search on its
    directory and write on the socket."""
    d = os.path.dirname(path) or "."
    if os.path.exists(d) and os.access(d, os.X_OK) and (not os.path.exists(path) or os.access(path, os.W_OK)):
        return None
    if not os.path.exists(d) and os.access(os.path.dirname(d) or ".", os.X_OK):
        return None
    return (
        f"error: permission denied on the operator socket {path}: only the SuperLink's account, root and "
        "members of its --operator-group may use it (as root: `usermod -aG GROUP USER`; the user then "
        "logs in again, or runs `newgrp GROUP`, for the group to count)"
    )


def run_entry(name: str) -> int:
    """Run Flower's console script ``name`` with its clients routed through the socket (if one is
    configured for this process)."""
    import importlib

    path = socket_path()
    if path:
        refused = _refused(path) if name == "flwr" else None
        if refused:  # flwr itself would only say "connection unavailable: check your network"
            print(refused, file=sys.stderr)
            return 1
        route_to_socket(path)
    module, func = ENTRY_POINTS[name]
    sys.argv[0] = name
    return int(getattr(importlib.import_module(module), func)() or 0)


def write_wrappers(bin_dir: Path) -> Path:
    """``<bin_dir>/flower-superexec`` and ``flwr-serverapp``: Flower's own commands, started by name
    by the SuperLink and its SuperExec, with their Runtime API client on the socket."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in ("flower-superexec", "flwr-serverapp"):
        target = bin_dir / name
        tmp = target.with_suffix(".tmp")
        tmp.write_text(
            f"#!{sys.executable}\n# generated by deploy/operator_socket.py\nimport sys\n"
            "from deploy.operator_socket import run_entry\n"
            f"sys.exit(run_entry({name!r}))\n"
        )
        tmp.chmod(0o755)
        tmp.replace(target)
    return bin_dir
