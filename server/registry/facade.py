"""``Registry``: the coordinator's LoRA registry, a facade over its parts (see ``__init__.py``).

A write: validate (``validation``), new blobs (``blobstore``), z rows (``server.zindex.ZColumn``),
record lines + one audit line as one commit (``writer``), then columns and the Chroma mirror. A
read answers from the columns; queries are exact (``search``) whatever Chroma says. Opening:
``loading.open_parts`` assembles every part (mapping the z column, replaying the metadata) and
returns them as one ``parts.Parts``, which the constructor keeps; the facade owns its attributes
and nothing outside it writes them; Chroma is reconciled on open only up to
``EAGER_SYNC_RECORDS`` records, else on first need; an old base64 registry migrates on the first
writable open.
"""

from __future__ import annotations

import builtins
import contextlib
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from server.bounds import NormBound
from server.registry import batch, coordkey, loading, maintenance
from server.registry import config as cfg
from server.registry.blobcrypt import BlobKey
from server.registry.columns import KEYS, Columns
from server.registry.errors import (
    NotEnoughRecordsError,
    QueryError,
    ReadOnlyError,
    RegistryError,
)
from server.registry.records import AdapterMeta, Hit, Record
from server.registry.search import METHODS, where_clause
from server.registry.validation import check_z

#: ``add_many`` batches up to this size are mirrored into Chroma at once (small registries only)
EAGER_MIRROR_BATCH = 1000
#: live records up to which the Chroma mirror is reconciled on open and by ``add_many``; above it
#: the mirror waits until something needs it, so opening stays fast (a rebuild costs ~ms per record)
EAGER_SYNC_RECORDS = 2_000


