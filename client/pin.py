"""A site runs only the app bundle (FAB) it reviewed: a site-owned ``flwr-clientapp``.

Why here and not in the ClientApp: the ClientApp's code *is* the FAB the coordinator ships, so a
check inside it is worthless against a coordinator (or an outsider who reached the Control API)
that ships other code. In Flower 1.41 a SuperNode (``--isolation subprocess``, the default) starts
``flwr-clientapp`` **by name from PATH** for every message; that process pulls the message, the
run and the FAB content from the SuperNode (``run_clientapp.pull_task_input``), and only then
installs the FAB under ``$FLWR_HOME/apps`` and imports it. This module is that executable: it wraps
``pull_task_input`` so that, before anything of the FAB is written or imported, the SHA-256 of the
FAB bytes is compared with the site's pin in its node config::

    app-sha256 = "9f2c...e1"          # or several, comma-separated (an upgrade window)

A mismatch writes one ``outcome = "refused"`` line (reason ``app-not-approved``, the FAB's hash
and id, the pins) to the site's egress log ``<site-dir>/egress.jsonl`` and raises
:class:`AppNotApproved`; Flower turns that into an error reply, no handler runs. A site without a
pin runs any app (the previous behaviour; ``deploy.launch supernode --app-sha256`` sets it).

``deploy.launch`` installs this as ``<site-dir>/bin/flwr-clientapp`` and puts that directory first
on the SuperNode's PATH. The hash to pin is that of the bundle ``flwr run``/``flwr build`` makes
(deterministic: fixed zip timestamps)::

    python -m client.pin hash .            # an app directory, or a built .fab file
"""

from __future__ import annotations

import argparse
import hashlib
import os
import stat
import sys
from pathlib import Path
from typing import Any

PIN_KEY = "app-sha256"
EGRESS_FILE = "egress.jsonl"  # the same name as client.app.EGRESS_FILE (not imported: it pulls torch)
WRAPPER_NAME = "flwr-clientapp"


class AppNotApproved(RuntimeError):
    """The run's app bundle is not the one this site pinned."""


def parse_pins(value: Any) -> list[str]:
    """The node-config value as a list of lower-case hex digests (empty: no pin)."""
    if value is None or value == "":
        return []
    pins = [p.strip().lower() for p in str(value).split(",") if p.strip()]
    for pin in pins:
        if len(pin) != 64 or any(c not in "0123456789abcdef" for c in pin):
            raise AppNotApproved(f"node config {PIN_KEY} = {value!r}: expected 64 hex digits (comma-separated)")
    return pins


def check_fab(
    content: bytes, node_config: dict[str, Any], run_id: Any = None, fab_id: str = "", message_type: str = ""
) -> str:
    """Return the FAB's SHA-256 if it is pinned (or nothing is pinned); else log and raise."""
    digest = hashlib.sha256(content).hexdigest()
    try:
        pins = parse_pins(node_config.get(PIN_KEY))
    except AppNotApproved as exc:
        _log_refusal(node_config, run_id, message_type, str(exc), digest, fab_id, [])
        raise
    if pins and digest not in pins:
        reason = (
            f"app-not-approved: the run's app bundle has SHA-256 {digest}, this site approved only "
            f"{', '.join(pins)} (node config {PIN_KEY})"
        )
        _log_refusal(node_config, run_id, message_type, reason, digest, fab_id, pins)
        raise AppNotApproved(reason)
    return digest


def _log_refusal(
    node_config: dict[str, Any], run_id: Any, message_type: str, reason: str, digest: str, fab_id: str, pins: list[str]
) -> None:
    from client.egress import EgressLog

    site_dir = node_config.get("site-dir")
    if not site_dir:
        return  # no egress log configured: the refusal still stands
    EgressLog(Path(str(site_dir)) / EGRESS_FILE).record(
        message_type or "unknown",
        {},
        run_id=None if run_id is None else str(run_id),
        extra={"outcome": "refused", "reason": reason[:500], "fab_sha256": digest, "fab_id": fab_id, "pinned": pins},
    )


