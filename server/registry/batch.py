"""One enrolment round as ONE registry commit (issue 29: "enrolment of N sites as one batch write,
one fsync per batch where the durability contract allows"). ``Registry.add_submissions``.

Each submission is validated on its own (``validation.prepare``, a live duplicate's metadata, the
update-norm bound): a rejected one is dropped from the batch, changes nothing and gets its own
``submission.rejected`` entry. The accepted ones are then written in the order of ``writer.py``:

1. new blobs, each its own file fsynced before any record names it (the blob contract; in parallel);
2. their z rows appended to the z column (one fsync);
3. ONE append of the record lines — every add line, then the tombstones of the adapters they
   supersede — each carrying the batch id ``"batch"`` (one fsync of records.jsonl);
4. ONE append of the audit entries (one fsync of audit.jsonl): the rejections, a
   ``submission.accepted`` per submission binding its own line (``records_span`` + ``line_sha256``,
   with the submission's ``audit_fields``: run, nonce, record digests), a ``registry.remove`` per
   tombstone (``superseded_by``) and a ``record.superseded`` per superseding submission;
5. the columns and the Chroma mirror.

Crash safety: before step 4 completes, the batch's record lines have no audit entry; they all carry
one batch id, so reopening cuts them as ONE interrupted commit (``loading.refuse_destructive_repair``
accepts lines of one batch as one commit; a ``registry.repair`` entry names them, their blobs are
orphans for ``gc``): none of the batch is stored, and nothing of it was acknowledged. After step 4
every record of the batch is live with its entry. The bound of a batch: the median over the
registry's sites (each by its latest adapter) and the batch's own submissions (a site in the batch
counts once, by its submission), so the result does not depend on the order replies arrived in.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.trust.digests import canonical_json, sha256_hex
from server.bounds import NormBound, NormBoundError
from server.registry.config import now
from server.registry.crashpoints import crash_point
from server.registry.errors import (
    DuplicateRecordError,
    UpdateNormBoundError,
    ValidationError,
)
from server.registry.parts import Parts
from server.registry.recordlog import add_line, line_starts
from server.registry.records import AdapterMeta, Prepared, Record
from server.registry.validation import NORMS_KEY, check_same, core_meta, prepare
from server.registry.writer import NORM_REFERENCE_MAX, accepted_fields, storage_error, stored_fields

#: the key of the batch id in every record line of a batch commit
BATCH_KEY = "batch"


@dataclass
class Submission:
    """One site's submission: what ``Registry.add`` takes, with the fields for its audit entry."""

    adapter: Any
    z: Any
    meta: AdapterMeta | Mapping[str, Any]
    expected_sha256: str | None = None
    audit_fields: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Outcome:
    """What became of one submission: ``record`` (accepted; ``duplicate`` when it was already
    stored) or ``error`` (rejected, audited, nothing else changed); ``superseded``: the records it
    took out of retrieval."""

    record: Record | None = None
    error: ValidationError | None = None
    superseded: list[Record] = field(default_factory=list)
    duplicate: bool = False


def _site_of(meta: Any) -> str | None:
    site = meta.get("site") if isinstance(meta, Mapping) else getattr(meta, "site", None)
    return site if isinstance(site, str) else None


def batch_bound(p: Parts, limits: Mapping[str, float], key: tuple[str, str], batch: dict[str, Any]) -> NormBound | None:
    """The update-norm bound of (base, task) over the registry's sites (each by its latest live
    adapter) and the batch's ``{site: norms}`` (a site in the batch counts once, by its submission)."""
    base, task = key
    cols = p.cols
    rows = np.flatnonzero(cols.mask(task=task, base=base))
    sites = cols.codes["site"][rows]
    _, last = np.unique(sites[::-1], return_index=True)
    rows = np.sort(rows[::-1][last])
    refs = [
        n
        for n in (cols.meta[int(r)].get(NORMS_KEY) for r in rows if cols.meta[int(r)].get("site") not in batch)
        if isinstance(n, dict)
    ]
    refs = (refs + list(batch.values()))[-NORM_REFERENCE_MAX:]
    return NormBound.from_reference(
        refs,
        factor=float(limits["update_norm_factor"]),
        min_reference=int(limits["update_norm_min_reference"]),
        floor=float(limits.get("update_norm_floor", 0.0)),
    )


def _rejection(sub: Submission, exc: Exception) -> tuple[str, dict[str, Any]]:
    return (
        "submission.rejected",
        {**dict(sub.audit_fields), "site": _site_of(sub.meta), "reason": str(exc), "error": type(exc).__name__},
    )


