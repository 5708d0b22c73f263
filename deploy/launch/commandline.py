"""Start and stop a Flower 1.41 deployment (SuperLink + SuperNodes) by PID, with TLS and node auth.

One machine (the default, for demos and tests)::

    python -m deploy.launch up --workdir runs/fed --model-path /models/smollm2 \\
        --site a=/data/a.jsonl --site b=/data/b.jsonl --site c=/data/c.jsonl
    FLWR_HOME=runs/fed/flwr-home python -m deploy.flwr_main run . rpe --stream --run-config "mode='enroll'"
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
import sys
import time
from pathlib import Path
from typing import Any

from common.trust.signing import generate_keypair
from deploy import tls
from deploy.launch import processes
from deploy.launch.coordinator import coordinator_public_key, register_sites, start_superlink
from deploy.launch.errors import LaunchError
from deploy.launch.federation import down, status, up
from deploy.launch.sites import restart_site, start_supernode, stop_site
from deploy.launch.state import DEFAULT_SUPERLINK_PORT, DEFAULT_SUPERNODE_PORT, SiteSpec, privacy_args
from server.allowlist import AllowList


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


def _poll_interval(spec: SiteSpec, value: str | None) -> None:
    """``--poll-interval`` into the site's node config (deploy/supernode_main.py reads it there, also
    after a restart), checked before anything starts."""
    from deploy.supernode_main import POLL_KEY, PollIntervalError, check_poll_interval

    if value is not None:
        try:
            spec.extra[POLL_KEY] = check_poll_interval(value, "--poll-interval")
        except PollIntervalError as exc:
            raise LaunchError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    """``python -m deploy.launch``: parse the command line and run one command; 1 on a launch error."""
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
    for p in (p_up, p_node):
        p.add_argument(
            "--poll-interval",
            default=None,
            metavar="SECONDS",
            help="seconds an idle SuperNode waits between two asks for work (node config 'poll-interval'; "
            "default 1): longer = less SuperLink load per idle site, each message waits half of it longer",
        )
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

    for p in (p_up, p_link):
        p.add_argument(
            "--run-as",
            default=None,
            metavar="USER",
            help="run the SuperLink, its SuperExec and every ServerApp as this unprivileged user (root "
            "creates it as a system user if missing); the registry becomes its alone (mode 0700). "
            "Default: the invoking user (root gets a warning)",
        )
        p.add_argument(
            "--operator-group",
            default=None,
            metavar="GROUP",
            help="members may use the operator socket <workdir>/control/superlink.sock "
            "(python -m deploy.flwr_main); default: only the --run-as user and root",
        )
    for p in (p_up, p_link, p_node):
        p.add_argument(
            "--attach",
            action="store_true",
            help="stay in the foreground; the servers get SIGTERM when this process dies or gets "
            "Ctrl-C (default: they keep running until `down`)",
        )
    args = parser.parse_args(argv)
    processes.TIE_TO_PARENT = bool(getattr(args, "attach", False))
    if args.command in ("up", "superlink") and not args.run_as and os.geteuid() == 0:
        print(
            "warning: the SuperLink and every ServerApp it starts will run as root; "
            "pass --run-as rpe-coord to give the coordinator an unprivileged account of its own",
            file=sys.stderr,
        )
    try:
        if args.command == "up":
            specs = [_parse_site(s, args.model_path) for s in args.site]
            for i, spec in enumerate(specs):
                spec.port = args.supernode_port + i
                spec.threads = args.threads
                spec.privacy = privacy_args(args.privacy, spec.site)
                spec.app_sha256 = args.app_sha256
                _poll_interval(spec, args.poll_interval)
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
                run_as=args.run_as,
                operator_group=args.operator_group,
            )
            print(json.dumps(status(args.workdir), indent=2))
            print(
                f"\nexport FLWR_HOME={state['flwr_home']}\n"
                f"python -m deploy.flwr_main run . {state['federation']} --stream   # flwr, through the operator socket"
            )
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
                run_as=args.run_as,
                operator_group=args.operator_group,
            )
            print(
                f"SuperLink PID {state['superlink']['pid']} on {args.host}:{args.port}; "
                f"CA for the sites: {state['ca_cert']}\nexport FLWR_HOME={state['flwr_home']}\n"
                f"operator socket: {state['socket']} (python -m deploy.flwr_main = flwr through it)"
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
                privacy_args(args.privacy),
                args.app_sha256,
                str(Path(args.coordinator_key).resolve()) if args.coordinator_key else "",
                dict(item.split("=", 1) for item in args.release),
            )
            _poll_interval(spec, args.poll_interval)
            proc = start_supernode(args.workdir, spec, args.superlink, args.root_certificates, args.auth_key)
            keys = Path(spec.site_dir) / "keys"
            if not (keys / f"{spec.site}.key").exists():
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
