"""Flower runs: ``flwr run`` a config and follow it to its end, keeping the deployment's SuperExec
and SuperNodes alive meanwhile (flwr 1.41 lets them die on one HTTP 500 from the SuperLink).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import tomli_w

from deploy.launch.appdir import staged_app
from deploy.launch.coordinator import ensure_superexec
from deploy.launch.errors import LaunchError
from deploy.launch.flower_cli import CLI_PREFIX, flwr_cli, operator_flwr
from deploy.launch.processes import process_env
from deploy.launch.sites import ensure_supernodes
from deploy.launch.state import FEDERATION, STATE_FILE


def run_app(
    flwr_home: Path,
    app: Path,
    config: dict[str, Any],
    registry: Path,
    timeout: float,
    federation: str = FEDERATION,
    poll_s: float = 60.0,
) -> dict[str, Any]:
    """``flwr run <app> <federation> --run-config <toml>``, then wait until the run has finished.

    Returns ``{"run_id", "status", "details", "report"}``: ``status`` / ``details`` as ``flwr ls``
    says (e.g. ``finished:failed`` / "No heartbeat received from the task" when the SuperLink was
    restarted under the run), ``report`` the ServerApp's ``<registry>/runs/<run-id>-<mode>.json``
    (written when the ServerApp ends, also when it fails; one stopped with its SuperLink writes
    ``"status": "running"`` and the phases it finished under ``timings``).
    ``flwr ls`` is a whole CLI process (1-2 s of CPU): it is asked every ``poll_s`` and as soon as
    the report exists; SuperNodes and SuperExec that died are restarted (a PID check) every few
    seconds. Raises ``LaunchError`` if the run cannot be submitted or outlives ``timeout``.
    """
    cfg_file = Path(flwr_home) / f"run-{time.monotonic_ns()}.toml"
    cfg_file.write_text(tomli_w.dumps(config))
    with staged_app(app) as src:  # only the bundle's files: flwr walks the whole directory
        res = subprocess.run(
            [
                *CLI_PREFIX,
                *operator_flwr(),
                "run",
                str(src),
                federation,
                "--format",
                "json",
                "--run-config",
                str(cfg_file),
            ],
            capture_output=True,
            text=True,
            env=process_env(Path(flwr_home)),
            timeout=120,
        )
    start = res.stdout.find("{")
    try:
        out = json.loads(res.stdout[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        out = {}
    if not out.get("success"):
        raise LaunchError(f"flwr run failed (rc={res.returncode}): {res.stdout}{res.stderr}")
    run_id = out["run-id"]
    report_path = Path(registry) / "runs" / f"{run_id}-{config['mode']}.json"
    deadline = time.monotonic() + timeout
    last_ls = 0.0
    status, details = "?", ""
    workdir = Path(flwr_home).parent
    last_check = 0.0
    while True:
        if (workdir / STATE_FILE).exists() and time.monotonic() - last_check > 5.0:
            last_check = time.monotonic()
            ensure_superexec(workdir)
            ensure_supernodes(workdir)
        if report_path.exists() or time.monotonic() - last_ls > poll_s:
            last_ls = time.monotonic()
            try:
                ls = flwr_cli(["ls", federation, "--run-id", run_id], Path(flwr_home))
            except (LaunchError, subprocess.TimeoutExpired):  # SuperLink restarting, or machine overloaded: ask again
                ls = {}
            status = ls["runs"][0]["status"] if ls.get("runs") else "?"
            details = str(ls["runs"][0].get("status-details", "")) if ls.get("runs") else ""
            if status.startswith("finished"):
                break
        if time.monotonic() > deadline:
            raise LaunchError(f"run {run_id} still {status} after {timeout:.0f} s")
        time.sleep(0.5)
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    return {"run_id": run_id, "status": status, "details": details, "report": report}