def _validate(
    p: Parts, subs: Sequence[Submission], rules: Mapping[str, Any], out: list[Outcome], events: list[Any]
) -> dict[int, tuple[Prepared, int | None]]:
    """Every submission checked on its own: {index: (prepared, live row if already stored)}; a
    rejected one gets its ``Outcome.error`` and its rejection event."""
    cols = p.cols
    good: dict[int, tuple[Prepared, int | None]] = {}
    seen: dict[str, int] = {}
    for i, sub in enumerate(subs):
        try:
            prep = prepare(sub.adapter, sub.z, sub.meta, sub.expected_sha256, **rules)
            row = cols.row.get(prep.id)
            if row is not None and cols.live[row]:
                check_same(cols.meta[row], prep)
                good[i] = (prep, row)
                continue
            if prep.id in seen and core_meta(good[seen[prep.id]][0].meta) != core_meta(prep.meta):
                raise DuplicateRecordError(
                    f"submission {i} repeats record {prep.id} of submission {seen[prep.id]} with different metadata"
                )
            seen.setdefault(prep.id, i)
            good[i] = (prep, None)
        except ValidationError as exc:
            out[i].error = exc
            events.append(_rejection(sub, exc))
    # the norm bound, over the registry and the batch's new submissions (order-independent)
    per_key: dict[tuple[str, str], dict[str, Any]] = {}
    for prep, row in good.values():
        if row is None:
            per_key.setdefault((prep.meta["base_fingerprint"], prep.meta["task"]), {})[prep.meta["site"]] = prep.meta[
                NORMS_KEY
            ]
    bounds = {key: batch_bound(p, rules["limits"], key, batch) for key, batch in per_key.items()}
    for i in sorted(good):
        prep, row = good[i]
        bound = bounds.get((prep.meta["base_fingerprint"], prep.meta["task"]))
        if row is not None or bound is None:
            continue
        try:
            bound.check(prep.meta[NORMS_KEY], f"site {prep.meta['site']!r} (task {prep.meta['task']!r})")
        except NormBoundError as exc:
            err = UpdateNormBoundError(str(exc))
            out[i].error = err
            events.append(_rejection(subs[i], err))
            del good[i]
    return good


