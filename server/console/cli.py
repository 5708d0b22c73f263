"""``rpe console``: serve the read-only web console of a coordinator's registry root (every family).

Access model (why): the console shows what every site released and how much privacy budget it
spent, so it is never open to a network by accident. By default it binds to 127.0.0.1 (reach it
from elsewhere through an SSH tunnel). Binding to any other address requires TLS
(``--certfile``/``--keyfile``) *and* an access token; the token is created on first use
(``secrets.token_urlsafe(32)``) in a 0600 file — ``--token-file`` or ``<registry>.console-token``
next to the registry directory (never inside it: the console writes nothing there) — and must
come with every request (see ``server/console/app.py``). On 127.0.0.1 a token is used too when
``--token-file`` is given.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import secrets
import stat
import sys
from pathlib import Path

DEFAULT_PORT = 8765


class ConsoleConfigError(ValueError):
    """The console cannot start as asked (unsafe binding, unreadable token or certificate)."""


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost' (anything else may be reachable from a network)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_token_file(registry: str | os.PathLike[str]) -> Path:
    """``<registry>.console-token`` beside the registry directory."""
    root = Path(registry).expanduser().resolve()
    return root.with_name(root.name + ".console-token")


def load_or_create_token(path: str | os.PathLike[str]) -> str:
    """The token in ``path``, creating it (mode 0600, exclusive create) when missing.

    A token file that other users can read is refused: it would let them in.
    """
    p = Path(path).expanduser()
    if p.exists():
        mode = stat.S_IMODE(p.stat().st_mode)
        if mode & 0o077:
            raise ConsoleConfigError(
                f"token file {p} has mode {mode:04o}; other users could read it. "
                f"Run `chmod 600 {p}` (or delete it to get a new token)"
            )
        token = p.read_text(encoding="ascii").strip()
        if len(token) < 32:
            raise ConsoleConfigError(
                f"token file {p} holds {len(token)} characters; a token needs at least 32. "
                "Delete the file to get a new one"
            )
        return token
    p.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(token + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return token


def plan(args: argparse.Namespace) -> dict[str, object]:
    """Check the flags and decide TLS and token (no side effect but creating the token file)."""
    tls = bool(args.certfile or args.keyfile)
    if tls and not (args.certfile and args.keyfile):
        raise ConsoleConfigError("TLS needs both --certfile and --keyfile")
    for name in ("certfile", "keyfile"):
        value = getattr(args, name)
        if value and not Path(value).is_file():
            raise ConsoleConfigError(f"--{name} {value} does not exist")
    loopback = is_loopback(args.host)
    if not loopback and not tls:
        raise ConsoleConfigError(
            f"--host {args.host} is reachable from a network: the console then requires TLS (--certfile and "
            "--keyfile; `python -m deploy.tls` or any CA can make them) and an access token. Or keep the default "
            "127.0.0.1 and use an SSH tunnel"
        )
    token_file = args.token_file or (None if loopback else default_token_file(args.registry))
    token = load_or_create_token(token_file) if token_file else None
    return {"tls": tls, "token": token, "token_file": str(token_file) if token_file else None}


def cmd_console(args: argparse.Namespace) -> None:
    """Start the console and serve until interrupted."""
    import uvicorn

    from server.console.app import create_app
    from server.console.security import allowed_hosts

    p = plan(args)
    hosts = allowed_hosts(args.host, args.port)  # any other Host (DNS rebinding) is refused
    app = create_app(args.registry, token=p["token"], secure_cookie=bool(p["tls"]), hosts=hosts)  # type: ignore[arg-type]
    scheme = "https" if p["tls"] else "http"
    host = f"[{args.host}]" if ":" in args.host else args.host
    url = f"{scheme}://{host}:{args.port}/"
    if p["token"]:
        print(f"rpe console: {url}?token={p['token']}  (token in {p['token_file']}, mode 0600)", file=sys.stderr)
    else:
        print(f"rpe console: {url}  (read-only; loopback only, no token)", file=sys.stderr)
    sys.stderr.flush()
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        ssl_certfile=args.certfile,
        ssl_keyfile=args.keyfile,
        log_level=args.log_level,
        server_header=False,
        access_log=args.log_level == "info",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``console`` to the ``rpe`` sub-commands."""
    c = subparsers.add_parser(
        "console",
        help="serve the read-only web console of a registry root, every family (overview, records, audit, privacy)",
        description="A read-only web console over the coordinator's registry root, every task family's "
        "registry under it: sites, records with a PCA map of z per family, compositions, audit-chain "
        "verification, egress-log cross-check over every family's log, privacy spent, evaluations with "
        "each family's metric. Binds to 127.0.0.1; any other --host requires --certfile/--keyfile and an "
        "access token (created in a 0600 file).",
    )
    c.add_argument(
        "--registry",
        required=True,
        help="the coordinator's registry root: every task family's registry under it is shown (opened read-only)",
    )
    c.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    c.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    c.add_argument("--certfile", help="TLS certificate (PEM); required with a non-loopback --host")
    c.add_argument("--keyfile", help="TLS private key (PEM)")
    c.add_argument(
        "--token-file",
        help="access-token file, created 0600 if missing (default for a non-loopback "
        "host: <registry>.console-token; on 127.0.0.1 a token is required only when this is given)",
    )
    c.add_argument(
        "--log-level",
        default="warning",
        choices=["warning", "info", "error"],
        help="uvicorn log level (info also logs each request)",
    )
    c.set_defaults(func=cmd_console)
