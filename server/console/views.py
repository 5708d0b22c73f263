"""What the console shows, computed from the registry directories alone (no web code here).

Why a separate module: every number a page shows comes from a function here that takes the
families' registries (opened read-only) or their audit logs, so the browser test can compare the
page with the same functions' output and a reader can check each figure against the CLI (``rpe
registry ls``, ``rpe audit verify / report``, ``rpe privacy spent``) that uses the same library calls.

Every family: the console is pointed at the coordinator's registry root and shows each task
family's registry under it (``server.coordroot``), one :class:`FamilyView` each; every row says
which family it belongs to, and an evaluation's score is read from ``results.csv`` by the
family's metric name (``rouge_l``, ``dice``, …), never by a name written here.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.adapters.normalise import describe_record
from common.files.safeio import UnsafeInputError, loads_json
from common.privacy import spent_from_egress
from server.audit import EV_COMPOSITION, problems_as_dicts, read_entries, verify
from server.auditreport import report
from server.coordroot import AuditSource
from server.registry import AUDIT_NAME, Record, Registry

RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
EVAL_FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\.(png|svg|csv|md|json)$")
#: the longest egress line the console parses (a reply's line is a few kB; full records stay small)
MAX_EGRESS_LINE = 4 << 20
SORT_KEYS = ("id", "site", "task", "modality", "rank", "samples", "bytes", "created")


#: results.csv columns that are bookkeeping, not a score (``server.reporting.write_evaluation``)
EVAL_BOOKKEEPING = frozenset({"target", "method", "n", "sources", "weights", "min_distance", "metric", "score"})


class ConsoleInputError(ValueError):
    """A request the console cannot answer (unknown id, malformed upload): shown as a clear message."""


@dataclass
class FamilyView:
    """One task family's registry under the console's root, opened read-only (``registry`` None and
    ``error`` set when it cannot be opened: the pages then show why instead of hiding the family)."""

    name: str
    path: Path
    registry: Registry | None
    error: str | None = None

    @property
    def audit_path(self) -> Path:
        return self.path / AUDIT_NAME

    @property
    def records(self) -> list[Record]:
        return self.registry.list() if self.registry is not None else []

    def stats(self) -> dict[str, Any]:
        """``Registry.stats()``, or zeros for a family that did not open."""
        if self.registry is None:
            return {"records": 0, "removed": 0, "embedding_dim": None, "representation": None, "by": {}}
        return self.registry.stats()


def open_families(found: Mapping[str, Path], blob_key: Any = None) -> list[FamilyView]:
    """Each family's registry opened read-only (no lock, no Chroma, no write)."""
    out = []
    for name, path in found.items():
        log = Path(path) / AUDIT_NAME
        if not log.is_file():  # opening would start a new, empty chain there: the console writes nothing
            out.append(FamilyView(name, Path(path), None, f"{log} does not exist; the registry is not opened"))
            continue
        try:
            out.append(FamilyView(name, Path(path), Registry(path, read_only=True, blob_key=blob_key)))
        except Exception as exc:  # noqa: BLE001 - a damaged family is shown with its error, not hidden
            out.append(FamilyView(name, Path(path), None, f"{type(exc).__name__}: {exc}"))
    return out


def family(fams: Sequence[FamilyView], name: str | None) -> FamilyView:
    """The family called ``name`` (the first, the root's, when None or empty)."""
    if not name:
        return fams[0]
    for f in fams:
        if f.name == name:
            return f
    raise ConsoleInputError(f"no task family {name!r} here; families: {', '.join(f.name for f in fams)}")


def metric_title(column: str) -> str:
    """How a table heads a score column: the title of the family whose metric it is, else the name."""
    from common.families import family_names, get_family

    for name in family_names():
        try:
            fam = get_family(name)
        except Exception:  # noqa: BLE001,S112 - a family that cannot load names no metric
            continue
        if getattr(fam, "metric", None) == column:
            return str(getattr(fam, "metric_title", column) or column)
    return column


def family_metric(name: str) -> str | None:
    """The metric name the family table gives family ``name`` (None for a family it does not know)."""
    from common.families import get_family

    try:
        return str(get_family(name).metric)
    except Exception:  # noqa: BLE001 - unknown family: results.csv says it by its columns
        return None


