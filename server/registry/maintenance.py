"""The registry's writes that are not submissions: creation, another base model, a removal, a
receipt, and the repair of record lines whose audit entry never came (``facade.Registry``
delegates here; each keeps the one-commit rule of ``writer.py``: the record or config change and
its audit line land together, or neither does).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.trust.digests import sha256_hex
from server.audit import read_entries
from server.audit import receipt as audit_receipt
from server.registry import binding, coordkey, snapshot
from server.registry import config as cfg
from server.registry.blobcrypt import BlobKey
from server.registry.blobstore import env_blob_key
from server.registry.errors import RecordNotFoundError, RegistryError, RegistryExistsError
from server.registry.recordlog import remove_line
from server.registry.records import Record
from server.registry.writer import span_fields, storage_error

if TYPE_CHECKING:
    from server.bounds import NormBound
    from server.registry.facade import Registry

#: at most this many of the latest adapters of a (base, task) form the norm reference
NORM_REFERENCE_MAX = 1000


def init_registry(
    cls: type[Registry],
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
) -> Registry:
    """``Registry.init``: create the directory (or, with ``exist_ok``, open a matching one)."""
    root = Path(path).expanduser().resolve()
    blob_key = blob_key if blob_key is not None else env_blob_key()
    if (root / cfg.CONFIG_NAME).is_file():
        if not exist_ok:
            raise RegistryExistsError(f"{root} already holds a registry; open it with Registry(path)")
        reg = cls(root, blob_key=blob_key)
        if reg.embedding_dim != embedding_dim or reg.representation != representation:
            reg.close()
            raise RegistryExistsError(
                f"{root} holds a {reg.embedding_dim}-d {reg.representation!r} registry, not "
                f"{embedding_dim}-d {representation!r}; use another directory"
            )
        if base_fingerprint not in reg.bases:
            reg.add_base(base_fingerprint, module_shapes, name=base_name)
        return reg
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
    return cls(root, blob_key=blob_key)


def rollback_unaudited(reg: Registry) -> None:
    """Cut record lines whose audit entry was never written (they were never reported stored)."""
    records = reg.path / cfg.RECORDS_NAME
    tail = binding.unaudited_tail(records, reg.path / cfg.AUDIT_NAME)
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
    reg._log.log.repair(end)
    reg._blobs.drop_unreferenced_of(data, records)
    reg.audit.append(
        "registry.repair",
        file=cfg.RECORDS_NAME,
        truncated_bytes=size - end,
        at_offset=end,
        sha256=sha256_hex(data),
        dropped=dropped,
        reason="record lines without their audit entry (the add never completed)",
    )


def add_base(reg: Registry, fingerprint: str, module_shapes: Mapping[str, Sequence[int]], name: str | None) -> None:
    """``Registry.add_base``: the new config and its audit line, or neither (caller checked writability)."""
    if not isinstance(fingerprint, str) or not fingerprint:
        raise RegistryError("base fingerprint must be a non-empty string")
    entry = cfg.base_entry(module_shapes, name)
    with reg._mutex:
        old = reg.config["bases"].get(fingerprint)
        if old is not None:
            if old["modules"] != entry["modules"]:
                raise RegistryError(
                    f"base {fingerprint} is already registered with different module shapes; "
                    "a fingerprint names one model"
                )
            return
        config = {**reg.config, "bases": {**reg.config["bases"], fingerprint: entry}}
        try:
            cfg.write_config(reg.path, config)
        except OSError as exc:
            raise storage_error(exc, "registry.json", reg.path) from exc
        try:
            reg.audit.append(
                "registry.add_base", base_fingerprint=fingerprint, name=name, n_modules=len(entry["modules"])
            )
        except OSError as exc:
            cfg.write_config(reg.path, reg.config)  # back to the old file: no space needed to shrink
            raise storage_error(exc, "audit entry", reg.path) from exc
        reg.config = config


def remove(reg: Registry, record_id: str, reason: str | None) -> Record:
    """``Registry.remove``: one tombstone line and its audit line, or neither; then columns and Chroma."""
    with reg._mutex:
        rec = reg._fresh().record(reg._cols.live_row(record_id, str(reg.path)))
        line = remove_line(record_id, reason)
        try:
            start, end, data = reg._log.append([line])
        except OSError as exc:
            raise storage_error(exc, "record line", reg.path) from exc
        try:
            reg.audit.append(
                "registry.remove",
                record_id=record_id,
                site=rec.meta.site,
                blob_sha256=rec.blob_sha256,
                reason=reason,
                **span_fields(start, end, data),
                line_sha256=sha256_hex(line.encode("utf-8")),
            )
        except BaseException as exc:
            reg._log.rollback(start, 1)
            if isinstance(exc, OSError):
                raise storage_error(exc, "audit entry", reg.path) from exc
            raise
        reg._cols.apply_remove(record_id)
        if reg._index is not None:
            reg._index.delete([record_id])
        return rec


def receipt(reg: Registry, record_id: str, run_id: str | None) -> dict[str, Any]:
    """``Registry.receipt``: the coordinator-signed receipt of the audit head after the record's acceptance."""
    with reg._mutex:
        entry = reg._writer.last_accepted
        if entry is None or entry.get("record_id") != record_id:
            entry = next(
                (
                    e
                    for _, e in reversed(list(read_entries(reg.audit.path)))
                    if e.get("event") == "submission.accepted" and e.get("record_id") == record_id
                ),
                None,
            )
        if entry is None:
            raise RecordNotFoundError(f"no accepted submission of record {record_id!r} in {reg.audit.path}")
        if run_id is not None and entry.get("run_id") not in (None, run_id):
            raise RegistryError(f"record {record_id} was accepted in run {entry.get('run_id')!r}, not {run_id!r}")
        return audit_receipt(coordkey.load_key(reg.path), entry, registry_id=reg.config["registry_id"])


