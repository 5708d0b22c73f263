"""A warm ClientApp starter beside each SuperNode: the site's ``flwr-clientapp`` without a fresh
interpreter per message.

Why: flwr 1.41's SuperNode (``--isolation subprocess``) starts one ``flwr-clientapp`` process per
message, and each one first imports flwr's runtime, numpy, torch, transformers and peft: 3-6 s of
CPU before the first line of the handler runs. A federation test of three sites starts 15-35 of
them, the demo ~80; on a two-core machine that import work was most of their wall time.

How: ``deploy.supernode_main`` starts :func:`serve` as its own child (it dies with the SuperNode,
is stopped with it, and inherits its user, environment, working directory and niceness) and names
it in ``RPE_WARM_CLIENTAPP`` for the SuperNode's processes. When the first ClientApp asks (that one
runs cold) the server imports those third-party libraries once (:data:`PRELOAD`; never a module of
the app's own packages) and then listens on an abstract Unix socket that only this user may use
(``SO_PEERCRED``). The site's ``flwr-clientapp``
wrapper (:func:`install_wrapper`) hands its arguments, environment, working directory and standard
streams to the server (:func:`handoff`); the server forks, and the fork runs exactly what the cold
wrapper runs - ``client.pin.clientapp_main`` imported from the site's checkout, which checks the
app bundle against the site's pin before anything of the bundle is written or imported, then loads
the ClientApp from the bundle - with those arguments and streams. The wrapper stays the process
Flower started: it forwards SIGTERM/SIGINT/SIGHUP to the fork and exits with its exit status; if the
wrapper dies, the fork is killed.

Cold start (the previous behaviour, the wrapper runs ``clientapp_main`` itself) whenever the server
is not there or not ready yet (it binds only after its imports), is turned off
(``RPE_WARM_CLIENTAPP=off`` in the SuperNode's environment), or the wrapper's environment differs
from the server's in any variable (a library reads some at import time) but :data:`FLWR_SETS`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import struct
import sys
from pathlib import Path
from typing import Any

#: names the server's abstract socket for the SuperNode's processes; ``off``: no server
ENV = "RPE_WARM_CLIENTAPP"
OFF = "off"
#: a launcher that runs more sites than this on one machine starts them cold: each warm starter
#: holds ~310 MB once it has imported (16 sites: ~5 GB; the 50-site scale run would need 15 GB)
MAX_SITES_ENV = "RPE_WARM_MAX_SITES"
DEFAULT_MAX_SITES = 16


def max_warm_sites() -> int:
    """How many sites one launcher may run warm on this machine (``$RPE_WARM_MAX_SITES``, default 16)."""
    raw = os.environ.get(MAX_SITES_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_SITES
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"${MAX_SITES_ENV}={raw!r}: expected a whole number of sites >= 0 (0: every site starts cold)")
    return value


#: third-party modules the server imports once (each one that fails to import is skipped); the
#: app's own packages (client, common, server, deploy) are never imported by the server
PRELOAD = (
    "flwr.supernode.runtime.run_clientapp",
    "flwr.clientapp",
    "flwr.app",
    "flwr.cli.install",
    "numpy",
    "torch",
    "torch.nn.functional",
    "safetensors.torch",
    "transformers",
    "transformers.models.auto.modeling_auto",
    "transformers.models.llama.modeling_llama",
    "transformers.models.auto.tokenization_auto",
    "peft",
    "peft.tuners.lora",
)
#: variables flwr sets in its own processes at run time, to fixed values no preloaded library reads
#: (so the wrapper, started by the SuperNode's SuperExec, has them and the starter may not); the
#: fork gets the wrapper's values all the same
FLWR_SETS = frozenset({"BROWSER_USE_SETUP_LOGGING"})
#: what the wrapper logs (to the SuperNode's log) when it starts cold although a starter is named
#: (none answered, or it declined: the reason follows), and what the starter logs for each fork
COLD_LINE = "[rpe] warm ClientApp starter not used: cold start"
#: the starter's answer to the first ClientApp, which runs cold while the starter imports
WARMING = "the first ClientApp of this SuperNode; the starter imports its libraries now"
FORK_LINE = "[rpe] warm ClientApp starter: forked"
_HEADER = struct.Struct("!I")
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _address(name: str) -> str:
    return "\0" + name  # abstract namespace: no file, no path-length limit, gone with the server


# -- the wrapper's side ------------------------------------------------------------------------
def handoff() -> None:
    """Run this ``flwr-clientapp`` in the warm server's fork and exit with its status; return (run
    cold) if there is no server, it is not ready, or it declines."""
    name = os.environ.get(ENV, "")
    if not name or name == OFF:
        return
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(_address(name))
        request = {"argv": sys.argv, "cwd": os.getcwd(), "env": dict(os.environ), "path": sys.path}
        payload = json.dumps(request).encode()
        socket.send_fds(sock, [_HEADER.pack(len(payload)) + payload], [0, 1, 2])
        reader = sock.makefile("rb")
        first = reader.readline()
    except OSError as exc:
        sock.close()
        print(f"{COLD_LINE} ({exc.strerror or exc})", file=sys.stderr, flush=True)
        return
    answer = json.loads(first) if first.strip() else {"cold": "the starter closed the connection"}
    if "pid" not in answer:
        sock.close()
        print(f"{COLD_LINE} ({answer.get('cold')})", file=sys.stderr, flush=True)
        return
    pid = int(answer["pid"])

    def forward(signum: int, _frame: Any) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for sig in _SIGNALS:
        signal.signal(sig, forward)
    line = reader.readline()  # retried after a forwarded signal (PEP 475)
    status = json.loads(line) if line.strip() else None
    if status is None:
        print(f"[rpe] warm ClientApp starter went away while PID {pid} ran", file=sys.stderr, flush=True)
        os._exit(1)
    code = int(status["exit"])
    if code < 0:  # the fork died of a signal: so does this process (what its parent would see)
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code & 0xFF)


def install_wrapper(bin_dir: Path, python: str | None = None, pythonpath: str | None = None) -> Path:
    """Write ``<bin_dir>/flwr-clientapp``: :func:`handoff` first, else ``client.pin.clientapp_main``
    (the pinned-bundle check; ``client/pin.py``) in this process, with this interpreter."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / "flwr-clientapp"
    root = pythonpath or str(Path(__file__).resolve().parents[1])
    text = (
        f"#!{python or sys.executable}\n"
        "# site-owned: checks the app bundle against node config app-sha256 (client/pin.py), in a fork of\n"
        "# the SuperNode's warm starter when one answers (deploy/warm_clientapp.py), else here\n"
        f"import sys\nsys.path.insert(0, {root!r})\n"
        "from deploy.warm_clientapp import handoff\nhandoff()\n"
        "from client.pin import clientapp_main\nclientapp_main()\n"
    )
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.chmod(stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    os.replace(tmp, path)
    return path


# -- the SuperNode's side ----------------------------------------------------------------------
def start_server() -> str | None:
    """Start :func:`serve` as a child of this process (it gets SIGTERM when this process dies) and
    name it in this process's environment for the processes it starts; None when turned off."""
    import ctypes
    import secrets
    import subprocess

    if os.environ.get(ENV) == OFF:
        return None
    name = f"rpe-clientapp-{os.getpid()}-{secrets.token_hex(8)}"
    os.environ[ENV] = name
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()

    def tie() -> None:
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os._exit(1)

    subprocess.Popen(  # noqa: S603 - our own module, this interpreter
        [sys.executable, "-m", "deploy.warm_clientapp", name], stdin=subprocess.DEVNULL, preexec_fn=tie
    )
    return name


def serve(name: str, preload: tuple[str, ...] = PRELOAD) -> None:
    """Import ``preload`` once the first ClientApp asked (it runs cold: a SuperNode that never gets
    a message, e.g. one refused at start-up, costs no imports; the first message of every run is a
    ``query.whoami``, which imports no torch), then fork one ClientApp per request on the abstract
    socket ``name``. While it imports, nothing listens: a ClientApp then starts cold at once."""
    import importlib

    before = dict(os.environ)  # what the SuperNode's processes see; some imports add to it
    first = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    first.bind(_address(name))
    first.listen(64)
    conn, _ = first.accept()
    first.close()
    try:
        _, fds = _receive(conn)
        for fd in fds:
            os.close(fd)
    except (OSError, ValueError):
        pass
    _send(conn, {"cold": WARMING})
    conn.close()
    print(f"[rpe] warm ClientApp starter: importing {', '.join(preload)}", file=sys.stderr, flush=True)
    for module in preload:
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - a library that does not import is imported cold
            print(f"[rpe] warm ClientApp starter: not preloading {module}: {exc}", file=sys.stderr, flush=True)
    added = {k: v for k, v in os.environ.items() if before.get(k) != v}
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(_address(name))
    server.listen(64)
    server.settimeout(1.0)
    print(f"[rpe] warm ClientApp starter ready (PID {os.getpid()})", file=sys.stderr, flush=True)
    while True:
        _reap()
        try:
            conn, _ = server.accept()
        except TimeoutError:
            continue
        conn.settimeout(None)
        try:
            request, fds = _receive(conn)
        except (OSError, ValueError) as exc:
            print(f"[rpe] warm ClientApp starter: bad request: {exc}", file=sys.stderr, flush=True)
            conn.close()
            continue
        why = _decline(conn, request, fds, before)
        if why:
            _send(conn, {"cold": why})
            print(f"[rpe] warm ClientApp starter: cold start ({why})", file=sys.stderr, flush=True)
        else:
            sys.stderr.flush()
            sys.stdout.flush()
            if os.fork() == 0:
                server.close()
                _carry(conn, request, fds, added)  # never returns
        for fd in fds:
            os.close(fd)
        conn.close()


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _receive(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    data, fds, _, _ = socket.recv_fds(conn, 65536, 3)
    if len(fds) != 3 or len(data) < _HEADER.size:
        for fd in fds:
            os.close(fd)
        raise ValueError("expected a length header and three file descriptors")
    (size,) = _HEADER.unpack(data[: _HEADER.size])
    body = data[_HEADER.size :]
    while len(body) < size:
        chunk = conn.recv(size - len(body))
        if not chunk:
            for fd in fds:
                os.close(fd)
            raise ValueError("the request ended early")
        body += chunk
    return json.loads(body), list(fds)


def _decline(conn: socket.socket, request: dict[str, Any], fds: list[int], env: dict[str, str]) -> str:
    """Why this request must run cold ('' if it may run here)."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    if uid != os.getuid():
        return f"the caller runs as uid {uid}, not {os.getuid()}"
    theirs = request.get("env") or {}
    keys = sorted(k for k in set(env) | set(theirs) if env.get(k) != theirs.get(k) and k not in FLWR_SETS)
    if keys:
        return f"its environment differs in {', '.join(keys)}"
    return ""


def _send(conn: socket.socket, obj: dict[str, Any]) -> None:
    try:
        conn.sendall(json.dumps(obj).encode() + b"\n")
    except OSError:
        pass


def _carry(conn: socket.socket, request: dict[str, Any], fds: list[int], added: dict[str, str]) -> None:
    """In the server's fork: fork the ClientApp, tell the wrapper its PID, kill it if the wrapper
    goes away, and send its exit status."""
    import select

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    pid = os.fork()
    if pid == 0:
        conn.close()
        _run(request, fds, added)  # never returns
    for fd in fds:
        os.close(fd)
    _send(conn, {"pid": pid})
    print(f"{FORK_LINE} PID {pid} for {request['argv'][0]}", file=sys.stderr, flush=True)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            _send(conn, {"exit": os.waitstatus_to_exitcode(status)})
            os._exit(0)
        readable, _, _ = select.select([conn], [], [], 0.2)
        if readable and not conn.recv(1):  # the wrapper died: so does its ClientApp
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
            os._exit(0)


def _run(request: dict[str, Any], fds: list[int], added: dict[str, str]) -> None:
    """In the ClientApp's fork: become the wrapper's process (streams, directory, environment,
    arguments, ``sys.path``) and run what the cold wrapper runs. ``added``: what the preloaded
    imports put into the environment (e.g. ``GRPC_VERBOSITY``), as they would in a cold start."""
    import atexit
    import threading
    import traceback

    for sig in (*_SIGNALS, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    os.environ.update(added)
    sys.argv[:] = request["argv"]
    sys.path[:] = request["path"]
    if "numpy" in sys.modules:  # the legacy global generator would be the server's in every fork
        sys.modules["numpy"].random.seed()
    code: Any = 0
    try:
        from client.pin import clientapp_main

        clientapp_main()
    except SystemExit as exc:
        code = exc.code
    except BaseException:  # noqa: BLE001 - printed as the interpreter would, then exit 1
        traceback.print_exc()
        code = 1
    if not isinstance(code, int):
        if code is not None:
            print(code, file=sys.stderr)
        code = 0 if code is None else 1
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code & 0xFF)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m deploy.warm_clientapp NAME (started by deploy.supernode_main)", file=sys.stderr)
        sys.exit(2)
    serve(sys.argv[1])
