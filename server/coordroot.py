"""The coordinator's registry root: one registry per task family under it, walked by the auditor's tools.

Why: each task family keeps its own registry (own z dimension, own index, own audit chain): the
root directory the coordinator was started with, and a sub-directory per other family. An auditor
or operator points ``rpe audit verify / report / cross-check`` and ``rpe console`` at the root and
must get *every* family, never only the one whose files happen to sit at the top. The tools ask
this module which registries exist; none of them names a family.

Where the families come from: ``common.families.family_registry_dirs(root)`` (the family table
names each family's directory), plus every other directory at the root or one level below it that
holds a registry's file, named after its directory: a family the table does not know, or one whose
``registry.json`` is gone, is still checked (and its damage named), never skipped. No registry is
opened here: this reads directory entries only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.audit import AuditProblem, verify
from server.registry.config import AUDIT_NAME, CONFIG_NAME, RECORDS_NAME

#: the label of a registry found at the root when the family table cannot name it
ROOT_LABEL = "(root)"


def family_registries(root: str | os.PathLike[str]) -> dict[str, Path]:
    """``{family: registry directory}`` of every family present under the coordinator root ``root``.

    The root's own registry (if any) comes first, then the others by name. An empty dict means
    ``root`` holds no registry at all."""
    base = Path(root).expanduser()
    found = _from_family_table(base) or {}
    named = {_resolved(p) for p in found.values()}
    for label, d in _scan(base).items():  # a registry the table does not know is still shown
        if _resolved(d) not in named:
            found[label] = d
    ordered = sorted(found.items(), key=lambda kv: (_resolved(kv[1]) != _resolved(base), kv[0]))
    return dict(ordered)


def _resolved(p: Path) -> Path:
    try:
        return p.resolve()
    except OSError:
        return p


def _from_family_table(root: Path) -> dict[str, Path] | None:
    """The family table's answer, or None where the table (``common.families``) does not offer one."""
    try:
        from common import families
    except ImportError:
        return None
    finder = getattr(families, "family_registry_dirs", None)
    if finder is None:
        return None
    try:
        found = {str(name): Path(path) for name, path in finder(root).items()}
        own = _family_of_subdir(root.name)
    except Exception:  # noqa: BLE001 - a family that fails to load must not blind the auditor: scan instead
        return None
    if own is not None and own not in found:
        # ``root`` is a family's own directory (e.g. ``segmentation/`` copied on its own): the table,
        # which reads its argument as a coordinator root, took it for the root family's registry
        found = {own if _resolved(p) == _resolved(root) else name: p for name, p in found.items()}
    return found


def _family_of_subdir(dirname: str) -> str | None:
    """The family whose registry lives in ``<root>/<dirname>/`` (None for the root's family or none)."""
    from common.families import family_names, get_family

    for name in family_names():
        subdir = getattr(getattr(get_family(name), "registry", None), "subdir", "")
        if subdir and subdir == dirname:
            return name
    return None


#: the files that make a directory a registry: one of them left is enough to be checked (and a
#: registry that lost its registry.json or audit log is named as damaged, never skipped)
REGISTRY_FILES = (CONFIG_NAME, AUDIT_NAME, RECORDS_NAME)


def _is_registry(d: Path) -> bool:
    return any((d / name).is_file() for name in REGISTRY_FILES)


def _scan(root: Path) -> dict[str, Path]:
    """Every directory at or one level below ``root`` that holds a registry's file."""
    out: dict[str, Path] = {}
    if _is_registry(root):
        out[ROOT_LABEL] = root
    if root.is_dir():
        for sub in sorted(root.iterdir()):
            if sub.is_dir() and not sub.is_symlink() and _is_registry(sub):
                out[sub.name] = sub
    return out


def registry_id(registry_dir: Path) -> str | None:
    """The ``registry_id`` in ``registry.json`` (None when unreadable): what a receipt names."""
    try:
        value = json.loads((registry_dir / CONFIG_NAME).read_text(encoding="utf-8")).get("registry_id")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class AuditSource:
    """One audit log in an auditor's scope: its family (or its path, for a loose log) and registry."""

    family: str
    log: Path
    registry: Path | None

    @property
    def registry_id(self) -> str | None:
        return registry_id(self.registry) if self.registry is not None else None


