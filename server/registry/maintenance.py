"""The registry's writes that are not submissions: creation, another base model, a removal, a
receipt, gc; and ``verify`` and the update-norm bound (``facade.Registry`` delegates here). Each
write keeps the one-commit rule of ``writer.py``: the record or config change and its audit line
land together, or neither does. The functions work on the registry's ``Parts`` (or plain values)
and return what changed; none of them knows the facade.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.trust.digests import sha256_hex
from server.audit import AuditLog, read_entries
from server.audit import receipt as audit_receipt
from server.bounds import NormBound
from server.registry import binding, coordkey, snapshot
from server.registry import config as cfg
from server.registry.blobcrypt import BlobKey
from server.registry.blobstore import env_blob_key
from server.registry.errors import RecordNotFoundError, RegistryError, RegistryExistsError
from server.registry.parts import Parts
from server.registry.recordlog import remove_line
from server.registry.records import Record
from server.registry.writer import reference_bound, span_fields, storage_error


def create_registry(
    path: str | os.PathLike[str],
    *,
    base_fingerprint: str,
    module_shapes: Mapping[str, Sequence[int]],
    embedding_dim: int,
    representation: str,
    chroma_host: str | None,
    chroma_port: int | None,
    base_name: str | None,
    limits: Mapping[str, int] | None,
    collection: str,
    exist_ok: bool,
    blob_key: BlobKey | None,
) -> tuple[Path, BlobKey | None, bool]:
    """``Registry.init``'s writes: (the directory, the blob key to open it with, whether it was created).

    With ``exist_ok`` an existing registry is left as it is (``created`` False); the facade opens it
    and checks it with :func:`check_existing`."""
    root = Path(path).expanduser().resolve()
    blob_key = blob_key if blob_key is not None else env_blob_key()
    if (root / cfg.CONFIG_NAME).is_file():
        if not exist_ok:
            raise RegistryExistsError(f"{root} already holds a registry; open it with Registry(path)")
        return root, blob_key, False
    if root.exists() and not cfg.empty_or_interrupted_init(root):
        raise RegistryExistsError(f"{root} exists and is not empty; choose a new directory for the registry")
    config = cfg.new_config(
        base_fingerprint=base_fingerprint,
        module_shapes=module_shapes,
        embedding_dim=embedding_dim,
        representation=representation,
        chroma_host=chroma_host,
        chroma_port=chroma_port,
        base_name=base_name,
        limits=limits,
        collection=collection,
        blob_encryption=None if blob_key is None else blob_key.describe(),
    )
    cfg.create(root, config)
    return root, blob_key, True


def check_existing(root: Path, config: Mapping[str, Any], embedding_dim: int, representation: str) -> None:
    """``Registry.init(exist_ok=True)`` on an existing registry: it must hold the same kind of z."""
    dim, rep = int(config["embedding_dim"]), str(config["representation"])
    if dim != embedding_dim or rep != representation:
        raise RegistryExistsError(
            f"{root} holds a {dim}-d {rep!r} registry, not {embedding_dim}-d {representation!r}; use another directory"
        )


def add_base(
    path: Path,
    config: dict[str, Any],
    audit: AuditLog,
    fingerprint: str,
    module_shapes: Mapping[str, Sequence[int]],
    name: str | None,
) -> dict[str, Any]:
    """``Registry.add_base``: the new registry.json and its audit line, or neither; returns the config
    now in force (``config`` itself when the base is already there). The caller holds the mutex."""
    if not isinstance(fingerprint, str) or not fingerprint:
        raise RegistryError("base fingerprint must be a non-empty string")
    entry = cfg.base_entry(module_shapes, name)
    old = config["bases"].get(fingerprint)
    if old is not None:
        if old["modules"] != entry["modules"]:
            raise RegistryError(
                f"base {fingerprint} is already registered with different module shapes; a fingerprint names one model"
            )
        return config
    new = {**config, "bases": {**config["bases"], fingerprint: entry}}
    try:
        cfg.write_config(path, new)
    except OSError as exc:
        raise storage_error(exc, "registry.json", path) from exc
    try:
        audit.append("registry.add_base", base_fingerprint=fingerprint, name=name, n_modules=len(entry["modules"]))
    except OSError as exc:
        cfg.write_config(path, config)  # back to the old file: no space needed to shrink
        raise storage_error(exc, "audit entry", path) from exc
    return new


def remove(p: Parts, record_id: str, reason: str | None, **fields: Any) -> Record:
    """``Registry.remove``: one tombstone line and its audit line, or neither; then columns and Chroma."""
    with p.mutex:
        rec = p.fresh().record(p.cols.live_row(record_id, str(p.path)))
        line = remove_line(record_id, reason)
        try:
            start, end, data = p.log.append([line])
        except OSError as exc:
            raise storage_error(exc, "record line", p.path) from exc
        try:
            p.audit.append(
                "registry.remove",
                record_id=record_id,
                site=rec.meta.site,
                blob_sha256=rec.blob_sha256,
                reason=reason,
                **fields,
                **span_fields(start, end, data),
                line_sha256=sha256_hex(line.encode("utf-8")),
            )
        except BaseException as exc:
            p.log.rollback(start, 1)
            if isinstance(exc, OSError):
                raise storage_error(exc, "audit entry", p.path) from exc
            raise
        p.cols.apply_remove(record_id)
        if p.index is not None:
            p.index.delete([record_id])
        return rec


def supersede(p: Parts, new_id: str, audit_fields: Mapping[str, Any]) -> list[Record]:
    """``Registry.supersede``: every other live record of ``new_id``'s (site, task, base) leaves
    retrieval. Each is tombstoned like a removal (one ``registry.remove`` line binding its
    tombstone, ``superseded_by`` naming the new record; its blob, add line and audit entries stay),
    then ONE ``record.superseded`` entry names the old ids and the new one. Returns the old records."""
    with p.mutex:
        cols = p.fresh()
        new = cols.record(cols.live_row(new_id, str(p.path)))
        meta = new.meta
        mask = cols.mask(task=meta.task, base=meta.base_fingerprint, site=meta.site)
        old = [cols.record(int(r)) for r in np.flatnonzero(mask) if cols.ids[int(r)] != new_id]
        for rec in old:
            remove(p, rec.id, f"superseded by {new_id}", superseded_by=new_id)
        if old:
            p.audit.append(
                "record.superseded",
                site=meta.site,
                task=meta.task,
                base_fingerprint=meta.base_fingerprint,
                record_id=new_id,
                superseded=[r.id for r in old],
                superseded_blobs=[r.blob_sha256 for r in old],
                **dict(audit_fields),
            )
        return old


def receipt(p: Parts, registry_id: str, record_id: str, run_id: str | None) -> dict[str, Any]:
    """``Registry.receipt``: the coordinator-signed receipt of the audit head after the record's acceptance."""
    with p.mutex:
        entry = p.writer.last_accepted
        if entry is None or entry.get("record_id") != record_id:
            entry = next(
                (
                    e
                    for _, e in reversed(list(read_entries(p.audit.path)))
                    if e.get("event") == "submission.accepted" and e.get("record_id") == record_id
                ),
                None,
            )
        if entry is None:
            raise RecordNotFoundError(f"no accepted submission of record {record_id!r} in {p.audit.path}")
        if run_id is not None and entry.get("run_id") not in (None, run_id):
            raise RegistryError(f"record {record_id} was accepted in run {entry.get('run_id')!r}, not {run_id!r}")
        return audit_receipt(coordkey.load_key(p.path), entry, registry_id=registry_id)


