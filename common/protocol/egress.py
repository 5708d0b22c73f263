"""The egress-log line format, shared by the site that writes it and the coordinator that checks it.

The writer is ``client/egress.py`` (``EgressLog``); ``server/crosscheck.py`` reads the same lines
to match them against the audit log, and ``common/privacy.py`` to count privacy spending. The
format and the one reader live here so neither side imports the other.


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

``records[*].sha256`` is ``common.trust.digests.record_digest`` of the record exactly as sent — the
coordinator recomputes it from what it received (``record_digests``) and logs it in its
``submission.*`` audit events, which is what the cross-check compares. Record order follows the
caller's dict; items are sorted by key.

Scalar values: numbers and booleans are always logged (non-finite floats as the strings "nan",
"inf", "-inf"); strings are logged in full when at most ``MAX_LOGGED_STR`` characters long or
when the record's name is in ``full_records`` (default: the ``metadata`` record, which is small
and non-private by design), otherwise as ``{"len", "sha256"}``; bytes values always as
``{"len", "sha256"}``; lists in full when short (≤ ``MAX_LOGGED_LIST`` loggable elements).
``bytes`` counts are ``array.nbytes`` for arrays and ``common.trust.digests.scalar_nbytes`` otherwise.

Reading (``read_egress``): one contract for every reader — ``(entries, bad)`` where ``entries``
is ``[(line number, line)]`` and ``bad`` the numbers of lines that are not egress lines (e.g. a
torn last line after a crash), returned separately, never skipped silently; blank lines are
ignored; a missing file is a ``FileNotFoundError`` that says where a site writes its log.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.trust.digests import (
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
#: the largest egress log ``read_egress`` reads, and the largest line it parses (bounded readers:
#: ``common.files.safeio``; a log past this is refused with a clear error, never read into memory)
MAX_EGRESS_BYTES = 1 << 30
MAX_EGRESS_LINE_BYTES = 16 << 20
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


def describe_record(
    name: str, record: Mapping[str, Any], kind: str | None = None, full: bool = False
) -> dict[str, Any]:
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


def read_egress(path: str | os.PathLike[str]) -> tuple[list[tuple[int, dict[str, Any]]], list[int]]:
    """Parse an egress log: ([(line number, entry)], [line numbers that could not be parsed])."""
    from common.files.safeio import UnsafeInputError, loads_json, read_regular_file

    if not Path(path).exists():
        raise FileNotFoundError(f"egress log {path} does not exist; a site writes it at <site-dir>/egress.jsonl")
    data = read_regular_file(path, MAX_EGRESS_BYTES, "egress log")  # a FIFO or a huge file: a clear error
    entries: list[tuple[int, dict[str, Any]]] = []
    bad: list[int] = []
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            entry = loads_json(raw, f"egress log {path} line {lineno}", max_bytes=MAX_EGRESS_LINE_BYTES)
        except UnsafeInputError:
            bad.append(lineno)
            continue
        if isinstance(entry, dict) and isinstance(entry.get("records"), list):
            entries.append((lineno, entry))
        else:
            bad.append(lineno)
    return entries, bad
