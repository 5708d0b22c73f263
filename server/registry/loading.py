"""Opening a registry: ``open_parts`` assembles every part (lock, blob store, audit log, z column,
columns, record log, search, writer, Chroma mirror) and returns them as one ``Parts`` for the
facade's constructor; nothing here writes into the facade.

Loading the records: map the z column, roll back unaudited lines, replay records.jsonl into the
columns (from the columns snapshot where it is valid), and migrate a registry written before the
z column. A registry whose add lines carry z as base64 (the format before ``z.f32``) is read as it
is when opened read-only (``MemColumn``) and migrated by its first writable open: only after its
lines check out against their audit entries (``binding.check_binding``), the column built under a
temporary name and renamed, then a ``registry.migrate`` audit entry that binds the whole rewritten
file, then the rename of the rewritten file (a crash anywhere leaves the old log, which the next
open migrates again).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.files.durable import JsonlLog, atomic_write, fsync_dir
from common.trust.digests import sha256_hex
from server.audit import AuditLog, repair_torn_audit
from server.registry import binding, coordkey, snapshot
from server.registry import config as cfg
from server.registry.blobcrypt import BlobKey
from server.registry.blobstore import BlobStore
from server.registry.chroma_index import ChromaIndex
from server.registry.columns import Columns, MemColumn, ZSource
from server.registry.errors import ReadOnlyError, RegistryCorruptError
from server.registry.lock import PathLock
from server.registry.parts import Parts
from server.registry.recordlog import RecordLog, add_format, migrate_lines
from server.registry.search import Candidates, Searcher
from server.registry.writer import Writer
from server.zindex import ColumnError, ZColumn


def open_parts(
    path: Path,
    config: Mapping[str, Any],
    *,
    read_only: bool,
    chroma: str | tuple[str, int] | None,
    blob_key: BlobKey | None,
    candidates: Candidates,
) -> Parts:
    """Every part of the registry at ``path`` (whose registry.json is ``config``), opened and checked.

    ``candidates`` is how the search asks for Chroma's proposals (the facade passes its own method,
    which a test may replace). A failure releases what was already opened (the lock first of all)
    and raises; the caches are not written then.
    """
    dim = int(config["embedding_dim"])
    with contextlib.ExitStack() as undo:
        lock: PathLock | None = None
        mutex = threading.RLock()
        if not read_only:
            lock = PathLock.acquire(path)
            undo.callback(lock.release)
            mutex = lock.mutex
        blobs = BlobStore(path, config.get("blob_encryption"), blob_key)
        if not read_only:
            refuse_destructive_repair(path)  # before anything is cut (issue 26 class 5)
        audit = open_audit(path, read_only)
        if not read_only:
            blobs.remove_stale_temps()
            coordkey.ensure_key(path)
            cfg.make_private(path)
        zcol, cols, rlog, search = load_records(path, dim, read_only, audit, blobs, candidates)
        undo.callback(zcol.close)
        spec = cfg.chroma_spec(config, chroma, read_only)
        index = None if spec is None else ChromaIndex(spec, path / cfg.CHROMA_DIR, config["registry_id"], dim)
        writer = Writer(cols, rlog, blobs, audit, index)
        undo.pop_all()
    return Parts(path, read_only, lock, mutex, blobs, audit, zcol, cols, rlog, search, writer, index)


class ReadOnlyAudit(AuditLog):
    """The audit log as a read-only open sees it: never created, never locked for writing, never
    appended to (issue 26 class 5: a read command writes nothing, so it cannot repair either); its
    tail is not checked here (``Registry.verify`` / ``rpe audit verify`` name a damaged one)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:  # noqa: D107 - see the class
        self.path = Path(path)
        self.log = JsonlLog(self.path, create=False)

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        """Refused: the registry was opened read-only."""
        raise ReadOnlyError(f"{self.path}: the registry was opened read-only; nothing is appended ({event})")