def record_row(r: Record, family_name: str = "") -> dict[str, Any]:
    """The registry-page row of one record (the same columns as ``rpe registry ls``, plus its family)."""
    return {
        "family": family_name,
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
    fams: Sequence[FamilyView],
    site: str | None = None,
    task: str | None = None,
    text: str | None = None,
    sort: str = "created",
    descending: bool = False,
    family_name: str | None = None,
) -> list[dict[str, Any]]:
    """Live records of every family (or of ``family_name``) matching the filters, sorted by one
    column (unknown columns are refused)."""
    if sort not in SORT_KEYS:
        raise ConsoleInputError(f"cannot sort by {sort!r}; choose one of {', '.join(SORT_KEYS)}")
    chosen = [family(fams, family_name)] if family_name else list(fams)
    rows = [
        record_row(r, f.name)
        for f in chosen
        if f.registry is not None
        for r in f.registry.list(site=site or None, task=task or None)
    ]
    if text:
        needle = text.lower()
        rows = [r for r in rows if needle in r["id"].lower()]
    rows.sort(key=lambda r: (r[sort] is None, r[sort] if r[sort] is not None else 0), reverse=descending)
    return rows


def find_record(fams: Sequence[FamilyView], record_id: str, family_name: str | None = None) -> FamilyView:
    """The family holding live record ``record_id`` (only ``family_name``'s when given)."""
    for f in [family(fams, family_name)] if family_name else fams:
        if f.registry is not None and record_id in f.registry:
            return f
    raise ConsoleInputError(f"no live record {record_id!r} in this registry; pick one from the registry page")


def record_detail(fams: Sequence[FamilyView], record_id: str, family_name: str | None = None) -> dict[str, Any]:
    """One record's family, metadata, privacy settings, blob hash and z summary."""
    f = find_record(fams, record_id, family_name)
    reg = f.registry
    assert reg is not None  # find_record returns opened families only
    rec = reg.get(record_id)
    d = rec.to_dict()
    d["family"] = f.name
    d["z_norm"] = float(np.linalg.norm(rec.z))
    d["epsilon"] = epsilon_of(rec.meta.privacy)
    d["blob_path"] = str(reg.blob_path(record_id).relative_to(f.path))
    return d


def _blank_site(site: str) -> dict[str, Any]:
    return {
        "site": site,
        "adapters": 0,
        "families": {},
        "tasks": set(),
        "bases": set(),
        "last_contact": None,
        "accepted": 0,
        "rejected": 0,
    }


def sites(fams: Sequence[FamilyView]) -> list[dict[str, Any]]:
    """Per site, over every family: live adapters (in all, and per family), tasks, bases, and the
    last time the coordinator heard from it (any family's audit log)."""
    out: dict[str, dict[str, Any]] = {}
    for f in fams:
        for r in f.records:
            s = out.setdefault(r.meta.site, _blank_site(r.meta.site))
            s["adapters"] += 1
            s["families"][f.name] = s["families"].get(f.name, 0) + 1
            s["tasks"].add(r.meta.task)
            s["bases"].add(r.meta.base_fingerprint)
        if not f.audit_path.is_file():
            continue
        for _, e in read_entries(f.audit_path):
            site = e.get("site")
            if not isinstance(site, str):
                continue
            s = out.setdefault(site, _blank_site(site))
            s["families"].setdefault(f.name, 0)
            ts = e.get("ts")
            if isinstance(ts, str) and (s["last_contact"] is None or ts > s["last_contact"]):
                s["last_contact"] = ts
            if e.get("event") == "submission.accepted":
                s["accepted"] += 1
            elif e.get("event") == "submission.rejected":
                s["rejected"] += 1
    return [{**s, "tasks": sorted(s["tasks"]), "bases": sorted(s["bases"])} for _, s in sorted(out.items())]


def bases(fams: Sequence[FamilyView]) -> list[dict[str, Any]]:
    """Every family's base models: fingerprint, name, module count, live adapters on it."""
    out = []
    for f in fams:
        if f.registry is None:
            continue
        by_base = f.registry.stats()["by"].get("base", {})
        for fp, b in f.registry.bases.items():
            out.append(
                {
                    "family": f.name,
                    "fingerprint": fp,
                    "name": b.get("name"),
                    "modules": len(b.get("modules") or {}),
                    "adapters": by_base.get(fp, 0),
                }
            )
    return out


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


