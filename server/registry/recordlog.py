"""``records.jsonl``: the registry's source of truth, one JSON line per ``add`` / ``remove``.

Line format (canonical JSON)::

    {"op": "add", "id", "blob_sha256", "bytes", "row", "z_sha256", "meta", "ts"[, "blob_encryption"]}
    {"op": "remove", "id", "reason", "ts"}

``row`` is the record's z in the z column file (``server/zindex/column.py``; written and fsynced
before the line), checked against ``z_sha256`` whenever it is used. Registries written before
the column kept z in the line as ``"z_b64"`` (base64 of little-endian float32); such lines are
still read (their z go into the columns' z store) and ``migrate_lines`` rewrites them. Lines are appended, flushed and
fsynced (``common.files.durable.JsonlLog``) before ``add`` returns. On open the log is replayed into
the ``Columns``; a torn last line (crash mid-append) is truncated (read-only: ignored), while a
bad line anywhere else is corruption and raises — never silently skipped. ``refresh`` picks up
lines another ``Registry`` object (or the writer, seen read-only) appended since.
"""

from __future__ import annotations

import binascii
import gc
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.files.durable import JsonlLog
from common.files.safeio import b64decode_strict
from common.trust.digests import canonical_json, sha256_hex
from server.registry.columns import Columns
from server.registry.config import now
from server.registry.crashpoints import armed, crash_point
from server.registry.errors import RegistryCorruptError
from server.registry.records import Prepared

_loads: Callable[[bytes | str], Any]
try:  # chromadb depends on orjson; 3x faster than json when opening a large records.jsonl
    from orjson import loads as _loads
except ImportError:  # pragma: no cover
    _loads = json.loads

log = logging.getLogger(__name__)

_LOAD_CHUNK = 64 * 1024 * 1024


def add_line(p: Prepared, encryption_fields: dict[str, Any], row: int) -> str:
    """The record line of a validated submission (``p.meta["created_at"]`` already set) whose z
    is row ``row`` of the z column."""
    return canonical_json(
        {
            "op": "add",
            "id": p.id,
            "blob_sha256": p.sha,
            "bytes": len(p.blob),
            "row": int(row),
            "z_sha256": p.z_sha,
            "meta": p.meta,
            "ts": p.meta["created_at"],
            **encryption_fields,
        }
    )


def add_format(path: Path) -> str | None:
    """``"column"`` (add lines name a z column row), ``"b64"`` (z as base64 in the line, the format
    before the z column) or None (no add line yet). A log is converted as a whole
    (``migrate_lines``), so its first add line speaks for the file."""
    if not path.exists():
        return None
    with open(path, "rb") as fh:
        for raw in fh:
            if b'"op":"add"' in raw:
                return "b64" if b'"z_b64"' in raw else "column"
    return None


def migrate_lines(src: Path, dst: Path) -> int:
    """Write ``dst``: ``src`` with each add line's ``z_b64`` replaced by ``row`` (its position
    among the add lines, the order in which they are appended to the new z column), fsynced.
    Everything else in a line is kept; a torn last line is dropped. Returns the add count."""
    n = 0
    with open(src, "rb") as fh, open(dst, "wb") as out:
        for raw in fh:
            if not raw.endswith(b"\n"):
                break
            entry = _loads(raw)
            if isinstance(entry, dict) and entry.get("op") == "add" and "z_b64" in entry:
                del entry["z_b64"]
                entry["row"] = n
                n += 1
                raw = (canonical_json(entry) + "\n").encode()
            out.write(raw)
        out.flush()
        os.fsync(out.fileno())
    return n