def norm_bound(reg: Registry, base: str, task: str | None) -> NormBound | None:
    """``Registry.norm_bound``: from the latest ``NORM_REFERENCE_MAX`` live adapters of (base, task)."""
    import numpy as np

    from server.bounds import NormBound
    from server.registry.validation import NORMS_KEY

    with reg._mutex:
        rows = np.flatnonzero(reg._fresh().mask(task=task, base=base))[-NORM_REFERENCE_MAX:]
        refs = [n for n in (reg._cols.meta[int(r)].get(NORMS_KEY) for r in rows) if isinstance(n, dict)]
    lim = reg.limits
    return NormBound.from_reference(
        refs, factor=float(lim["update_norm_factor"]), min_reference=int(lim["update_norm_min_reference"])
    )


def verify(reg: Registry, full: bool) -> list[str]:
    """``Registry.verify``: blobs, the records binding (z column included) and the Chroma mirror."""
    if full:
        reg._blobs.require_key("verify(full=True)")
    with reg._mutex:
        reg._ensure_index()
        c = reg._fresh()
        snap_problems, replayed = snapshot.problems(reg.path / snapshot.SNAP_NAME, reg._log)
        c = replayed if replayed is not None else c  # check records.jsonl itself, not the cache
        live = [(c.ids[r], *c.blob[r][:2]) for r in c.live_rows()]
        problems = snap_problems + reg._blobs.problems(live, {c.blob[r][0] for r in range(c.n)}, full)
        problems += binding.check_binding(reg.path / cfg.RECORDS_NAME, reg.path / cfg.AUDIT_NAME)
        return problems + ([] if reg._index is None else reg._index.problems(c.n_live))


def gc(reg: Registry, dry_run: bool) -> list[str]:
    """``Registry.gc``: delete (or list) blobs no live record references, audited."""
    with reg._mutex:
        gone = reg._blobs.unreferenced({reg._cols.blob[r][0] for r in reg._fresh().live_rows()})
        if not dry_run and gone:
            reg._blobs.delete(gone)
            reg.audit.append("registry.gc", blobs=[p.name for p in gone])
        return [p.name for p in gone]
