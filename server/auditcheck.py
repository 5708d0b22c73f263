"""The registry-side checks every auditor's tool runs beside the hash chain, and what they flag.

Why one module: ``rpe audit verify``, ``rpe audit cross-check``, the console and the signed audit
report must give the same answer for the same registry (issue 26: the console called a registry
"intact" that ``verify`` had just failed). ``server.coordroot.verify_sources`` is the one function
they all call; it checks each family's hash chain and record binding, and this module adds:

- ``registry_problems``: what a read-only open and ``Registry.verify`` find — the open-time cache
  (``columns.snap``) compared with a full replay of ``records.jsonl``, a cache that exists but is not
  usable (edited or keyed for something else), missing or wrong-size blobs;
- ``composition_problems``: each ``composition`` entry against the records it names (every
  retrieved id must be a record of this registry whose blob hash is the one the entry gives; the
  four lists must have equal length) — a composition forged with a valid hash names adapters that
  never existed, or other blobs;
- ``line_flags`` / ``record_flags``: which audit lines and which records a page must flag because a
  problem concerns them (an edited entry, an entry after a chain break, a record named by a
  binding or cache problem), so no page shows a forged value as if it were checked.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from server.audit import BROKEN_CHAIN, EV_COMPOSITION, AuditProblem, read_entries
from server.registry.config import RECORDS_NAME

#: how ``Registry.verify`` starts the note of a blob no record references (left by an interrupted add)
ORPHAN_BLOB = "orphan blob "
#: problems looked at when flagging records (a registry with more problems is flagged as a whole)
MAX_FLAG_PROBLEMS = 1000


def registry_problems(registry_dir: Path) -> list[str]:
    """``Registry.verify()`` of a read-only open (cache vs replay, blobs, binding), plus a cache file
    the open would not use; an open that fails is itself the problem."""
    from server.registry import Registry

    try:
        reg = Registry(registry_dir, read_only=True)
    except Exception as exc:  # noqa: BLE001 - a registry that does not open is damage, named
        return [f"the registry cannot be opened read-only: {type(exc).__name__}: {exc}"]
    try:
        # an orphan blob is what an interrupted add leaves (gc removes it): no record changed, no finding
        out = [p for p in reg.verify() if not p.startswith(ORPHAN_BLOB)]
        out += _unused_snapshot(reg, registry_dir, out)
    except Exception as exc:  # noqa: BLE001 - reported, never a traceback for the auditor
        out = [f"the registry's own check failed: {type(exc).__name__}: {exc}"]
    finally:
        reg.close()
    return out


def _unused_snapshot(reg: Any, registry_dir: Path, found: list[str]) -> list[str]:
    """A ``columns.snap`` that is there but that a fresh open would not use: edited or damaged (the
    registry writes it atomically and only from a replay, so an honest one always loads)."""
    from server.registry import snapshot

    path = registry_dir / snapshot.SNAP_NAME
    if not path.exists() or any(snapshot.SNAP_NAME in p for p in found):
        return []
    try:
        from server.registry.columns import Columns
        from server.registry.recordlog import RecordLog

        rlog = reg._log  # noqa: SLF001 - the same probe ``snapshot.problems`` builds
        cols = Columns(rlog.cols.dim, str(rlog.path), rlog.cols.zcol)
        usable = snapshot.load(path, RecordLog(rlog.path, cols), cols)
    except Exception as exc:  # noqa: BLE001 - the cache could not even be tried: say so
        return [f"{snapshot.SNAP_NAME}: cannot be checked ({type(exc).__name__}: {exc})"]
    if usable:
        return []
    return [
        f"{snapshot.SNAP_NAME} (a cache: delete it and reopen the registry) is not usable: it does not "
        "match records.jsonl or fails its own check (edited, damaged or written for other records)"
    ]


def _record_blobs(records: Path | None) -> dict[str, set[str]]:
    """``{record id: every blob hash an add line gave it}`` read from records.jsonl (removed ones too:
    an old composition may name a record withdrawn since)."""
    out: dict[str, set[str]] = {}
    if records is None or not records.is_file():
        return out
    with open(records, "rb") as fh:
        for raw in fh:
            try:
                line = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                continue
            if isinstance(line, dict) and isinstance(line.get("id"), str) and isinstance(line.get("blob_sha256"), str):
                out.setdefault(line["id"], set()).add(line["blob_sha256"])
    return out


def composition_problems(log: Path, records: Path | None) -> list[tuple[int, str]]:
    """``(line, message)`` for each composition entry that the records do not bear out."""
    if not log.is_file():
        return []
    blobs = _record_blobs(records)
    out: list[tuple[int, str]] = []
    for line, e in read_entries(log):
        if e.get("event") != EV_COMPOSITION:
            continue
        where = f"line {line} (seq {e.get('seq')}): composition"
        lists = [e.get(k) for k in ("retrieved", "distances", "weights", "adapter_sha256")]
        if not all(isinstance(x, list) for x in lists) or len({len(x) for x in lists}) != 1:  # type: ignore[arg-type]
            out.append((line, f"{where}: its retrieved/distances/weights/adapter_sha256 lists differ in length"))
            continue
        if records is None:
            continue
        for rid, sha in zip(e["retrieved"], e["adapter_sha256"], strict=False):
            if not isinstance(rid, str) or rid not in blobs:
                out.append((line, f"{where}: retrieved adapter {rid!r} is no record of this registry (forged?)"))
            elif sha not in blobs[rid]:
                out.append((line, f"{where}: adapter {rid} has blob {str(sha)[:12]}… here, records.jsonl says another"))
    return out


def line_flags(problems: Iterable[AuditProblem], compositions: Iterable[tuple[int, str]]) -> dict[int, list[str]]:
    """``{audit line: why a page must flag it}``. An entry with a problem is flagged, so is the entry
    before a broken link (its successor no longer vouches for it), and every entry after the first
    chain problem (a chain that broke once cannot vouch for what follows); key 0 holds the first
    line from which on everything is unverified (absent when the chain is whole)."""
    flags: dict[int, list[str]] = {}
    first: int | None = None
    for p in problems:
        if p.line <= 0:
            continue
        flags.setdefault(p.line, []).append(f"{p.kind}: {p.message}")
        if p.kind == BROKEN_CHAIN and p.line > 1:
            flags.setdefault(p.line - 1, []).append(f"the next line's link to this entry is broken (line {p.line})")
            first = p.line - 1 if first is None else min(first, p.line - 1)
        else:
            first = p.line if first is None else min(first, p.line)
    for line, msg in compositions:
        flags.setdefault(line, []).append(msg)
    if first is not None:
        flags[0] = [str(first)]
    return flags


def line_flag(flags: dict[int, list[str]], line: int) -> list[str]:
    """Why the entry at ``line`` is not vouched for ([] when it is)."""
    out = list(flags.get(line, []))
    first = int(flags[0][0]) if 0 in flags else None
    if first is not None and line > first and not out:
        out.append(f"after the chain break at line {first}: this entry is not covered by a verified chain")
    return out


def record_flags(record_ids: Iterable[str], problems: list[str]) -> dict[str, list[str]]:
    """``{record id: the problems that name it}`` (every id of a registry with too many problems)."""
    ids = list(record_ids)
    if len(problems) > MAX_FLAG_PROBLEMS:
        return {i: [f"{len(problems)} registry problems: nothing in it is vouched for"] for i in ids}
    out: dict[str, list[str]] = {}
    for i in ids:
        hits = [p for p in problems if i in p]
        if hits:
            out[i] = hits
    return out


def records_path(registry_dir: Path | None) -> Path | None:
    """The registry's records.jsonl, or None where there is none."""
    if registry_dir is None:
        return None
    p = registry_dir / RECORDS_NAME
    return p if p.is_file() else None