def norm_bound(p: Parts, limits: Mapping[str, float], base: str, task: str | None) -> NormBound | None:
    """``Registry.norm_bound``: ``writer.reference_bound`` over the records as they are on disk now."""
    with p.mutex:
        return reference_bound(p.fresh(), limits, base, task)


def verify(p: Parts, full: bool) -> list[str]:
    """``Registry.verify``: blobs, the records binding (z column included) and the Chroma mirror.
    The caller holds the mutex and has reconciled a deferred Chroma mirror."""
    c = p.fresh()
    snap_problems, replayed = snapshot.problems(p.path / snapshot.SNAP_NAME, p.log)
    c = replayed if replayed is not None else c  # check records.jsonl itself, not the cache
    live = [(c.ids[r], *c.blob[r][:2]) for r in c.live_rows()]
    problems = snap_problems + p.blobs.problems(live, {c.blob[r][0] for r in range(c.n)}, full)
    problems += _superseded_blob_problems(p, c, {sha for _, sha, _ in live}, full)
    problems += binding.check_binding(p.path / cfg.RECORDS_NAME, p.path / cfg.AUDIT_NAME)
    return problems + ([] if p.index is None else p.index.problems(c.n_live))


def _superseded_blob_problems(p: Parts, c: Any, live_shas: set[str], full: bool) -> list[str]:
    """The blobs of superseded records, checked as live records' are (present, right size; ``full``:
    re-hashed). ``gc`` keeps them for the audit trail, so a missing one was deleted by hand: damage,
    named with the record and the blob. A blob an audited ``registry.gc`` deleted
    (a version of gc that did not keep them yet) is no damage; one a live record shares is checked
    with that record."""
    gone_by_gc: set[str] = set()
    checks: list[tuple[str, str, int]] = []
    for rid in superseded_records(p, gone_by_gc):
        row = c.row.get(rid)
        if row is None or c.live[row]:
            continue  # a record the binding check names, or one live again
        sha, nbytes = c.blob[row][:2]
        if sha in live_shas or sha in gone_by_gc:
            continue
        checks.append((rid, sha, nbytes))
    if not checks:
        return []
    stored = {q.name for q in p.blobs.all()}  # no orphan is reported twice
    out = []
    for msg in p.blobs.problems(checks, stored, full):
        rid = msg.removeprefix("record ").split(": ", 1)[0]
        out.append(  # not naming its successor: the console flags every record a finding names
            f"superseded record {rid} (out of retrieval; its blob is kept for the audit trail and gc never "
            f"deletes it): {msg.split(': ', 1)[1]}; restore the blob from a backup"
        )
    return out