def write_batch(p: Parts, subs: Sequence[Submission], rules: Mapping[str, Any], supersede: bool) -> list[Outcome]:
    """Validate and store ``subs`` as one commit (module docstring); the caller holds the mutex and
    has refreshed the columns. A storage failure raises ``RegistryStorageError`` with nothing stored
    (the rejections are still audited, best effort)."""
    cols, blobs = p.cols, p.blobs
    out = [Outcome() for _ in subs]
    events: list[tuple[str, dict[str, Any]]] = []
    good = _validate(p, subs, rules, out, events)
    # the new records, once each (two submissions of one record: the first is written)
    new: list[Prepared] = []
    new_at: dict[str, int] = {}
    for prep, row in good.values():
        if row is None and prep.id not in new_at:
            new_at[prep.id] = len(new)
            new.append(prep)
    ts = now()
    bid = uuid.uuid4().hex
    for prep in new:
        prep.meta["created_at"] = ts
    # supersede: per (site, task, base), the batch's last accepted submission survives
    removals: list[tuple[str, str, Record | None]] = []  # (removed id, survivor id, stored record or None)
    survivors: dict[tuple[str, str, str], int] = {}
    if supersede:
        for i, (prep, _row) in good.items():
            survivors[(prep.meta["site"], prep.meta["task"], prep.meta["base_fingerprint"])] = i
        for (site, task, base), i in survivors.items():
            keep = good[i][0].id
            gone = [cols.record(int(r)) for r in np.flatnonzero(cols.mask(task=task, base=base, site=site))]
            removals += [(r.id, keep, r) for r in gone if r.id != keep]
            removals += [
                (q.id, keep, None)
                for q in new
                if q.id != keep and (q.meta["site"], q.meta["task"], q.meta["base_fingerprint"]) == (site, task, base)
            ]
    new_blobs: dict[str, bytes] = {}
    intact: set[str] = set()
    for prep in new:
        if prep.sha in new_blobs or prep.sha in intact:
            continue
        if blobs.is_intact(prep.sha, len(prep.blob)):
            intact.add(prep.sha)
        else:
            new_blobs[prep.sha] = prep.blob
    enc = blobs.encryption_fields()
    lines: list[str] = []
    start = 0
    data = b""
    try:
        try:
            blobs.write(new_blobs)
        except OSError as exc:
            raise storage_error(exc, "adapter blob", p.path) from exc
        if new_blobs:
            crash_point("after_blob")
        zrows: Any = []
        if new:
            try:
                zrows = cols.append_z(np.stack([q.z for q in new]))
            except OSError as exc:
                raise storage_error(exc, "z column", p.path) from exc
            crash_point("after_column")
        lines = [add_line(q, {**enc, BATCH_KEY: bid}, int(r)) for q, r in zip(new, zrows, strict=True)]
        lines += [
            canonical_json({"op": "remove", "id": rid, "reason": f"superseded by {keep}", "ts": ts, BATCH_KEY: bid})
            for rid, keep, _ in removals
        ]
        if lines:
            try:
                start, _end, data = p.log.append(lines)
            except OSError as exc:
                raise storage_error(exc, "record line", p.path) from exc
            crash_point("after_record")
    except BaseException:
        _drop(p, new_blobs)
        with contextlib.suppress(Exception):
            if events:
                p.audit.append_many(events)
        raise
    offs = line_starts(data, start).tolist() if lines else []
    span = {
        line: {
            "records_span": [at, at + len(line) + 1],
            "records_span_sha256": sha256_hex(line.encode("utf-8") + b"\n"),
            "line_sha256": sha256_hex(line.encode("utf-8")),
        }
        for line, at in zip(lines, offs, strict=True)
    }
    accepted_at: list[int] = []
    for i, (prep, row) in good.items():
        fields = dict(subs[i].audit_fields)
        if row is None:
            what = {**accepted_fields(prep), **span[lines[new_at[prep.id]]]}
            if new[new_at[prep.id]] is not prep:  # a second submission of a record of this batch
                what = {**accepted_fields(new[new_at[prep.id]]), "duplicate": True}
        else:
            what = {**stored_fields(cols.record(row)), "duplicate": True}
        accepted_at.append(len(events))
        events.append(("submission.accepted", {**fields, **what, **enc}))
    run_fields = _common_fields(subs, good)
    for (rid, keep, was), line in zip(removals, lines[len(new) :], strict=True):
        site, sha = (was.meta.site, was.blob_sha256) if was is not None else _site_sha(new[new_at[rid]])
        events.append(
            (
                "registry.remove",
                {
                    "record_id": rid,
                    "site": site,
                    "blob_sha256": sha,
                    "reason": f"superseded by {keep}",
                    "superseded_by": keep,
                    **run_fields,
                    **span[line],
                },
            )
        )
    for i in survivors.values():
        keep = good[i][0].id
        old = [(rid, rec) for rid, k, rec in removals if k == keep]
        if old:
            meta = good[i][0].meta
            events.append(
                (
                    "record.superseded",
                    {
                        "site": meta["site"],
                        "task": meta["task"],
                        "base_fingerprint": meta["base_fingerprint"],
                        "record_id": keep,
                        "superseded": [rid for rid, _ in old],
                        "superseded_blobs": [
                            rec.blob_sha256 if rec is not None else new[new_at[rid]].sha for rid, rec in old
                        ],
                        **run_fields,
                    },
                )
            )
    try:
        written = p.audit.append_many(events, midway=_midway())
    except BaseException as exc:
        if lines:
            p.log.rollback(start, len(lines))
        _drop(p, new_blobs)
        if isinstance(exc, OSError):
            raise storage_error(exc, "audit entry", p.path) from exc
        raise
    crash_point("after_audit")
    if accepted_at:
        p.writer.last_accepted = written[accepted_at[-1]]
    rows = (
        cols.apply_adds([(q.id, q.meta, q.sha, len(q.blob), q.z_sha) for q in new], zrows, offs[: len(new)])
        if new
        else []
    )
    stored = {q.id: cols.record(cols.row[q.id]) for q in new}  # before any of them is tombstoned
    for rid, _keep, _rec in removals:
        cols.apply_remove(rid)
    if p.index is not None:
        if rows:
            p.index.upsert(rows, cols.rows_view)  # a failure only marks the index stale
        if removals:
            p.index.delete([rid for rid, _, _ in removals])
    last = set(survivors.values())
    for i, (prep, row) in good.items():
        rid = prep.id
        out[i].record = stored[rid] if rid in stored else cols.record(int(row))  # type: ignore[arg-type]
        out[i].duplicate = row is not None or new[new_at[rid]] is not prep
        if i in last:
            out[i].superseded = [rec if rec is not None else stored[r] for r, k, rec in removals if k == rid]
    return out


def _site_sha(q: Prepared) -> tuple[str, str]:
    return str(q.meta["site"]), q.sha


def _common_fields(subs: Sequence[Submission], good: Mapping[int, Any]) -> dict[str, Any]:
    """``run_id`` for the tombstone entries, when the batch's submissions share one."""
    runs = {subs[i].audit_fields.get("run_id") for i in good}
    return {"run_id": runs.pop()} if len(runs) == 1 and None not in runs else {}


def _midway() -> Any:
    from server.registry.crashpoints import armed

    return (lambda: crash_point("mid_audit")) if armed() else None


def _drop(p: Parts, new_blobs: Mapping[str, bytes]) -> None:
    """Delete the blobs this failed commit wrote (no record names them: they were new)."""
    for sha in new_blobs:
        with contextlib.suppress(OSError):
            p.blobs.path(sha).unlink()