def line_starts(data: bytes, base: int) -> np.ndarray:
    """File offsets of the lines of ``data`` (whole lines, each ending in a newline) read at ``base``."""
    return base + np.concatenate(([0], np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10)[:-1] + 1))


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
        self.snap_end = 0  # records.jsonl bytes the columns snapshot covers (``server.registry.snapshot``)

    def load(self, read_only: bool, on_torn: Callable[[int, int, str], None]) -> None:
        """Replay the file from ``offset`` (0, or the end of a restored snapshot); a torn last line
        is truncated and ``on_torn(bytes, offset, sha)`` told."""
        path = self.path
        if not path.exists():
            if read_only:
                return
            raise RegistryCorruptError(
                f"{path} is missing: the registry's source of truth is gone; restore it from a backup"
            )
        size = path.stat().st_size
        good = self.offset
        gc_was = gc.isenabled()
        gc.disable()  # ~10^5 fresh dicts would trigger repeated full collections for nothing
        try:
            good, buf = self._load_chunks(path, size, good)
        finally:
            if gc_was:
                gc.enable()
        if buf:
            if read_only:
                log.warning("registry %s: ignoring a torn last line (%d bytes)", path.parent, len(buf))
            else:
                log.warning(
                    "registry %s: truncating a torn last record line (%d bytes, crash mid-append)",
                    path.parent,
                    len(buf),
                )
                self.log.repair(good)
                on_torn(len(buf), good, sha256_hex(buf))
        self.offset = good

    def _load_chunks(self, path: Path, size: int, start: int) -> tuple[int, bytes]:
        """Parse the file from ``start`` in chunks: (end of what was applied, the unparsed tail)."""
        good = start
        with open(path, "rb") as fh:
            fh.seek(start)
            first = fh.readline()
            if first and size - start > (1 << 20):  # pre-size the matrix instead of doubling a huge one
                self.cols.ensure_capacity(int((size - start) / max(len(first), 1) * 1.1) + 16)
            fh.seek(start)
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
        return good, buf

    def refresh(self) -> None:
        """Apply lines appended by another writer object since the last look."""
        size = self.log.size()
        if size == self.offset:
            return
        if size < self.offset:
            raise RegistryCorruptError(
                f"{self.path} shrank while open ({self.offset} -> {size} bytes); reopen the registry"
            )
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
        fast = self._parse_fast(data, base_offset)
        if fast >= 0:
            return fast
        dim = self.cols.dim
        pos = 0
        n = len(data)
        adds: list[tuple[dict[str, Any], bytes | int, int]] = []
        while pos < n:
            nl = data.find(b"\n", pos)
            if nl < 0:
                break  # torn (or in-flight) last line
            raw = data[pos:nl]
            try:
                entry = _loads(raw)
                if not isinstance(entry, dict) or entry.get("op") not in ("add", "remove"):
                    raise ValueError("not a record line")
                zb: bytes | int = b""
                if entry["op"] == "add" and "row" in entry:
                    zb = entry["row"]
                    if isinstance(zb, bool) or not isinstance(zb, int) or zb < 0:
                        raise ValueError(f"row must be a non-negative integer; got {zb!r}")
                elif entry["op"] == "add":
                    zb = b64decode_strict(entry["z_b64"].encode("ascii"))
                    if len(zb) != 4 * dim:
                        raise ValueError(f"z has {len(zb) // 4} values, registry holds {dim}")
            except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
                if data[nl + 1 :].strip(b"\x00\n\r\t ") == b"" and final:
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
                adds.append((entry, zb, base_offset + pos))
            else:
                self._flush_adds(adds)
                adds = []
                self.cols.apply_remove(entry["id"])
            pos = nl + 1
        self._flush_adds(adds)
        self.line_count += data[:pos].count(b"\n")
        return pos

    def _parse_fast(self, data: bytes, base_offset: int) -> int:
        """Every complete line of ``data`` parsed in one ``loads`` call (one JSON array), when they
        are all well-formed column-format lines; -1 otherwise (the line-by-line path then finds and
        names the bad line). Why: a call per line dominated opening a 100,000-record registry."""
        end = data.rfind(b"\n") + 1
        if end == 0:
            return -1
        body = data[: end - 1]
        try:
            entries = _loads(b"[" + body.replace(b"\n", b",") + b"]")
        except ValueError:
            return -1
        if len(entries) != body.count(b"\n") + 1:
            return -1  # a line held more than one value (or none): let the careful path judge it
        adds: list[tuple[dict[str, Any], int]] = []
        try:
            for entry in entries:
                op = entry["op"]
                if op == "add":
                    r = entry["row"]
                    if r.__class__ is not int or r < 0:
                        return -1
                    adds.append((entry, r))
                elif op == "remove":
                    adds.append((entry, -1))
                else:
                    return -1
        except (KeyError, TypeError):
            return -1
        starts = line_starts(data[:end], base_offset).tolist()
        batch: list[tuple[dict[str, Any], bytes | int, int]] = []
        for (entry, r), at in zip(adds, starts, strict=True):
            if r == -1:
                self._flush_adds(batch)
                batch = []
                self.cols.apply_remove(entry["id"])
            else:
                batch.append((entry, r, at))
        self._flush_adds(batch)
        self.line_count += len(entries)
        return end

    def _flush_adds(self, adds: list[tuple[dict[str, Any], bytes | int, int]]) -> None:
        if not adds:
            return
        if isinstance(adds[0][1], bytes):  # old format: z in the line, into the columns' z store
            Z = np.frombuffer(b"".join(zb for _, zb, _ in adds if isinstance(zb, bytes)), dtype="<f4").reshape(
                -1, self.cols.dim
            )
            if Z.shape[0] != len(adds):
                raise RegistryCorruptError(
                    f"{self.path}: lines with and without z_b64 are mixed; the log was edited outside the registry"
                )
            zrows: Any = self.cols.append_z(Z)
        else:
            zrows = [zb for _, zb, _ in adds]
            if not all(isinstance(r, int) for r in zrows):
                raise RegistryCorruptError(
                    f"{self.path}: lines with and without z_b64 are mixed; the log was edited outside the registry"
                )
        self.cols.apply_adds(
            [(e["id"], e["meta"], e["blob_sha256"], int(e["bytes"]), e["z_sha256"]) for e, _, _ in adds],
            zrows,
            [at for _, _, at in adds],
        )