def audit_statuses(fams: Sequence[FamilyView], verdicts: Sequence[Any] | None = None) -> dict[str, Any]:
    """Every family's verdict (``families``), and over all of them: ok, entries, every chain problem
    with its family (``problems``: the table of lines and kinds) and every other finding — records
    not bound, the columns.snap cache, compositions the records do not bear out (``findings``).
    ``verdicts``: ``server.coordroot.verify_sources`` of the families (run here when not given) — the
    same check as ``rpe audit verify --registry ROOT``, so the two never disagree."""
    if verdicts is None:
        from server.coordroot import verify_sources

        verdicts = verify_sources([AuditSource(f.name, f.audit_path, f.path) for f in fams])
    per = []
    for f, v in zip(fams, verdicts, strict=True):
        entries = sum(1 for _ in read_entries(f.audit_path)) if f.audit_path.is_file() else 0
        problems = problems_as_dicts(v.problems)
        if not f.audit_path.is_file():
            problems = problems[:1]  # the log is gone: that is the news, not the registry.json beside it
        if f.error and f.audit_path.is_file():
            problems.append({"line": 0, "seq": None, "kind": "unreadable", "message": f.error})
        findings = [t for t in v.all_problems() if t not in {str(q) for q in v.problems}]
        ok = not problems and not findings
        per.append(
            {
                "family": f.name,
                "log": str(f.audit_path),
                "entries": entries,
                "problems": problems,
                "findings": findings,
                "ok": ok,
                "anchored": v.anchored,
            }
        )
    return {
        "ok": all(p["ok"] for p in per),
        "entries": sum(p["entries"] for p in per),
        "problems": [{**q, "family": p["family"]} for p in per for q in p["problems"]],
        "findings": [{"family": p["family"], "text": t} for p in per for t in p["findings"]],
        "families": per,
    }


def audit_report(audit_path: Path) -> dict[str, Any]:
    """``server.auditreport.report`` (the per-site report of ``rpe audit report``)."""
    return report(audit_path)


def audit_reports(fams: Sequence[FamilyView]) -> list[dict[str, Any]]:
    """``audit_report`` of every family's log that exists, each with its family."""
    return [{"family": f.name, **report(f.audit_path)} for f in fams if f.audit_path.is_file()]


def compositions(fams: Sequence[FamilyView]) -> list[dict[str, Any]]:
    """Every composition entry of every family's audit log, family by family in log order (a
    composition is named by its family and seq)."""
    out = []
    for f in fams:
        if not f.audit_path.is_file():
            continue
        for line, e in read_entries(f.audit_path):
            if e.get("event") != EV_COMPOSITION:
                continue
            ids = list(e.get("retrieved") or [])
            out.append(
                {
                    "family": f.name,
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
                    # the "nothing close enough" check (server/nearness.py); None in entries older than it
                    "nearness": e.get("nearness") if isinstance(e.get("nearness"), dict) else None,
                    # update-norm (common/adapters/normalise.py): mode, each adapter's norm and scale c_i
                    "update_norm": describe_record(e.get("normalisation"), len(ids)),
                }
            )
    return out


def composition(fams: Sequence[FamilyView], seq: int, family_name: str | None = None) -> dict[str, Any]:
    """The composition entry with this seq in family ``family_name``'s log (the root's when None)."""
    f = family(fams, family_name)
    for c in compositions([f]):
        if c["seq"] == seq:
            return c
    raise ConsoleInputError(
        f"the {f.name} audit log has no composition with seq {seq}; pick one from the compositions page"
    )


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
        try:  # bounded: a deep or huge line is a clear 400, never a RecursionError (issue 26 class 8)
            entry = loads_json(raw, "the line", max_bytes=MAX_EGRESS_LINE)
        except UnsafeInputError as exc:
            raise ConsoleInputError(
                f"{name}: line {n} is not JSON an egress log holds ({exc}); is this an rpe egress log?"
            ) from None
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


def recorded_privacy(fams: Sequence[FamilyView]) -> list[dict[str, Any]]:
    """Per site, the releases the coordinator recorded in every family: adapters in the registries and
    embedding queries.

    This is what the coordinator *received*; the site's own egress log (uploaded) is the complete
    account (it also counts metric replies, which carry no ε).
    """
    out: dict[str, dict[str, Any]] = {}

    def row(site: str) -> dict[str, Any]:
        return out.setdefault(
            site,
            {
                "site": site,
                "families": set(),
                "adapters": 0,
                "queries": 0,
                "releases": [],
                "max_epsilon": 0.0,
                "non_private": 0,
                "unrecorded": 0,
            },
        )

    for f in fams:
        for r in f.records:
            eps = epsilon_of(r.meta.privacy)
            s = row(r.meta.site)
            s["families"].add(f.name)
            s["adapters"] += 1
            s["releases"].append({"what": f"{f.name} adapter {r.id}", "ts": r.meta.created_at, "epsilon": eps})
        if f.audit_path.is_file():
            rep = report(f.audit_path)
            for site, items in rep.get("query_privacy", {}).items():
                s = row(site)
                s["families"].add(f.name)
                for p in items:
                    s["queries"] += 1
                    s["releases"].append({"what": f"{f.name} embedding query", "ts": None, "epsilon": epsilon_of(p)})
    for s in out.values():
        eps = [r["epsilon"] for r in s["releases"]]
        s["non_private"] = sum(1 for e in eps if e is not None and math.isinf(e))
        s["unrecorded"] = sum(1 for e in eps if e is None)
        finite = [e for e in eps if e is not None and not math.isinf(e)]
        s["max_epsilon"] = max(finite) if finite else None
        s["families"] = sorted(s["families"])
    return [out[k] for k in sorted(out)]


