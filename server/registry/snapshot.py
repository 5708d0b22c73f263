"""``columns.snap``: the registry's columns as a replay of a records.jsonl prefix would build them,
so that opening a large registry reads a few arrays instead of parsing every line.

Why: at 100,000 records replaying records.jsonl (60 MB of JSON) took 1.1–1.4 s, most of it
building 100,000 metadata dicts no query needs. The snapshot keeps what the hot paths use (ids,
z rows, liveness, the filter codes and their vocabularies) and, per row, the byte offset of its add
line; a row's metadata and blob fields are read from that line on first use.

It is a cache, never a source of truth:

- it is used only when the first ``records_end`` bytes of records.jsonl hash to the
  ``records_sha256`` it names (any edit, cut or migration of those bytes means a full replay, which
  finds and reports the damage exactly as before) and its own body checksum holds; lines after that
  prefix are replayed as usual (so a crash after the last snapshot loses nothing);
- a row's metadata, blob hash, size and z hash come from records.jsonl itself; the line at the
  stored offset must be the add line of that row's id;
- ``problems`` (part of ``Registry.verify``) replays the prefix in full and reports any
  disagreement, so a snapshot altered on disk cannot silently change what the registry serves;
- it is written atomically (temporary file, fsync, rename) when a writable registry closes, and can
  be deleted at any time: the next open replays the whole log.

Bound into the audit chain (issue 26 class 4: ``columns.snap`` carried only a plain sha256 that
whoever edits it recomputes, so a consent-withdrawn record was made live again, a live one hidden
and a record given another site's filter code, and every open served that): writing a snapshot
first appends a ``registry.snapshot`` audit entry naming its body hash, the records prefix it covers
and that prefix's hash; the header names the entry's byte offset and seq. An open uses a snapshot
only when the entry at that offset is that entry, intact; otherwise it replays records.jsonl (and a
writable open moves the refused file aside as ``columns.snap.refused-<hash>`` and audits
``registry.cache_refused``). An edited cache therefore needs an edited audit log as well: inside the
chain that is a broken chain, appended at its end it is still caught by ``Registry.verify`` (and so
``rpe audit verify`` and the console), which compares the snapshot with a full replay and names
each disagreement (liveness, filter codes, rows, lines) and a snapshot not bound to the log.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from common.files.durable import atomic_write
from common.files.safeio import UnsafeInputError, read_regular_file
from server.audit import AuditLog, entry_hash
from server.registry.columns import KEYS, Columns
from server.registry.config import AUDIT_NAME
from server.registry.errors import RegistryCorruptError
from server.registry.recordlog import RecordLog

log = logging.getLogger(__name__)

SNAP_NAME = "columns.snap"
MAGIC = b"RPECOLS1\n"
FORMAT = 1
#: below this many rows a replay is already fast; no snapshot is written
MIN_RECORDS = 2000
MAX_BYTES = 1 << 34


def _prefix_sha(records: Path, end: int) -> str | None:
    h = hashlib.sha256()
    left = end
    with open(records, "rb") as fh:
        while left > 0:
            chunk = fh.read(min(left, 1 << 24))
            if not chunk:
                return None  # the file is shorter than the prefix
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def read_line(records: Path, off: int) -> bytes:
    """The line of ``records`` that starts at byte ``off`` (without its newline)."""
    fd = os.open(records, os.O_RDONLY)
    try:
        size, out = 4096, b""
        while True:
            chunk = os.pread(fd, size, off + len(out))
            nl = chunk.find(b"\n")
            if nl >= 0:
                return out + chunk[:nl]
            if not chunk:
                return out
            out += chunk
            size *= 2
    finally:
        os.close(fd)


def write(path: Path, cols: Columns, rlog: RecordLog, audit: AuditLog) -> bool:
    """Write the snapshot of ``cols`` (= the replay of ``rlog`` up to its offset) atomically, after
    the ``registry.snapshot`` entry in ``audit`` that binds it (a crash in between leaves an entry
    naming a file that never appeared: harmless). Returns False (and writes nothing) when there is
    nothing new or the state cannot be captured."""
    end, records, n = rlog.offset, rlog.path, cols.n
    if n < MIN_RECORDS or end == rlog.snap_end or any("\n" in i for i in cols.ids):
        return False
    off = cols.line_off[:n]
    sha = _prefix_sha(records, end)
    if (n and int(off.min()) < 0) or sha is None:
        log.warning(
            "%s: the columns snapshot was not written (a row's add line is unknown, or records.jsonl "
            "is shorter than what was applied)",
            path,
        )
        return False
    parts = [
        ("\n".join(cols.ids)).encode("utf-8"),
        np.ascontiguousarray(cols.zrow[:n], dtype="<i8").tobytes(),
        cols.live[:n].astype(np.uint8).tobytes(),
        off.astype("<i8").tobytes(),
    ]
    parts += [np.ascontiguousarray(cols.codes[k][:n], dtype="<i4").tobytes() for k in KEYS]
    body = b"".join(parts)
    header = {
        "format": FORMAT,
        "dim": cols.dim,
        "keys": list(KEYS),
        "n": n,
        "records_end": end,
        "records_sha256": sha,
        "line_count": rlog.line_count,
        "vocab": cols.vocab,
        "ids_bytes": len(parts[0]),
        "body_sha256": hashlib.sha256(body).hexdigest(),
    }
    header["audit_offset"] = audit.path.stat().st_size if audit.path.exists() else 0
    entry = audit.append(EV_SNAPSHOT, **{k: header[k] for k in BOUND_FIELDS}, live=int(np.count_nonzero(cols.live[:n])))
    header["audit_seq"] = entry["seq"]
    head = json.dumps(header, sort_keys=True).encode()
    atomic_write(path, MAGIC + len(head).to_bytes(8, "little") + head + body)
    rlog.snap_end = end
    return True


def _parse(raw: bytes, dim: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(header, arrays) of a snapshot file; ValueError naming what is wrong."""
    if not raw.startswith(MAGIC) or len(raw) < len(MAGIC) + 8:
        raise ValueError("not a columns snapshot")
    hl = int.from_bytes(raw[len(MAGIC) : len(MAGIC) + 8], "little")
    at = len(MAGIC) + 8 + hl
    h = json.loads(raw[len(MAGIC) + 8 : at])
    if h.get("format") != FORMAT or h.get("dim") != dim or h.get("keys") != list(KEYS):
        raise ValueError("written for another format, dimension or key set")
    body = raw[at:]
    if hashlib.sha256(body).hexdigest() != h["body_sha256"]:
        raise ValueError("its body checksum fails (damaged or cut)")
    n, ib = int(h["n"]), int(h["ids_bytes"])
    if len(body) != ib + n * (8 + 1 + 8 + 4 * len(KEYS)):
        raise ValueError("its size does not match its header")
    ids = body[:ib].decode("utf-8").split("\n") if n else []
    pos = ib

    def take(dtype: str, width: int) -> np.ndarray:
        nonlocal pos
        a = np.frombuffer(body, dtype=dtype, count=n, offset=pos)
        pos += n * width
        return a

    arrays: dict[str, Any] = {
        "ids": ids,
        "zrow": take("<i8", 8),
        "live": take("u1", 1).astype(bool),
        "off": take("<i8", 8).copy(),
    }
    arrays["codes"] = {k: take("<i4", 4) for k in KEYS}
    vocab = h["vocab"]
    if len(ids) != n or len(set(ids)) != n:
        raise ValueError("its ids are not n distinct ids")
    for k in KEYS:
        c = arrays["codes"][k]
        if n and (int(c.min()) < 0 or int(c.max()) >= len(vocab.get(k, {}))):
            raise ValueError(f"its {k} codes fall outside their vocabulary")
    if n and (
        int(arrays["zrow"].min()) < 0
        or int(arrays["off"].min()) < 0
        or int(arrays["off"].max()) >= int(h["records_end"])
    ):
        raise ValueError("it names negative z rows or add lines outside its prefix")
    return h, arrays