class Registry:
    """A LoRA registry directory (layout and guarantees: ``server/registry/__init__.py``).

    ``Registry(path)`` opens an existing registry for writing (one process at a time);
    ``read_only=True`` opens without the lock and without Chroma (brute-force queries only),
    e.g. for ``rpe registry ls`` while the server runs. ``chroma`` overrides the configured
    index: ``"off"``, ``"embedded"``, or ``(host, port)`` of a ``chroma run`` server.
    ``sync_index=False`` skips reconciling Chroma on open (unused until ``sync_index()``).
    ``blob_key`` is the key of a registry whose blobs are encrypted (default:
    ``$RPE_BLOB_KEY_FILE`` / ``$RPE_BLOB_KEY``); only storing and reading adapter bytes need it.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        read_only: bool = False,
        chroma: str | tuple[str, int] | None = None,
        sync_index: bool = True,
        blob_key: BlobKey | None = None,
    ) -> None:
        self._closed = True  # until every part is open: a failed open has nothing to close
        self.path = Path(path).expanduser().resolve()
        self.config: dict[str, Any] = cfg.read_config(self.path)
        self.read_only = read_only
        self.embedding_dim: int = int(self.config["embedding_dim"])
        self.representation: str = str(self.config["representation"])
        parts = loading.open_parts(
            self.path,
            self.config,
            read_only=read_only,
            chroma=chroma,
            blob_key=blob_key,
            candidates=lambda q, want, where: self._chroma_candidates(q, want, where),
        )
        self._parts = parts
        self._closed = False
        self._mutex = parts.mutex
        self._blobs = parts.blobs
        self.blob_encryption = parts.blobs.encryption
        self.audit = parts.audit
        self._cols = parts.cols
        self._log = parts.log
        self._search = parts.search
        self._writer = parts.writer
        self._index = parts.index
        #: the Chroma mirror is reconciled when next needed (a large registry on open, after ``add_many``);
        #: never on its own with ``sync_index=False`` (``sync_index()`` then does it)
        self._index_pending = parts.index is not None and sync_index
        self._lazy_sync = sync_index
        try:
            if self._index_pending and self._cols.n_live <= EAGER_SYNC_RECORDS:
                self.sync_index()
        except BaseException:
            self.close()
            raise

    # ---- creation ---------------------------------------------------------------------------

    @classmethod
    def init(
        cls,
        path: str | os.PathLike[str],
        *,
        base_fingerprint: str,
        module_shapes: Mapping[str, Sequence[int]],
        embedding_dim: int,
        representation: str = "hidden-mean",
        chroma_host: str | None = None,
        chroma_port: int | None = None,
        base_name: str | None = None,
        limits: Mapping[str, int] | None = None,
        collection: str = cfg.COLLECTION,
        exist_ok: bool = False,
        blob_key: BlobKey | None = None,
    ) -> Registry:
        """Create a registry directory and open it.

        ``module_shapes`` is ``{module name: (out, in)}`` of the base model (``common.models.
        linear_module_shapes``), so adapters are validated without loading the model.
        ``base_name`` is what composed PEFT directories record as ``base_model_name_or_path``.
        ``exist_ok=True`` opens an existing registry whose representation and dim match.
        ``blob_key`` (default: ``$RPE_BLOB_KEY_FILE`` / ``$RPE_BLOB_KEY``, if set) makes every blob
        stored AES-256-GCM encrypted with that key, for the registry's whole life.
        """
        root, key, created = maintenance.create_registry(
            path,
            base_fingerprint=base_fingerprint,
            module_shapes=module_shapes,
            embedding_dim=embedding_dim,
            representation=representation,
            chroma_host=chroma_host,
            chroma_port=chroma_port,
            base_name=base_name,
            limits=limits,
            collection=collection,
            exist_ok=exist_ok,
            blob_key=blob_key,
        )
        reg = cls(root, blob_key=key)
        if not created:
            try:
                maintenance.check_existing(root, reg.config, embedding_dim, representation)
            except BaseException:
                reg.close()
                raise
            if base_fingerprint not in reg.bases:
                reg.add_base(base_fingerprint, module_shapes, name=base_name)
        return reg

    def add_base(self, fingerprint: str, module_shapes: Mapping[str, Sequence[int]], name: str | None = None) -> None:
        """Accept adapters for another base model (same fingerprint twice with the same shapes is a no-op)."""
        self._require_writable()
        with self._mutex:
            self.config = maintenance.add_base(self.path, self.config, self.audit, fingerprint, module_shapes, name)

    # ---- properties -------------------------------------------------------------------------

    @property
    def bases(self) -> dict[str, dict[str, Any]]:
        """``{fingerprint: {"name", "modules": {module: [out, in]}, "added_at"}}``."""
        return self.config["bases"]

    @property
    def limits(self) -> dict[str, float]:
        """Size and sanity caps (registry.json over ``DEFAULT_LIMITS``)."""
        return {**cfg.DEFAULT_LIMITS, **self.config.get("limits", {})}

    @property
    def has_blob_key(self) -> bool:
        """True when adapter bytes can be stored and read: blobs unencrypted, or the key is loaded."""
        return self._blobs.has_key

    @property
    def index_ready(self) -> bool:
        """True when Chroma holds exactly the live records (the index query path may use it);
        a deferred mirror is reconciled first."""
        self._ensure_index()
        return self._index is not None and self._index.ready

    def _ensure_index(self) -> None:
        """Reconcile a Chroma mirror that was deferred (large registry, or ``add_many``)."""
        if self._index is not None and self._index_pending and not self._closed and not self.read_only:
            self.sync_index()

    @property
    def index_error(self) -> str | None:
        """Why the Chroma index is unavailable, if it failed to rebuild."""
        return None if self._index is None else self._index.error

    def check_z(self, z: Any, who: str = "the query") -> np.ndarray:
        """``z`` as a contiguous float32 vector of the registry's dimension, or a typed error
        (``EmbeddingDimensionError`` / ``NonFiniteError`` / ``NormError``) whose message names ``who``."""
        return check_z(z, who, self.embedding_dim, self.representation, self.limits["max_z_norm"])

    def _require_writable(self) -> None:
        if self._closed:
            raise RegistryError(f"registry {self.path} is closed")
        if self.read_only:
            raise ReadOnlyError(f"registry {self.path} was opened read-only; open it with Registry(path) to write")

    # ---- writing ----------------------------------------------------------------------------

    def add(
        self,
        adapter: Any,
        z: Any,
        meta: AdapterMeta | Mapping[str, Any],
        expected_sha256: str | None = None,
        audit_fields: Mapping[str, Any] | None = None,
    ) -> Record:
        """Validate and store one adapter (a ``LoraAdapter`` or its canonical bytes) with its z.

        Everything is checked before anything is written; a rejection raises a ``ValidationError``
        subclass, appends one ``submission.rejected`` audit line and changes nothing else.
        Re-submitting the same (site, task, adapter, z) returns the existing record.
        ``audit_fields`` (e.g. run_id, nonce, record_digests) are added to that audit entry.
        """
        return self._add_batch(
            [(adapter, z, meta, expected_sha256)], index=True, single=True, extra=dict(audit_fields or {})
        )[0]

    def add_many(self, items: Iterable[Sequence[Any]], *, index: bool = True) -> list[Record]:
        """Bulk insert ``(adapter, z, meta[, expected_sha256])`` items: all validated first (one bad
        item rejects the batch, naming its index), blobs fsynced, then one z column append + fsync,
        then one records append + fsync. The Chroma mirror (its HNSW build was the bulk-insert
        bottleneck, and exact queries do not need it) is upserted at once only for a small batch
        (≤ ``EAGER_MIRROR_BATCH`` items) into a small registry (≤ ``EAGER_SYNC_RECORDS`` records)
        whose mirror is already connected; otherwise, or with ``index=False``, it is reconciled when
        next needed (``index_ready``, an ``index``/``approx`` query, ``verify``, ``sync_index()``)."""
        items = list(items)
        eager = (
            index
            and self._index is not None
            and self._index.ready
            and len(items) <= EAGER_MIRROR_BATCH
            and self._cols.n_live + len(items) <= EAGER_SYNC_RECORDS
        )
        out = self._add_batch(items, index=eager, single=False, extra={})
        if self._index is not None and not eager:
            self._index_pending = self._lazy_sync
        return out

    def _rules(self) -> dict[str, Any]:
        """What every stored submission is checked against (``validation.prepare``)."""
        return {
            "bases": self.bases,
            "limits": self.limits,
            "dim": self.embedding_dim,
            "representation": self.representation,
        }

    def _add_batch(
        self, items: Iterable[Sequence[Any]], index: bool, single: bool, extra: dict[str, Any]
    ) -> list[Record]:
        self._require_writable()
        self._blobs.require_key("storing adapters")
        rules = self._rules()
        with self._mutex:
            self._log.refresh()
            return self._writer.add_batch(items, index, single, extra, rules)

    def add_submissions(
        self, submissions: Sequence[batch.Submission], *, supersede: bool = True
    ) -> builtins.list[batch.Outcome]:
        """Store an enrolment round's submissions as ONE commit (``batch.py``): each checked on its
        own (a rejected one changes nothing but its ``submission.rejected`` entry), the accepted
        ones' record lines in one fsynced append and their audit entries (one ``submission.accepted``
        each, with its ``audit_fields``) in another. ``supersede``: each accepted submission
        becomes its site's only live adapter of its (task, base), as ``supersede`` does. Returns
        one ``Outcome`` per submission, in order; ``RegistryStorageError`` stores nothing."""
        self._require_writable()
        self._blobs.require_key("storing adapters")
        rules = self._rules()
        with self._mutex:
            self._log.refresh()
            return batch.write_batch(self._parts, list(submissions), rules, supersede)

    def remove(self, record_id: str, reason: str | None = None) -> Record:
        """Tombstone a record (it disappears from list/query/get) and delete it from Chroma.

        The blob stays (audited compositions reference it); ``gc()`` deletes unreferenced blobs."""
        self._require_writable()
        return maintenance.remove(self._parts, record_id, reason)

    def supersede(self, record_id: str, **audit_fields: Any) -> builtins.list[Record]:
        """Make ``record_id`` its site's only live adapter for its (task, base): every other one is
        tombstoned (``registry.remove`` with ``superseded_by``; add line, blob and audit entries kept)
        and one ``record.superseded`` entry names them and the new id, with ``audit_fields`` (e.g.
        run_id). Returns the superseded records (none: nothing is written)."""
        self._require_writable()
        return maintenance.supersede(self._parts, record_id, audit_fields)

    def norm_bound(self, base: str, task: str | None) -> NormBound | None:
        """The update-norm bound of (base, task): ``update_norm_factor`` × the median per-module and
        total ‖ΔW‖ over the sites holding a live adapter for it, each by its latest adapter, never
        below ``update_norm_floor``; None while fewer than ``update_norm_min_reference`` sites exist.
        Used at ``add`` and for compositions (``writer.reference_bound``)."""
        return maintenance.norm_bound(self._parts, self.limits, base, task)

    def receipt(self, record_id: str, run_id: str | None = None) -> dict[str, Any]:
        """The coordinator-signed receipt of the audit head after ``record_id``'s accepted submission.

        ``run_id`` (optional) must match the entry's run. The ServerApp puts it in the enrol
        reply's ack; the site keeps it in its egress log (``extra["receipt"]``), so a truncated or
        rewritten coordinator log shows in ``rpe audit cross-check``."""
        self._require_writable()
        return maintenance.receipt(self._parts, self.config["registry_id"], record_id, run_id)

    @property
    def coordinator_public_key_path(self) -> Path:
        """The coordinator's exported public key (copy it to the sites)."""
        return coordkey.key_paths(self.path)[1]

    # ---- reading ----------------------------------------------------------------------------

    def _fresh(self) -> Columns:
        """The columns, after picking up lines another writer object appended (caller holds the mutex)."""
        return self._parts.fresh()

    def __len__(self) -> int:
        with self._mutex:
            return self._fresh().n_live

    def __contains__(self, record_id: object) -> bool:
        with self._mutex:
            return self._fresh().has(record_id)

    def get(self, record_id: str) -> Record:
        """The live record ``record_id`` (``RecordNotFoundError`` if unknown or removed)."""
        with self._mutex:
            return self._fresh().record(self._cols.live_row(record_id, str(self.path)))

    def blob_path(self, record_id: str) -> Path:
        """Where the record's adapter bytes live (read-only: never modify a blob). In an encrypted
        registry the file holds ciphertext; ``load_blob`` gives the adapter bytes."""
        return self._blobs.path(self.get(record_id).blob_sha256)

    def load_blob(self, record_id: str) -> bytes:
        """The adapter's canonical bytes (decrypted if the registry encrypts blobs), re-verified
        against their sha256."""
        return self._blobs.load(self.get(record_id).blob_sha256, record_id)

    def load_adapter(self, record_id: str) -> Any:
        """The record's ``LoraAdapter`` (bytes re-verified against the stored sha256 first)."""
        from common.adapters import adapter_from_bytes  # lazy: torch; most readers never load an adapter

        return adapter_from_bytes(self.load_blob(record_id))

    def list(
        self, task: str | None = None, modality: str | None = None, base: str | None = None, site: str | None = None
    ) -> builtins.list[Record]:
        """Live records matching every given filter, in insertion order."""
        with self._mutex:
            mask = self._fresh().mask(task=task, modality=modality, base=base, site=site)
            return [self._cols.record(int(r)) for r in np.flatnonzero(mask)]

    def ids(self) -> builtins.list[str]:
        """Ids of all live records, in insertion order."""
        with self._mutex:
            return [self._cols.ids[int(r)] for r in self._fresh().live_rows()]

    def embeddings(self, ids: Sequence[str]) -> np.ndarray:
        """The z of the given records as a float32 ``[len(ids), dim]`` matrix."""
        with self._mutex:
            rows = [self._fresh().live_row(rid, str(self.path)) for rid in ids]
            return self._cols.z_rows(np.asarray(rows, dtype=np.int64))

    def distinct(
        self,
        key: str,
        task: str | None = None,
        modality: str | None = None,
        base: str | None = None,
        site: str | None = None,
    ) -> dict[str, int]:
        """``{value: live record count}`` of ``key`` (site, task, modality or base) among the records
        matching the filters — cheap (no Record objects), for the composer and dashboards."""
        if key not in KEYS:
            raise QueryError(f"key must be one of {sorted(KEYS)}; got {key!r}")
        with self._mutex:
            return self._cols.distinct(key, self._fresh().mask(task=task, modality=modality, base=base, site=site))

    def query(
        self,
        z: Any,
        k: int,
        task: str | None = None,
        modality: str | None = None,
        base: str | None = None,
        exclude_site: str | None = None,
        method: str = "auto",
        one_per_site: bool = False,
    ) -> builtins.list[Hit]:
        """The exact k nearest live records to ``z`` by squared L2 (ties: earlier record first).

        ``one_per_site``: the k nearest *sites*, each by its nearest matching record (a site that
        kept several adapters is never retrieved twice); ``NotEnoughRecordsError`` when fewer than
        k sites match.

        ``method``: ``"auto"`` (``server.zindex.ExactTopK``: PCA and int8 bounds, exact float64
        re-rank; no Chroma), ``"brute"``, ``"index"`` (Chroma candidates + exact certification;
        same answer), or ``"approx"`` (Chroma candidates re-ranked exactly but *not* certified:
        faster on huge registries, may miss true neighbours that HNSW misses).
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise QueryError(f"k must be a positive integer; got {k!r}")
        if method not in METHODS:
            raise QueryError(f"method must be auto, brute, index or approx; got {method!r}")
        q = self.check_z(z, "the query")
        with self._mutex:
            if method in ("index", "approx"):
                self._ensure_index()
            elig = self._fresh().mask(task=task, modality=modality, base=base, exclude_site=exclude_site)
            n_elig = int(elig.sum())
            filters = {"task": task, "modality": modality, "base": base, "exclude_site": exclude_site}
            if k > n_elig:
                raise NotEnoughRecordsError(self._cols.shortfall(int(k), n_elig, filters))
            where = where_clause(task, modality, base, exclude_site)
            if not one_per_site:
                rows, dist = self._search.search(q, elig, int(k), method, where)
                return [Hit(self._cols.record(int(r)), float(d)) for r, d in zip(rows, dist, strict=True)]
            n_sites = len(self._cols.distinct("site", elig))
            if k > n_sites:
                raise NotEnoughRecordsError(
                    self._cols.shortfall(int(k), n_elig, filters).replace(
                        f"only {n_elig} record(s) match",
                        f"only {n_sites} site(s) hold a matching record (one per site)",
                    )
                )
            return self._nearest_per_site(q, elig, int(k), n_elig, method, where)

    def _nearest_per_site(
        self, q: np.ndarray, elig: np.ndarray, k: int, n_elig: int, method: str, where: Any
    ) -> builtins.list[Hit]:
        """The k nearest sites, each by its nearest eligible record: exact top-``want`` searches with
        ``want`` doubled until k distinct sites appear (at most log2(records) searches)."""
        want = k
        while True:
            rows, dist = self._search.search(q, elig, want, method, where)
            hits: dict[int, Hit] = {}
            for r, d in zip(rows, dist, strict=True):
                site = int(self._cols.codes["site"][int(r)])
                if site not in hits:
                    hits[site] = Hit(self._cols.record(int(r)), float(d))
            if len(hits) >= k or want >= n_elig:
                return list(hits.values())[:k]
            want = min(n_elig, 2 * want)

    # ---- the Chroma index -------------------------------------------------------------------

    def _chroma_candidates(self, q: np.ndarray, want: int, where: dict[str, Any] | None) -> np.ndarray:
        """Rows Chroma proposes for ``q`` (a method, so a test can make them deliberately wrong)."""
        ids = [] if self._index is None else self._index.candidates(q, want, where)
        return np.asarray([self._cols.row[i] for i in ids if i in self._cols.row], dtype=np.int64)

    def sync_index(self, rebuild: bool = False) -> None:
        """Reconcile Chroma with the records (or rebuild it from them). Never affects the records."""
        self._require_writable()
        if self._index is None:
            return
        with self._mutex:
            self._index_pending = False
            reason = self._index.sync(self._fresh(), rebuild)
            if reason is not None:
                self.audit.append("registry.reindex", reason=reason[:500], records=self._cols.n_live)

    # ---- maintenance ------------------------------------------------------------------------

    def verify(self, full: bool = False) -> builtins.list[str]:
        """Problems found: missing or wrong-size blobs of live records and of superseded ones
        (``gc`` keeps those for the audit trail, so one gone was deleted by hand; ``full``: re-hash
        every blob, decrypting it first in an encrypted registry, which needs the key), orphan blobs,
        record lines that differ from what the audit log bound (``binding.check_binding``: edited,
        deleted, re-pointed, added), the columns snapshot against a full replay of records.jsonl
        and its ``registry.snapshot`` audit binding (``snapshot.problems``: liveness, filter codes,
        rows, lines), and Chroma disagreement. Empty list = consistent. This is the one registry
        check ``rpe audit verify``, the console and the audit report run (``server.auditcheck``)."""
        if full:
            self._blobs.require_key("verify(full=True)")
        with self._mutex:
            self._ensure_index()
            return maintenance.verify(self._parts, full)

    def gc(self, dry_run: bool = False) -> builtins.list[str]:
        """Delete blobs referenced by no *live* record (orphans and removed records' blobs);
        returns their hashes. A superseded record's blob is kept (issue 27: "kept in the audit log
        and blob store, not retrievable"). Run it only when audited compositions no longer need
        re-checking."""
        self._require_writable()
        return maintenance.gc(self._parts, dry_run)

    def stats(self) -> dict[str, Any]:
        """Counts for operators and the dashboard."""
        with self._mutex:
            by = {key: self.distinct(key) for key in KEYS}
            return {
                "records": self._fresh().n_live,
                "removed": self._cols.n - self._cols.n_live,
                "embedding_dim": self.embedding_dim,
                "representation": self.representation,
                "bases": sorted(self.bases),
                "by": by,
                "index_ready": self.index_ready,
                "blob_encryption": self.blob_encryption,
            }

    # ---- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        """Release Chroma and the writer lock (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._parts.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __repr__(self) -> str:
        return f"Registry({str(self.path)!r}, records={self._cols.n_live}, dim={self.embedding_dim})"
