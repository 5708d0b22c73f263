"""The run's verdict in one machine-readable line of its log stream.

Why: the operator's ``rpe fed run`` (``deploy/fed.py``) must exit non-zero when a site failed,
refused a delivery or was offline, or when the ServerApp failed; ``flwr run`` exits 0 for all of
them, and the run report lies in the registry, which may belong to another account (``--run-as``).
Every line the ServerApp prints reaches the operator through ``flwr log``, so the last one is
``[rpe] RPE-RUN-SUMMARY {json}``: :func:`summarize` of the run report.

``outcome``: ``ok`` (every site it asked did its part), ``site-failures`` (the run finished, a site
failed / refused / was offline), ``nothing-done`` (no site to work with), ``failed`` (the ServerApp
itself failed, e.g. the registry was locked by another run).
"""

from __future__ import annotations

import json
from typing import Any

MARKER = "RPE-RUN-SUMMARY"

#: per-site statuses that mean the site did its part (``skipped``: left out on purpose)
OK_STATUSES = frozenset({"accepted", "delivered", "skipped"})


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """The verdict of a run report (``server/app.py``'s ``report``), small enough for one line."""
    mode = str(report.get("mode", "?"))
    out: dict[str, Any] = {"run_id": str(report.get("run_id", "")), "mode": mode, "status": report.get("status")}
    sites: dict[str, str] = {}
    problems: dict[str, str] = {}
    if report.get("status") != "completed":
        out.update(outcome="failed", error=str(report.get("error") or "the ServerApp did not finish"))
        if report.get("operator_error"):
            out["operator_error"] = True
        return out
    if mode in ("enroll", "compose"):
        for site, res in sorted((report.get(mode) or {}).items()):
            sites[site] = str(res.get("status"))
            if sites[site] not in OK_STATUSES:
                problems[site] = f"{sites[site]}: {res.get('reason', '')}".strip(": ")
        done = any(status != "skipped" for status in sites.values())  # every site skipped: nothing was done
    elif mode == "evaluate":
        ev = report.get("evaluate") or {}
        problems = {str(k): str(v) for k, v in (ev.get("problems") or {}).items()}
        done = bool(ev.get("rows"))
    else:  # whoami: the online sites, and those whose identity was refused
        sites = {s: "online" for s in sorted(report.get("online") or {})}
        problems = {str(k): str(v) for k, v in (report.get("discovery_problems") or {}).items()}
        done = bool(sites)
    out["sites"] = sites
    if problems:
        out.update(outcome="site-failures", problems={k: v[:300] for k, v in problems.items()})
    elif not done:
        out.update(outcome="nothing-done", error=f"mode {mode}: no site was online or chosen")
    else:
        out["outcome"] = "ok"
    return out


def summary_line(report: dict[str, Any]) -> str:
    """``RPE-RUN-SUMMARY {json}`` (one line, no newlines inside)."""
    return f"{MARKER} {json.dumps(summarize(report), sort_keys=True, default=str)}"


def parse_summary(line: str) -> dict[str, Any] | None:
    """The verdict a log line carries, or None if it carries none."""
    at = line.find(MARKER + " ")
    if at < 0:
        return None
    try:
        out = json.loads(line[at + len(MARKER) + 1 :])
    except ValueError:
        return None
    return out if isinstance(out, dict) and "outcome" in out else None
