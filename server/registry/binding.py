"""The records log bound into the audit chain: a record is live iff its audit entry exists.

Why: records.jsonl is the registry's source of truth, but it has no chain of its own, so a hand
edit (a z, a blob pointer, a deleted or added line) used to be served silently. Every audit entry
that writes record lines (``submission.accepted`` of a new record, ``registry.bulk_add``,
``registry.remove``) now carries ``records_span`` = [start, end) of the bytes it appended and
their ``records_span_sha256`` (and, for one line, ``line_sha256``: the exact line without its
newline). Two uses:

- ``unaudited_tail``: on a writable open, record bytes past the last audited span were appended
  but their audit entry never written (crash or ENOSPC between the two appends); they are cut
  (``rollback_unaudited``) and a ``registry.repair`` audit entry names what was dropped. Such a
  record was never reported stored: ``add`` returns only after the audit entry is durable.
- ``check_binding``: every audited span is found in records.jsonl with the same bytes, and every
  record line after the first audited one belongs to an audited span; otherwise the problem names
  the record and what changed (z, blob pointer, metadata, deleted, added).

Logs written before this binding existed carry no spans; their lines are not judged (the first
audited span marks where the binding starts).

Moving z out of records.jsonl into the z column (``facade.Registry._migrate``) rewrites every line.
It happens only after the old lines checked out against their audit entries, and its
``registry.migrate`` entry binds the whole rewritten file (``records_span`` = [0, size), its
sha256, count and first/last ids, like a bulk add); the binding restarts there. The entry is
written before the rewritten file is renamed into place, so a crash in between leaves an entry
whose bytes are not (yet) the file's: it is ignored and the next open migrates again.
"""

from __future__ import annotations

import binascii
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common.files.safeio import b64decode_strict
from common.trust.digests import sha256_hex
from server.zindex import ColumnError, ZColumn

RECORD_EVENTS = ("submission.accepted", "registry.bulk_add", "registry.remove", "registry.migrate")
MIGRATE = "registry.migrate"


def _writes_records(entry: dict[str, Any]) -> bool:
    ev = entry.get("event")
    if ev == "submission.accepted":
        return not entry.get("duplicate")
    if ev in ("registry.bulk_add", MIGRATE):
        return bool(entry.get("count"))
    return ev == "registry.remove"


def _reverse_lines(path: Path, chunk: int = 1 << 20) -> Iterator[bytes]:
    """The complete lines of ``path`` from the last to the first (a torn tail is skipped)."""
    with open(path, "rb") as fh:
        pos = fh.seek(0, os.SEEK_END)
        rest = b""
        first = True
        while pos > 0:
            step = min(chunk, pos)
            pos -= step
            fh.seek(pos)
            buf = fh.read(step) + rest
            parts = buf.split(b"\n")
            rest = parts[0]
            tail = parts[1:]
            if first:
                tail = tail[:-1]  # after the final newline: empty, or a torn line
                first = False
            yield from reversed(tail)
        if rest and not first:
            yield rest


def _migrated_file_is(records_path: Path | None, entry: dict[str, Any]) -> bool:
    """Whether records.jsonl starts with exactly the bytes a ``registry.migrate`` entry bound."""
    span = entry.get("records_span")
    if records_path is None or not records_path.exists() or not isinstance(span, list) or len(span) != 2:
        return False
    with open(records_path, "rb") as fh:
        return sha256_hex(fh.read(int(span[1]))) == entry.get("records_span_sha256")


def last_bound_end(audit_path: Path, records_path: Path | None = None) -> int | None:
    """End offset of the last audited records span; 0 when no entry wrote records; None for a log
    whose last record-writing entry predates the binding (nothing can be judged). A migrate entry
    whose rewritten file never replaced records.jsonl (a crash in between) does not count."""
    if not audit_path.exists():
        return 0
    for raw in _reverse_lines(audit_path):
        try:
            entry = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return None  # damage: audit verify reports it; never cut records on a guess
        if not isinstance(entry, dict) or not _writes_records(entry):
            continue
        if entry.get("event") == MIGRATE and not _migrated_file_is(records_path, entry):
            continue
        span = entry.get("records_span")
        if isinstance(span, list) and len(span) == 2 and all(isinstance(v, int) for v in span):
            return int(span[1])
        return None
    return 0


def unaudited_tail(records_path: Path, audit_path: Path) -> tuple[int, int] | None:
    """(audited end, file size) when records.jsonl holds bytes past the last audited span."""
    end = last_bound_end(audit_path, records_path)
    if end is None or not records_path.exists():
        return None
    size = records_path.stat().st_size
    return (end, size) if size > end else None


def dropped_ids(data: bytes) -> list[str]:
    """The ids of the record lines in ``data`` (for the repair entry)."""
    out = []
    for raw in data.split(b"\n"):
        try:
            entry = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(entry, dict) and isinstance(entry.get("id"), str):
            out.append(f"{entry.get('op')}:{entry['id']}")
    return out


def _z_sha(line: dict[str, Any]) -> str | None:
    try:
        return sha256_hex(b64decode_strict(str(line["z_b64"]).encode("ascii")))
    except (KeyError, binascii.Error, ValueError):
        return None


def _what_changed(audit: dict[str, Any], line: dict[str, Any]) -> str:
    if line.get("blob_sha256") != audit.get("blob_sha256"):
        return (
            f"re-pointed: its blob pointer is {str(line.get('blob_sha256'))[:16]}…, the audit entry recorded "
            f"{str(audit.get('blob_sha256'))[:16]}…"
        )
    inline_z_changed = "z_b64" in line and _z_sha(line) != audit.get("z_sha256")  # z in the line (pre-column)
    if audit.get("z_sha256") is not None and (inline_z_changed or line.get("z_sha256") != audit["z_sha256"]):
        return "z changed: its embedding no longer hashes to the z_sha256 the audit entry recorded"
    return "edited: its bytes differ from the line the audit entry recorded (metadata or timestamps)"


