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
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.files.durable import fsync_dir
from common.trust.digests import sha256_hex
from server.audit import AuditLog, repair_torn_audit
from server.registry import binding, coordkey, snapshot
from server.registry import config as cfg
from server.registry.blobcrypt import BlobKey
from server.registry.blobstore import BlobStore
from server.registry.chroma_index import ChromaIndex
from server.registry.columns import Columns, MemColumn, ZSource
from server.registry.errors import RegistryCorruptError
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


def open_audit(path: Path, read_only: bool) -> AuditLog:
    """The registry's audit log; a writable open first cuts a torn last line and audits the cut."""
    torn = None if read_only else repair_torn_audit(path / cfg.AUDIT_NAME)
    audit = AuditLog(path / cfg.AUDIT_NAME)
    if torn is not None:
        audit.append(
            "registry.repair",
            file=cfg.AUDIT_NAME,
            truncated_bytes=torn[0],
            at_offset=torn[1],
            sha256=torn[2],
            reason="torn last audit line (crash or full disk mid-append)",
        )
    return audit


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
            snapshot.load(path / snapshot.SNAP_NAME, rlog, cols)

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
    rlog.log.repair(end)
    blobs.drop_unreferenced_of(data, records)
    audit.append(
        "registry.repair",
        file=cfg.RECORDS_NAME,
        truncated_bytes=size - end,
        at_offset=end,
        sha256=sha256_hex(data),
        dropped=dropped,
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
