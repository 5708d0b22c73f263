"""The write path of the registry: validate a batch, store it, account for it in the audit log.

Order (each step durable before the next): every item validated (``validation.prepare``; one bad
item rejects the batch and writes one ``submission.rejected`` line), new blobs written and
fsynced (``BlobStore.write``), the z rows appended to the z column (``Columns.append_z``:
``ZColumn.append``, fsynced, its row count published last), one append of the record lines
(``RecordLog.append``; each add line names its column row and z_sha256), then one audit line
(``submission.accepted`` per ``add``, ``registry.bulk_add`` per ``add_many``) that names the
exact bytes appended (``records_span`` = [start, end) of records.jsonl and their sha256, plus
``line_sha256`` for a single add). The record lines and their audit line are ONE commit: a record
is live iff its audit entry exists. If the audit append fails (ENOSPC), the record lines are cut
back and the new blobs deleted before the typed ``RegistryStorageError`` is raised; if the process
dies in between, reopening rolls the unaudited lines back (``binding.rollback_unaudited``). The z
rows of a rolled-back add stay in the column as orphans that no record names (never read; the next
add appends after them). Only after the commit are the rows put into the columns and the Chroma
mirror updated (a failing mirror only marks the index stale: queries stay exact). Re-submissions
of a live record are idempotent and return it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from common.trust.digests import canonical_json, sha256_hex
from server.audit import AuditLog
from server.bounds import NormBound, NormBoundError
from server.registry.blobstore import BlobStore
from server.registry.chroma_index import ChromaIndex
from server.registry.columns import Columns
from server.registry.config import now
from server.registry.crashpoints import crash_point
from server.registry.errors import (
    DuplicateRecordError,
    RegistryError,
    RegistryStorageError,
    UpdateNormBoundError,
    ValidationError,
)
from server.registry.recordlog import RecordLog, add_line, line_starts
from server.registry.records import Prepared, Record
from server.registry.validation import NORMS_KEY, check_same, core_meta, prepare

log = logging.getLogger(__name__)

#: at most this many sites (each by its latest adapter) of a (base, task) form the norm reference
NORM_REFERENCE_MAX = 1000


def storage_error(exc: OSError, stage: str, root: Any) -> RegistryStorageError:
    """The typed error of a failed write: what was being written, why, and that nothing was stored."""
    why = "the disk is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else f"{exc.strerror or exc}"
    return RegistryStorageError(
        f"registry {root}: writing the {stage} failed ({why}); nothing was stored and the registry is as "
        "before — free space (or fix the filesystem) and resubmit",
        stage=stage,
    )


def reference_bound(cols: Columns, limits: Mapping[str, float], base: str, task: str | None) -> NormBound | None:
    """The update-norm bound of (base, task): ``update_norm_factor`` × the median per-module and total
    ‖ΔW‖ over the sites that hold a live adapter for it, each site by its **latest** adapter (the
    latest ``NORM_REFERENCE_MAX`` sites), never below ``update_norm_floor``; None while fewer than
    ``update_norm_min_reference`` sites exist (``server/bounds.py``). ``cols`` must be fresh.

    Why one per site (issue 26 class 6): when every enrolment counted, one lying site enrolling
    four near-zero adapters made every honest enrolment of the task refused, and one enrolling just
    under the moving limit 40 times ratcheted it from 0.38 to 258. Counted once, a site moves the
    median of the sites no further than to the next honest site's value."""
    rows = np.flatnonzero(cols.mask(task=task, base=base))
    sites = cols.codes["site"][rows]
    _, last = np.unique(sites[::-1], return_index=True)  # each site's latest row
    rows = np.sort(rows[::-1][last])[-NORM_REFERENCE_MAX:]
    refs = [n for n in (cols.meta[int(r)].get(NORMS_KEY) for r in rows) if isinstance(n, dict)]
    return NormBound.from_reference(
        refs,
        factor=float(limits["update_norm_factor"]),
        min_reference=int(limits["update_norm_min_reference"]),
        floor=float(limits.get("update_norm_floor", 0.0)),
    )


def accepted_fields(p: Prepared) -> dict[str, Any]:
    """What a ``submission.accepted`` audit entry says of a newly stored submission."""
    return {
        "site": p.meta["site"],
        "record_id": p.id,
        "blob_sha256": p.sha,
        "bytes": len(p.blob),
        "z_sha256": p.z_sha,
        "task": p.meta["task"],
        "base_fingerprint": p.meta["base_fingerprint"],
        "privacy": p.meta["privacy"],
    }


