"""``records.jsonl``: the registry's source of truth, one JSON line per ``add`` / ``remove``.

Line format (canonical JSON)::

    {"op": "add", "id", "blob_sha256", "bytes", "z_b64", "z_sha256", "meta", "ts"[, "blob_encryption"]}
    {"op": "remove", "id", "reason", "ts"}

z is base64 of little-endian float32 (exact, 4/3 of binary size). Lines are appended, flushed and
fsynced (``common.durable.JsonlLog``) before ``add`` returns. On open the log is replayed into
the ``Columns``; a torn last line (crash mid-append) is truncated (read-only: ignored), while a
bad line anywhere else is corruption and raises — never silently skipped. ``refresh`` picks up
lines another ``Registry`` object (or the writer, seen read-only) appended since.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.digests import canonical_json, sha256_hex
from common.durable import JsonlLog
from server.registry.columns import Columns
from server.registry.config import now
from server.registry.crashpoints import armed, crash_point
from server.registry.errors import RegistryCorruptError
from server.registry.records import Prepared

try:  # chromadb depends on orjson; 3x faster than json when opening a large records.jsonl
    from orjson import loads as _loads
except ImportError:  # pragma: no cover
    _loads = json.loads

log = logging.getLogger(__name__)

_LOAD_CHUNK = 64 * 1024 * 1024


def add_line(p: Prepared, encryption_fields: dict[str, Any]) -> str:
    """The record line of a validated submission (``p.meta["created_at"]`` already set)."""
    z_b64 = base64.b64encode(np.ascontiguousarray(p.z, dtype="<f4").tobytes()).decode("ascii")
    return canonical_json({"op": "add", "id": p.id, "blob_sha256": p.sha, "bytes": len(p.blob), "z_b64": z_b64,
                           "z_sha256": p.z_sha, "meta": p.meta, "ts": p.meta["created_at"], **encryption_fields})


def remove_line(record_id: str, reason: str | None) -> str:
    """The tombstone line of a removal."""
    return canonical_json({"op": "remove", "id": record_id, "reason": reason, "ts": now()})


class RecordLog:
    """The records.jsonl at ``path``, replayed into ``cols`` (``offset``: bytes applied so far)."""

    def __init__(self, path: Path, cols: Columns) -> None:
        self.path = path
        self.cols = cols
        self.log = JsonlLog(path, create=False)
        self.offset = 0
        self.line_count = 0

    def load(self, read_only: bool, on_torn: Callable[[int, int, str], None]) -> None:
        """Replay the whole file; a torn last line is truncated and ``on_torn(bytes, offset, sha)`` told."""
        path = self.path
        if not path.exists():
            if read_only:
                return
            raise RegistryCorruptError(
                f"{path} is missing: the registry's source of truth is gone; restore it from a backup"
            )
        size = path.stat().st_size
        good = 0
        with open(path, "rb") as fh:
            first = fh.readline()
            if first and size > (1 << 20):  # pre-size the matrix instead of doubling a huge one
                self.cols.ensure_capacity(int(size / max(len(first), 1) * 1.1) + 16)
            fh.seek(0)
            buf = b""
            while True:
                chunk = fh.read(_LOAD_CHUNK)
                at_eof = not chunk
                buf += chunk
                used = self._parse_lines(buf, good, final=at_eof)
                good += used
                buf = buf[used:]
                if at_eof:
                    break
        if buf:
            if read_only:
                log.warning("registry %s: ignoring a torn last line (%d bytes)", path.parent, len(buf))
            else:
                log.warning("registry %s: truncating a torn last record line (%d bytes, crash mid-append)",
                            path.parent, len(buf))
                self.log.repair(good)
                on_torn(len(buf), good, sha256_hex(buf))
        self.offset = good

    def refresh(self) -> None:
        """Apply lines appended by another writer object since the last look."""
        size = self.log.size()
        if size == self.offset:
            return
        if size < self.offset:
            raise RegistryCorruptError(f"{self.path} shrank while open ({self.offset} -> {size} bytes); "
                                       "reopen the registry")
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read(size - self.offset)
        self.offset += self._parse_lines(data, self.offset, final=False)

    def append(self, lines: Sequence[str]) -> tuple[int, int, bytes]:
        """Append lines durably; returns (start, end, the bytes written). The ``mid_record`` crash
        point splits the write when armed. The caller applies the lines to the columns itself,
        once the matching audit entry is written."""
        midway = (lambda: crash_point("mid_record")) if armed() else None
        start, end = self.log.append(lines, midway=midway)
        self.offset = end
        self.line_count += len(lines)
        return start, end, b"".join(ln.encode("utf-8") + b"\n" for ln in lines)

    def rollback(self, start: int, n_lines: int) -> None:
        """Cut the lines just appended at ``start`` (their audit entry could not be written)."""
        self.log.repair(start)
        self.offset = start
        self.line_count -= n_lines

    def _parse_lines(self, data: bytes, base_offset: int, final: bool) -> int:
        """Apply every complete line of ``data``; returns the byte count consumed.

        ``final``: ``data`` runs to the end of the file. A bad line that is the file's last one
        (no newline after it, or unparseable) is a torn append and is left unconsumed; a bad line
        followed by anything else is corruption and raises.
        """
        dim = self.cols.dim
        pos = 0
        n = len(data)
        adds: list[tuple[dict[str, Any], bytes]] = []
        while pos < n:
            nl = data.find(b"\n", pos)
            if nl < 0:
                break  # torn (or in-flight) last line
            raw = data[pos:nl]
            try:
                entry = _loads(raw)
                if not isinstance(entry, dict) or entry.get("op") not in ("add", "remove"):
                    raise ValueError("not a record line")
                if entry["op"] == "add":
                    zb = binascii.a2b_base64(entry["z_b64"].encode("ascii"), strict_mode=True)
                    if len(zb) != 4 * dim:
                        raise ValueError(f"z has {len(zb) // 4} values, registry holds {dim}")
                else:
                    zb = b""
            except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
                if data[nl + 1:].strip(b"\x00\n\r\t ") == b"" and final:
                    break  # the last line is damaged: treat as torn
                lineno = self.line_count + data[:pos].count(b"\n") + 1
                raise RegistryCorruptError(
                    f"{self.path}: line {lineno} (byte {base_offset + pos}) is not a valid record ({exc}) but "
                    "later lines are; the file was damaged outside the registry (the registry itself never leaves a "
                    "torn line before a good one). Take a copy, then move out only that damaged line — every "
                    "other line is a stored record, keep them all — and run `rpe audit verify`, which names any "
                    "audited record that is then missing"
                ) from exc
            if entry["op"] == "add":
                adds.append((entry, zb))
            else:
                self._flush_adds(adds)
                adds = []
                self.cols.apply_remove(entry["id"])
            pos = nl + 1
        self._flush_adds(adds)
        self.line_count += data[:pos].count(b"\n")
        return pos

    def _flush_adds(self, adds: list[tuple[dict[str, Any], bytes]]) -> None:
        if not adds:
            return
        Z = np.frombuffer(b"".join(zb for _, zb in adds), dtype="<f4").reshape(len(adds), self.cols.dim)
        self.cols.apply_adds(
            [(e["id"], e["meta"], e["blob_sha256"], int(e["bytes"]), e["z_sha256"]) for e, _ in adds], Z)
