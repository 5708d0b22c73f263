"""``rpe fed run | stop | ls``: Flower runs a script can use, through the coordinator's operator socket.

``rpe fed run MODE [KEY=VALUE ...] [--dir D]`` checks every KEY against ``[tool.flwr.app.config]``
of the app it runs (an unknown key is named with its closest match) and its VALUE against the
default's type, submits the run (``flwr run --format json``), streams its log (``flwr log
--stream``) and exits by the verdict the ServerApp prints as its last log line
(``server/run_summary.py``; the operator need not read the registry, which may be another account's):

- 0: every site asked did its part;
- 1: the run finished, but a site failed, refused, was offline, or nothing was done;
- 2: bad usage or run config (nothing submitted);
- 3: the run itself failed (ServerApp exception, locked registry, lost SuperLink);
- 130: interrupted (Ctrl-C / SIGTERM): the run was stopped with ``flwr stop RUN_ID``.

``FLWR_HOME`` is ``D/flwr-home`` with ``--dir D`` (the coordinator directory, the
``deploy.launch`` workdir), else ``$FLWR_HOME``.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

import tomli_w

from common.adapters.normalise import UpdateNormError, check_update_norm
from common.cli_base import CliError
from server.nearness import FarRatioError, check_far_ratio

#: the repository root: its pyproject.toml is the Flower app ``rpe fed run`` submits by default
APP_DIR = Path(__file__).resolve().parents[1]
#: the run's modes (server/settings.py MODES; not imported: that pulls the coordinator's code)
MODES = ("enroll", "compose", "evaluate", "whoami")

#: flwr 1.41: a stopped run's ServerApp learns it at its next heartbeat (HEARTBEAT_DEFAULT_INTERVAL)
HEARTBEAT_S = 30

EXIT_OK, EXIT_SITES, EXIT_USAGE, EXIT_RUN, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def app_config(app: Path) -> dict[str, Any]:
    """``[tool.flwr.app.config]`` of ``app``'s pyproject.toml: every run-config key and its default."""
    path = Path(app) / "pyproject.toml"
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise CliError(f"--app {app}: cannot read {path} ({exc}); expected a Flower app directory") from None
    config = data.get("tool", {}).get("flwr", {}).get("app", {}).get("config")
    if not isinstance(config, dict):
        raise CliError(f"--app {app}: {path} has no [tool.flwr.app.config] table; expected a Flower app")
    return config


def _convert(key: str, text: str, default: Any) -> Any:
    """``text`` as the type of ``default`` (bool, int, float or str), or a CliError naming ``key``."""
    if isinstance(default, bool):
        low = text.strip().lower()
        if low in ("true", "yes", "1", "on"):
            return True
        if low in ("false", "no", "0", "off"):
            return False
        raise CliError(f"{key}={text}: expected true or false")
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            raise CliError(f"{key}={text}: expected an integer (default {default})") from None
    if isinstance(default, float):
        try:
            return float(text)
        except ValueError:
            raise CliError(f"{key}={text}: expected a number (default {default})") from None
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]  # mode='compose' as flwr's own --run-config writes it
    return text


