"""The write path of the registry: validate a batch, store it, account for it in the audit log.

Order (each step durable before the next): every item validated (``validation.prepare``; one bad
item rejects the batch and writes one ``submission.rejected`` line), new blobs written and
fsynced (``BlobStore.write``), one append of the record lines (``RecordLog.append``), the rows
put into the columns, the Chroma mirror updated, then one audit line (``submission.accepted``
per ``add``, ``registry.bulk_add`` per ``add_many``). Re-submissions of a live record are
idempotent and return it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from common.digests import canonical_json, sha256_hex
from server.audit import AuditLog
from server.registry.blobstore import BlobStore
from server.registry.chroma_index import ChromaIndex
from server.registry.columns import Columns
from server.registry.config import now
from server.registry.crashpoints import crash_point
from server.registry.errors import DuplicateRecordError, RegistryError, ValidationError
from server.registry.recordlog import RecordLog, add_line
from server.registry.records import Prepared, Record
from server.registry.validation import check_same, core_meta, prepare


class Writer:
    """Writes batches into the registry's parts (the caller holds the registry's mutex)."""

    def __init__(self, cols: Columns, log: RecordLog, blobs: BlobStore, audit: AuditLog,
                 index: Callable[[], ChromaIndex | None]) -> None:
        self.cols = cols
        self.log = log
        self.blobs = blobs
        self.audit = audit
        self.index = index

    def add_batch(self, items: Iterable[Sequence[Any]], index: bool, single: bool, extra: dict[str, Any],
                  rules: Mapping[str, Any]) -> list[Record]:
        """Validate and store ``(adapter, z, meta[, expected_sha256])`` items (``rules``: bases,
        limits, dim, representation); ``single``: one ``add`` with its own audit line."""
        prepared: list[Prepared] = []
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
        rows = self._commit(prepared, index) if prepared else []
        out = [self.cols.record(rows[ref] if kind == "new" else ref) for kind, ref in results]
        if not single:
            self._audit_bulk(prepared, len(results))
            return out
        (kind, _), rec = results[0], out[0]
        self.audit.append("submission.accepted", **{
            **extra, "site": rec.meta.site, "record_id": rec.id, "blob_sha256": rec.blob_sha256,
            "bytes": rec.bytes, "z_sha256": rec.z_sha256, "task": rec.meta.task,
            "base_fingerprint": rec.meta.base_fingerprint, "privacy": rec.meta.privacy,
            **({"duplicate": True} if kind == "old" else {}), **self.blobs.encryption_fields()})
        return out

    def _validate_item(self, i: int, item: tuple[Any, ...], single: bool, extra: dict[str, Any],
                       prepared: list[Prepared], seen: dict[str, int], rules: Mapping[str, Any]) -> Prepared:
        """Validate item ``i``; on a rejection write the ``submission.rejected`` audit line and raise."""
        if len(item) not in (3, 4):
            raise RegistryError(f"item {i}: expected (adapter, z, meta[, expected_sha256])")
        meta = item[2]
        try:
            p = prepare(item[0], item[1], meta, item[3] if len(item) == 4 else None, **rules)
            row = self.cols.row.get(p.id)
            if row is not None and self.cols.live[row]:
                check_same(self.cols.meta[row], p)
            elif p.id in seen and core_meta(prepared[seen[p.id]].meta) != core_meta(p.meta):
                raise DuplicateRecordError(
                    f"item {i} repeats record {p.id} of item {seen[p.id]} with different metadata")
            return p
        except ValidationError as exc:
            if not single:
                exc.args = (f"item {i}: {exc}",) + exc.args[1:]
            site = meta.get("site") if isinstance(meta, Mapping) else getattr(meta, "site", None)
            self.audit.append("submission.rejected", **{
                **extra, "site": site if isinstance(site, str) else None, "reason": str(exc),
                "error": type(exc).__name__, **({} if single else {"item": i})})
            raise

    def _audit_bulk(self, prepared: list[Prepared], n_items: int) -> None:
        """One audit line per ``add_many`` call (an fsynced line per record would dominate a bulk
        load): the count and a digest of the new (id, blob, z) triples, recomputable from
        records.jsonl, pin exactly what was added."""
        triples = [[p.id, p.sha, p.z_sha] for p in prepared]
        self.audit.append(
            "registry.bulk_add", count=len(prepared), duplicates=n_items - len(prepared),
            records_sha256=sha256_hex(canonical_json(triples).encode()),
            first_id=prepared[0].id if prepared else None, last_id=prepared[-1].id if prepared else None,
            sites=sorted({p.meta["site"] for p in prepared}), **self.blobs.encryption_fields())

    def _commit(self, prepared: list[Prepared], index: bool) -> list[int]:
        ts = now()
        new_blobs: dict[str, bytes] = {}
        for p in prepared:
            p.meta["created_at"] = ts
            if p.sha not in new_blobs and not self.blobs.is_intact(p.sha, len(p.blob)):
                new_blobs[p.sha] = p.blob
        self.blobs.write(new_blobs)
        if new_blobs:
            crash_point("after_blob")
        self.log.append([add_line(p, self.blobs.encryption_fields()) for p in prepared])
        crash_point("after_record")
        rows = self.cols.apply_adds([(p.id, p.meta, p.sha, len(p.blob), p.z_sha) for p in prepared],
                                     np.stack([p.z for p in prepared]))
        chroma = self.index()
        if index:
            if chroma is not None:
                chroma.upsert(rows, self.cols.rows_view)
            crash_point("after_index")
        elif chroma is not None:
            chroma.fresh = False
        return rows