def open_audit(path: Path, read_only: bool) -> AuditLog:
    """The registry's audit log; a writable open first cuts a torn last line and audits the cut."""
    if read_only:
        return ReadOnlyAudit(path / cfg.AUDIT_NAME)
    frag = torn_audit_tail(path / cfg.AUDIT_NAME)
    kept = None if frag is None else keep_aside(path / cfg.AUDIT_NAME, frag[0], frag[1])
    torn = repair_torn_audit(path / cfg.AUDIT_NAME)
    audit = AuditLog(path / cfg.AUDIT_NAME)
    if torn is not None:
        audit.append(
            "registry.repair",
            file=cfg.AUDIT_NAME,
            truncated_bytes=torn[0],
            at_offset=torn[1],
            sha256=torn[2],
            kept_in=kept,
            reason="torn last audit line (crash or full disk mid-append)",
        )
    return audit


#: the largest torn tail looked at (``server.audit.repair_torn_audit`` refuses a longer one)
TORN_PEEK = 1 << 20


def torn_audit_tail(audit_path: Path) -> tuple[int, bytes] | None:
    """(offset, bytes) of the audit log's torn last line (no newline), read without writing; None
    when it ends cleanly, is empty or missing."""
    if not audit_path.exists():
        return None
    with open(audit_path, "rb") as fh:
        size = fh.seek(0, os.SEEK_END)
        if size == 0:
            return None
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return None  # the common case: one byte read
        start = max(0, size - TORN_PEEK)
        fh.seek(start)
        tail = fh.read()
    if tail.endswith(b"\n"):
        return None
    cut = len(tail) - (tail.rfind(b"\n") + 1)
    return size - cut, tail[-cut:]


def keep_aside(of: Path, offset: int, data: bytes) -> str:
    """Save bytes a repair is about to cut as ``<file>.cut-<offset>`` beside it (0600, fsynced) and
    return its name: a repair never destroys bytes that might have been acknowledged."""
    aside = of.with_name(f"{of.name}.cut-{offset}")
    atomic_write(aside, data)
    return aside.name