#: the audit event that binds a snapshot, and the header fields it repeats
EV_SNAPSHOT = "registry.snapshot"
BOUND_FIELDS = ("body_sha256", "records_end", "records_sha256", "n")


def binding_problem(h: dict[str, Any], audit_path: Path) -> str | None:
    """Why the snapshot with header ``h`` is not bound by its ``registry.snapshot`` audit entry
    (None when the entry at ``audit_offset`` is that entry and its own hash holds)."""
    at, seq = h.get("audit_offset"), h.get("audit_seq")
    if not isinstance(at, int) or isinstance(at, bool) or at < 0 or not isinstance(seq, int):
        return "it names no registry.snapshot audit entry (written before the binding, or edited)"
    if not audit_path.is_file():
        return f"{audit_path.name} is missing"
    try:
        entry = json.loads(read_line(audit_path, at))
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        return f"there is no audit entry at byte {at} of {audit_path.name} ({exc})"
    if not isinstance(entry, dict) or entry.get("event") != EV_SNAPSHOT or entry.get("seq") != seq:
        return f"the audit entry at byte {at} of {audit_path.name} is not its registry.snapshot entry (seq {seq})"
    if entry.get("hash") != entry_hash(entry):
        return f"its registry.snapshot audit entry (seq {seq}) does not match its own hash"
    differ = [k for k in BOUND_FIELDS if entry.get(k) != h.get(k)]
    if differ:
        return f"it differs from its registry.snapshot audit entry (seq {seq}) in {', '.join(differ)}"
    return None


def load(path: Path, rlog: RecordLog, cols: Columns, audit_path: Path | None = None, *, bound: bool = True) -> bool:
    """Restore ``cols`` (empty) from the snapshot at ``path`` if it matches records.jsonl and (with
    ``bound``) its ``registry.snapshot`` audit entry in ``audit_path`` (default: audit.jsonl beside
    records.jsonl); then ``rlog`` replays only the lines after it. False (with the reason logged) to
    replay everything."""
    return try_load(path, rlog, cols, audit_path, bound=bound) is None and rlog.snap_end > 0


