"""The coordinator's Flower ServerApp: enrol sites, compose adapters for targets, evaluate.

A run is an ordinary Flower run with ``mode`` in the run config (every key and its default:
``pyproject.toml``, ``[tool.flwr.app.config]``; parsed once into ``server/settings.py``):

- ``enroll`` (``server/modes/enroll.py``): the chosen sites train a LoRA; each reply is
  validated, signature-checked and stored;
- ``compose`` (``server/modes/compose.py``): z of each target -> the k nearest adapters ->
  weights -> exact composition -> ``train.apply`` -> metrics;
- ``evaluate`` (``server/modes/evaluate.py``): leave-one-site-out over every strategy and baseline,
  tables and plots under ``<registry>/evaluations/`` (``server/reporting.py``);
- ``whoami``: only discover the online sites (a connectivity check).

Talking to sites (the resend protocol, discovery) is ``server/messaging.py``. Nothing is kept in
memory between runs: the registry directory holds everything, and each run leaves its report in
``<registry>/runs/<run id>-<mode>.json`` even when it fails. ``blob-key-file`` and registry
creation: ``server/bootstrap.py``.
"""

from __future__ import annotations

import os
import time
import traceback
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.allowlist import AllowList
from server.bootstrap import open_registry
from server.messaging import (
    IdentityRefused,
    SiteFailure,
    SiteInfo,
    discover,
    exchange,
    log,
    message_counts,
    run_log,
)
from server.modes.compose import embed_sites, run_compose
from server.modes.enroll import run_enroll
from server.modes.evaluate import run_evaluate
from server.registry.errors import RegistryLockedError
from server.registry.lock import set_holder
from server.reporting import write_evaluation, write_report
from server.run_summary import summary_line
from server.settings import MODES, REGISTRY_ENV, Settings

__all__ = [
    "MODES",
    "IdentityRefused",
    "Settings",
    "SiteFailure",
    "SiteInfo",
    "app",
    "discover",
    "embed_sites",
    "exchange",
    "main",
    "open_registry",
    "run_compose",
    "run_enroll",
    "run_evaluate",
    "write_evaluation",
    "write_report",
]


def allow_list(s: Settings) -> AllowList:
    """The site allow-list of this run (a missing file allows no one)."""
    return AllowList(s.allowlist)


HANDLERS = {"enroll": run_enroll, "compose": run_compose, "evaluate": run_evaluate}

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Dispatch on ``mode``; always leave a run report, and fail the run only on coordinator errors."""
    run_id = str(grid.run.run_id)
    report: dict[str, Any] = {
        "run_id": run_id,
        "mode": str(context.run_config.get("mode", "?")),
        "started_at": time.time(),
        "status": "running",
    }
    registry_dir = str(context.run_config.get("registry-dir") or os.environ.get(REGISTRY_ENV, ""))
    try:
        s = Settings.from_run_config(context.run_config)
        registry_dir = s.registry_dir
        report["settings"] = s.as_report()
        timings: dict[str, float] = {}
        report["timings"] = timings
        t0 = time.monotonic()
        set_holder(f"run {run_id} ({s.mode})", run_id)  # a second writer is told which run holds the registry
        registry = open_registry(s)
        # from here on every line is also in <registry>/runs/<run id>-<mode>.log (deploy/demo.py follows it)
        try:
            with run_log(Path(s.registry_dir).expanduser() / "runs" / f"{run_id}-{s.mode}.log"):
                timings["open_registry"] = round(time.monotonic() - t0, 3)
                t0 = time.monotonic()
                sites = discover(
                    grid, s.timeout_query, report, run_id, allow_list(s), s.require_signatures, registry.audit
                )
                timings["discover"] = round(time.monotonic() - t0, 3)
                if s.mode in HANDLERS:
                    t0 = time.monotonic()
                    HANDLERS[s.mode](grid, s, registry, sites, run_id, report)
                    timings[s.mode] = round(time.monotonic() - t0, 3)
        finally:
            registry.close()
        report["status"] = "completed"
    except RegistryLockedError as exc:  # an operator's situation, not a coordinator bug: one line
        report["status"] = "failed"
        report["error"] = str(exc)
        report["operator_error"] = True  # `rpe fed run` shows this line, not Flower's traceback after it
        log(f"run failed: {exc}")
        raise
    except Exception as exc:
        report["status"] = "failed"
        report["error"] = f"{type(exc).__name__}: {exc}"
        report["traceback"] = traceback.format_exc()
        log(f"run failed: {report['error']}")
        raise
    finally:
        report["finished_at"] = time.time()
        report["messages"] = message_counts()  # sent / resent / probes / unanswered (server/messaging.py)
        path = write_report(registry_dir, report)
        if path is not None:
            log(f"report: {path}")
        log(summary_line(report))  # the last line: what `rpe fed run` exits by (deploy/fed.py)