def run_config(mode: str, items: list[str], app: Path) -> dict[str, Any]:
    """The run config of ``rpe fed run MODE KEY=VALUE ...``, checked against ``app``'s keys."""
    if mode not in MODES:
        close = difflib.get_close_matches(mode, MODES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise CliError(f"unknown mode {mode!r}{hint}; expected one of {', '.join(MODES)}")
    known = app_config(app)
    config: dict[str, Any] = {"mode": mode}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise CliError(f"{item!r}: expected KEY=VALUE (e.g. sites=a,b or k=3)")
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise CliError(f"unknown run-config key {key!r}{hint} (the keys: [tool.flwr.app.config] of {app})")
        if key == "mode":
            raise CliError(f"{item!r}: the mode is the first argument (rpe fed run {mode} ...), not a key")
        config[key] = _convert(key, value, known[key])
        if key == "update-norm":  # a value the ServerApp would refuse is refused here, before any run starts
            try:
                config[key] = check_update_norm(config[key])
            except UpdateNormError as exc:
                raise CliError(str(exc)) from None
        if key == "far-ratio":  # likewise: NaN, inf or a negative threshold (server/nearness.py)
            try:
                config[key] = check_far_ratio(config[key])
            except FarRatioError as exc:
                raise CliError(str(exc)) from None
        if key in _ENUMERATED:  # a value outside its list would fail the run (or every site) later
            config[key] = _ENUMERATED[key](key, config[key])
    return config


def _one_of(key: str, value: str, allowed: list[str], what: str) -> str:
    """``value`` if it is one of ``allowed``, else a CliError naming the key, the value, its closest
    match and the allowed values (as an unknown key is named)."""
    if value in allowed:
        return value
    close = difflib.get_close_matches(value, allowed, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise CliError(f"{key}={value!r} is not a known {what}{hint} (expected one of: {', '.join(allowed)})")


def _strategy_names() -> list[str]:
    from server.strategies import STRATEGIES  # lazy: numpy, only when a strategy is named

    return list(STRATEGIES)


def _check_strategy(key: str, value: Any) -> str:
    """``strategy``: one weighting strategy (``lin_l1`` is accepted as ``lin-l1``, as the ServerApp does)."""
    return _one_of(key, str(value).strip().replace("_", "-"), _strategy_names(), "weighting strategy")


def _check_strategies(key: str, value: Any) -> str:
    """``eval-strategies``: a comma-separated list of weighting strategies, each checked."""
    names = [part.strip() for part in str(value).split(",") if part.strip()]
    return ",".join(_check_strategy(key, name) for name in names)


def _check_chroma(key: str, value: Any) -> str:
    """``chroma``: ``embedded``, ``off`` or the ``HOST:PORT`` of a ``chroma run`` server (anything else
    was taken as ``embedded`` by the ServerApp: a typo such as ``of`` went unnoticed)."""
    text = str(value).strip()
    if text in ("embedded", "off"):
        return text
    host, sep, port = text.rpartition(":")
    if sep and host and port.isdigit() and 0 < int(port) < 65536:
        return text
    close = difflib.get_close_matches(text, ["embedded", "off"], n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise CliError(
        f"{key}={text!r} is not a Chroma setting{hint} (expected one of: embedded, off, or HOST:PORT of a "
        "`chroma run` server, e.g. 127.0.0.1:8000)"
    )


#: run-config keys whose value is one of a known list: checked before any run is submitted. Not
#: ``task``: a family added with $RPE_FAMILIES need only be known where the ServerApp runs, which
#: refuses an unknown one at once (exit 3, naming the known families)
_ENUMERATED = {
    "strategy": _check_strategy,
    "eval-strategies": _check_strategies,
    "chroma": _check_chroma,
}


def flwr_home(directory: Path | None) -> Path:
    """``D/flwr-home`` with ``--dir D``, else ``$FLWR_HOME``; its config.toml must exist."""
    if directory is not None:
        home = Path(directory) / "flwr-home"
        origin = f"--dir {directory}"
    elif os.environ.get("FLWR_HOME"):
        home = Path(os.environ["FLWR_HOME"])
        origin = "$FLWR_HOME"
    else:
        raise CliError("no coordinator: pass --dir D (the directory of `rpe coordinator init`) or set $FLWR_HOME")
    if not (home / "config.toml").is_file():
        raise CliError(
            f"{origin}: {home / 'config.toml'} does not exist; expected a coordinator directory whose "
            "SuperLink was started (rpe coordinator start / python -m deploy.launch superlink)"
        )
    return home.resolve()


def federation(home: Path) -> str:
    """The SuperLink connection name: launch-state.json's ``federation`` beside FLWR_HOME, else config.toml's default."""
    state = home.parent / "launch-state.json"
    try:
        name = json.loads(state.read_text()).get("federation")
        if name:
            return str(name)
    except (OSError, ValueError):
        pass
    try:
        return str(tomllib.loads((home / "config.toml").read_text())["superlink"]["default"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "rpe"


def _flwr(home: Path) -> tuple[list[str], dict[str, str]]:
    from deploy.launch.flower_cli import CLI_PREFIX, operator_flwr  # lazy: `rpe --help` stays instant
    from deploy.launch.processes import process_env

    return [*CLI_PREFIX, *operator_flwr()], process_env(home)


def _json_out(text: str) -> dict[str, Any]:
    start = text.find("{")
    try:
        out = json.loads(text[start:]) if start >= 0 else {}
    except ValueError:
        out = {}
    return out if isinstance(out, dict) else {}


def submit(home: Path, fed: str, app: Path, config: dict[str, Any]) -> str:
    """``flwr run APP FED --format json --run-config FILE``; the run id (LaunchError-free: CliError/RunError)."""
    prefix, env = _flwr(home)
    with tempfile.NamedTemporaryFile("w", suffix=".toml", dir=home, prefix="run-config-", delete=False) as fh:
        fh.write(tomli_w.dumps(config))
    try:
        from deploy.launch.appdir import staged_app  # only the bundle's files: flwr walks the whole directory

        with staged_app(app) as src:
            res = subprocess.run(
                [*prefix, "run", str(src), fed, "--format", "json", "--run-config", fh.name],
                capture_output=True,
                text=True,
                env=env,
                timeout=300,
            )
    finally:
        Path(fh.name).unlink(missing_ok=True)
    out = _json_out(res.stdout)
    if not out.get("success") or not out.get("run-id"):
        why = out.get("error-message") or (res.stderr.strip().splitlines() or [res.stdout.strip()])[-1]
        raise RunError(f"flwr run was refused: {why}")
    return str(out["run-id"])


class RunError(Exception):
    """The run could not be submitted or followed (exit 3)."""


def run_status(home: Path, fed: str, run_id: str) -> tuple[str, str]:
    """(status, details) of ``run_id`` as ``flwr ls`` says, ("?", why) if it cannot say."""
    prefix, env = _flwr(home)
    try:
        res = subprocess.run(
            [*prefix, "ls", fed, "--run-id", run_id, "--format", "json"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
    except subprocess.TimeoutExpired:
        return "?", "flwr ls did not answer in 60 s"
    out = _json_out(res.stdout)
    runs = out.get("runs") or []
    if not runs:
        return "?", str(out.get("error-message") or res.stderr.strip()[-300:] or "flwr ls printed nothing")
    return str(runs[0].get("status", "?")), str(runs[0].get("status-details", ""))


def stop_run(home: Path, fed: str, run_id: str) -> tuple[bool, str]:
    """``flwr stop RUN_ID FED``: (stopped, message)."""
    prefix, env = _flwr(home)
    res = subprocess.run(
        [*prefix, "stop", run_id, fed, "--format", "json"], capture_output=True, text=True, env=env, timeout=120
    )
    out = _json_out(res.stdout)
    if out.get("success"):
        return True, (
            f"run {run_id} stopped (its ServerApp ends at its next heartbeat, within {HEARTBEAT_S} s; until then "
            "it still holds the registry)"
        )
    return False, f"run {run_id} not stopped: {out.get('error-message') or res.stderr.strip()[-300:] or res.stdout}"


def exit_code(summary: dict[str, Any] | None, status: str, details: str = "", run_id: str = "?") -> tuple[int, str]:
    """The exit code and its one-line reason, from the run's own verdict (else ``flwr ls``'s status)."""
    if summary is not None:
        outcome = summary.get("outcome")
        rid, mode = summary.get("run_id", "?"), summary.get("mode", "?")
        if outcome == "ok":
            return EXIT_OK, f"run {rid} ({mode}): every site ok {sorted(summary.get('sites') or [])}"
        if outcome == "site-failures":
            problems = "; ".join(f"{k}: {v}" for k, v in sorted((summary.get("problems") or {}).items()))
            return EXIT_SITES, f"run {rid} ({mode}) finished with site failures: {problems}"
        if outcome == "nothing-done":
            return EXIT_SITES, f"run {rid} ({mode}) did nothing: {summary.get('error', '')}"
        return EXIT_RUN, f"run {rid} ({mode}) failed: {summary.get('error', '?')}"
    why = f": {details}" if details else ""
    if status == "finished:stopped":
        return EXIT_RUN, f"run {run_id} was stopped before it finished (rpe fed stop / flwr stop){why}"
    if status.startswith("finished:"):
        return EXIT_RUN, f"run {run_id} ended {status.split(':', 1)[1]} without a verdict line{why}"
    return EXIT_RUN, f"lost run {run_id} (status {status}{why}); is the SuperLink running?"


def follow(home: Path, fed: str, run_id: str, echo: Any = print) -> dict[str, Any] | None:
    """Stream the run's log (``flwr log RUN_ID FED --stream``) until it ends; the verdict line's content."""
    from server.run_summary import parse_summary  # lazy: small, but keeps `rpe --help` instant

    prefix, env = _flwr(home)
    proc = subprocess.Popen(
        [*prefix, "log", run_id, fed, "--stream"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    summary: dict[str, Any] | None = None
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            found = parse_summary(line)
            if found is not None:
                summary = found
                continue
            if summary is not None and summary.get("operator_error"):
                continue  # Flower's traceback of a situation the verdict already named in one line
            echo(line.rstrip("\n"))
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
    return summary


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def cmd_run(args: argparse.Namespace) -> None:
    app = Path(args.app).resolve()
    config = run_config(args.mode, args.assignments, app)
    home = flwr_home(args.dir)
    fed = federation(home)
    try:
        run_id = submit(home, fed, app, config)
    except RunError as exc:
        print(f"rpe: error: {exc}", file=sys.stderr)
        sys.exit(EXIT_RUN)
    except KeyboardInterrupt:
        print("rpe: interrupted while submitting; see `rpe fed ls` for a run that started anyway", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    print(f"[rpe fed] run {run_id} submitted ({args.mode}); Ctrl-C stops it (or: rpe fed stop {run_id})", flush=True)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        summary = follow(home, fed, run_id, echo=lambda line: print(line, flush=True))
        status, details = ("?", "") if summary is not None else run_status(home, fed, run_id)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the stop must not be interrupted in its turn
        stopped, message = stop_run(home, fed, run_id)
        if not stopped:
            status, _ = run_status(home, fed, run_id)
            message = (
                f"run {run_id} had already finished ({status})"
                if status.startswith("finished")
                else f"{message}; stop it: rpe fed stop {run_id}"
            )
        print(f"rpe: interrupted: {message}", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    finally:
        signal.signal(signal.SIGTERM, previous)
    code, message = exit_code(summary, status, details, run_id)
    print(("[rpe fed] " if code == 0 else "rpe: error: ") + message, file=sys.stdout if code == 0 else sys.stderr)
    sys.exit(code)


def cmd_stop(args: argparse.Namespace) -> None:
    home = flwr_home(args.dir)
    stopped, message = stop_run(home, federation(home), str(args.run_id))
    print(message if stopped else f"rpe: error: {message}", file=sys.stdout if stopped else sys.stderr)
    sys.exit(0 if stopped else 1)


def cmd_ls(args: argparse.Namespace) -> None:
    home = flwr_home(args.dir)
    prefix, env = _flwr(home)
    extra = ["--run-id", str(args.run_id)] if args.run_id else []
    if args.json:
        extra += ["--format", "json"]
    if not sys.stdout.isatty():
        # rich cuts a table to $COLUMNS (80 when piped or inherited narrow): status would be cut
        cols = env.get("COLUMNS", "")
        env["COLUMNS"] = str(max(200, int(cols) if cols.isdigit() else 0))
    res = subprocess.run([*prefix, "ls", federation(home), *extra], env=env, timeout=120)
    sys.exit(0 if res.returncode == 0 else 1)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``fed run | stop | ls`` to the ``rpe`` sub-commands."""
    fed = subparsers.add_parser(
        "fed",
        help="Flower runs on the coordinator: run a mode, stop a run, list runs",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = fed.add_subparsers(dest="fed_command", required=True, metavar="COMMAND")

    def dir_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--dir",
            type=Path,
            default=None,
            help="the coordinator directory (FLWR_HOME = DIR/flwr-home); default: $FLWR_HOME",
        )

    r = sub.add_parser(
        "run",
        help="run a mode and exit by its verdict (0 ok, 1 a site failed, 2 bad config, 3 run failed, 130 stopped)",
        description="Submit a run of MODE with the run-config KEY=VALUE pairs (keys: [tool.flwr.app.config] "
        "of the app), stream its log, exit by the ServerApp's verdict. Ctrl-C stops the run.",
        epilog="exit: 0 every site ok; 1 the run finished but a site failed/refused/was offline or nothing was "
        "done; 2 bad usage or run config; 3 the run failed (ServerApp exception, locked registry, lost SuperLink); "
        "130 interrupted (the run was stopped). Example: rpe fed run compose target=c k=2 --dir /srv/rpe/coord",
    )
    r.add_argument("mode", help=f"one of {', '.join(MODES)}")
    r.add_argument("assignments", nargs="*", metavar="KEY=VALUE", help="run-config values, e.g. sites=a,b steps=20")
    dir_arg(r)
    r.add_argument("--app", default=str(APP_DIR), help="the Flower app directory (default: this project)")
    r.set_defaults(func=cmd_run)
    s = sub.add_parser("stop", help="stop a run (flwr stop)")
    s.add_argument("run_id")
    dir_arg(s)
    s.set_defaults(func=cmd_stop)
    ls = sub.add_parser("ls", help="list runs and their status (flwr ls)")
    ls.add_argument("--run-id", default=None, help="only this run")
    ls.add_argument("--json", action="store_true", help="flwr's JSON (run-id, status, ...) instead of a table")
    dir_arg(ls)
    ls.set_defaults(func=cmd_ls)