def try_load(
    path: Path, rlog: RecordLog, cols: Columns, audit_path: Path | None = None, *, bound: bool = True
) -> str | None:
    """:func:`load`, returning why an existing snapshot was not used (None: used, or there is none)."""
    if not os.path.lexists(path):
        return None
    try:  # never blocks on a FIFO put in its place
        raw = read_regular_file(path, MAX_BYTES, "columns snapshot")
    except UnsafeInputError as exc:
        log.warning("%s; replaying records.jsonl", exc)
        return str(exc)
    audit_path = audit_path if audit_path is not None else rlog.path.with_name(AUDIT_NAME)
    try:
        h, a = _parse(raw, cols.dim)
        if bound:
            unbound = binding_problem(h, audit_path)
            if unbound is not None:
                raise ValueError(f"not bound to the audit log: {unbound}")
        end = int(h["records_end"])
        if _prefix_sha(rlog.path, end) != h["records_sha256"]:
            raise ValueError("records.jsonl no longer starts with the lines it was made from")
        if a["zrow"].size and int(a["zrow"].max()) >= len(cols.zcol):
            cols.zcol.refresh()
            if int(a["zrow"].max()) >= len(cols.zcol):
                raise ValueError("it names z rows past the end of the z column")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, OSError) as exc:
        log.warning("%s not used (%s); replaying records.jsonl", path, exc)
        return str(exc)
    records = rlog.path
    cols.restore(
        a["ids"],
        a["zrow"],
        a["live"],
        a["codes"],
        {k: dict(v) for k, v in h["vocab"].items()},
        a["off"],
        lambda off: read_line(records, off),
    )
    rlog.offset = rlog.snap_end = end
    rlog.line_count = int(h["line_count"])
    return None


def problems(path: Path, rlog: RecordLog) -> tuple[list[str], Columns | None]:
    """Disagreements between the snapshot and a full replay of the records.jsonl prefix it covers,
    and the columns of a full replay up to ``rlog.offset`` (for the rest of ``verify`` to check
    records.jsonl itself, not the cache). ``([], None)`` when there is no usable snapshot."""
    cols = rlog.cols
    snap = Columns(cols.dim, str(rlog.path), cols.zcol)
    probe = RecordLog(rlog.path, snap)
    if not load(path, probe, snap, bound=False):  # compared even when unbound: name what it would change
        return [], None
    try:
        raw = read_regular_file(path, MAX_BYTES, "columns snapshot")
        unbound = binding_problem(_parse(raw, cols.dim)[0], rlog.path.with_name(AUDIT_NAME))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, OSError) as exc:  # replaced meanwhile
        unbound = f"it could not be read again ({exc})"
    fresh = Columns(cols.dim, str(rlog.path), cols.zcol)
    replay = RecordLog(rlog.path, fresh)
    with open(rlog.path, "rb") as fh:
        data = fh.read(max(rlog.offset, probe.offset))
    try:
        replay._parse_lines(data[: probe.offset], 0, final=False)  # noqa: SLF001 - the replay an open does
    except Exception as exc:  # noqa: BLE001 - reported, not raised: verify lists problems
        return [f"{path.name}: records.jsonl up to byte {probe.offset} does not replay ({exc})"], None
    where = f"{path.name} (a cache: delete it and reopen the registry)"
    out = [] if unbound is None else [f"{where} is not bound to the audit log: {unbound}; no open uses it"]
    n = fresh.n
    if fresh.n != snap.n or fresh.ids != snap.ids:
        out.append(f"{where} lists other records than records.jsonl")
    else:
        for name, x, y in (("z rows", fresh.zrow[:n], snap.zrow[:n]), ("liveness", fresh.live[:n], snap.live[:n])):
            bad = np.flatnonzero(x != y)
            if bad.size:
                out.append(
                    f"{where} disagrees with records.jsonl on the {name} of {bad.size} record(s), "
                    f"e.g. {fresh.ids[int(bad[0])]}"
                )
        if fresh.vocab != snap.vocab or any(not np.array_equal(fresh.codes[k][:n], snap.codes[k][:n]) for k in KEYS):
            out.append(f"{where} disagrees with records.jsonl on the filter fields (site/task/modality/base)")
        stale = []
        for i in range(n):
            try:
                if snap.meta[i] != fresh.meta[i] or snap.blob[i] != fresh.blob[i]:
                    stale.append(i)
            except RegistryCorruptError:
                stale.append(i)
        if stale:
            out.append(
                f"{where} points {len(stale)} record(s) at another line than their add line, e.g. {fresh.ids[stale[0]]}"
            )
    if len(data) > probe.offset:
        replay._parse_lines(data[probe.offset :], probe.offset, final=False)  # noqa: SLF001
    return out, fresh
