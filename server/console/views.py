"""What the console shows, computed from the registry directory alone (no web code here).

Why a separate module: every number a page shows comes from a function here that takes the
registry (opened read-only) or the audit log path, so the browser test can compare the page with
the same functions' output and a reader can check each figure against the CLI (``rpe registry
ls``, ``rpe audit verify / report``, ``rpe privacy spent``) that uses the same library calls.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from common.privacy import spent_from_egress
from server.audit import EV_COMPOSITION, problems_as_dicts, read_entries, report, verify
from server.registry import Record, Registry

RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
EVAL_FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\.(png|svg|csv|md|json)$")
SORT_KEYS = ("id", "site", "task", "modality", "rank", "samples", "bytes", "created")


class ConsoleInputError(ValueError):
    """A request the console cannot answer (unknown id, malformed upload): shown as a clear message."""


def record_row(r: Record) -> dict[str, Any]:
    """The registry-page row of one record (the same columns as ``rpe registry ls``)."""
    return {
        "id": r.id,
        "site": r.meta.site,
        "task": r.meta.task,
        "modality": r.meta.modality,
        "rank": r.meta.rank,
        "samples": r.meta.sample_count,
        "bytes": r.bytes,
        "created": r.meta.created_at,
        "epsilon": epsilon_of(r.meta.privacy),
    }


def epsilon_of(privacy: Any) -> float | None:
    """Total ε a release recorded (``common.privacy.release_record``), ``inf`` if not private, None if unknown."""
    if isinstance(privacy, str):
        if privacy == "none":
            return math.inf
        try:
            privacy = json.loads(privacy)
        except ValueError:
            return None
    if not isinstance(privacy, Mapping):
        return None
    total = privacy.get("epsilon_total")
    if isinstance(total, (int, float)) and not isinstance(total, bool):
        return float(total)
    return math.inf  # no total: some part of the release was not private


def records(
    reg: Registry,
    site: str | None = None,
    task: str | None = None,
    text: str | None = None,
    sort: str = "created",
    descending: bool = False,
) -> list[dict[str, Any]]:
    """Live records matching the filters, sorted by one column (unknown columns are refused)."""
    if sort not in SORT_KEYS:
        raise ConsoleInputError(f"cannot sort by {sort!r}; choose one of {', '.join(SORT_KEYS)}")
    rows = [record_row(r) for r in reg.list(site=site or None, task=task or None)]
    if text:
        needle = text.lower()
        rows = [r for r in rows if needle in r["id"].lower()]
    rows.sort(key=lambda r: (r[sort] is None, r[sort] if r[sort] is not None else 0), reverse=descending)
    return rows


def record_detail(reg: Registry, record_id: str) -> dict[str, Any]:
    """One record's metadata, privacy settings, blob hash and z summary."""
    if record_id not in reg:
        raise ConsoleInputError(f"no live record {record_id!r} in this registry; pick one from the registry page")
    rec = reg.get(record_id)
    d = rec.to_dict()
    d["z_norm"] = float(np.linalg.norm(rec.z))
    d["epsilon"] = epsilon_of(rec.meta.privacy)
    d["blob_path"] = str(reg.blob_path(record_id).relative_to(reg.path))
    return d


def sites(reg: Registry, audit_path: Path) -> list[dict[str, Any]]:
    """Per site: live adapters, tasks, bases, and the last time the coordinator heard from it."""
    out: dict[str, dict[str, Any]] = {}
    for r in reg.list():
        s = out.setdefault(
            r.meta.site,
            {
                "site": r.meta.site,
                "adapters": 0,
                "tasks": set(),
                "bases": set(),
                "last_contact": None,
                "accepted": 0,
                "rejected": 0,
            },
        )
        s["adapters"] += 1
        s["tasks"].add(r.meta.task)
        s["bases"].add(r.meta.base_fingerprint)
    if audit_path.is_file():
        for _, e in read_entries(audit_path):
            site = e.get("site")
            if not isinstance(site, str):
                continue
            s = out.setdefault(
                site,
                {
                    "site": site,
                    "adapters": 0,
                    "tasks": set(),
                    "bases": set(),
                    "last_contact": None,
                    "accepted": 0,
                    "rejected": 0,
                },
            )
            ts = e.get("ts")
            if isinstance(ts, str) and (s["last_contact"] is None or ts > s["last_contact"]):
                s["last_contact"] = ts
            if e.get("event") == "submission.accepted":
                s["accepted"] += 1
            elif e.get("event") == "submission.rejected":
                s["rejected"] += 1
    return [{**s, "tasks": sorted(s["tasks"]), "bases": sorted(s["bases"])} for _, s in sorted(out.items())]