def refuse_destructive_repair(path: Path) -> None:
    """Refuse a writable open whose automatic repair could cut acknowledged records (issue 26 class 5).

    The one commit of ``writer.py`` appends record lines, then their audit entry (one ``os.write``
    of a whole line, cut back on failure), then acknowledges. So record lines past the last audited
    span are provably unacknowledged only when (a) the audit log ends in a complete line (a torn
    audit line *with* unaudited record lines is what cutting the log's end leaves: the fragment may
    be their acknowledged entry) and (b) they are the lines of ONE commit (one op; one ``ts``; a
    removal is one line): a crash interrupts one commit, while deleting whole audit lines orphans
    several. The lines of one batch commit (``batch.py``: adds and their tombstones, one batch id)
    are one commit too. Otherwise nothing is cut and the open raises ``RegistryCorruptError`` naming the damage.
    """
    records, audit_path = path / cfg.RECORDS_NAME, path / cfg.AUDIT_NAME
    tail = binding.unaudited_tail(records, audit_path)
    if tail is None:
        return
    end, size = tail
    with open(records, "rb") as fh:
        if end > 0:
            fh.seek(end - 1)
            if fh.read(1) != b"\n":
                return  # no line boundary: an edit before it (rollback_unaudited cuts nothing; verify names it)
        fh.seek(end)
        data = fh.read(size - end)
    complete = data[: data.rfind(b"\n") + 1]
    if not complete:
        return  # only a torn record fragment: never acknowledged (RecordLog.load cuts it, audited)
    ids = binding.dropped_ids(complete)
    names = ", ".join(i.split(":", 1)[1] for i in ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
    lines = []
    for raw in complete.splitlines():
        try:
            lines.append(json.loads(raw))
        except ValueError:
            lines.append(None)
    shapes = {(ln.get("op"), ln.get("ts")) if isinstance(ln, dict) else ("?", None) for ln in lines}
    ops = {op for op, _ in shapes}
    one_commit = len(shapes) == 1 and ops <= {"add", "remove"} and (ops == {"add"} or len(lines) == 1)
    batches = {ln.get("batch") if isinstance(ln, dict) else None for ln in lines}
    one_commit = one_commit or (len(batches) == 1 and None not in batches and ops <= {"add", "remove"})  # batch.py
    torn = torn_audit_tail(audit_path)
    why = None
    if torn is not None:
        why = (
            f"{cfg.AUDIT_NAME} ends in a torn line ({len(torn[1])} bytes at byte {torn[0]}) and {cfg.RECORDS_NAME} "
            f"holds {len(lines)} record line(s) after the last audited span ({names}): that is what cutting the "
            "end of the audit log leaves (the cut line may be their acknowledged entry), not an interrupted append"
        )
    elif not one_commit:
        why = (
            f"{cfg.RECORDS_NAME} holds {len(lines)} record line(s) after the last audited span ({names}) that are "
            "not the lines of one interrupted commit (several operations or times): whole entries were cut from "
            f"the end of {cfg.AUDIT_NAME}, or records were appended outside the registry"
        )
    if why is not None:
        raise RegistryCorruptError(
            f"registry {path}: {why}. Nothing was cut or repaired. Restore {cfg.AUDIT_NAME} from a backup (or "
            "compare it with the sites' receipts: `rpe audit cross-check`); `rpe audit verify` and read-only "
            "commands still work meanwhile"
        )


def load_records(
    path: Path, dim: int, read_only: bool, audit: AuditLog, blobs: BlobStore, candidates: Candidates
) -> tuple[ZColumn | MemColumn, Columns, RecordLog, Searcher]:
    """Map the z column and replay records.jsonl into the columns (migrating an old registry)."""
    records = path / cfg.RECORDS_NAME
    zpath = path / cfg.ZCOLUMN_NAME
    fmt = add_format(records)
    zcol: ZColumn | MemColumn
    state: Path | None = None
    if fmt == "b64" or (fmt is None and read_only and not zpath.exists()):
        zcol = MemColumn(dim)  # old format: z come from the lines themselves
    elif not zpath.exists() and fmt == "column":
        raise RegistryCorruptError(
            f"{zpath} is missing but records.jsonl names rows in it: restore z.f32 and z.f32.crc from the "
            "backup taken with records.jsonl"
        )
    else:
        try:
            zcol = ZColumn(zpath, read_only=read_only, dim=dim) if zpath.exists() else ZColumn.create(zpath, dim)
        except ColumnError as exc:
            raise RegistryCorruptError(f"the z column of {path} cannot be opened: {exc}") from exc
        if zcol.recovered_rows and not read_only:
            audit.append("registry.recover", file=cfg.ZCOLUMN_NAME, truncated_rows=zcol.recovered_rows)
        state = path / cfg.ZINDEX_NAME
    try:
        cols = Columns(dim, str(records), zcol)
        search = Searcher(cols, candidates, state)  # read-only opens load the persisted state too (never save it)
        rlog = RecordLog(records, cols)
        if not read_only:
            rollback_unaudited(path, rlog, blobs, audit)
        if isinstance(zcol, ZColumn):  # the old format's lines carry z themselves: always replayed
            refused = snapshot.try_load(path / snapshot.SNAP_NAME, rlog, cols, path / cfg.AUDIT_NAME)
            if refused is not None and not read_only:
                refuse_cache(path, audit, refused)

        def on_torn(n: int, at: int, sha: str) -> None:
            audit.append("registry.recover", file=cfg.RECORDS_NAME, truncated_bytes=n, at_offset=at, sha256=sha)

        rlog.load(read_only, on_torn)
        if fmt == "b64" and not read_only:
            migrate(path, dim, zcol, audit)
            zcol.close()
            return load_records(path, dim, read_only, audit, blobs, candidates)
    except BaseException:
        with contextlib.suppress(Exception):
            zcol.close()
        raise
    return zcol, cols, rlog, search


def refuse_cache(path: Path, audit: AuditLog, reason: str) -> None:
    """A writable open that did not use ``columns.snap`` (edited, unbound, damaged or stale) moves it
    aside as evidence (the close writes a fresh one) and audits why (issue 26 class 4)."""
    snap = path / snapshot.SNAP_NAME
    try:
        digest = sha256_hex(snap.read_bytes()) if snap.is_file() else None
        aside = snap.with_name(f"{snapshot.SNAP_NAME}.refused-{(digest or 'special')[:16]}")
        os.replace(snap, aside)
    except OSError as exc:  # evidence kept where it is; the close still overwrites it
        digest, aside = None, None
        reason += f" (could not be moved aside: {exc.strerror or exc})"
    audit.append(
        "registry.cache_refused",
        file=snapshot.SNAP_NAME,
        sha256=digest,
        kept_in=None if aside is None else aside.name,
        reason=reason[:1000],
    )


def rollback_unaudited(path: Path, rlog: RecordLog, blobs: BlobStore, audit: AuditLog) -> None:
    """Cut record lines whose audit entry was never written (they were never reported stored)."""
    records = path / cfg.RECORDS_NAME
    tail = binding.unaudited_tail(records, path / cfg.AUDIT_NAME)
    if tail is None:
        return
    end, size = tail
    with open(records, "rb") as fh:
        if end > 0:
            fh.seek(end - 1)
            if fh.read(1) != b"\n":
                return  # `end` is no line boundary: bytes before it changed (an edit, not an unfinished add);
                # cutting would destroy good records; ``verify`` reports the edit (``binding.check_binding``)
        fh.seek(end)
        data = fh.read(size - end)
    if b"\n" not in data:
        return  # only a torn fragment: RecordLog.load cuts it (audit event registry.recover)
    dropped = binding.dropped_ids(data)
    kept = keep_aside(records, end, data)  # provably unacknowledged (refuse_destructive_repair), still kept
    rlog.log.repair(end)
    blobs.drop_unreferenced_of(data, records)
    audit.append(
        "registry.repair",
        file=cfg.RECORDS_NAME,
        truncated_bytes=size - end,
        at_offset=end,
        sha256=sha256_hex(data),
        dropped=dropped,
        kept_in=kept,
        reason="record lines without their audit entry (the add never completed)",
    )


def migrate(path: Path, dim: int, zcol: ZSource, audit: AuditLog) -> None:
    """Move z out of records.jsonl into the z column, crash-safely: the column is built under a
    temporary name and renamed, then the rewritten log replaces records.jsonl. Until that last
    rename the log is still in the old format, which makes any column beside it a leftover
    that the next open rebuilds."""
    records, zpath = path / cfg.RECORDS_NAME, path / cfg.ZCOLUMN_NAME
    tmp = zpath.with_name(zpath.name + ".migrate")
    for p in (zpath, tmp):
        for q in (p, p.with_name(p.name + ".crc")):
            q.unlink(missing_ok=True)
    problems = binding.check_binding(records, path / cfg.AUDIT_NAME)
    if problems:
        more = f"; {len(problems) - 1} more" if len(problems) > 1 else ""
        raise RegistryCorruptError(
            f"{records} does not match its audit entries ({problems[0]}{more}), so it is not rewritten for the "
            "z column (that would bind the changes): open it with read_only=True to inspect, or restore "
            "records.jsonl from a backup"
        )
    Z = zcol.matrix()
    col = ZColumn.create(tmp, dim)
    try:
        for s in range(0, Z.shape[0], 65536):
            col.append(Z[s : s + 65536])
    finally:
        col.close()
    new_log = records.with_name(records.name + ".migrate")
    n = migrate_lines(records, new_log)
    if n != Z.shape[0]:
        raise RegistryCorruptError(f"{records}: {n} add lines but {Z.shape[0]} z rows while migrating")
    os.replace(tmp.with_name(tmp.name + ".crc"), zpath.with_name(zpath.name + ".crc"))
    os.replace(tmp, zpath)
    fsync_dir(path)
    data = new_log.read_bytes()
    ids = binding.dropped_ids(data)  # "op:id" of every line, in order
    audit.append(
        binding.MIGRATE,
        file=cfg.RECORDS_NAME,
        z_rows=n,
        to=cfg.ZCOLUMN_NAME,
        records_span=[0, len(data)],
        records_span_sha256=sha256_hex(data),
        count=len(ids),
        first_id=ids[0].split(":", 1)[1] if ids else None,
        last_id=ids[-1].split(":", 1)[1] if ids else None,
    )
    os.replace(new_log, records)  # after its audit entry: a crash in between migrates again
    fsync_dir(path)