def _runs(f: FamilyView) -> list[Path]:
    base = f.path / "evaluations"
    if not base.is_dir():
        return []
    runs = [p for p in base.iterdir() if p.is_dir() and RUN_ID_RE.match(p.name) and (p / "results.csv").is_file()]
    return sorted(runs, key=lambda p: p.stat().st_mtime, reverse=True)


def evaluation_runs(fams: Sequence[FamilyView]) -> list[dict[str, str]]:
    """Every family's runs under ``<its registry>/evaluations/`` that hold a results.csv, newest first."""
    runs = [(p.stat().st_mtime, f.name, p.name) for f in fams for p in _runs(f)]
    return [{"family": name, "run_id": run} for _, name, run in sorted(runs, key=lambda r: -r[0])]


def _run_family(fams: Sequence[FamilyView], run_id: str, family_name: str | None) -> FamilyView:
    """The family whose evaluations hold ``run_id`` (only ``family_name``'s when given)."""
    if RUN_ID_RE.match(run_id):
        for f in [family(fams, family_name)] if family_name else fams:
            if run_id in {p.name for p in _runs(f)}:
                return f
    raise ConsoleInputError(f"no evaluation run {run_id!r} under evaluations/; pick one from the list")


def metric_columns(header: Sequence[str], family_name: str) -> list[str]:
    """The score column(s) of a results.csv: the family's metric when the file has it, else every
    column that is not bookkeeping (a family the table does not know still shows its score)."""
    metric = family_metric(family_name)
    if metric and metric in header:
        return [metric]
    return [c for c in header if c not in EVAL_BOOKKEEPING]


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def evaluation(fams: Sequence[FamilyView], run_id: str, family_name: str | None = None) -> dict[str, Any]:
    """One leave-one-site-out run: its family, the score read by its metric name, the results table
    (target × method), per-row details and the plot files."""
    f = _run_family(fams, run_id, family_name)
    d = f.path / "evaluations" / run_id
    with open(d / "results.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        header = list(reader.fieldnames or [])
    metrics = metric_columns(header, f.name)
    metric = metrics[0] if metrics else None
    targets = sorted({r["target"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    table = {(r["target"], r["method"]): _number(r.get(metric)) if metric else None for r in rows}
    means = {}
    for m in methods:
        vals = [table[(t, m)] for t in targets if table.get((t, m)) is not None]
        means[m] = float(np.mean(vals)) if vals else None
    plots = sorted(
        p.name for p in d.iterdir() if p.is_file() and p.suffix in (".png", ".svg") and EVAL_FILE_RE.match(p.name)
    )
    return {
        "family": f.name,
        "run_id": run_id,
        "metric": metric,
        "metric_title": metric_title(metric) if metric else "score",
        "metrics": [{"name": m, "title": metric_title(m)} for m in metrics],
        "rows": rows,
        "targets": targets,
        "methods": methods,
        "table": {f"{t}|{m}": v for (t, m), v in table.items()},
        "means": means,
        "plots": plots,
    }


def evaluation_file(fams: Sequence[FamilyView], run_id: str, name: str, family_name: str | None = None) -> Path:
    """The path of one file of an evaluation run, refusing anything outside that run's directory."""
    if not RUN_ID_RE.match(run_id) or not EVAL_FILE_RE.match(name):
        raise ConsoleInputError(f"no file {name!r} in evaluation {run_id!r}")
    try:
        f = _run_family(fams, run_id, family_name)
    except ConsoleInputError:
        raise ConsoleInputError(f"no file {name!r} in evaluation {run_id!r}") from None
    run_dir = f.path / "evaluations" / run_id
    p = (run_dir / name).resolve()
    if p.parent != run_dir.resolve() or not p.is_file():
        raise ConsoleInputError(f"no file {name!r} in evaluation {run_id!r}")
    return p