def audit_sources(
    logs: Iterable[str | os.PathLike[str]] = (), registry: str | os.PathLike[str] | None = None
) -> list[AuditSource]:
    """Every audit log an auditor's command covers: each family's under the coordinator root, plus
    each log named explicitly.

    The root is ``registry`` if given, else the directory of the first log when it is a registry:
    naming the root's ``audit.jsonl`` covers every family, as naming the root does. A named log
    outside the root's registries is checked as it is (labelled by its path). Raises
    ``FileNotFoundError`` naming what is missing when a named log does not exist or the scope holds
    no audit log at all."""
    logs = [Path(p).expanduser() for p in logs]
    for p in logs:
        if not p.is_file():
            raise FileNotFoundError(f"audit log {p} does not exist (a registry's audit log is <registry>/{AUDIT_NAME})")
    root = Path(registry).expanduser() if registry is not None else None
    if root is None and logs and any((logs[0].parent / n).is_file() for n in (CONFIG_NAME, RECORDS_NAME)):
        root = logs[0].parent  # a loose log (no registry beside it) is only itself
    out: list[AuditSource] = []
    seen: set[Path] = set()
    if root is not None:
        if registry is not None and not root.is_dir():
            raise FileNotFoundError(f"registry root {root} is not a directory")
        for family, d in family_registries(root).items():
            log = d / AUDIT_NAME  # kept even when missing: verify names it
            out.append(AuditSource(family, log, d))
            seen.add(_resolved(log))
    for p in logs:
        if _resolved(p) not in seen:
            reg = p.parent if (p.parent / CONFIG_NAME).is_file() else None
            out.append(AuditSource(str(p), p, reg))
            seen.add(_resolved(p))
    if not out:
        raise FileNotFoundError(
            f"no audit log under {root}: point at the coordinator's registry root (the directory holding "
            f"{CONFIG_NAME} and {AUDIT_NAME}) or name a log"
        )
    return out


@dataclass
class FamilyVerdict:
    """``verify`` of one family's audit log and its records' binding to it."""

    family: str
    log: Path
    records: Path | None
    problems: list[AuditProblem] = field(default_factory=list)
    binding: list[str] = field(default_factory=list)
    anchored: bool = False
    #: what the registry's own check finds beyond the binding (the columns.snap cache, blobs)
    registry: list[str] = field(default_factory=list)
    #: composition entries the records do not bear out, as "line N (seq S): composition: ..."
    compositions: list[str] = field(default_factory=list)
    #: ``server.auditcheck.line_flags``: which audit lines a page must flag, and why
    flags: dict[int, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems and not self.binding and not self.registry and not self.compositions

    def all_problems(self) -> list[str]:
        """Every finding as one line of text (what the pages, cross-check and the report list)."""
        return (
            [str(p) for p in self.problems]
            + [f"{self.records}: {b}" for b in self.binding]
            + [f"registry: {r}" for r in self.registry]
            + list(self.compositions)
        )

    def to_dict(self) -> dict[str, Any]:
        from server.audit import problems_as_dicts

        return {
            "family": self.family,
            "log": str(self.log),
            "records": str(self.records) if self.records else None,
            "ok": self.ok,
            "problems": problems_as_dicts(self.problems),
            "binding": self.binding,
            "registry": self.registry,
            "compositions": self.compositions,
            "anchored": self.anchored,
        }


def verify_sources(
    sources: Iterable[AuditSource], anchors: Mapping[Path, dict[str, Any]] | None = None
) -> list[FamilyVerdict]:
    """THE check of every auditor's tool (``rpe audit verify``, ``rpe audit cross-check``, the console,
    the signed report): the hash chain of every log; where its registry holds ``records.jsonl``, the
    binding of every record to it (``server.registry.binding.check_binding``); the registry's own
    check of its open-time cache and blobs; and every composition against the records it names
    (``server.auditcheck``). ``anchors`` maps a log path to a known head of that log
    (``verify(anchor=...)``)."""
    from server.auditcheck import composition_problems, line_flags, registry_problems
    from server.registry.binding import check_binding

    out = []
    for s in sources:
        anchor = (anchors or {}).get(s.log)
        if anchor is None and anchors:
            anchor = next((a for p, a in anchors.items() if _resolved(Path(p)) == _resolved(s.log)), None)
        records = s.registry / RECORDS_NAME if s.registry is not None else None
        if records is not None and not records.is_file():
            records = None
        v = FamilyVerdict(s.family, s.log, records, anchored=anchor is not None)
        v.problems = missing(s)
        comps: list[tuple[int, str]] = []
        if s.log.is_file():
            v.problems += verify(s.log, anchor=anchor)
            v.binding = check_binding(records, s.log) if records is not None else []
            if s.registry is not None and (s.registry / CONFIG_NAME).is_file():
                v.registry = [p for p in registry_problems(s.registry) if p not in v.binding]
            comps = composition_problems(s.log, records)
            v.compositions = [m for _, m in comps]
        v.flags = line_flags(v.problems, comps)
        out.append(v)
    return out


#: the problem kind of a registry file that is gone (the audit log, registry.json)
MISSING = "missing"


def missing(source: AuditSource) -> list[AuditProblem]:
    """A family registry's audit log or ``registry.json`` that is not there: damage, named."""
    out = []
    if not source.log.is_file():
        out.append(AuditProblem(0, None, MISSING, f"{source.log} does not exist: the family's audit chain is gone"))
    elif source.log.stat().st_size == 0 and source.registry is not None:
        records = source.registry / RECORDS_NAME
        if records.is_file() and records.stat().st_size > 0:
            out.append(
                AuditProblem(
                    0, None, MISSING, f"{source.log} is empty while {records} holds records: the audit chain is gone"
                )
            )
    if source.registry is not None and not (source.registry / CONFIG_NAME).is_file():
        out.append(
            AuditProblem(0, None, MISSING, f"{source.registry / CONFIG_NAME} does not exist: not a complete registry")
        )
    return out
