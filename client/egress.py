"""The site's egress log: one JSON line for every reply that leaves the hospital.

Why: a hospital's privacy officer must be able to see, without trusting the coordinator, what
data left the site — which arrays (shapes, sizes, hashes), which configuration and metric
values — and later prove that the coordinator's audit log describes the same messages
(``server/crosscheck.py`` matches the two). Array *contents* are never logged, only their
hashes; the log itself is therefore safe to share with the coordinator's operators.

Line format (one JSON object per line, keys sorted, fsynced before ``record`` returns)::

    {"v": 1,
     "ts": "2025-11-25T13:01:02.123456Z",        # UTC
     "message_type": "train",                    # the Flower message type answered
     "run_id": "run-7" | null,
     "total_bytes": 1234567,                     # sum of the records' bytes
     "extra": {...} | null,                      # caller's context, e.g. blob_sha256, z_sha256, nonce
     "records": [
       {"name": "adapter", "kind": "arrays", "sha256": <record_digest>, "bytes": N,
        "items": [{"key": "...", "dtype": "float32", "shape": [8, 64], "bytes": 2048,
                   "sha256": <sha256 of the C-contiguous little-endian bytes>}, ...]},
       {"name": "metadata", "kind": "config", "sha256": ..., "bytes": N,
        "items": [{"key": "task", "type": "str", "bytes": 10, "value": "report-gen"}, ...]},
       {"name": "metrics", "kind": "metrics", ...,
        "items": [{"key": "loss", "type": "float", "bytes": 8, "value": 1.25}]}]}

``records[*].sha256`` is ``common.digests.record_digest`` of the record exactly as sent — the
coordinator recomputes it from what it received (``record_digests``) and logs it in its
``submission.*`` audit events, which is what the cross-check compares. Record order follows the
caller's dict; items are sorted by key.

Scalar values: numbers and booleans are always logged (non-finite floats as the strings "nan",
"inf", "-inf"); strings are logged in full when at most ``MAX_LOGGED_STR`` characters long or
when the record's name is in ``full_records`` (default: the ``metadata`` record, which is small
and non-private by design), otherwise as ``{"len", "sha256"}``; bytes values always as
``{"len", "sha256"}``; lists in full when short (≤ ``MAX_LOGGED_LIST`` loggable elements).
``bytes`` counts are ``array.nbytes`` for arrays and ``common.digests.scalar_nbytes`` otherwise.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from common.digests import (
    RECORD_KINDS,
    canonical_json,
    describe_value,
    record_digest,
    record_kind,
    scalar_nbytes,
    sha256_hex,
    to_numpy,
)

EGRESS_FORMAT_VERSION = 1
MAX_LOGGED_STR = 200
MAX_LOGGED_LIST = 64
DEFAULT_FULL_RECORDS = frozenset({"metadata"})


def _loggable_scalar(value: Any, full: bool) -> tuple[bool, Any]:
    """(True, JSON value) if the value may be logged verbatim, else (False, None)."""
    if isinstance(value, bool) or (hasattr(value, "dtype") and getattr(value.dtype, "kind", "") == "b"):
        return True, bool(value)
    if isinstance(value, int) or (hasattr(value, "dtype") and getattr(value.dtype, "kind", "") in "iu"):
        return True, int(value)
    if isinstance(value, float) or (hasattr(value, "dtype") and getattr(value.dtype, "kind", "") == "f"):
        x = float(value)
        return True, (x if math.isfinite(x) else str(x))
    if isinstance(value, str):
        return (full or len(value) <= MAX_LOGGED_STR), value
    if isinstance(value, (list, tuple)):
        if not full and len(value) > MAX_LOGGED_LIST:
            return False, None
        out = []
        for v in value:
            ok, j = _loggable_scalar(v, full)
            if not ok:
                return False, None
            out.append(j)
        return True, out
    return False, None  # bytes and anything else: hash only


def _content_sha256(value: Any, desc: dict[str, Any]) -> str:
    """Hash logged in place of a value too long (or too binary) to log: sha256 of the UTF-8 text
    for strings, of the raw bytes for bytes, of the canonical typed JSON for lists."""
    if isinstance(value, str):
        return sha256_hex(value.encode("utf-8"))
    if isinstance(value, (bytes, bytearray, memoryview)):
        return sha256_hex(bytes(value))
    return sha256_hex(canonical_json(desc["v"]).encode("ascii"))


def describe_record(name: str, record: Mapping[str, Any], kind: str | None = None,
                    full: bool = False) -> dict[str, Any]:
    """The egress-log entry of one record (see the module docstring); pure, writes nothing."""
    if not isinstance(record, Mapping):
        raise TypeError(f"record {name!r} must be a mapping of key -> value; got {type(record).__name__}")
    kind = kind or record_kind(name, record)
    if kind not in RECORD_KINDS:
        raise ValueError(f"record {name!r}: kind must be one of {RECORD_KINDS}; got {kind!r}")
    items = []
    total = 0
    for key in sorted(record):
        value = record[key]
        desc = describe_value(key, value)  # validates key type and value type
        arr = to_numpy(value)
        if arr is not None:
            item = {k: desc[k] for k in ("key", "dtype", "shape", "sha256")}
            item["bytes"] = int(arr.nbytes)
        else:
            item = {"key": key, "type": desc["type"], "bytes": scalar_nbytes(value)}
            ok, logged = _loggable_scalar(value, full)
            if ok:
                item["value"] = logged
            else:
                item["len"] = len(value)
                item["sha256"] = _content_sha256(value, desc)
        total += item["bytes"]
        items.append(item)
    return {"name": name, "kind": kind, "sha256": record_digest(record), "bytes": total, "items": items}


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class EgressLog:
    """Append-only JSON-lines log of outgoing replies at ``path`` (created if missing).

    Appends hold an exclusive ``flock`` (Flower may run ClientApps in several processes) and are
    fsynced, so a reply is never sent without its line being on disk when ``record`` is called
    before the reply is returned.
    """

    def __init__(
        self, path: str | os.PathLike[str], full_records: Iterable[str] = DEFAULT_FULL_RECORDS
    ) -> None:
        self.path = Path(path)
        self.full_records = frozenset(full_records)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def record(
        self,
        message_type: str,
        records: Mapping[str, Mapping[str, Any]],
        run_id: str | None = None,
        extra: Mapping[str, Any] | None = None,
        kinds: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """Log one outgoing reply and return the line written (as a dict).

        ``records``: {record name: record} where a record is a Flower ArrayRecord /
        ConfigRecord / MetricRecord or a plain dict of arrays or of scalars. ``kinds`` overrides
        the inferred kind per record name (it is only a label; digests do not depend on it).
        ``extra``: small JSON-able context worth keeping next to the reply, e.g. ``blob_sha256``,
        ``z_sha256``, ``nonce``, ``signature`` (the cross-check falls back to blob/z hashes here
        when the coordinator logged no record digests).
        """
        if not isinstance(message_type, str) or not message_type:
            raise ValueError(f"message_type must be a non-empty string; got {message_type!r}")
        if not isinstance(records, Mapping):
            raise TypeError(f"records must be a mapping of name -> record; got {type(records).__name__}")
        kinds = dict(kinds or {})
        described = [
            describe_record(name, rec, kinds.get(name), full=name in self.full_records)
            for name, rec in records.items()
        ]
        line = {
            "v": EGRESS_FORMAT_VERSION,
            "ts": _now(),
            "message_type": message_type,
            "run_id": run_id,
            "records": described,
            "total_bytes": sum(r["bytes"] for r in described),
            "extra": dict(extra) if extra is not None else None,
        }
        try:
            text = canonical_json(line)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"egress extra must be JSON-serialisable without NaN/inf: {exc}") from exc
        data = (text + "\n").encode("ascii")
        with open(self.path, "ab") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
        return json.loads(text)


def read_egress(path: str | os.PathLike[str]) -> tuple[list[tuple[int, dict[str, Any]]], list[int]]:
    """Parse an egress log: ([(line number, entry)], [line numbers that could not be parsed]).

    Damaged lines (e.g. a torn last line after a crash) are returned separately, not skipped
    silently, so a cross-check can say that part of the log was unreadable.
    """
    entries: list[tuple[int, dict[str, Any]]] = []
    bad: list[int] = []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                entry = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                bad.append(lineno)
                continue
            if isinstance(entry, dict) and isinstance(entry.get("records"), list):
                entries.append((lineno, entry))
            else:
                bad.append(lineno)
    return entries, bad
