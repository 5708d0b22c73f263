"""What the console says about the registries' integrity: the very check ``rpe audit verify`` runs.

Why: every page of the console shows values read from files the coordinator's operator can edit.
Issue 26 found it calling a registry "chain intact" after a record was edited, showing the forged
record and a forged composition without a word. So every page carries a banner computed by
``server.coordroot.verify_sources`` — the function the CLI runs (hash chain, anchor, records
bound, ``columns.snap`` against a replay, compositions against the records) — and every record
and composition a finding concerns is flagged where it is shown (``server.auditcheck``).

The result is cached per state of the files it reads (size and mtime of each family's audit log,
records, cache and config) and of the anchors the auditor entered, so a page render re-runs the
check only when something changed on disk; the check itself runs in a worker thread (the page
handlers are synchronous endpoints, which Starlette runs in its thread pool).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.auditcheck import line_flag, record_flags
from server.console.views import FamilyView
from server.coordroot import AuditSource, FamilyVerdict, verify_sources
from server.registry.config import AUDIT_NAME, CONFIG_NAME, RECORDS_NAME

#: files whose change invalidates the cached verdict
WATCHED = (AUDIT_NAME, RECORDS_NAME, CONFIG_NAME, "columns.snap", "z.f32")
#: findings the banner lists before it says "and N more"
BANNER_ITEMS = 6


@dataclass
class Integrity:
    """The verdicts of every family, and the flags pages attach to what they show."""

    verdicts: list[FamilyVerdict]
    anchors: dict[str, dict[str, Any]] = field(default_factory=dict)
    records: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # family -> id -> why

    @property
    def ok(self) -> bool:
        return all(v.ok for v in self.verdicts)

    def verdict(self, family: str) -> FamilyVerdict | None:
        return next((v for v in self.verdicts if v.family == family), None)

    def findings(self) -> list[dict[str, str]]:
        """Every finding with its family, in family order."""
        return [{"family": v.family, "text": t} for v in self.verdicts for t in v.all_problems()]

    def banner(self) -> dict[str, Any]:
        found = self.findings()
        return {
            "ok": self.ok,
            "count": len(found),
            "families": [v.family for v in self.verdicts if not v.ok],
            "items": found[:BANNER_ITEMS],
            "more": max(0, len(found) - BANNER_ITEMS),
            "anchored": sorted(self.anchors),
            "n_families": len(self.verdicts),
        }

    def line_flags(self, family: str, line: int) -> list[str]:
        """Why the audit entry at ``line`` of ``family``'s log is not vouched for ([] when it is)."""
        v = self.verdict(family)
        return line_flag(v.flags, line) if v is not None else []

    def record_flags(self, family: str, record_id: str) -> list[str]:
        return self.records.get(family, {}).get(record_id, [])


def _signature(fams: Sequence[FamilyView], anchors: Mapping[str, Any]) -> tuple[Any, ...]:
    out: list[Any] = [tuple(sorted((k, tuple(sorted(v.items()))) for k, v in anchors.items()))]
    for f in fams:
        for name in WATCHED:
            try:
                st = os.stat(f.path / name)
                out.append((str(f.path), name, st.st_size, st.st_mtime_ns, st.st_ino))
            except OSError:
                out.append((str(f.path), name, None))
    return tuple(out)


class IntegrityCache:
    """``compute`` once per state of the files; thread-safe (pages render in worker threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: tuple[Any, ...] | None = None
        self._value: Integrity | None = None

    def get(self, fams: Sequence[FamilyView], anchors: Mapping[str, dict[str, Any]]) -> Integrity:
        with self._lock:
            key = _signature(fams, anchors)
            if self._value is None or key != self._key:
                try:
                    value = compute(fams, anchors)
                except Exception as exc:  # noqa: BLE001 - a check that fails is itself a finding, never a 500
                    why = f"the integrity check itself failed ({type(exc).__name__}: {exc}); run rpe audit verify"
                    value = Integrity([FamilyVerdict(f.name, f.audit_path, None, registry=[why]) for f in fams])
                self._value, self._key = value, key
            return self._value


def compute(fams: Sequence[FamilyView], anchors: Mapping[str, dict[str, Any]]) -> Integrity:
    """``verify_sources`` over every family (``anchors``: {family: known head}), and record flags."""
    sources = [AuditSource(f.name, f.audit_path, f.path) for f in fams]
    by_log: dict[Path, dict[str, Any]] = {f.audit_path: anchors[f.name] for f in fams if f.name in anchors}
    verdicts = verify_sources(sources, by_log)
    out = Integrity(verdicts, dict(anchors))
    for f, v in zip(fams, verdicts, strict=True):
        named = list(v.binding) + list(v.registry)
        if f.registry is not None and named:
            out.records[f.name] = record_flags(f.registry.ids(), named)
    return out


def parse_anchor(text: str) -> dict[str, Any]:
    """``SEQ:LINE_SHA256`` (what ``rpe audit verify`` prints as a head, and a receipt names)."""
    seq, sep, digest = text.strip().partition(":")
    digest = digest.strip().lower()
    if not sep or not seq.strip().isdigit() or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError(
            f"anchor {text[:80]!r}: expected SEQ:LINE_SHA256 (a seq number, a colon, 64 hex digits), as the audit "
            "page shows a head"
        )
    return {"seq": int(seq), "line_sha256": digest}
