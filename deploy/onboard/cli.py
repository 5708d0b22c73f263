"""``rpe coordinator init|admit|start|stop|status`` and ``rpe site init|join|start|stop``.

Registered in ``deploy/cli.py`` after ``client.use``, whose ``rpe site`` group (``status``) the
site actions join. Each command prints what it did and what to do next; a bad input is one
``rpe: error:`` line, exit 2, and nothing changed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from common.cli_base import CliError

NEXT_SITE = "send {request} to the coordinator; import its answer with `rpe site join --dir {dir} BUNDLE.json`"


def _detach() -> None:
    """The servers a start command launches outlive it (until ``stop``), as with
    ``python -m deploy.launch superlink|supernode`` without ``--attach``."""
    from deploy.launch import processes

    processes.TIE_TO_PARENT = False


def _run(fn: Any) -> Any:
    """Call ``fn``; the onboarding, launch and key errors become one CliError line."""
    from deploy.launch.errors import LaunchError
    from deploy.onboard.files import OnboardError
    from deploy.tls import TlsError

    try:
        return fn()
    except (OnboardError, LaunchError, TlsError, FileExistsError) as exc:
        raise CliError(str(exc)) from None
    except ValueError as exc:  # e.g. a key file that does not parse, an allow-list error
        raise CliError(f"{type(exc).__name__}: {exc}") from None


# -- coordinator ---------------------------------------------------------------------------------


def _family_bases(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        family, sep, model = item.partition("=")
        if not sep or not family or not model:
            raise CliError(f"--family-base {item!r}: expected FAMILY=MODEL, e.g. segmentation=/models/sam")
        out[family] = model
    return out


def cmd_coordinator_init(args: argparse.Namespace) -> None:
    from deploy.onboard.coordinator import REPO_ROOT, CoordinatorSettings, init

    settings = CoordinatorSettings(
        address=args.address,
        host=args.host,
        tls_hosts=list(args.tls_host),
        site_networks=list(args.site_network),
        registry=str(Path(args.registry).resolve()) if args.registry else "",
        base_model=args.base_model,
        family_bases=_family_bases(args.family_base),
        app=str(args.app or REPO_ROOT),
        proxy=not args.no_proxy,
        inner_port=args.inner_port or 0,
        operator_ca=str(args.operator_ca or ""),
        run_as=args.run_as or "",
        operator_group=args.operator_group or "",
    )
    out = _run(lambda: init(args.dir, settings, force=args.force))
    print(f"coordinator {out['dir']} for sites dialling {out['address']}")
    print(f"  federation CA      {out['ca_cert']}")
    print(f"  coordinator key    {out['coordinator_key']}")
    print(f"  registry           {out['registry']}")
    print(f"next: rpe coordinator start --dir {out['dir']}")


def cmd_coordinator_admit(args: argparse.Namespace) -> None:
    from deploy.onboard.coordinator import admit

    out = _run(lambda: admit(args.dir, args.request, args.out, replace=args.replace))
    print(f"admitted site {out['site']!r} (SuperNode key registered, node id {out['node_id']}; signing key allowed)")
    print(f"join bundle: {out['bundle']}  (send it to the site: `rpe site join --dir S {Path(out['bundle']).name}`)")
    print(f"  pins app {out['app_sha256']}; audit entry seq {out['audit_seq']}")


def cmd_coordinator_start(args: argparse.Namespace) -> None:
    from deploy.onboard.coordinator import start

    _detach()
    state = _run(lambda: start(args.dir, timeout=args.timeout))
    proxy = state.get("proxy") or {}
    print(f"SuperLink PID {state['superlink']['pid']}" + (f", proxy PID {proxy['pid']}" if proxy else ""))
    print(f"operator socket {state['socket']}; FLWR_HOME={state['flwr_home']}")


def cmd_coordinator_stop(args: argparse.Namespace) -> None:
    from deploy.onboard.coordinator import stop

    print(json.dumps(_run(lambda: stop(args.dir)), indent=2))


def cmd_coordinator_status(args: argparse.Namespace) -> None:
    from deploy.onboard.coordinator import status

    print(json.dumps(_run(lambda: status(args.dir)), indent=2))


def _add_coordinator(sub: Any) -> None:
    p = sub.add_parser(
        "coordinator",
        help="set up and run the coordinator (init, admit sites, start, stop, status)",
        description="The coordinator operator's commands. `init` once, `start`, then `admit` each "
        "site's join request; later commands read D/coordinator.toml and need only --dir D.",
    )
    csub = p.add_subparsers(dest="coordinator_command", required=True, metavar="ACTION")

    def dir_arg(q: argparse.ArgumentParser) -> None:
        q.add_argument("--dir", type=Path, required=True, help="the coordinator directory (of `rpe coordinator init`)")

    q = csub.add_parser(
        "init",
        help="CA, SuperLink certificate, registry + coordinator key, coordinator.toml",
        description="Create the coordinator directory: the federation CA and the SuperLink certificate "
        "(certs/), the registry with the coordinator's signing key (coordinator.pub, what sites pin), "
        "an empty allow-list, and coordinator.toml with these settings. Refuses an existing "
        "coordinator without --force.",
    )
    dir_arg(q)
    q.add_argument("--address", required=True, metavar="HOST:PORT", help="the address sites dial (in the certificate)")
    q.add_argument("--host", default="0.0.0.0", help="bind address of the public port (default 0.0.0.0)")
    q.add_argument("--tls-host", action="append", default=[], metavar="H", help="another name/IP for the certificate")
    q.add_argument(
        "--site-network", action="append", default=[], metavar="CIDR", help="networks the sites connect from"
    )
    q.add_argument("--registry", help="registry directory (default DIR/registry)")
    q.add_argument(
        "--base-model",
        default="smollm2-135m-instruct",
        help="base model directory (or the packaged name) the registry is bound to",
    )
    q.add_argument(
        "--family-base",
        action="append",
        default=[],
        metavar="FAMILY=MODEL",
        help="another task family's base model, e.g. segmentation=/models/sam (its registry is made too)",
    )
    q.add_argument("--app", type=Path, default=None, help="the app `flwr run` is started from (default: this checkout)")
    q.add_argument("--no-proxy", action="store_true", help="no nginx in front of the SuperLink (one machine only)")
    q.add_argument("--inner-port", type=int, default=0, help="the SuperLink's loopback port (default port + 1000)")
    q.add_argument("--operator-ca", type=Path, help="CA whose client certificates may use the Control API remotely")
    q.add_argument("--run-as", help="run the SuperLink and ServerApps as this unprivileged user")
    q.add_argument("--operator-group", help="members may use the operator socket")
    q.add_argument("--force", action="store_true", help="rewrite the settings of an existing coordinator")
    q.set_defaults(func=cmd_coordinator_init)

    q = csub.add_parser(
        "admit",
        help="admit a site from its join request; write its join bundle",
        description="Check REQUEST.json (schema, keys, site id, no key clash), register the SuperNode "
        "key with the running SuperLink, allow-list the signing key, record site <-> SuperNode key, write "
        "the join bundle and audit both files' digests.",
    )
    dir_arg(q)
    q.add_argument("request", type=Path, metavar="REQUEST.json")
    q.add_argument("--out", type=Path, help="where to write the bundle (default DIR/sites/ID/join-bundle.json)")
    q.add_argument("--replace", action="store_true", help="the site is admitted already: rotate to these keys")
    q.set_defaults(func=cmd_coordinator_admit)

    q = csub.add_parser("start", help="start the SuperLink (and its proxy) with coordinator.toml's settings")
    dir_arg(q)
    q.add_argument("--timeout", type=float, default=60.0, help="seconds to wait until it answers")
    q.set_defaults(func=cmd_coordinator_start)
    q = csub.add_parser("stop", help="stop every process of the coordinator directory")
    dir_arg(q)
    q.set_defaults(func=cmd_coordinator_stop)
    q = csub.add_parser("status", help="processes, nodes and admitted sites (JSON)")
    dir_arg(q)
    q.set_defaults(func=cmd_coordinator_status)


# -- site ------------------------------------------------------------------------------------------


def cmd_site_init(args: argparse.Namespace) -> None:
    from deploy.onboard.site import init

    out = _run(lambda: init(args.dir, args.site_id, force=args.force))
    print(f"site {out['site_id']!r}: keys in {out['dir']}/certs and {out['dir']}/keys")
    print(f"  SuperNode key sha256 {out['fingerprints']['supernode']}")
    print(f"  signing key sha256   {out['fingerprints']['signing']}")
    print("next: " + NEXT_SITE.format(request=out["request"], dir=out["dir"]))


def cmd_site_join(args: argparse.Namespace) -> None:
    from deploy.onboard.site import join

    out = _run(lambda: join(args.dir, args.bundle, force=args.force))
    print(f"site {out['site']!r} joined the federation at {out['superlink']}; pinned:")
    print(f"  federation CA   sha256 {out['ca_sha256']} ({out['ca_cert']})")
    print(f"  coordinator key sha256 {out['coordinator_key_sha256']} ({out['coordinator_key']})")
    print(f"  app bundle      sha256 {out['app_sha256']}")


def cmd_site_start(args: argparse.Namespace) -> None:
    from deploy.onboard import site

    release = {}
    for item in args.release:
        key, sep, value = item.partition("=")
        if not sep:
            raise CliError(f"--release {item!r}: expected KEY=VALUE")
        release[key] = value
    settings: dict[str, Any] = {
        "threads": args.threads,
        "no_deliveries": args.no_deliveries,
        "port": args.port,
        "release": release,
        "tasks": args.task,
        "options": args.option,
    }
    if args.check:
        _site_check(args, settings)
        return
    _detach()
    out = _run(lambda: site.start(args.dir, args.data_path, args.model_path or "", **settings))
    print(
        f"SuperNode of site {out['site']!r} ({out['task']}): PID {out['pid']}, dialling {out['superlink']}, log {out['log']}"
    )
    print(f"node config {out['node_config']}  (check its data: rpe data check --node-config {out['node_config']})")


def _site_check(args: argparse.Namespace, settings: dict[str, Any]) -> None:
    """``rpe site start --check``: the node config start would write, and its data check; exit 1 on a
    problem (as ``rpe data check``), nothing written or started."""
    import sys

    import tomli_w

    from client.datacheck import format_checks
    from deploy.onboard import site

    nc, checks = _run(lambda: site.check(args.dir, args.data_path, args.model_path or "", **settings))
    where = Path(args.dir).resolve() / site.NODE_CONFIG_FILE
    print(f"node config `rpe site start` would write to {where} (nothing written, nothing started):")
    print("".join(f"  {line}\n" for line in tomli_w.dumps(nc).splitlines()), end="")
    print(format_checks(checks))
    if not all(c.ok for c in checks):
        sys.exit(1)


def cmd_site_stop(args: argparse.Namespace) -> None:
    from deploy.onboard.site import stop

    print(json.dumps(_run(lambda: stop(args.dir)), indent=2))


def _site_actions(sub: Any) -> Any:
    """The sub-parsers of the ``rpe site`` group ``client.use`` made (created here if absent)."""
    import client.use as use

    if hasattr(use, "site_subparsers"):
        return use.site_subparsers(sub)
    site = sub.choices.get("site")
    if site is None:
        site = sub.add_parser("site", help="the site's own commands")
        return site.add_subparsers(dest="site_command", required=True, metavar="ACTION")
    for action in site._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    raise RuntimeError("the `rpe site` group has no sub-commands")  # pragma: no cover


def _add_site(sub: Any) -> None:
    ssub = _site_actions(sub)

    def dir_arg(q: argparse.ArgumentParser) -> None:
        q.add_argument("--dir", type=Path, required=True, help="the site directory (of `rpe site init`)")

    q = ssub.add_parser(
        "init",
        help="the site's keys and its join request (no CA: that comes from the coordinator)",
        description="Make the site's SuperNode key pair (certs/) and Ed25519 signing key (keys/), "
        "and DIR/join-request.json with their public halves for the coordinator.",
    )
    dir_arg(q)
    q.add_argument("--site-id", required=True)
    q.add_argument("--force", action="store_true", help="make new keys (the site must be admitted again)")
    q.set_defaults(func=cmd_site_init)

    q = ssub.add_parser(
        "join",
        help="import the coordinator's join bundle (CA, coordinator key, address, app hash)",
        description="Check BUNDLE.json (for this site, CA and key parse, address) and store it in DIR.",
    )
    dir_arg(q)
    q.add_argument("bundle", type=Path, metavar="BUNDLE.json")
    q.add_argument("--force", action="store_true", help="replace a bundle imported before")
    q.set_defaults(func=cmd_site_join)

    q = ssub.add_parser(
        "start",
        help="start the site's SuperNode from DIR's keys and bundle",
        description="Start the SuperNode with DIR's CA, SuperNode key, coordinator key and pinned app "
        "hash, and the node config DIR/node-config.toml: data path, model, --task and the families' keys "
        "(--option, checked: an unknown key is named with its closest match). Refuses without a "
        "coordinator key unless --no-deliveries. --check first: what would be used of the data.",
    )
    dir_arg(q)
    q.add_argument("--data-path", required=True, help="the site's data (see docs/DATA.md)")
    q.add_argument(
        "--model-path",
        help="base model directory (default: the task family's packaged model, smollm2-135m-instruct or litemedsam)",
    )
    q.add_argument(
        "--task",
        action="append",
        default=[],
        metavar="FAMILY",
        help="task family the site runs: report-text (default) or segmentation (repeatable or comma-separated)",
    )
    q.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a node-config key of the site's task families, e.g. report-columns=uid=Accession,prompt=Befund "
        "or seg-dataset=volumes (repeatable; docs/DATA.md lists them)",
    )
    q.add_argument(
        "--check",
        action="store_true",
        help="print the node config start would write and check the site's data with it (as `rpe data check`); "
        "start nothing, write nothing; exit 1 on a data problem",
    )
    q.add_argument("--threads", type=int, default=0, help="torch threads per ClientApp")
    q.add_argument("--port", type=int, default=0, help="the SuperNode's local ClientApp port (default 9094)")
    q.add_argument(
        "--no-deliveries", action="store_true", help="start without a coordinator key: never receive adapters"
    )
    q.add_argument(
        "--release",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="release policy (z-min-examples, z-layers, metrics-min-reports)",
    )
    q.set_defaults(func=cmd_site_start)

    q = ssub.add_parser("stop", help="stop the site's SuperNode")
    dir_arg(q)
    q.set_defaults(func=cmd_site_stop)


def register(sub: Any) -> None:
    """Add ``rpe coordinator`` and the ``rpe site`` onboarding actions."""
    _add_coordinator(sub)
    _add_site(sub)
