"""The coordinator's append-only, hash-chained audit log (one JSON line per event).

Why: hospitals must be able to check afterwards exactly what the coordinator received from them
and what it did with it (which adapters went into which composition, with which weights). The
log is a hash chain, so editing, deleting, inserting or reordering past entries is detectable by
``verify``; a *rewrite of the whole tail* or a truncation of the last entries is only detectable
against a head hash kept elsewhere (``head(path)`` gives it; pass it back as ``verify(path,
anchor=...)``), since the chain has no secret key.

Entry format (each line is the entry's canonical JSON — sorted keys, no whitespace, ASCII):

    {"seq": 1, "ts": "2025-11-25T13:01:02.123456Z", "event": "...", ...fields...,
     "prev": sha256 hex of the previous entry's canonical line (64 zeros for the first),
     "hash": sha256 hex of this entry's canonical JSON without the "hash" key}

``seq`` starts at 1 and equals the line number in an untouched log.

Event vocabulary (required fields are checked by ``append``; others are recommended; hashes are
lowercase sha256 hex; see ``common/trust/digests.py`` for ``z_sha256`` and ``record_digests``):

- ``submission.accepted`` — a site's train reply that entered the registry.
  Required: ``site``, ``record_id``, ``blob_sha256`` (sha256 of the canonical adapter blob),
  ``bytes`` (blob size), ``z_sha256``. Recommended: ``record_digests`` ({record name: digest},
  what the egress cross-check matches on), ``run_id``, ``nonce``, ``message_type`` ("train").
- ``submission.rejected`` — a reply that did not. Required: ``site``, ``reason``. Recommended:
  ``record_digests``, ``run_id``, ``nonce``, and whatever of ``blob_sha256``, ``bytes``,
  ``z_sha256`` could be computed (``record_id`` is null).
- ``query.embedding`` — a site's target embedding received for composition.
  Required: ``site``, ``z_sha256``. Recommended: ``target``, ``run_id``, ``record_digests``.
- ``composition`` — one composed adapter. Required: ``target``, ``strategy``, ``retrieved``
  (record ids, in weight order), ``distances`` (squared L2), ``weights``, ``adapter_sha256``
  (blob hashes of the retrieved adapters), ``output_sha256`` (hash of the composed blob).
  The four lists must have equal length. Recommended: ``params`` (e.g. {"lam1": ...}),
  ``z_sha256`` (target z), ``max_rank``, ``site`` (the receiving site).
- ``registry.add`` — Required: ``record_id``, ``blob_sha256``. Recommended: ``site``, ``bytes``,
  ``z_sha256``.
- ``registry.remove`` — Required: ``record_id``. Recommended: ``blob_sha256``, ``reason``.

Other event names are accepted unchecked, so new events need no change here.

Durability and concurrency (``common.files.durable.JsonlLog``): each ``append`` takes an exclusive
``flock`` on the file, reads the current last entry (so several processes can share one log and
the chain stays linear), writes one line with a single ``write``, then flushes and fsyncs (a
failed write is truncated back); creating the file also fsyncs its directory. A final line
without a newline (a crash mid-write) or a last entry that fails its own hash stops further
appends with ``AuditLogCorruptError`` instead of silently chaining onto damage. The one automatic
repair: the registry's writer, on open, cuts a torn final fragment (never a committed entry:
``append`` returns only after a whole line is fsynced, and a failed append cuts itself back) and
records the cut in a ``registry.repair`` entry (``repair_torn_audit``). A damaged *complete*
entry is left for the operator, who runs ``verify`` and repairs by hand.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from common.files.durable import JsonlLog, TornTailError
from common.trust.digests import canonical_json, is_sha256_hex, sha256_hex

GENESIS = "0" * 64
RESERVED_KEYS = frozenset({"seq", "ts", "event", "prev", "hash"})

EV_SUBMISSION_ACCEPTED = "submission.accepted"
EV_SUBMISSION_REJECTED = "submission.rejected"
EV_QUERY_EMBEDDING = "query.embedding"
EV_COMPOSITION = "composition"
EV_REGISTRY_ADD = "registry.add"
EV_REGISTRY_REMOVE = "registry.remove"

REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    EV_SUBMISSION_ACCEPTED: ("site", "record_id", "blob_sha256", "bytes", "z_sha256"),
    EV_SUBMISSION_REJECTED: ("site", "reason"),
    EV_QUERY_EMBEDDING: ("site", "z_sha256"),
    EV_COMPOSITION: (
        "target",
        "strategy",
        "retrieved",
        "distances",
        "weights",
        "adapter_sha256",
        "output_sha256",
    ),
    EV_REGISTRY_ADD: ("record_id", "blob_sha256"),
    EV_REGISTRY_REMOVE: ("record_id",),
}
EVENTS = tuple(REQUIRED_FIELDS)

# problem kinds reported by verify()
UNPARSEABLE = "unparseable"  # not a JSON object / missing or mistyped seq, ts, event, prev, hash
TORN_LINE = "torn_line"  # last line without its newline: a crash mid-append
NON_CANONICAL = "non_canonical"  # valid entry, but the line is not its canonical JSON (re-formatted)
BAD_HASH = "bad_hash"  # the entry's content does not match its own hash: edited
BROKEN_CHAIN = "broken_chain"  # prev is not the hash of the line before it
SEQ_GAP = "seq_gap"  # seq jumps ahead: entries missing before this line
SEQ_DUPLICATE = "seq_duplicate"  # seq already used by an earlier line: an inserted entry
SEQ_OUT_OF_ORDER = "seq_out_of_order"  # seq lower than an earlier one and not seen yet: reordered
ANCHOR_MISMATCH = "anchor_mismatch"  # the externally kept head (seq, line hash) is not in the log


class AuditError(Exception):
    """Base class of audit-log errors."""


class AuditLogCorruptError(AuditError):
    """The log's tail is damaged; appending would chain onto it, so we refuse."""