def disk_bytes(root: Path) -> int:
    """Bytes on disk under the registry directory (records, blobs, index, audit log)."""
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def audit_status(audit_path: Path) -> dict[str, Any]:
    """The verify result: ok, and every problem with its exact line, seq and kind."""
    if not audit_path.is_file():
        return {
            "ok": False,
            "entries": 0,
            "problems": [{"line": 0, "seq": None, "kind": "missing", "message": f"{audit_path.name} does not exist"}],
        }
    problems = problems_as_dicts(verify(audit_path))
    entries = sum(1 for _ in read_entries(audit_path))
    return {"ok": not problems, "entries": entries, "problems": problems}


def audit_report(audit_path: Path) -> dict[str, Any]:
    """``server.audit.report`` (the per-site report of ``rpe audit report``)."""
    return report(audit_path)


def compositions(audit_path: Path) -> list[dict[str, Any]]:
    """Every composition entry of the audit log, in log order (seq is the key the pages link by)."""
    out = []
    for line, e in read_entries(audit_path):
        if e.get("event") != EV_COMPOSITION:
            continue
        ids = list(e.get("retrieved") or [])
        out.append(
            {
                "seq": e.get("seq"),
                "line": line,
                "ts": e.get("ts"),
                "target": e.get("target"),
                "site": e.get("site"),
                "strategy": e.get("strategy"),
                "params": e.get("params"),
                "retrieved": ids,
                "distances": list(e.get("distances") or []),
                "weights": list(e.get("weights") or []),
                "adapter_sha256": list(e.get("adapter_sha256") or []),
                "output_sha256": e.get("output_sha256"),
                "max_rank": e.get("max_rank"),
                "z_sha256": e.get("z_sha256"),
                "run_id": e.get("run_id"),
            }
        )
    return out


def composition(audit_path: Path, seq: int) -> dict[str, Any]:
    """The composition entry with this seq (``ConsoleInputError`` if there is none)."""
    for c in compositions(audit_path):
        if c["seq"] == seq:
            return c
    raise ConsoleInputError(f"the audit log has no composition with seq {seq}; pick one from the compositions page")


def parse_egress(data: bytes, name: str) -> list[dict[str, Any]]:
    """An uploaded egress log's lines, refusing anything that is not one: a clear reason, never a partial parse."""
    if not data.strip():
        raise ConsoleInputError(f"{name}: the file is empty; upload the site's <site-dir>/egress.jsonl")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConsoleInputError(f"{name}: not UTF-8 text (byte {exc.start}); upload the site's egress.jsonl") from None
    lines = []
    for n, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            entry = json.loads(raw)
        except ValueError as exc:
            raise ConsoleInputError(f"{name}: line {n} is not JSON ({exc.msg}); is this an rpe egress log?") from None
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("records"), list)
            or not isinstance(entry.get("message_type"), str)
        ):
            raise ConsoleInputError(
                f"{name}: line {n} is not an egress entry (needs 'message_type' and a "
                "'records' list); upload the site's egress.jsonl, not another log"
            )
        lines.append(entry)
    return lines