def check_binding(records_path: str | os.PathLike[str], audit_path: str | os.PathLike[str]) -> list[str]:
    """Problems between records.jsonl and the audit entries that bind it (empty list = consistent)."""
    records_path, audit_path = Path(records_path), Path(audit_path)
    if not audit_path.exists():
        return []
    data = records_path.read_bytes() if records_path.exists() else b""
    lines: list[tuple[int, bytes]] = []  # (offset, line without newline)
    pos = 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        if nl < 0:
            break
        lines.append((pos, data[pos:nl]))
        pos = nl + 1
    by_hash: dict[str, list[int]] = {}
    by_id: dict[Any, list[int]] = {}  # ids as the (untrusted) lines spell them
    parsed: list[dict[str, Any]] = []
    for i, (_, raw) in enumerate(lines):
        by_hash.setdefault(sha256_hex(raw), []).append(i)
        try:
            entry = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            entry = {}
        parsed.append(entry if isinstance(entry, dict) else {})
        if isinstance(parsed[-1].get("id"), str):
            by_id.setdefault(parsed[-1]["id"], []).append(i)
    covered: set[int] = set()
    problems: list[str] = []
    first_bound: int | None = None
    with open(audit_path, "rb") as fh:
        for raw in fh:
            try:
                e = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                continue
            if not isinstance(e, dict) or not _writes_records(e) or not isinstance(e.get("records_span"), list):
                continue
            if e.get("event") == MIGRATE:
                if sha256_hex(data[: int(e["records_span"][1])]) != e.get("records_span_sha256"):
                    continue  # its rewritten file never replaced records.jsonl
                covered.clear()  # every line was rewritten: the binding restarts at this entry
                problems.clear()
                first_bound = None
            start, end = e["records_span"]
            first_bound = start if first_bound is None else min(first_bound, start)
            seq = e.get("seq")
            if isinstance(e.get("line_sha256"), str):
                hit = [i for i in by_hash.get(e["line_sha256"], []) if i not in covered]
                if hit:
                    covered.add(hit[0])
                    continue
                rid = e.get("record_id")
                op = "remove" if e.get("event") == "registry.remove" else "add"
                cands = [i for i in by_id.get(rid, []) if i not in covered and parsed[i].get("op") == op]
                if not cands:
                    problems.append(f"record {rid}: its {op} line (audit seq {seq}) was deleted from records.jsonl")
                    continue
                covered.add(cands[0])
                what = _what_changed(e, parsed[cands[0]]) if op == "add" else "edited after it was audited"
                problems.append(f"record {rid} (records.jsonl line {cands[0] + 1}, audit seq {seq}): {what}")
                continue
            # a bulk add: its lines are contiguous; find them by their first id, wherever they now are
            n = int(e.get("count") or 0)
            first = [i for i in by_id.get(e.get("first_id"), []) if i not in covered]
            ok = False
            for i in first:
                block = lines[i : i + n]
                if len(block) == n and sha256_hex(b"".join(r + b"\n" for _, r in block)) == e.get(
                    "records_span_sha256"
                ):
                    covered.update(range(i, i + n))
                    ok = True
                    break
            if not ok:
                where = f"from line {first[0] + 1}" if first else "its first line is gone"
                problems.append(
                    f"bulk add of {n} records {e.get('first_id')}…{e.get('last_id')} (audit seq {seq}): "
                    f"the lines were edited, deleted or re-pointed ({where})"
                )
                if first:
                    covered.update(range(first[0], min(first[0] + n, len(lines))))
    problems += _column_problems(records_path, parsed)
    if first_bound is None:
        return problems
    for i, (off, _) in enumerate(lines):
        if off >= first_bound and i not in covered:
            rid = parsed[i].get("id", "?")
            problems.append(
                f"record {rid} (records.jsonl line {i + 1}, {parsed[i].get('op', '?')}): added outside "
                "the registry — no audit entry recorded it"
            )
    return problems


def _column_problems(records_path: Path, parsed: list[dict[str, Any]]) -> list[str]:
    """Add lines that name a z column row whose bytes no longer hash to the line's ``z_sha256``
    (the line itself, and so that hash, is bound by its audit entry: a z edited in ``z.f32`` shows here)."""
    named = [(i, e) for i, e in enumerate(parsed) if e.get("op") == "add" and isinstance(e.get("row"), int)]
    if not named:
        return []
    zpath = records_path.with_name("z.f32")
    try:
        col = ZColumn(zpath, read_only=True, check=False)
    except (OSError, ColumnError) as exc:
        return [f"the z column {zpath} cannot be read ({exc}); {len(named)} records name rows in it"]
    out = []
    try:
        for i, e in named:
            row = int(e["row"])
            if row >= len(col):
                out.append(
                    f"record {e.get('id')} (records.jsonl line {i + 1}): its z row {row} is past the end of "
                    f"the z column ({len(col)} rows)"
                )
            elif col.row_sha256(row) != e.get("z_sha256"):
                out.append(
                    f"record {e.get('id')} (records.jsonl line {i + 1}): z changed: its row {row} in the z "
                    "column does not match its z_sha256 (the hash its audit entry recorded)"
                )
    finally:
        col.close()
    return out