@dataclass(frozen=True)
class AuditProblem:
    """One failed check: ``line`` is 1-based, ``seq`` the entry's seq if readable."""

    line: int
    seq: int | None
    kind: str
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}" + (f" (seq {self.seq})" if self.seq is not None else "")
        return f"{where}: {self.kind}: {self.message}"


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def entry_hash(entry: dict[str, Any]) -> str:
    """sha256 of the entry's canonical JSON without its ``hash`` key."""
    body = {k: v for k, v in entry.items() if k != "hash"}
    return sha256_hex(canonical_json(body).encode("ascii"))


def line_hash(entry: dict[str, Any]) -> str:
    """sha256 of the entry's full canonical line (what the next entry's ``prev`` holds)."""
    return sha256_hex(canonical_json(entry).encode("ascii"))


def _check_fields(event: str, fields: dict[str, Any]) -> None:
    if not isinstance(event, str) or not event:
        raise ValueError(f"event must be a non-empty string; got {event!r}")
    clash = sorted(RESERVED_KEYS & set(fields))
    if clash:
        raise ValueError(f"fields {clash} are reserved by the audit log (seq, ts, event, prev, hash)")
    missing = [f for f in REQUIRED_FIELDS.get(event, ()) if f not in fields]
    if missing:
        raise ValueError(f"audit event {event!r} requires fields {list(missing)}; got {sorted(fields)}")
    if event == EV_COMPOSITION:
        lists = ("retrieved", "distances", "weights", "adapter_sha256")
        lengths = {name: len(fields[name]) for name in lists}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"composition lists must have equal lengths; got {lengths}")


def _read_tail(log: JsonlLog, fh: Any) -> bytes | None:
    """The last line of the log (without its newline), or None for an empty log.

    Raises AuditLogCorruptError if the file does not end with a newline (torn final write): the
    audit log never repairs itself, because cutting a line of evidence is the operator's call.
    """
    try:
        return log.last_line(fh)
    except TornTailError:
        raise AuditLogCorruptError(
            f"{fh.name}: the last line has no newline — an append was interrupted (torn write). "
            f"Run `rpe audit verify {fh.name}`, then remove or repair the partial last line by hand; "
            "nothing more is appended until then"
        ) from None