def _install_guard() -> None:
    """Wrap flwr's ``pull_task_input`` so the check runs before the FAB is installed or imported."""
    from flwr.supernode.runtime import run_clientapp as rc

    original = rc.pull_task_input

    def guarded(client: Any) -> Any:
        message, context, run, fab = original(client)
        try:
            check_fab(
                fab.content,
                dict(context.node_config),
                run.run_id,
                getattr(run, "fab_id", ""),
                message.metadata.message_type,
            )
        except AppNotApproved as exc:
            # flwr pushes its error reply only once it holds the context, which it never gets when
            # this raises: answer here, else the SuperNode waits for this task and stalls
            from flwr.app import Error, Message

            from common.protocol.wire import ERROR_REFUSED

            rc.push_message(
                client, Message(Error(code=ERROR_REFUSED, reason=f"refused: {exc}"), reply_to=message), context
            )
            raise
        return message, context, run, fab

    rc.pull_task_input = guarded


def _clientapp_entry() -> Any:
    """flwr's ``flwr_clientapp`` function, without running ``flwr.supernode.cli/__init__.py``.

    That package's ``__init__`` imports the whole SuperNode (``flower_supernode``: its SQL object
    store, alembic, the gRPC servers) just to re-export this one function: 0.4-0.75 s of CPU in
    every ClientApp process, i.e. every message a site answers. The module that defines it
    (``flwr/supernode/cli/flwr_clientapp.py``) is loaded on its own instead, from the same
    installed flwr; if flwr ever moves it, the stock import is used."""
    import importlib
    import importlib.util
    import types

    name = "flwr.supernode.cli"
    if name not in sys.modules:
        spec = importlib.util.find_spec("flwr.supernode")
        where = [os.path.join(p, "cli") for p in (spec.submodule_search_locations or [])] if spec else []
        if where and os.path.isfile(os.path.join(where[0], "flwr_clientapp.py")):
            pkg = types.ModuleType(name)
            pkg.__path__ = where
            sys.modules[name] = pkg  # a bare package: only what is imported from it is loaded
    try:
        return importlib.import_module(f"{name}.flwr_clientapp").flwr_clientapp
    except (ImportError, AttributeError):
        sys.modules.pop(name, None)
        from flwr.supernode.cli import flwr_clientapp

        return flwr_clientapp


def clientapp_main() -> None:
    """Entry point used instead of ``flwr-clientapp`` (same arguments)."""
    _install_guard()
    flwr_clientapp = _clientapp_entry()

    sys.argv[0] = WRAPPER_NAME
    flwr_clientapp()


def install_wrapper(bin_dir: Path, python: str | None = None, pythonpath: str | None = None) -> Path:
    """Write ``<bin_dir>/flwr-clientapp`` running :func:`clientapp_main` with this interpreter."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / WRAPPER_NAME
    root = pythonpath or str(Path(__file__).resolve().parents[1])
    text = (
        f"#!{python or sys.executable}\n"
        "# site-owned: checks the app bundle against node config app-sha256 (client/pin.py)\n"
        f"import sys\nsys.path.insert(0, {root!r})\n"
        "from client.pin import clientapp_main\nclientapp_main()\n"
    )
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.chmod(stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    os.replace(tmp, path)
    return path


def fab_sha256(path: Path) -> str:
    """SHA-256 of a built ``.fab`` file, or of the bundle ``flwr run`` builds from an app directory."""
    if path.is_dir():
        from flwr.cli.build import build_fab_from_disk

        return hashlib.sha256(build_fab_from_disk(path.resolve())).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    """``python -m client.pin hash APP_DIR|FILE.fab``: the value to pin."""
    parser = argparse.ArgumentParser(prog="python -m client.pin", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_hash = sub.add_parser("hash", help="SHA-256 of an app bundle, the value for node config app-sha256")
    p_hash.add_argument("app", type=Path)
    args = parser.parse_args(argv)
    if not args.app.exists():
        print(f"rpe: error: {args.app} does not exist", file=sys.stderr)
        return 2
    print(fab_sha256(args.app))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
