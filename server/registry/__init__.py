"""The coordinator's LoRA registry: a durable record log, a content-addressed blob store, and a
Chroma index that is only ever a cache.

Why this shape
--------------
Chroma 1.5.9 is an *approximate* (HNSW) index and is not crash-safe (a SIGKILL during an index
flush can leave it unreadable for good, and two writers corrupt it), see ``shared/FACTS.md``.
A hospital federation cannot lose an enrolment or return a neighbour that is not the nearest, so
the registry keeps its own source of truth and treats Chroma as a rebuildable accelerator:

- ``records.jsonl`` is the log every answer derives from: one JSON line per ``add``/``remove``,
  appended, flushed and fsynced before ``add`` returns. A torn last line (crash mid-append) is
  detected and truncated on open; damage anywhere else is an error, never silently skipped.
- ``blobs/sha256/ab/<hex>`` holds the adapter bytes (exactly ``common.adapters.lora.adapter_to_bytes``),
  named by their sha256. A blob is written to a temp file in its final directory, fsynced,
  ``os.replace``-d into place and the directory fsynced **before** the record that names it is
  appended, so a record never points at a missing or half-written blob. A crash in between
  leaves at most an orphan blob, which no query sees and ``gc()`` removes.
- ``chroma/`` (or a ``chroma run`` server) holds collection ``lora_l2`` (squared L2). On open it
  is reconciled with the records (missing ids upserted, extra ids deleted, a sample of vectors
  compared, a probe query run); if anything fails it is rebuilt from the records.
- ``audit.jsonl`` (``server.audit.AuditLog``) gets every accepted or rejected submission, removal
  and composition.

One commit, bound into the chain (issue 10 items 4–5, ``binding.py``): the record lines of an
``add`` / ``add_many`` / ``remove`` and their audit entry are one commit — a record is live iff its
audit entry exists. The entry carries ``records_span`` ([start, end) of the appended bytes),
``records_span_sha256`` and, for one line, ``line_sha256``. If the audit append fails (ENOSPC) the
lines are cut back and the new blobs deleted before ``RegistryStorageError`` (naming the write
point) is raised; after a crash in between, reopening cuts the unaudited lines and writes a
``registry.repair`` entry naming them (they were never reported stored). A torn audit tail is cut
on reopen too, with a ``registry.repair`` entry. Repairs never destroy (issue 26 class 5,
``loading.refuse_destructive_repair``): unaudited lines are cut only when the audit log ends cleanly
and they are one commit's lines; a torn audit tail *with* unaudited lines (what cutting the end of
the audit log leaves) or several commits' lines make a writable open refuse, naming the damage;
whatever is cut is first kept as ``<file>.cut-<offset>`` (``kept_in`` in the repair entry). An enrolment
round is ONE commit (``batch.py``, ``Registry.add_submissions``): its record lines (adds and the
tombstones they supersede, one batch id) in one fsynced append, its audit entries (one per
submission) in another; reopening after a crash before the audit append cuts the whole batch. A
read-only open writes nothing at all (``loading.ReadOnlyAudit``: the audit log is not even created).
The open-time cache ``columns.snap`` is used only when its ``registry.snapshot`` audit entry binds it
(``snapshot.py``, issue 26 class 4); ``Registry.verify`` compares it with a full replay. ``verify()`` and ``rpe audit verify`` check every
record line against its entry and name an edited, deleted, re-pointed or added record. Every
append is all-or-nothing for readers (``common.files.durable.JsonlLog`` writes with ``os.write`` and
``ftruncate``-s back on failure).

Receipts (``keys/coordinator.key``, Ed25519, 0600, created on the first writable open;
``coordinator.pub`` is the export for sites): ``Registry.receipt(record_id)`` signs the audit
head after an accepted submission (``server.audit.receipt``); the site keeps it in its egress log
and ``rpe audit cross-check`` detects a truncated or rewritten coordinator log from it.

Update-norm bound (item 6, ``server/bounds.py``): every record's per-module ‖ΔW‖ is computed at add
and stored in its line's ``meta.update_norms`` (not part of ``AdapterMeta``); an adapter above
``update_norm_factor`` (10) × the median of the live adapters of the same base and task, one per
site (its latest: repeated enrolments of a site count once) and never below ``update_norm_floor``
(once ``update_norm_min_reference`` = 3 sites exist) is refused with ``UpdateNormBoundError`` naming the site
and the bound; ``Registry.norm_bound(base, task)`` is what the composer checks the composed
adapter against. Files are private: directories 0700, files 0600, blobs 0400.

Blob encryption at rest (optional, ``server/registry/blobcrypt.py``): a registry created with a blob key
(``Registry.init(..., blob_key=...)``, ``rpe registry init --blob-key-file FILE``) records
``"blob_encryption": {"alg": "AES-256-GCM", "key_id": ...}`` in registry.json and stores every blob
as AES-256-GCM ciphertext bound to its name. Names, record ``bytes`` and every hash stay those of
the *plaintext* canonical adapter, so ids, idempotency, the audit trail and signatures do not
change. Only the adapter bytes are encrypted: z (needed in memory for every retrieval), the
metadata, registry.json and the audit log are not. Opening, listing, queries, ``remove``, ``gc``
and ``verify()`` work without the key; storing (``add``/``add_many``) and reading adapter bytes
(``load_blob``/``load_adapter``, composition, ``verify(full=True)``) raise ``BlobKeyError``
without it. The key comes from the ``blob_key`` argument, else ``$RPE_BLOB_KEY_FILE`` /
``$RPE_BLOB_KEY``; a key whose id differs from registry.json's, or any key for a registry created
without encryption, is refused at open (never silently ignored). Each add record line and
``submission.accepted`` / ``registry.bulk_add`` audit entry carries ``blob_encryption``. There is
no key rotation: the key of a registry is fixed at ``init``.

Queries are *exact* top-k by squared L2, and never depend on Chroma for correctness: every z is
held in an in-memory float32 matrix loaded from the records. Small searches are a numpy brute
force (one BLAS matrix-vector product, then an exact float64 re-check of every row that rounding
could have moved across the k-th boundary). Large searches take 8·k candidates from Chroma and
*certify* them: a PCA projection gives a lower bound on every distance, and every row whose
lower bound does not exclude it is checked exactly, so the answer always equals brute force.

On-disk layout (``REG`` = the registry directory)::

    REG/registry.json        config: format, representation, embedding dim, bases with module
                             shapes, size limits, Chroma location, blob_encryption if any
                             (rewritten atomically)
    REG/records.jsonl        {"op": "add", "id", "blob_sha256", "bytes", "row", "z_sha256",
                             "meta", "ts"[, "blob_encryption"]} / {"op": "remove", "id",
                             "reason", "ts"}; ``row`` is the z's row in z.f32 (older registries
                             kept "z_b64", base64 float32: migrated on the first writable open)
    REG/z.f32, z.f32.crc     the z column: append-only float32 rows, memory-mapped on open, a
                             crc32 per row (server/zindex/column.py); written before the record
                             line naming the row; each z used is re-hashed against z_sha256
    REG/zindex.npz           ExactTopK's derived search state (a cache bound to the column)
    REG/blobs/sha256/ab/<64 hex>   adapter blobs (content-addressed by the plaintext's sha256,
                             never rewritten; AES-GCM ciphertext in an encrypted registry)
    REG/chroma/              Chroma PersistentClient directory (cache; may be deleted)
    REG/audit.jsonl          hash-chained audit log (binds records.jsonl, see above)
    REG/keys/coordinator.key / .pub   the coordinator's receipt-signing key pair
    REG/.lock                flock held by the one process that writes this registry

Record ids are ``"<site>:<task>:<16 hex>"`` where the hex is a hash over (site, task, blob
sha256, z sha256): re-submitting the same adapter and z from the same site for the same task
gives the same id and writes nothing (idempotent; ``extra`` may differ, the first one is kept);
the same content with different core metadata (modality, counts, privacy, ...) is rejected
(``DuplicateRecordError``) rather than silently dropped.

``remove(id)`` appends a tombstone and deletes the id from Chroma. The blob is **kept**: past
compositions in the audit log name adapter hashes, and an auditor must be able to re-check them.
``gc()`` deletes blobs that no live record references (including orphans left by a crash).

Test hook: ``RPE_CRASH_AT`` SIGKILLs the process at a named point of a write
(``server/registry/crashpoints.py``); ``tests/integration/test_registry_crash.py`` uses it.

The parts (each has one reason to change; ``Registry`` in ``facade.py`` ties them together):

- ``errors.py`` — every typed error; ``records.py`` — AdapterMeta, Record, Hit.
- ``config.py`` — registry.json and the directory's file names; ``lock.py`` — one writer per path.
- ``recordlog.py`` — records.jsonl (replay, torn tail, append) on ``common.files.durable.JsonlLog``.
- ``blobstore.py`` + ``blobcrypt.py`` — content-addressed blobs, encryption at rest.
- ``validation.py`` — pure checks of z, metadata and adapter bytes (no I/O).
- ``columns.py`` — the in-memory z matrix, metadata codes and filter masks.
- ``search.py`` — exact top-k and the PCA certificate (pure array code).
- ``chroma_index.py`` — the Chroma mirror (cache, reconciled or rebuilt).
- ``writer.py`` — the write path of a batch: validate, blobs, records + audit (one commit), columns, index.
- ``binding.py`` — records.jsonl against the audit entries that bind it (rollback, verify).
- ``maintenance.py`` — the writes that are not submissions: init, another base, removal, receipt,
  gc; verify; and the update-norm bound (on ``Parts``, never on the facade).
- ``parts.py`` — the parts of an open registry as one value (``Parts``), and closing them.
- ``loading.py`` — opening: ``open_parts`` assembles every part for the facade (the z column,
  rollback, replay, migration of base64 registries).
- ``coordkey.py`` — the coordinator's Ed25519 key for receipts.
"""