class AuditLog:
    """Append-only audit log at ``path`` (created, with its directory, if missing).

    Opening checks the tail (torn line, last entry's own hash) so a damaged log is reported at
    start-up rather than at the first event; every ``append`` checks it again under the lock.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.log = JsonlLog(self.path)
        with self.log.locked(shared=True) as fh:
            self._last(fh)

    def _last(self, fh: Any) -> tuple[int, str]:
        """(seq, line hash) of the last entry, or (0, GENESIS) for an empty log."""
        raw = _read_tail(self.log, fh)
        if raw is None:
            return 0, GENESIS
        hint = f"Run `rpe audit verify {self.path}` and repair the log before appending"
        try:
            entry = json.loads(raw)
        except json.JSONDecodeError as exc:
            msg = f"{self.path}: the last line is not valid JSON ({exc}). {hint}"
            raise AuditLogCorruptError(msg) from exc
        if not isinstance(entry, dict) or not isinstance(entry.get("seq"), int) or "hash" not in entry:
            raise AuditLogCorruptError(f"{self.path}: the last line is not an audit entry. {hint}")
        if entry_hash(entry) != entry["hash"]:
            raise AuditLogCorruptError(
                f"{self.path}: the last entry (seq {entry['seq']}) does not match its own hash. {hint}"
            )
        return int(entry["seq"]), line_hash(entry)

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one event and return the entry as written (with seq, ts, prev and hash).

        Field values must be JSON-serialisable (numpy scalars/arrays are converted; NaN and
        infinities are refused because JSON cannot represent them and canonical forms must
        round-trip). Durable on return: the line is fsynced.
        """
        _check_fields(event, fields)
        with self.log.locked() as fh:
            seq, prev = self._last(fh)
            entry: dict[str, Any] = {**fields, "seq": seq + 1, "ts": _now(), "event": event, "prev": prev}
            try:
                entry = json.loads(canonical_json(entry))  # normalise numpy values, tuples
            except ValueError as exc:
                raise ValueError(f"audit fields must be JSON without NaN/inf: {exc}") from exc
            except TypeError as exc:
                raise ValueError(f"audit fields must be JSON-serialisable: {exc}") from exc
            entry["hash"] = entry_hash(entry)
            self.log.append([canonical_json(entry).encode("ascii")], fh=fh)
        return entry

    def append_many(self, events: list[tuple[str, dict[str, Any]]], midway: Any = None) -> list[dict[str, Any]]:
        """Append several events, chained in order, with ONE write and ONE fsync (a registry batch
        commit, ``server/registry/batch.py``); every entry is checked before anything is written.
        ``midway``: the crash tests' hook (``JsonlLog.append``). Returns the entries as written."""
        for event, fields in events:
            _check_fields(event, fields)
        entries: list[dict[str, Any]] = []
        with self.log.locked() as fh:
            seq, prev = self._last(fh)
            lines = []
            for event, fields in events:
                seq += 1
                entry: dict[str, Any] = {**fields, "seq": seq, "ts": _now(), "event": event, "prev": prev}
                try:
                    entry = json.loads(canonical_json(entry))
                except (ValueError, TypeError) as exc:
                    raise ValueError(f"audit fields must be JSON without NaN/inf: {exc}") from exc
                entry["hash"] = entry_hash(entry)
                lines.append(canonical_json(entry).encode("ascii"))
                prev = sha256_hex(lines[-1])
                entries.append(entry)
            if lines:
                self.log.append(lines, fh=fh, midway=midway)
        return entries


