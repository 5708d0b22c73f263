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

The pin covers exactly the code that runs: the bundle. This wrapper is imported from the site's
own checkout (it must run before any bundle code), so once the bundle is checked it forgets every
module of the app's packages it imported and the checkout's place on ``sys.path``
(:func:`forget_site_code`), and after flwr loads the ClientApp it checks that every loaded
``client``/``common``/``server``/``deploy`` module is a file of the installed bundle
(:func:`check_loaded_from`; else ``AppNotApproved``). The other choice, hashing the checkout's
``client/`` into the pin too, was not taken: it would pin a mix no one built or reviewed as one
bundle, and a site that updates its checkout would silently change what its pin approves. A
deployed site's own settings (threads, compute dtype, paths, release policy) come from its node
config alone; the run config's ``sim-*`` keys are ignored there and logged (``client/site.py``).

``deploy.launch`` installs this as ``<site-dir>/bin/flwr-clientapp`` and puts that directory first
on the SuperNode's PATH. The hash to pin is that of the bundle ``flwr run``/``flwr build`` makes
(deterministic: fixed zip timestamps)::

    python -m client.pin hash .            # an app directory, or a built .fab file
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
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


#: the app's top-level packages: at a pinned site every one of them must come from the bundle
APP_PACKAGES = ("client", "common", "server", "deploy")


def forget_site_code(root: str | None = None) -> list[str]:
    """Before the app bundle is loaded: drop every module of ``APP_PACKAGES`` this wrapper imported
    from the site's checkout (``client.pin`` itself, and what it pulled in), and the checkout from
    ``sys.path``, so ``client.app`` and all it imports come from the hash-checked bundle that flwr
    puts first on ``sys.path`` (issue 26 class 10: the ``client`` package stayed imported from the
    checkout, so a pinned site ran its own ``client/`` beside the bundle's ``common/``). Returns the
    module names dropped."""
    dropped = [n for n in list(sys.modules) if n.split(".", 1)[0] in APP_PACKAGES]
    for name in dropped:
        del sys.modules[name]
    root = root or str(Path(__file__).resolve().parents[1])
    sys.path[:] = [p for p in sys.path if not p or Path(p).resolve() != Path(root).resolve()]
    importlib.invalidate_caches()
    return dropped


def check_loaded_from(app_dir: str | os.PathLike[str]) -> None:
    """After the app bundle is loaded: every loaded module of ``APP_PACKAGES`` must be a file of
    ``app_dir`` (the installed bundle); one from anywhere else is refused, named."""
    where = Path(app_dir).resolve()
    for name, module in list(sys.modules.items()):
        if name.split(".", 1)[0] not in APP_PACKAGES:
            continue
        file = getattr(module, "__file__", None)
        if file is None and (paths := list(getattr(module, "__path__", []) or [])):
            file = paths[0]
        if file is None or not Path(file).resolve().is_relative_to(where):
            raise AppNotApproved(
                f"module {name} was loaded from {file}, not from the pinned app bundle at {where}: "
                "the code that runs must be the code the pin covers"
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
        forget_site_code()  # from here on, client/ and common/ come from the bundle just checked
        return message, context, run, fab

    def guarded_loader(*args: Any, **kwargs: Any) -> Any:
        load = original_loader(*args, **kwargs)

        def load_and_check(fab_id: str, fab_version: str, fab_hash: str) -> Any:
            from flwr.common.config import get_project_dir

            app = load(fab_id, fab_version, fab_hash)
            check_loaded_from(get_project_dir(fab_id, fab_version, fab_hash))
            return app

        return load_and_check

    original_loader = rc.get_load_client_app_fn
    rc.pull_task_input = guarded
    rc.get_load_client_app_fn = guarded_loader


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


def app_files(app: Path) -> dict[str, Path]:
    """The files ``flwr build`` / ``flwr run`` collect from ``app`` (``flwr.cli.utils.collect_files``)
    less those under a directory the app's ``.gitignore`` excludes, which flwr drops anyway: its walk
    enters them first, and a ``.venv`` inside a checkout is ~65,000 files, ~5 s of CPU per bundle.
    With a negated pattern (``!x``) in ``.gitignore`` nothing is skipped (a file under an ignored
    directory could be re-included). The bundle built from these is byte-identical."""
    from flwr.cli.utils import build_pathspec, load_gitignore_patterns

    root = Path(app).expanduser().resolve()
    ignore = root / ".gitignore"
    patterns = load_gitignore_patterns(ignore.read_bytes() if ignore.is_file() else b"")
    spec = None if any(p.lstrip().startswith("!") for p in patterns) else build_pathspec(patterns)
    files: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel = Path(dirpath).relative_to(root)
        if spec is not None:
            dirnames[:] = [d for d in dirnames if not spec.match_file(f"{(rel / d).as_posix()}/")]
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_symlink() or not path.resolve().is_relative_to(root):
                continue
            files[path.relative_to(root).as_posix()] = path
    return files


def bundle_paths(app: Path) -> list[str]:
    """The relative paths of ``app`` that end up in its bundle (pyproject.toml and .gitignore too,
    when present): a directory holding just these builds the same bundle."""
    import tomllib
    from flwr.cli.build import get_filtered_fab_paths
    from flwr.cli.utils import filter_paths_for_publish

    files = filter_paths_for_publish(app_files(app))
    config = tomllib.loads((Path(app) / "pyproject.toml").read_text(encoding="utf-8"))
    keep = [*get_filtered_fab_paths(files, config), "pyproject.toml", ".gitignore"]
    return sorted({p for p in keep if (Path(app) / p).is_file()})


def fab_sha256(path: Path) -> str:
    """SHA-256 of a built ``.fab`` file, or of the bundle ``flwr run`` builds from an app directory."""
    if path.is_dir():
        from flwr.cli.build import build_fab_from_files

        return hashlib.sha256(build_fab_from_files(app_files(path))[0]).hexdigest()
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