from server.registry.batch import Outcome, Submission
from server.registry.blobcrypt import BlobKey
from server.registry.chroma_index import CHROMA_BATCH, HNSW_CONFIG
from server.registry.config import (
    AUDIT_NAME,
    BLOBS_DIR,
    CHROMA_DIR,
    COLLECTION,
    CONFIG_NAME,
    DEFAULT_LIMITS,
    LOCK_NAME,
    RECORDS_NAME,
    REGISTRY_FORMAT,
    TMP_PREFIX,
)
from server.registry.errors import (
    AdapterFormatError,
    BlobCorruptError,
    BlobHashMismatchError,
    BlobKeyError,
    DtypeError,
    DuplicateRecordError,
    EmbeddingDimensionError,
    MetadataError,
    NonFiniteError,
    NormError,
    NotARegistryError,
    NotEnoughRecordsError,
    PayloadTooLargeError,
    QueryError,
    RankError,
    ReadOnlyError,
    RecordNotFoundError,
    RegistryCorruptError,
    RegistryError,
    RegistryExistsError,
    RegistryLockedError,
    RegistryStorageError,
    ShapeMismatchError,
    UnknownBaseError,
    UnknownModuleError,
    UpdateNormBoundError,
    ValidationError,
)
from server.registry.facade import Registry
from server.registry.records import AdapterMeta, Hit, Record
from server.registry.search import BRUTE_FORCE_BUDGET, CANDIDATE_FACTOR
from server.registry.validation import ALLOWED_DTYPES