def repair_torn_audit(path: str | os.PathLike[str]) -> tuple[int, int, str] | None:
    """Cut a torn last line (no newline: a crash or full disk mid-append) of the audit log at ``path``.

    Returns (bytes cut, offset, sha256 of the cut bytes) for the ``registry.repair`` entry the
    caller appends, or None when the log ends cleanly. Only the registry's writer calls this on
    open: the fragment is never a committed entry (``append`` returns after the fsync of a whole
    line, and a failed append cuts itself back), so nothing that was reported is lost.
    """
    p = Path(path)
    if not p.exists():
        return None
    log = JsonlLog(p, create=False)
    with log.locked() as fh:
        size = fh.seek(0, os.SEEK_END)
        if size == 0:
            return None
        fh.seek(max(0, size - (1 << 20)))
        tail = fh.read()
        if tail.endswith(b"\n"):
            return None
        cut = len(tail) - (tail.rfind(b"\n") + 1)
        if cut == len(tail) and size > len(tail):
            raise AuditLogCorruptError(f"{p}: the last line is over 1 MiB without a newline; repair it by hand")
        fh.seek(size - cut)
        frag = fh.read()
        log.repair(size - cut, fh)
    return cut, size - cut, sha256_hex(frag)


def receipt(private_key: Any, entry: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """A coordinator-signed ``receipt`` statement of the audit head right after ``entry`` was appended.

    The body names the entry (``seq``, ``line_sha256``: what ``head`` and ``verify(anchor=...)``
    use), the ``record_id``, ``site`` and ``run_id`` it accepted, plus ``fields`` (e.g.
    ``registry_id``). The site keeps it in its egress log; ``server.crosscheck`` later shows a
    coordinator log that was truncated before, or rewritten at, that entry
    (``common.trust.statements.check_receipts``).
    """
    from common.trust.statements import sign_statement

    body = {
        "seq": int(entry["seq"]),
        "line_sha256": line_hash(entry),
        "record_id": entry.get("record_id"),
        "site": entry.get("site"),
        "run_id": entry.get("run_id"),
        **fields,
    }
    return sign_statement(private_key, "receipt", body)


# --------------------------------------------------------------------------------------------
# reading and verification


def read_entries(path: str | os.PathLike[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, entry) for every parseable entry, skipping damaged lines.

    For reports and cross-checks, which should still work on a damaged log; run ``verify`` to
    learn what is damaged.
    """
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                entry = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(entry, dict) and "event" in entry:
                yield lineno, entry


def head(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The log's current head ``{"seq", "line_sha256"}`` (seq 0 and 64 zeros when empty).

    Keep it outside the coordinator (e-mail it to the sites, print it in a report) and pass it
    to ``verify(path, anchor=...)`` later: that also detects truncation and tail rewrites.
    """
    log = JsonlLog(path, create=False)
    with log.locked(shared=True) as fh:
        raw = _read_tail(log, fh)
    if raw is None:
        return {"seq": 0, "line_sha256": GENESIS}
    entry = json.loads(raw)
    return {"seq": int(entry["seq"]), "line_sha256": line_hash(entry)}


def _structurally_valid(entry: Any) -> str | None:
    if not isinstance(entry, dict):
        return "the line is not a JSON object"
    seq = entry.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool):
        return "seq is missing or not an integer"
    for key in ("ts", "event"):
        if not isinstance(entry.get(key), str):
            return f"{key} is missing or not a string"
    for key in ("prev", "hash"):
        if not is_sha256_hex(entry.get(key)):
            return f"{key} is missing or not a sha256 hex string"
    return None


def verify(path: str | os.PathLike[str], anchor: dict[str, Any] | None = None) -> list[AuditProblem]:
    """Check every entry; return the problems found (an empty list means the log is intact).

    Checks per line, each reported with its line number and seq:
    ``bad_hash`` (content edited: hash mismatch), ``broken_chain`` (prev ≠ hash of the line
    before), ``seq_gap`` (seq skips numbers: a deletion), ``seq_duplicate`` (seq repeats an
    earlier one: an insertion), ``seq_out_of_order`` (a seq that was skipped earlier shows up
    later: a reordering), plus ``unparseable``, ``torn_line`` and ``non_canonical``.

    Typical signatures, for an edit / delete / insert / swap at line j:
      edit:    bad_hash@j and broken_chain@j+1 (the next link no longer matches)
      delete:  broken_chain@j and seq_gap@j
      insert:  seq_duplicate@j+1 and broken_chain@j+1 (plus broken_chain@j if the forger did
               not know the previous hash)
      reorder: seq_gap@j, seq_out_of_order@j+1 and broken_chain at j, j+1, j+2
    A seq_duplicate always means an insertion (or a replayed copy of a genuine entry; a copy of
    a *later* entry also shows the gap/out-of-order pattern of the seqs it jumps over).
    ``anchor`` = ``head(path)`` from an earlier time: also reports ``anchor_mismatch`` when the
    entry with that seq is gone or differs (truncation, tail rewrite).
    """
    problems: list[AuditProblem] = []
    prev_hash = GENESIS
    seen: dict[int, int] = {}  # seq -> first line
    max_seq = 0
    anchor_found = False
    with open(path, "rb") as fh:
        data = fh.read()
    lines = data.split(b"\n")
    torn = lines[-1] != b""
    if not torn:
        lines = lines[:-1]
    for lineno, raw in enumerate(lines, start=1):
        is_last = lineno == len(lines)
        if torn and is_last:
            msg = "last line has no newline (interrupted append)"
            problems.append(AuditProblem(lineno, None, TORN_LINE, msg))
        try:
            entry = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            problems.append(AuditProblem(lineno, None, UNPARSEABLE, f"not valid JSON ({exc})"))
            prev_hash = sha256_hex(raw)
            continue
        why = _structurally_valid(entry)
        if why is not None:
            problems.append(AuditProblem(lineno, None, UNPARSEABLE, why))
            prev_hash = sha256_hex(raw)
            continue
        seq = int(entry["seq"])
        canon = canonical_json(entry)
        if raw != canon.encode("ascii"):
            problems.append(AuditProblem(lineno, seq, NON_CANONICAL, "line is not in canonical JSON form"))
        if entry_hash(entry) != entry["hash"]:
            msg = "content does not match the entry's hash (edited)"
            problems.append(AuditProblem(lineno, seq, BAD_HASH, msg))
        if entry["prev"] != prev_hash:
            what = "the genesis value" if lineno == 1 else f"the hash of line {lineno - 1}"
            problems.append(AuditProblem(lineno, seq, BROKEN_CHAIN, f"prev is not {what}"))
        expected = max_seq + 1
        if seq > expected:
            missing = f"seq {expected}" if seq == expected + 1 else f"seqs {expected}..{seq - 1}"
            problems.append(AuditProblem(lineno, seq, SEQ_GAP, f"expected seq {expected}: {missing} missing"))
        elif seq < expected:
            if seq in seen:
                problems.append(AuditProblem(lineno, seq, SEQ_DUPLICATE, f"seq {seq} already used at line {seen[seq]}"))
            else:
                problems.append(
                    AuditProblem(lineno, seq, SEQ_OUT_OF_ORDER, f"seq {seq} after seq {max_seq}: entries reordered")
                )
        seen.setdefault(seq, lineno)
        max_seq = max(max_seq, seq)
        prev_hash = sha256_hex(canon.encode("ascii"))
        if anchor is not None and seq == int(anchor["seq"]) and prev_hash == anchor["line_sha256"]:
            anchor_found = True
    if anchor is not None and int(anchor["seq"]) > 0 and not anchor_found:
        problems.append(
            AuditProblem(
                len(lines),
                int(anchor["seq"]),
                ANCHOR_MISMATCH,
                f"no entry with seq {anchor['seq']} and line hash {anchor['line_sha256'][:12]}… "
                "(log truncated or rewritten since the anchor was taken)",
            )
        )
    return problems


def problems_as_dicts(problems: list[AuditProblem]) -> list[dict[str, Any]]:
    """JSON-friendly form of ``verify`` output (for ``rpe audit verify --json``)."""
    return [asdict(p) for p in problems]