def stored_fields(rec: Record) -> dict[str, Any]:
    """The same fields, of a record already stored (a re-submission of a live record)."""
    return {
        "site": rec.meta.site,
        "record_id": rec.id,
        "blob_sha256": rec.blob_sha256,
        "bytes": rec.bytes,
        "z_sha256": rec.z_sha256,
        "task": rec.meta.task,
        "base_fingerprint": rec.meta.base_fingerprint,
        "privacy": rec.meta.privacy,
    }


def span_fields(start: int, end: int, data: bytes) -> dict[str, Any]:
    """The audit fields that bind appended record bytes ``data`` at [start, end) into the chain."""
    return {"records_span": [start, end], "records_span_sha256": sha256_hex(data)}


class Writer:
    """Writes batches into the registry's parts (the caller holds the registry's mutex)."""

    def __init__(
        self,
        cols: Columns,
        log: RecordLog,
        blobs: BlobStore,
        audit: AuditLog,
        index: ChromaIndex | None,
    ) -> None:
        self.cols = cols
        self.log = log
        self.blobs = blobs
        self.audit = audit
        self.index = index
        self._bounds: dict[tuple[str, str], NormBound | None] = {}  # per batch: (base, task) -> bound
        self._limits: Mapping[str, float] = {}  # the batch's ``rules["limits"]``
        #: the last ``submission.accepted`` entry written (what ``Registry.receipt`` signs)
        self.last_accepted: dict[str, Any] | None = None

    def add_batch(
        self, items: Iterable[Sequence[Any]], index: bool, single: bool, extra: dict[str, Any], rules: Mapping[str, Any]
    ) -> list[Record]:
        """Validate and store ``(adapter, z, meta[, expected_sha256])`` items (``rules``: bases,
        limits, dim, representation); ``single``: one ``add`` with its own audit line."""
        prepared: list[Prepared] = []
        self._bounds = {}
        self._limits = rules["limits"]
        seen: dict[str, int] = {}
        results: list[tuple[str, int]] = []  # ("new", index into prepared) | ("old", row)
        for i, item in enumerate(items):
            p = self._validate_item(i, tuple(item), single, extra, prepared, seen, rules)
            row = self.cols.row.get(p.id)
            if row is not None and self.cols.live[row]:
                results.append(("old", row))
            elif p.id in seen:
                results.append(("new", seen[p.id]))
            else:
                seen[p.id] = len(prepared)
                results.append(("new", len(prepared)))
                prepared.append(p)
        if single:
            kind, at = results[0]

            def audit_single(fields: dict[str, Any]) -> None:
                if kind == "new":
                    what = accepted_fields(prepared[at])
                else:  # a re-submission of a live record: the stored one's fields, marked duplicate
                    what = {**stored_fields(self.cols.record(at)), "duplicate": True}
                self.last_accepted = self.audit.append(
                    "submission.accepted", **{**extra, **what, **fields, **self.blobs.encryption_fields()}
                )

            audit = audit_single
        else:

            def audit_bulk(fields: dict[str, Any]) -> None:
                self._audit_bulk(prepared, len(results), fields)

            audit = audit_bulk
        if prepared:
            rows = self._commit(prepared, index, audit)
        else:
            try:
                audit({})
            except OSError as exc:
                raise storage_error(exc, "audit entry", self.blobs.root) from exc
            rows = []
        return [self.cols.record(rows[ref] if kind == "new" else ref) for kind, ref in results]

    def _validate_item(
        self,
        i: int,
        item: tuple[Any, ...],
        single: bool,
        extra: dict[str, Any],
        prepared: list[Prepared],
        seen: dict[str, int],
        rules: Mapping[str, Any],
    ) -> Prepared:
        """Validate item ``i``; on a rejection write the ``submission.rejected`` audit line and raise."""
        if len(item) not in (3, 4):
            raise RegistryError(f"item {i}: expected (adapter, z, meta[, expected_sha256])")
        meta = item[2]
        try:
            p = prepare(item[0], item[1], meta, item[3] if len(item) == 4 else None, **rules)
            row = self.cols.row.get(p.id)
            if row is not None and self.cols.live[row]:
                check_same(self.cols.meta[row], p)  # a live record was bounded when it was added
                return p
            self._check_bound(p)
            if p.id in seen and core_meta(prepared[seen[p.id]].meta) != core_meta(p.meta):
                raise DuplicateRecordError(
                    f"item {i} repeats record {p.id} of item {seen[p.id]} with different metadata"
                )
            return p
        except ValidationError as exc:
            if not single:
                exc.args = (f"item {i}: {exc}",) + exc.args[1:]
            site = meta.get("site") if isinstance(meta, Mapping) else getattr(meta, "site", None)
            self.audit.append(
                "submission.rejected",
                **{
                    **extra,
                    "site": site if isinstance(site, str) else None,
                    "reason": str(exc),
                    "error": type(exc).__name__,
                    **({} if single else {"item": i}),
                },
            )
            raise

    def _check_bound(self, p: Prepared) -> None:
        """Refuse an update far larger than the registry's adapters of the same base and task."""
        key = (p.meta["base_fingerprint"], p.meta["task"])
        if key not in self._bounds:
            self._bounds[key] = reference_bound(self.cols, self._limits, *key)
        bound = self._bounds[key]
        if bound is None:
            return
        try:
            bound.check(p.meta[NORMS_KEY], f"site {p.meta['site']!r} (task {p.meta['task']!r})")
        except NormBoundError as exc:
            raise UpdateNormBoundError(str(exc)) from None

    def _audit_bulk(self, prepared: list[Prepared], n_items: int, fields: dict[str, Any]) -> None:
        """One audit line per ``add_many`` call (an fsynced line per record would dominate a bulk
        load): the count and a digest of the new (id, blob, z) triples, recomputable from
        records.jsonl, pin exactly what was added."""
        triples = [[p.id, p.sha, p.z_sha] for p in prepared]
        self.audit.append(
            "registry.bulk_add",
            count=len(prepared),
            duplicates=n_items - len(prepared),
            records_sha256=sha256_hex(canonical_json(triples).encode()),
            first_id=prepared[0].id if prepared else None,
            last_id=prepared[-1].id if prepared else None,
            sites=sorted({p.meta["site"] for p in prepared}),
            **fields,
            **self.blobs.encryption_fields(),
        )

    def _commit(self, prepared: list[Prepared], index: bool, audit: Callable[[dict[str, Any]], None]) -> list[int]:
        """Blobs, record lines, audit line — all or nothing — then columns and the Chroma mirror."""
        ts = now()
        new_blobs: dict[str, bytes] = {}
        intact: set[str] = set()  # a blob many items of the batch share is read back once
        for p in prepared:
            p.meta["created_at"] = ts
            if p.sha in new_blobs or p.sha in intact:
                continue
            if self.blobs.is_intact(p.sha, len(p.blob)):
                intact.add(p.sha)
            else:
                new_blobs[p.sha] = p.blob
        root = self.blobs.root
        try:
            self.blobs.write(new_blobs)
        except OSError as exc:
            self._drop_blobs(new_blobs)
            raise storage_error(exc, "adapter blob", root) from exc
        if new_blobs:
            crash_point("after_blob")
        # z column before the record lines that name its rows (a crash or ENOSPC after it leaves orphan rows)
        try:
            zrows = self.cols.append_z(np.stack([p.z for p in prepared]))
        except OSError as exc:
            self._drop_blobs(new_blobs)
            raise storage_error(exc, "z column", root) from exc
        crash_point("after_column")
        enc = self.blobs.encryption_fields()
        lines = [add_line(p, enc, int(r)) for p, r in zip(prepared, zrows, strict=True)]
        try:
            start, end, data = self.log.append(lines)
        except OSError as exc:
            self._drop_blobs(new_blobs)
            raise storage_error(exc, "record line", root) from exc
        crash_point("after_record")
        fields = span_fields(start, end, data)
        if len(lines) == 1:
            fields["line_sha256"] = sha256_hex(lines[0].encode("utf-8"))
        try:
            audit(fields)
        except BaseException as exc:
            self.log.rollback(start, len(lines))
            self._drop_blobs(new_blobs)
            if isinstance(exc, OSError):
                raise storage_error(exc, "audit entry", root) from exc
            raise
        offs = line_starts(data, start)
        rows = self.cols.apply_adds([(p.id, p.meta, p.sha, len(p.blob), p.z_sha) for p in prepared], zrows, offs)
        chroma = self.index
        if index:
            if chroma is not None:
                chroma.upsert(rows, self.cols.rows_view)  # a failure only marks the index stale
            crash_point("after_index")
        elif chroma is not None:
            chroma.fresh = False
        return rows

    def _drop_blobs(self, new_blobs: Mapping[str, bytes]) -> None:
        """Delete the blobs this failed commit wrote (no record names them: they were new)."""
        for sha in new_blobs:
            with contextlib.suppress(OSError):
                self.blobs.path(sha).unlink()