def superseded_records(p: Parts, gc_blobs: set[str] | None = None) -> dict[str, str]:
    """``{record id: the id that superseded it}`` of every record a later adapter of its site
    superseded, from every witness (so one damaged line cannot hide one): the ``registry.remove``
    audit entries with ``superseded_by``, the ``record.superseded`` entries and the records.jsonl
    tombstones whose reason is ``superseded by ...``. ``gc_blobs`` (when given) receives every blob
    an audited ``registry.gc`` deleted, from the same pass over the audit log."""
    out: dict[str, str] = {}
    for _, e in read_entries(p.audit.path):
        if gc_blobs is not None and e.get("event") == "registry.gc" and isinstance(e.get("blobs"), list):
            gc_blobs.update(str(b) for b in e["blobs"])
        elif e.get("event") == "registry.remove" and e.get("superseded_by") and e.get("record_id"):
            out.setdefault(str(e["record_id"]), str(e["superseded_by"]))
        elif e.get("event") == "record.superseded" and isinstance(e.get("superseded"), list):
            for rid in e["superseded"]:
                out.setdefault(str(rid), str(e.get("record_id")))
    with open(p.path / cfg.RECORDS_NAME, "rb") as fh:
        for raw in fh:
            if b'"remove"' not in raw or b"superseded by " not in raw:
                continue
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(line, dict) or line.get("op") != "remove":
                continue
            reason = str(line.get("reason") or "")
            if reason.startswith("superseded by "):
                out.setdefault(str(line.get("id")), reason.removeprefix("superseded by ").strip())
    return out


def superseded_blobs(p: Parts) -> set[str]:
    """Blobs of records a later adapter of their site superseded (``supersede``): out of retrieval,
    but kept in the blob store for the audit trail (issue 27), so ``gc`` never deletes them. Every
    witnesses count, so a damaged line in one of them cannot lose a blob: each ``registry.remove``
    audit entry with ``superseded_by`` (its ``blob_sha256``), each ``record.superseded`` entry
    (``superseded_blobs``) and each tombstone of records.jsonl whose
    reason is ``superseded by ...`` (the blob its row holds)."""
    out: set[str] = set()
    for _, e in read_entries(p.audit.path):
        if e.get("event") == "registry.remove" and e.get("superseded_by") and e.get("blob_sha256"):
            out.add(str(e["blob_sha256"]))
        elif e.get("event") == "record.superseded" and isinstance(e.get("superseded_blobs"), list):
            out.update(str(b) for b in e["superseded_blobs"])
    cols = p.cols
    with open(p.path / cfg.RECORDS_NAME, "rb") as fh:
        for raw in fh:
            if b'"remove"' not in raw or b"superseded by " not in raw:
                continue
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(line, dict) or line.get("op") != "remove":
                continue
            row = cols.row.get(str(line.get("id")))
            if row is not None and str(line.get("reason") or "").startswith("superseded by "):
                out.add(cols.blob[row][0])
    return out


def gc(p: Parts, dry_run: bool) -> list[str]:
    """``Registry.gc``: delete (or list) blobs no live record references, audited. Blobs of superseded
    records stay (:func:`superseded_blobs`); an explicitly removed record's blob and an orphan go."""
    with p.mutex:
        keep = {p.cols.blob[r][0] for r in p.fresh().live_rows()} | superseded_blobs(p)
        gone = p.blobs.unreferenced(keep)
        if not dry_run and gone:
            p.blobs.delete(gone)
            p.audit.append("registry.gc", blobs=[q.name for q in gone])
        return [q.name for q in gone]