__all__ = [
    "ALLOWED_DTYPES",
    "AUDIT_NAME",
    "BLOBS_DIR",
    "BRUTE_FORCE_BUDGET",
    "CANDIDATE_FACTOR",
    "CHROMA_BATCH",
    "CHROMA_DIR",
    "COLLECTION",
    "CONFIG_NAME",
    "DEFAULT_LIMITS",
    "HNSW_CONFIG",
    "LOCK_NAME",
    "RECORDS_NAME",
    "REGISTRY_FORMAT",
    "TMP_PREFIX",
    "AdapterFormatError",
    "AdapterMeta",
    "BlobCorruptError",
    "BlobHashMismatchError",
    "BlobKey",
    "BlobKeyError",
    "DtypeError",
    "DuplicateRecordError",
    "EmbeddingDimensionError",
    "Hit",
    "MetadataError",
    "NonFiniteError",
    "NormError",
    "NotARegistryError",
    "NotEnoughRecordsError",
    "Outcome",
    "PayloadTooLargeError",
    "QueryError",
    "RankError",
    "ReadOnlyError",
    "Record",
    "RecordNotFoundError",
    "Registry",
    "RegistryCorruptError",
    "RegistryError",
    "RegistryExistsError",
    "RegistryLockedError",
    "RegistryStorageError",
    "ShapeMismatchError",
    "Submission",
    "UnknownBaseError",
    "UnknownModuleError",
    "UpdateNormBoundError",
    "ValidationError",
]