def spent(lines: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """``common.privacy.spent_from_egress`` as plain values for a page."""
    s = spent_from_egress(lines)
    return {
        "releases": s.releases,
        "epsilon": s.epsilon,
        "delta": s.delta,
        "non_private": s.non_private,
        "summary": s.summary(),
    }


def recorded_privacy(reg: Registry, audit_path: Path) -> list[dict[str, Any]]:
    """Per site, the releases the coordinator recorded: adapters in the registry and embedding queries.

    This is what the coordinator *received*; the site's own egress log (uploaded) is the complete
    account (it also counts metric replies, which carry no ε).
    """
    out: dict[str, dict[str, Any]] = {}

    def row(site: str) -> dict[str, Any]:
        return out.setdefault(
            site,
            {
                "site": site,
                "adapters": 0,
                "queries": 0,
                "releases": [],
                "max_epsilon": 0.0,
                "non_private": 0,
                "unrecorded": 0,
            },
        )

    for r in reg.list():
        eps = epsilon_of(r.meta.privacy)
        s = row(r.meta.site)
        s["adapters"] += 1
        s["releases"].append({"what": f"adapter {r.id}", "ts": r.meta.created_at, "epsilon": eps})
    if audit_path.is_file():
        rep = report(audit_path)
        for site, items in rep.get("query_privacy", {}).items():
            s = row(site)
            for p in items:
                s["queries"] += 1
                s["releases"].append({"what": "embedding query", "ts": None, "epsilon": epsilon_of(p)})
    for s in out.values():
        eps = [r["epsilon"] for r in s["releases"]]
        s["non_private"] = sum(1 for e in eps if e is not None and math.isinf(e))
        s["unrecorded"] = sum(1 for e in eps if e is None)
        finite = [e for e in eps if e is not None and not math.isinf(e)]
        s["max_epsilon"] = max(finite) if finite else None
    return [out[k] for k in sorted(out)]


def evaluation_runs(root: Path) -> list[str]:
    """Run ids under ``<registry>/evaluations/`` that hold a results.csv, newest first."""
    base = root / "evaluations"
    if not base.is_dir():
        return []
    runs = [p for p in base.iterdir() if p.is_dir() and RUN_ID_RE.match(p.name) and (p / "results.csv").is_file()]
    return [p.name for p in sorted(runs, key=lambda p: p.stat().st_mtime, reverse=True)]


def evaluation(root: Path, run_id: str) -> dict[str, Any]:
    """One leave-one-site-out run: the results table (target × method), per-row details and the plot files."""
    if not RUN_ID_RE.match(run_id) or run_id not in evaluation_runs(root):
        raise ConsoleInputError(f"no evaluation run {run_id!r} under evaluations/; pick one from the list")
    d = root / "evaluations" / run_id
    with open(d / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    targets = sorted({r["target"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    table = {(r["target"], r["method"]): (float(r["rouge_l"]) if r.get("rouge_l") else None) for r in rows}
    means = {}
    for m in methods:
        vals = [table[(t, m)] for t in targets if table.get((t, m)) is not None]
        means[m] = float(np.mean(vals)) if vals else None
    plots = sorted(
        p.name for p in d.iterdir() if p.is_file() and p.suffix in (".png", ".svg") and EVAL_FILE_RE.match(p.name)
    )
    return {
        "run_id": run_id,
        "rows": rows,
        "targets": targets,
        "methods": methods,
        "table": {f"{t}|{m}": v for (t, m), v in table.items()},
        "means": means,
        "plots": plots,
    }


def evaluation_file(root: Path, run_id: str, name: str) -> Path:
    """The path of one file of an evaluation run, refusing anything outside that run's directory."""
    if not RUN_ID_RE.match(run_id) or not EVAL_FILE_RE.match(name):
        raise ConsoleInputError(f"no file {name!r} in evaluation {run_id!r}")
    p = (root / "evaluations" / run_id / name).resolve()
    if p.parent != (root / "evaluations" / run_id).resolve() or not p.is_file():
        raise ConsoleInputError(f"no file {name!r} in evaluation {run_id!r}")
    return p
