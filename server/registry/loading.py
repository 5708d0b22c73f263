"""Opening a registry's records: map the z column, roll back unaudited lines, replay records.jsonl
into the columns, and migrate a registry written before the z column (``facade.Registry`` calls
``load_records`` on open).

A registry whose add lines carry z as base64 (the format before ``z.f32``) is read as it is when
opened read-only (``MemColumn``) and migrated by its first writable open: only after its lines
check out against their audit entries (``binding.check_binding``), the column built under a
temporary name and renamed, then a ``registry.migrate`` audit entry that binds the whole rewritten
file, then the rename of the rewritten file (a crash anywhere leaves the old log, which the next
open migrates again).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.files.durable import fsync_dir
from common.trust.digests import sha256_hex
from server.registry import binding, maintenance, snapshot
from server.registry import config as cfg
from server.registry.columns import Columns, MemColumn
from server.registry.errors import RegistryCorruptError
from server.registry.recordlog import RecordLog, add_format, migrate_lines
from server.registry.search import Searcher
from server.registry.writer import Writer
from server.zindex import ColumnError, ZColumn

if TYPE_CHECKING:
    from server.registry.facade import Registry

log = logging.getLogger("server.registry.facade")


def load_records(reg: Registry) -> None:
    """Map the z column and replay records.jsonl into the columns (migrating an old registry)."""
    records = reg.path / cfg.RECORDS_NAME
    zpath = reg.path / cfg.ZCOLUMN_NAME
    fmt = add_format(records)
    zcol: ZColumn | MemColumn
    state: Any = None
    if fmt == "b64" or (fmt is None and reg.read_only and not zpath.exists()):
        zcol = MemColumn(reg.embedding_dim)  # old format: z come from the lines themselves
    elif not zpath.exists() and fmt == "column":
        raise RegistryCorruptError(
            f"{zpath} is missing but records.jsonl names rows in it: restore z.f32 and z.f32.crc from the "
            "backup taken with records.jsonl"
        )
    else:
        try:
            zcol = (
                ZColumn(zpath, read_only=reg.read_only, dim=reg.embedding_dim)
                if zpath.exists()
                else ZColumn.create(zpath, reg.embedding_dim)
            )
        except ColumnError as exc:
            raise RegistryCorruptError(f"the z column of {reg.path} cannot be opened: {exc}") from exc
        if zcol.recovered_rows and not reg.read_only:
            reg.audit.append("registry.recover", file=cfg.ZCOLUMN_NAME, truncated_rows=zcol.recovered_rows)
        state = reg.path / cfg.ZINDEX_NAME
    reg._zcol = zcol
    reg._cols = Columns(reg.embedding_dim, str(records), zcol)
    reg._search = Searcher(
        reg._cols, lambda q, want, where: reg._chroma_candidates(q, want, where), state
    )  # read-only opens load the persisted state too (never save it)
    reg._log = RecordLog(records, reg._cols)
    reg._writer = Writer(reg._cols, reg._log, reg._blobs, reg.audit, lambda: reg._index, reg.norm_bound)
    if not reg.read_only:
        maintenance.rollback_unaudited(reg)
    if isinstance(zcol, ZColumn):  # the old format's lines carry z themselves: always replayed
        snapshot.load(reg.path / snapshot.SNAP_NAME, reg._log, reg._cols)
    reg._log.load(
        reg.read_only,
        lambda n, at, sha: reg.audit.append(
            "registry.recover", file=cfg.RECORDS_NAME, truncated_bytes=n, at_offset=at, sha256=sha
        ),
    )
    if fmt == "b64" and not reg.read_only:
        migrate(reg, records, zpath)
        load_records(reg)


def migrate(reg: Registry, records: Path, zpath: Path) -> None:
    """Move z out of records.jsonl into the z column, crash-safely: the column is built under a
    temporary name and renamed, then the rewritten log replaces records.jsonl. Until that last
    rename the log is still in the old format, which makes any column beside it a leftover
    that the next open rebuilds."""
    tmp = zpath.with_name(zpath.name + ".migrate")
    for p in (zpath, tmp):
        for q in (p, p.with_name(p.name + ".crc")):
            q.unlink(missing_ok=True)
    problems = binding.check_binding(records, reg.path / cfg.AUDIT_NAME)
    if problems:
        more = f"; {len(problems) - 1} more" if len(problems) > 1 else ""
        raise RegistryCorruptError(
            f"{records} does not match its audit entries ({problems[0]}{more}), so it is not rewritten for the "
            "z column (that would bind the changes): open it with read_only=True to inspect, or restore "
            "records.jsonl from a backup"
        )
    Z = reg._zcol.matrix()
    col = ZColumn.create(tmp, reg.embedding_dim)
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
    fsync_dir(reg.path)
    data = new_log.read_bytes()
    ids = binding.dropped_ids(data)  # "op:id" of every line, in order
    reg.audit.append(
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
    fsync_dir(reg.path)


def close_parts(reg: Registry) -> None:
    """``Registry.close``: persist the search state (a cache), close the column, Chroma and the lock."""
    if getattr(reg, "_search", None) is not None and not reg.read_only:
        try:
            reg._search.save_state()
        except OSError as exc:  # a cache: losing it costs a rebuild on the next query, not data
            log.warning("could not persist the search index of %s (%s)", reg.path, exc)
    if getattr(reg, "_log", None) is not None and not reg.read_only and isinstance(reg._zcol, ZColumn):
        try:
            snapshot.write(reg.path / snapshot.SNAP_NAME, reg._cols, reg._log)
        except OSError as exc:  # a cache: losing it costs a full replay on the next open, not data
            log.warning("could not write the columns snapshot of %s (%s)", reg.path, exc)
    if getattr(reg, "_zcol", None) is not None:
        with contextlib.suppress(Exception):
            reg._zcol.close()
    if getattr(reg, "_index", None) is not None:
        with contextlib.suppress(Exception):
            reg._index.disconnect()
    if reg._lock is not None:
        reg._lock.release()
        reg._lock = None
