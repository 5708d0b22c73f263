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
- ``blobs/sha256/ab/<hex>`` holds the adapter bytes (exactly ``common.lora.adapter_to_bytes``),
  named by their sha256. A blob is written to a temp file in its final directory, fsynced,
  ``os.replace``-d into place and the directory fsynced **before** the record that names it is
  appended, so a record never points at a missing or half-written blob. A crash in between
  leaves at most an orphan blob, which no query sees and ``gc()`` removes.
- ``chroma/`` (or a ``chroma run`` server) holds collection ``lora_l2`` (squared L2). On open it
  is reconciled with the records (missing ids upserted, extra ids deleted, a sample of vectors
  compared, a probe query run); if anything fails it is rebuilt from the records.
- ``audit.jsonl`` (``server.audit.AuditLog``) gets every accepted or rejected submission, removal
  and composition.

Blob encryption at rest (optional, ``common/blobcrypt.py``): a registry created with a blob key
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
    REG/records.jsonl        {"op": "add", "id", "blob_sha256", "bytes", "z_b64", "z_sha256",
                             "meta", "ts"[, "blob_encryption"]} / {"op": "remove", "id",
                             "reason", "ts"}; z is base64 of little-endian float32 (exact, 4/3
                             of binary size)
    REG/blobs/sha256/ab/<64 hex>   adapter blobs (content-addressed by the plaintext's sha256,
                             never rewritten; AES-GCM ciphertext in an encrypted registry)
    REG/chroma/              Chroma PersistentClient directory (cache; may be deleted)
    REG/audit.jsonl          hash-chained audit log
    REG/.lock                flock held by the one process that writes this registry

Record ids are ``"<site>:<task>:<16 hex>"`` where the hex is a hash over (site, task, blob
sha256, z sha256): re-submitting the same adapter and z from the same site for the same task
gives the same id and writes nothing (idempotent; ``extra`` may differ, the first one is kept);
the same content with different core metadata (modality, counts, privacy, ...) is rejected
(``DuplicateRecordError``) rather than silently dropped.

``remove(id)`` appends a tombstone and deletes the id from Chroma. The blob is **kept**: past
compositions in the audit log name adapter hashes, and an auditor must be able to re-check them.
``gc()`` deletes blobs that no live record references (including orphans left by a crash).

Test hook: when the environment variable ``RPE_CRASH_AT`` names a point, the process SIGKILLs
itself there (``point`` or ``point@N`` for the N-th time it is reached). Points: ``mid_blob``
(half the temp blob written), ``after_blob_tmp`` (temp blob fsynced, not renamed),
``after_blob`` (blob in place, record not yet written), ``mid_record`` (half a record line
written), ``after_record`` (record durable, Chroma not updated), ``after_index`` (Chroma updated,
audit line not written). ``tests/test_registry_crash.py`` uses it; it is inert otherwise.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import tempfile
import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from common import blobcrypt
from common.blobcrypt import BlobKey
from common.durable import fsync_dir

try:  # chromadb depends on orjson; 3x faster than json when opening a large records.jsonl
    from orjson import loads as _loads
except ImportError:  # pragma: no cover
    _loads = json.loads

log = logging.getLogger(__name__)

REGISTRY_FORMAT = "rpe-registry-v1"
CONFIG_NAME = "registry.json"
RECORDS_NAME = "records.jsonl"
BLOBS_DIR = "blobs"
CHROMA_DIR = "chroma"
AUDIT_NAME = "audit.jsonl"
LOCK_NAME = ".lock"
TMP_PREFIX = ".tmp-"
COLLECTION = "lora_l2"
HNSW_CONFIG = {"space": "l2", "max_neighbors": 48, "ef_construction": 400, "ef_search": 200}
CHROMA_BATCH = 5000  # Chroma's max batch is 5461
#: safetensors dtype tag -> accepted adapter dtype
ALLOWED_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
DEFAULT_LIMITS: dict[str, float] = {
    "max_rank": 256,
    "max_blob_bytes": 256 * 1024 * 1024,
    "max_modules": 4096,
    "max_meta_bytes": 64 * 1024,
    # finite but absurd values: a ΔW that would swamp every composition it enters, a z whose
    # squared norm would overflow float32 arithmetic (and can never be a sensible neighbour)
    "max_delta_norm": 1e4,
    "max_z_norm": 1e6,
}
#: brute force when (eligible records × dim) is at most this many elements (≈ 20,000 × 4096)
BRUTE_FORCE_BUDGET = 20_000 * 4096
CANDIDATE_FACTOR = 8
_LOAD_CHUNK = 64 * 1024 * 1024
_LB_DIM = 64
_LB_MIN_EXPLAINED = 0.5  # share of variance the 64-d PCA bound must capture to be worth using
_U32 = 2.0**-24  # float32 unit roundoff
_ID_HASH_LEN = 16
_TEXT_MAX = 128


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------

class RegistryError(Exception):
    """Base class of every error the registry raises on purpose."""


class NotARegistryError(RegistryError):
    """The directory is not a registry (no registry.json)."""


class RegistryExistsError(RegistryError):
    """``Registry.init`` on a directory that already holds a registry or other files."""


class RegistryLockedError(RegistryError):
    """Another process holds the registry open for writing (one writer per path)."""


class RegistryCorruptError(RegistryError):
    """The durable files are damaged in a way the registry must not guess about."""


class ReadOnlyError(RegistryError):
    """A write was attempted on a registry opened with ``read_only=True``."""


class RecordNotFoundError(RegistryError, LookupError):
    """No live record with that id."""


class BlobCorruptError(RegistryError):
    """A stored blob is missing or its bytes no longer hash to its name (or fail decryption)."""


class BlobKeyError(RegistryError, blobcrypt.BlobKeyError):
    """The blob key is missing, malformed, or not the one the registry's blobs are encrypted with."""


class ValidationError(RegistryError, ValueError):
    """A submission (or query) was rejected; nothing was written."""


class UnknownBaseError(ValidationError):
    """The base-model fingerprint is not one the registry accepts."""


class ShapeMismatchError(ValidationError):
    """A module's A/B shapes do not fit the base model's module."""


class UnknownModuleError(ShapeMismatchError):
    """The adapter targets a module the base model does not have."""


class RankError(ValidationError):
    """A module's rank is < 1 or above the registry's cap."""


class NonFiniteError(ValidationError):
    """NaN or Inf in the adapter factors, their scale, or z."""


class NormError(ValidationError):
    """A finite but absurd ‖ΔW‖ or ‖z‖ (above the registry's max_delta_norm / max_z_norm)."""


class DtypeError(ValidationError):
    """Adapter tensors must be float32, bfloat16 or float16."""


class PayloadTooLargeError(ValidationError):
    """Blob, module count or metadata over the registry's size caps."""


class EmbeddingDimensionError(ValidationError):
    """z is not a 1-D vector of the registry's embedding dimension."""


class BlobHashMismatchError(ValidationError):
    """The blob's sha256 is not the one announced on the wire."""


class MetadataError(ValidationError):
    """A metadata field is missing, unknown or of the wrong type."""


class AdapterFormatError(ValidationError):
    """The blob is not a canonical rpe-lora-v1 safetensors adapter."""


class DuplicateRecordError(ValidationError):
    """Same site/task/adapter/z as an existing record but different metadata."""


class QueryError(RegistryError, ValueError):
    """A query that cannot be answered as asked (bad k, no base, ...)."""


class NotEnoughRecordsError(QueryError):
    """k is larger than the number of records that match the filters."""


# --------------------------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------------------------

@dataclass
class AdapterMeta:
    """What a site says about an adapter. ``rank`` and ``created_at`` are set by the registry.

    ``privacy`` is ``"none"`` or a dict such as ``{"dp_sgd": true, "epsilon": 8, "delta": 1e-5}``;
    ``extra`` holds anything else worth keeping (JSON values only), e.g. the embedding spec,
    training statistics, the site's signature.
    """

    site: str
    task: str
    modality: str
    base_fingerprint: str
    sample_count: int
    token_count: int | None = None
    rank: int | None = None
    privacy: dict[str, Any] | str = "none"
    created_at: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (the ``meta`` of a record line)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AdapterMeta:
        """Build from a dict, naming unknown or missing keys (a typo must not be dropped silently)."""
        if not isinstance(data, Mapping):
            raise MetadataError(f"metadata must be an AdapterMeta or a dict; got {type(data).__name__}")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise MetadataError(
                f"metadata has unknown field(s) {unknown}; allowed: {names} (put anything else in 'extra')"
            )
        required = ("site", "task", "modality", "base_fingerprint", "sample_count")
        missing = [k for k in required if k not in data]
        if missing:
            raise MetadataError(f"metadata is missing required field(s) {missing}")
        return cls(**{k: data[k] for k in names if k in data})


@dataclass
class Record:
    """One registry entry: id, embedding z (float32), metadata, and the adapter blob's hash/size."""

    id: str
    z: np.ndarray
    meta: AdapterMeta
    blob_sha256: str
    bytes: int
    z_sha256: str

    def to_dict(self, with_z: bool = False) -> dict[str, Any]:
        """JSON-able summary (for the CLI and dashboard); z only on request."""
        out: dict[str, Any] = {
            "id": self.id,
            "blob_sha256": self.blob_sha256,
            "bytes": self.bytes,
            "z_sha256": self.z_sha256,
            "dim": int(self.z.shape[0]),
            "meta": self.meta.to_dict(),
        }
        if with_z:
            out["z"] = [float(x) for x in self.z]
        return out


@dataclass
class Hit:
    """A query result: the record and its exact squared L2 distance to the query."""

    record: Record
    distance: float


@dataclass
class _Prepared:
    """A fully validated submission, ready to be written (nothing written yet)."""

    id: str
    z: np.ndarray
    meta: dict[str, Any]
    blob: bytes
    sha: str
    z_sha: str


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------

_crash_counts: dict[str, int] = {}


def _crash_point(name: str) -> None:
    """Test hook (see module docstring): SIGKILL ourselves at ``name`` if RPE_CRASH_AT says so."""
    spec = os.environ.get("RPE_CRASH_AT")
    if not spec:
        return
    for item in spec.split(","):
        point, _, nth = item.strip().partition("@")
        if point != name:
            continue
        _crash_counts[name] = _crash_counts.get(name, 0) + 1
        if _crash_counts[name] >= (int(nth) if nth else 1):
            os.kill(os.getpid(), signal.SIGKILL)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


_fsync_dir = fsync_dir


def _fsync_path(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _parallel(fn: Any, items: Sequence[Any]) -> None:
    """Run ``fn`` over ``items`` on a few threads (for fsync, which releases the GIL)."""
    if len(items) <= 1:
        for item in items:
            fn(item)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(32, len(items))) as pool:
        for _ in pool.map(fn, items):
            pass


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old or the new file."""
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + "-", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # like the other registry files (mkstemp makes 0600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _env_blob_key() -> BlobKey | None:
    """The blob key from ``$RPE_BLOB_KEY_FILE`` / ``$RPE_BLOB_KEY`` (None if neither is set)."""
    try:
        return blobcrypt.load_blob_key()
    except blobcrypt.BlobKeyError as exc:
        raise BlobKeyError(str(exc)) from None


def _normalize_sha(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise BlobHashMismatchError(f"{what} must be a sha256 hex string; got {type(value).__name__}")
    v = value.strip().lower().removeprefix("sha256:")
    if len(v) != 64 or any(c not in "0123456789abcdef" for c in v):
        raise BlobHashMismatchError(f"{what} {value!r} is not a sha256 (64 hex digits)")
    return v


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _z_b64(z: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(z, dtype="<f4").tobytes()).decode("ascii")


def _check_text(name: str, value: Any, site: str) -> None:
    if not isinstance(value, str):
        raise MetadataError(
            f"site {site!r}: metadata field {name!r} must be a string; got {type(value).__name__}"
        )
    if not value or len(value) > _TEXT_MAX or value != value.strip():
        raise MetadataError(
            f"site {site!r}: metadata field {name!r} must be 1–{_TEXT_MAX} characters without "
            "leading/trailing "
            f"spaces; got {value[:40]!r}"
        )
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise MetadataError(f"site {site!r}: metadata field {name!r} contains control characters")


def _check_count(name: str, value: Any, site: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise MetadataError(
            f"site {site!r}: metadata field {name!r} must be an integer; got {type(value).__name__} {value!r}"
        )
    if value < minimum:
        raise MetadataError(f"site {site!r}: metadata field {name!r} must be >= {minimum}; got {value}")


def _check_json_value(name: str, value: Any, site: str) -> Any:
    try:
        return json.loads(_canonical(value))
    except (TypeError, ValueError) as exc:
        raise MetadataError(
            f"site {site!r}: metadata field {name!r} must hold JSON values only (str, finite numbers, bool, "
            f"None, lists, dicts with string keys): {exc}"
        ) from exc


def _core_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The metadata that must match for a re-submission to count as the same one. ``extra`` is
    left out on purpose: it carries per-run values (signatures over a nonce, timings) that differ
    on an honest re-submission; ``created_at`` is the registry's own."""
    return {k: v for k, v in meta.items() if k not in ("created_at", "extra")}


def _parse_safetensors_header(blob: bytes) -> dict[str, Any]:
    """The safetensors JSON header (tensor dtypes/shapes), read without loading any tensor."""
    if len(blob) < 8:
        raise AdapterFormatError(
            "adapter blob is too short to be safetensors; send common.lora.adapter_to_bytes()"
        )
    n = int.from_bytes(blob[:8], "little")
    if n > len(blob) - 8 or n > 100 * 1024 * 1024:
        raise AdapterFormatError("adapter blob has a truncated or oversized safetensors header")
    try:
        header = json.loads(bytes(blob[8:8 + n]))
    except (UnicodeDecodeError, ValueError) as exc:
        raise AdapterFormatError(f"adapter blob has an unreadable safetensors header ({exc})") from exc
    if not isinstance(header, dict):
        raise AdapterFormatError("adapter blob's safetensors header is not a JSON object")
    return header


# --------------------------------------------------------------------------------------------
# one writer per registry path
# --------------------------------------------------------------------------------------------

class _PathLock:
    """Process-wide exclusive flock on ``REG/.lock`` with a reference count.

    flock is per open file, so two Registry objects in one process share this lock (and a thread
    lock serialising their writes) instead of locking each other out; another process is refused.
    """

    _table: dict[str, _PathLock] = {}
    _table_lock = threading.Lock()

    def __init__(self, key: str, fd: int) -> None:
        self.key = key
        self.fd = fd
        self.refs = 0
        self.mutex = threading.RLock()

    @classmethod
    def acquire(cls, root: Path) -> _PathLock:
        key = str(root.resolve())
        with cls._table_lock:
            lock = cls._table.get(key)
            if lock is None:
                fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                    os.close(fd)
                    raise RegistryLockedError(
                        f"registry {root} is open for writing by another process (pid {holder}); only one "
                        "writer per registry is allowed: stop it, or open with Registry(path, read_only=True)"
                    ) from None
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                lock = cls(key, fd)
                cls._table[key] = lock
            lock.refs += 1
            return lock

    def release(self) -> None:
        with self._table_lock:
            self.refs -= 1
            if self.refs <= 0:
                self._table.pop(self.key, None)
                with contextlib.suppress(OSError):
                    fcntl.flock(self.fd, fcntl.LOCK_UN)
                os.close(self.fd)


# --------------------------------------------------------------------------------------------
# the registry
# --------------------------------------------------------------------------------------------

class Registry:
    """A LoRA registry directory (see the module docstring for layout and guarantees).

    ``Registry(path)`` opens an existing registry for writing (one process at a time);
    ``read_only=True`` opens without the lock and without Chroma (brute-force queries only),
    e.g. for ``rpe registry ls`` while the server runs. ``chroma`` overrides the configured
    index: ``"off"`` (no Chroma), ``"embedded"``, or ``(host, port)`` of a ``chroma run``
    server. ``sync_index=False`` skips reconciling Chroma on open (it stays unused until
    ``sync_index()``), for a quick open of a very large registry. ``blob_key`` is the key of a
    registry whose blobs are encrypted (default: ``$RPE_BLOB_KEY_FILE`` / ``$RPE_BLOB_KEY``, see
    ``common.blobcrypt.load_blob_key``); only storing and reading adapter bytes need it.
    """

    def __init__(self, path: str | os.PathLike[str], *, read_only: bool = False,
                 chroma: str | tuple[str, int] | None = None, sync_index: bool = True,
                 blob_key: BlobKey | None = None) -> None:
        self.path = Path(path).expanduser().resolve()
        cfg_path = self.path / CONFIG_NAME
        if not cfg_path.is_file():
            raise NotARegistryError(
                f"{self.path} is not a registry (no {CONFIG_NAME}); create one with "
                "`rpe registry init` / Registry.init(path, base_fingerprint=..., module_shapes=..., "
                "embedding_dim=...)"
            )
        self.read_only = read_only
        self._lock: _PathLock | None = None
        self._closed = False
        self._mutex: threading.RLock = threading.RLock()
        if not read_only:
            self._lock = _PathLock.acquire(self.path)
            self._mutex = self._lock.mutex
        try:
            self._open(chroma, sync_index, blob_key)
        except BaseException:
            self.close()
            raise

    # ---- creation ---------------------------------------------------------------------------

    @classmethod
    def init(cls, path: str | os.PathLike[str], *, base_fingerprint: str,
             module_shapes: Mapping[str, Sequence[int]], embedding_dim: int,
             representation: str = "hidden-mean", chroma_host: str | None = None,
             chroma_port: int | None = None, base_name: str | None = None,
             limits: Mapping[str, int] | None = None, collection: str = COLLECTION,
             exist_ok: bool = False, blob_key: BlobKey | None = None) -> Registry:
        """Create a registry directory and open it.

        ``module_shapes`` is ``{module name: (out, in)}`` of the base model (``common.models.
        linear_module_shapes``), so adapters are validated without loading the model.
        ``base_name`` is what composed PEFT directories record as ``base_model_name_or_path``.
        ``exist_ok=True`` opens an existing registry whose representation and dim match.
        ``blob_key`` (default: ``$RPE_BLOB_KEY_FILE`` / ``$RPE_BLOB_KEY``, if set) makes every blob
        stored AES-256-GCM encrypted with that key, for the registry's whole life.
        """
        root = Path(path).expanduser().resolve()
        blob_key = blob_key if blob_key is not None else _env_blob_key()
        if (root / CONFIG_NAME).is_file():
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
        if root.exists() and not cls._empty_or_interrupted_init(root):
            raise RegistryExistsError(
                f"{root} exists and is not empty; choose a new directory for the registry"
            )
        if isinstance(embedding_dim, bool) or not isinstance(embedding_dim, int) or embedding_dim < 1:
            raise RegistryError(f"embedding_dim must be a positive integer; got {embedding_dim!r}")
        if (chroma_host is None) != (chroma_port is None):
            raise RegistryError("give both chroma_host and chroma_port (a `chroma run` server) or neither")
        lim = dict(DEFAULT_LIMITS)
        for k, v in (limits or {}).items():
            if k not in DEFAULT_LIMITS:
                raise RegistryError(f"unknown limit {k!r}; known: {sorted(DEFAULT_LIMITS)}")
            lim[k] = float(v) if isinstance(DEFAULT_LIMITS[k], float) else int(v)
        chroma_cfg: dict[str, Any] = {"mode": "embedded", "collection": collection}
        if chroma_host is not None:
            chroma_cfg = {"mode": "http", "host": chroma_host, "port": int(chroma_port),
                          "collection": collection}
        config = {
            "format": REGISTRY_FORMAT,
            "registry_id": uuid.uuid4().hex,
            "created_at": _now(),
            "representation": representation,
            "embedding_dim": embedding_dim,
            "bases": {base_fingerprint: cls._base_entry(module_shapes, base_name)},
            "limits": lim,
            "chroma": chroma_cfg,
        }
        if blob_key is not None:
            config["blob_encryption"] = blob_key.describe()
        (root / BLOBS_DIR / "sha256").mkdir(parents=True, exist_ok=True)
        records = root / RECORDS_NAME
        with open(records, "ab") as fh:
            os.fsync(fh.fileno())
        _atomic_write(root / CONFIG_NAME, (json.dumps(config, indent=1, sort_keys=True) + "\n").encode())
        _fsync_dir(root)
        if root.parent.exists():
            _fsync_dir(root.parent)
        return cls(root, blob_key=blob_key)

    @staticmethod
    def _empty_or_interrupted_init(root: Path) -> bool:
        """True for an empty directory or the leftovers of an ``init`` that crashed before writing
        registry.json (which is written last): an empty records.jsonl and an empty blob tree."""
        for p in root.iterdir():
            if p.name in (LOCK_NAME,) or p.name.startswith(TMP_PREFIX):
                continue
            if p.name == RECORDS_NAME and p.is_file() and p.stat().st_size == 0:
                continue
            if p.name == BLOBS_DIR and p.is_dir() and not any(q.is_file() for q in p.rglob("*")):
                continue
            return False
        return True

    @staticmethod
    def _base_entry(module_shapes: Mapping[str, Sequence[int]], name: str | None) -> dict[str, Any]:
        if not isinstance(module_shapes, Mapping) or not module_shapes:
            raise RegistryError("module_shapes must be a non-empty {module name: (out, in)} mapping")
        modules: dict[str, list[int]] = {}
        for mod, shape in module_shapes.items():
            dims = [int(x) for x in shape]
            if not isinstance(mod, str) or len(dims) != 2 or min(dims) < 1:
                raise RegistryError(
                    f"module_shapes[{mod!r}] must be (out, in) positive integers; got {shape!r}"
                )
            modules[mod] = dims
        return {"name": name, "modules": dict(sorted(modules.items())), "added_at": _now()}

    def add_base(self, fingerprint: str, module_shapes: Mapping[str, Sequence[int]],
                 name: str | None = None) -> None:
        """Accept adapters for another base model (same fingerprint twice with the same shapes is a no-op)."""
        self._require_writable()
        if not isinstance(fingerprint, str) or not fingerprint:
            raise RegistryError("base fingerprint must be a non-empty string")
        entry = self._base_entry(module_shapes, name)
        with self._mutex:
            old = self.config["bases"].get(fingerprint)
            if old is not None:
                if old["modules"] != entry["modules"]:
                    raise RegistryError(
                        f"base {fingerprint} is already registered with different module shapes; a "
                        "fingerprint names one model"
                    )
                return
            config = json.loads(json.dumps(self.config))
            config["bases"][fingerprint] = entry
            _atomic_write(self.path / CONFIG_NAME,
                          (json.dumps(config, indent=1, sort_keys=True) + "\n").encode())
            self.config = config
            self.audit.append("registry.add_base", base_fingerprint=fingerprint, name=name,
                              n_modules=len(entry["modules"]))

    # ---- opening ----------------------------------------------------------------------------

    def _open(self, chroma: str | tuple[str, int] | None, sync_index: bool, blob_key: BlobKey | None) -> None:
        from server.audit import AuditLog

        try:
            self.config: dict[str, Any] = json.loads((self.path / CONFIG_NAME).read_text())
        except (OSError, ValueError) as exc:
            raise RegistryCorruptError(f"{self.path / CONFIG_NAME} is unreadable ({exc})") from exc
        if self.config.get("format") != REGISTRY_FORMAT:
            raise NotARegistryError(
                f"{self.path / CONFIG_NAME} has format {self.config.get('format')!r}, expected "
                f"{REGISTRY_FORMAT!r}"
            )
        self.embedding_dim: int = int(self.config["embedding_dim"])
        self.representation: str = str(self.config["representation"])
        self._setup_blob_key(blob_key)
        self.audit = AuditLog(self.path / AUDIT_NAME)
        d = self.embedding_dim
        self._n = 0
        self._line_count = 0
        self._Z = np.zeros((0, d), dtype=np.float32)
        self._n2 = np.zeros(0, dtype=np.float64)
        self._live = np.zeros(0, dtype=bool)
        self._codes: dict[str, np.ndarray] = {
            k: np.zeros(0, dtype=np.int32) for k in ("site", "task", "modality", "base")
        }
        self._vocab: dict[str, dict[str, int]] = {k: {} for k in self._codes}
        self._ids: list[str] = []
        self._row: dict[str, int] = {}
        self._meta: list[dict[str, Any]] = []
        self._blob: list[tuple[str, int, str]] = []  # (sha, bytes, z_sha)
        self._n_live = 0
        self._offset = 0
        self._proj: dict[str, Any] | None = None
        self._index_misses = 0
        self._chroma_client: Any = None
        self._col: Any = None
        self._index_fresh = False
        self.index_error: str | None = None
        if not self.read_only:
            self._remove_stale_temps()
        self._load_records()
        mode = chroma if chroma is not None else self.config.get("chroma", {}).get("mode", "embedded")
        if isinstance(mode, (tuple, list)):
            self._chroma_spec: dict[str, Any] | None = {"mode": "http", "host": mode[0], "port": int(mode[1])}
        elif mode == "off" or self.read_only:
            self._chroma_spec = None
        elif mode == "embedded":
            self._chroma_spec = {"mode": "embedded"}
        elif mode == "http":
            cc = self.config["chroma"]
            self._chroma_spec = {"mode": "http", "host": cc["host"], "port": int(cc["port"])}
        else:
            raise RegistryError(f"chroma must be 'off', 'embedded', 'http' or (host, port); got {mode!r}")
        if self._chroma_spec is not None:
            self._chroma_spec["collection"] = self.config.get("chroma", {}).get("collection", COLLECTION)
            if sync_index:
                self.sync_index()

    def _setup_blob_key(self, blob_key: BlobKey | None) -> None:
        """Match the given (or environment) key against registry.json's ``blob_encryption``."""
        enc = self.config.get("blob_encryption")
        key = blob_key if blob_key is not None else _env_blob_key()
        #: ``{"alg", "key_id"}`` when the registry's blobs are encrypted, else None
        self.blob_encryption: dict[str, str] | None = None if enc is None else dict(enc)
        self._blob_key: BlobKey | None = None
        if enc is None:
            if key is not None:
                raise BlobKeyError(
                    f"registry {self.path} stores adapter blobs unencrypted, but a blob key was given ({key.source}); "
                    "refusing to ignore it. Create an encrypted registry with `rpe registry init --blob-key-file "
                    f"FILE` (Registry.init(..., blob_key=...)), or open this one without a key (unset "
                    f"${blobcrypt.KEY_FILE_ENV} / ${blobcrypt.KEY_ENV})"
                )
            return
        if not isinstance(enc, dict) or enc.get("alg") != blobcrypt.ALG or not isinstance(enc.get("key_id"), str):
            raise RegistryCorruptError(
                f"{self.path / CONFIG_NAME}: blob_encryption {enc!r} is not {{'alg': {blobcrypt.ALG!r}, 'key_id': "
                "...}}; this version cannot read such blobs"
            )
        if key is not None and key.key_id != enc["key_id"]:
            raise BlobKeyError(
                f"registry {self.path} blobs are encrypted with key {enc['key_id']}, but the key from {key.source} "
                f"is key {key.key_id}; give the key file the registry was created with"
            )
        self._blob_key = key

    @property
    def has_blob_key(self) -> bool:
        """True when adapter bytes can be stored and read: blobs unencrypted, or the key is loaded."""
        return self.blob_encryption is None or self._blob_key is not None

    def _require_blob_key(self, what: str) -> BlobKey | None:
        """The key for an encrypted registry (None for a plain one); ``BlobKeyError`` if it is missing."""
        if self.blob_encryption is None:
            return None
        if self._blob_key is None:
            raise BlobKeyError(
                f"registry {self.path} stores adapter blobs encrypted ({self.blob_encryption['alg']}, key "
                f"{self.blob_encryption['key_id']}); {what} needs that key: set ${blobcrypt.KEY_FILE_ENV} to the "
                f"key file (or ${blobcrypt.KEY_ENV} to the key), pass --blob-key-file FILE to `rpe`, set run "
                "config blob-key-file, or open with Registry(path, blob_key=common.blobcrypt.load_blob_key(FILE)). "
                "Listing, queries and removal work without it"
            )
        return self._blob_key

    def _encryption_fields(self) -> dict[str, Any]:
        """``{"blob_encryption": {...}}`` for record lines and audit entries of an encrypted registry."""
        return {} if self.blob_encryption is None else {"blob_encryption": dict(self.blob_encryption)}

    def _remove_stale_temps(self) -> None:
        """Temp files can only be leftovers of a crashed writer: we hold the writer lock."""
        stale = [p for p in self.path.glob(TMP_PREFIX + "*") if p.is_file()]
        sha_dir = self.path / BLOBS_DIR / "sha256"
        if sha_dir.is_dir():
            for sub in sha_dir.iterdir():
                if sub.is_dir():
                    stale.extend(p for p in sub.iterdir() if p.name.startswith(TMP_PREFIX))
        for p in stale:
            log.warning("registry %s: removing stale temp file %s (left by a crashed writer)", self.path, p)
            with contextlib.suppress(OSError):
                p.unlink()

    def _load_records(self) -> None:
        path = self.path / RECORDS_NAME
        if not path.exists():
            if self.read_only:
                return
            raise RegistryCorruptError(
                f"{path} is missing: the registry's source of truth is gone; restore it from a backup"
            )
        size = path.stat().st_size
        good = 0
        with open(path, "rb") as fh:
            first = fh.readline()
            if first and size > (1 << 20):  # pre-size the matrix instead of doubling a huge one
                self._ensure_capacity(int(size / max(len(first), 1) * 1.1) + 16)
            fh.seek(0)
            buf = b""
            while True:
                chunk = fh.read(_LOAD_CHUNK)
                at_eof = not chunk
                buf += chunk
                used = self._parse_lines(buf, good, final=at_eof)
                good += used
                buf = buf[used:]
                if at_eof:
                    break
        if buf:
            torn = buf
            if self.read_only:
                log.warning("registry %s: ignoring a torn last line (%d bytes)", self.path, len(torn))
            else:
                log.warning("registry %s: truncating a torn last record line (%d bytes, crash mid-append)",
                            self.path, len(torn))
                with open(path, "rb+") as fh:
                    fh.truncate(good)
                    fh.flush()
                    os.fsync(fh.fileno())
                self.audit.append("registry.recover", file=RECORDS_NAME, truncated_bytes=len(torn),
                                  at_offset=good, sha256=_sha256(torn))
        self._offset = good

    def _parse_lines(self, data: bytes, base_offset: int, final: bool) -> int:
        """Apply every complete line of ``data``; returns the byte count consumed.

        ``final``: ``data`` runs to the end of the file. A bad line that is the file's last one
        (no newline after it, or unparseable) is a torn append and is left unconsumed; a bad line
        followed by anything else is corruption and raises.
        """
        pos = 0
        n = len(data)
        adds: list[tuple[dict[str, Any], bytes]] = []
        while pos < n:
            nl = data.find(b"\n", pos)
            if nl < 0:
                break  # torn (or in-flight) last line
            raw = data[pos:nl]
            try:
                entry = _loads(raw)
                if not isinstance(entry, dict) or entry.get("op") not in ("add", "remove"):
                    raise ValueError("not a record line")
                if entry["op"] == "add":
                    zb = binascii.a2b_base64(entry["z_b64"].encode("ascii"), strict_mode=True)
                    if len(zb) != 4 * self.embedding_dim:
                        raise ValueError(f"z has {len(zb) // 4} values, registry holds {self.embedding_dim}")
                else:
                    zb = b""
            except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
                if data[nl + 1:].strip(b"\x00\n\r\t ") == b"" and final:
                    break  # the last line is damaged: treat as torn
                lineno = self._line_count + data[:pos].count(b"\n") + 1
                raise RegistryCorruptError(
                    f"{self.path / RECORDS_NAME}: line {lineno} (byte {base_offset + pos}) is not a valid "
                    "record "
                    f"({exc}) but later lines are; the file was damaged outside the registry. Move the bad "
                    "line out by hand (one record per line) after taking a copy, then reopen"
                ) from exc
            if entry["op"] == "add":
                adds.append((entry, zb))
            else:
                self._flush_adds(adds)
                adds = []
                self._apply_remove(entry["id"])
            pos = nl + 1
        self._flush_adds(adds)
        self._line_count += data[:pos].count(b"\n")
        return pos

    def _flush_adds(self, adds: list[tuple[dict[str, Any], bytes]]) -> None:
        if not adds:
            return
        Z = np.frombuffer(b"".join(zb for _, zb in adds), dtype="<f4").reshape(len(adds), self.embedding_dim)
        self._apply_adds(
            [(e["id"], e["meta"], e["blob_sha256"], int(e["bytes"]), e["z_sha256"]) for e, _ in adds], Z
        )

    # ---- in-memory state --------------------------------------------------------------------

    def _ensure_capacity(self, extra: int) -> None:
        need = self._n + extra
        cap = self._Z.shape[0]
        if need <= cap:
            return
        new_cap = max(need, cap * 2, 64)

        def grow(a: np.ndarray) -> np.ndarray:
            out = np.zeros((new_cap,) + a.shape[1:], dtype=a.dtype)
            out[: self._n] = a[: self._n]
            return out

        self._Z = grow(self._Z)
        self._n2 = grow(self._n2)
        self._live = grow(self._live)
        for k in self._codes:
            self._codes[k] = grow(self._codes[k])
        if self._proj is not None and "Y" in self._proj:
            self._proj["Y"] = grow(self._proj["Y"])
            self._proj["yn"] = grow(self._proj["yn"])

    def _code(self, key: str, value: str) -> int:
        vocab = self._vocab[key]
        c = vocab.get(value)
        if c is None:
            c = vocab[value] = len(vocab)
        return c

    def _apply_adds(self, items: Sequence[tuple[str, dict[str, Any], str, int, str]],
                    Z: np.ndarray) -> list[int]:
        """Put records into memory (rows reused for an id that was removed and is added again)."""
        self._ensure_capacity(len(items))
        rows: list[int] = []
        for (rid, meta, sha, nbytes, zsha), z in zip(items, Z, strict=True):
            row = self._row.get(rid)
            if row is None:
                row = self._n
                self._n += 1
                self._row[rid] = row
                self._ids.append(rid)
                self._meta.append(meta)
                self._blob.append((sha, nbytes, zsha))
            else:
                if self._live[row]:
                    raise RegistryCorruptError(f"{self.path / RECORDS_NAME}: record {rid} is added twice")
                self._meta[row] = meta
                self._blob[row] = (sha, nbytes, zsha)
            self._Z[row] = z
            self._live[row] = True
            self._n_live += 1
            for key, mkey in (("site", "site"), ("task", "task"), ("modality", "modality"),
                              ("base", "base_fingerprint")):
                self._codes[key][row] = self._code(key, meta[mkey])
            rows.append(row)
        if rows:
            r = np.asarray(rows)
            zr = self._Z[r]
            self._n2[r] = np.einsum("ij,ij->i", zr, zr)  # float32 sum: its error is in _search_brute's bound
            if self._proj is not None and "Y" in self._proj:
                self._project_rows(r)
        return rows

    def _apply_remove(self, rid: str) -> None:
        row = self._row.get(rid)
        if row is None or not self._live[row]:
            raise RegistryCorruptError(f"{self.path / RECORDS_NAME}: removal of unknown record {rid}")
        self._live[row] = False
        self._n_live -= 1

    def _refresh(self) -> None:
        """Pick up lines another Registry object (same process, or a writer seen read-only) appended."""
        path = self.path / RECORDS_NAME
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return
        if size == self._offset:
            return
        if size < self._offset:
            raise RegistryCorruptError(
                f"{path} shrank while open ({self._offset} -> {size} bytes); reopen the registry"
            )
        with open(path, "rb") as fh:
            fh.seek(self._offset)
            data = fh.read(size - self._offset)
        self._offset += self._parse_lines(data, self._offset, final=False)

    # ---- validation -------------------------------------------------------------------------

    def _require_writable(self) -> None:
        if self._closed:
            raise RegistryError(f"registry {self.path} is closed")
        if self.read_only:
            raise ReadOnlyError(
                f"registry {self.path} was opened read-only; open it with Registry(path) to write"
            )

    @property
    def bases(self) -> dict[str, dict[str, Any]]:
        """``{fingerprint: {"name", "modules": {module: [out, in]}, "added_at"}}``."""
        return self.config["bases"]

    @property
    def limits(self) -> dict[str, float]:
        return {**DEFAULT_LIMITS, **self.config.get("limits", {})}

    def check_z(self, z: Any, who: str = "the query") -> np.ndarray:
        """``z`` as a contiguous float32 vector of the registry's dimension, or a typed error
        (``EmbeddingDimensionError`` / ``NonFiniteError``) whose message names ``who``."""
        return self._check_z(z, who)

    def _check_z(self, z: Any, who: str) -> np.ndarray:
        try:
            arr = _to_numpy(z)
        except Exception as exc:  # noqa: BLE001 - anything unconvertible is a bad z
            raise EmbeddingDimensionError(f"{who} sent a z that is not an array ({exc})") from exc
        if arr.dtype.kind not in "fiu" or arr.dtype == bool:
            raise EmbeddingDimensionError(f"{who} sent z of dtype {arr.dtype}; expected a float vector")
        if arr.ndim != 1:
            raise EmbeddingDimensionError(
                f"{who} sent z of shape {tuple(arr.shape)}; expected a 1-D vector of {self.embedding_dim} "
                "values"
            )
        if arr.shape[0] != self.embedding_dim:
            raise EmbeddingDimensionError(
                f"{who} sent {arr.shape[0]} values, the registry holds {self.embedding_dim} "
                f"({self.representation!r}); compute z with the registry's representation/layer"
            )
        with np.errstate(over="ignore", invalid="ignore"):
            z32 = arr.astype(np.float32)
        bad = np.flatnonzero(~np.isfinite(z32))
        if bad.size:
            raise NonFiniteError(
                f"{who} sent z with {bad.size} non-finite value(s) (NaN/Inf after the cast to float32) at "
                f"index {bad[:5].tolist()}; recompute the embedding"
            )
        norm = float(np.linalg.norm(z32.astype(np.float64)))
        cap = float(self.limits["max_z_norm"])
        if norm > cap:
            raise NormError(
                f"{who} sent z with norm {norm:.3g}, above the registry's cap {cap:.3g} (limits.max_z_norm); "
                "check the embedding pipeline (layer, pooling, dtype)"
            )
        return np.ascontiguousarray(z32)

    def _check_meta(self, meta: AdapterMeta | Mapping[str, Any]) -> dict[str, Any]:
        m = meta if isinstance(meta, AdapterMeta) else AdapterMeta.from_dict(meta)
        site = m.site if isinstance(m.site, str) else "?"
        _check_text("site", m.site, site)
        for name in ("task", "modality", "base_fingerprint"):
            _check_text(name, getattr(m, name), site)
        _check_count("sample_count", m.sample_count, site, 1)
        if m.token_count is not None:
            _check_count("token_count", m.token_count, site, 0)
        if isinstance(m.privacy, str):
            _check_text("privacy", m.privacy, site)
        elif not isinstance(m.privacy, dict):
            raise MetadataError(
                f"site {site!r}: metadata field 'privacy' must be a string such as 'none' or a dict; "
                f"got {type(m.privacy).__name__}"
            )
        if not isinstance(m.extra, dict):
            raise MetadataError(
                f"site {site!r}: metadata field 'extra' must be a dict; got {type(m.extra).__name__}"
            )
        out = {
            "site": m.site, "task": m.task, "modality": m.modality, "base_fingerprint": m.base_fingerprint,
            "sample_count": int(m.sample_count),
            "token_count": None if m.token_count is None else int(m.token_count),
            "rank": None, "privacy": _check_json_value("privacy", m.privacy, site), "created_at": None,
            "extra": _check_json_value("extra", m.extra, site),
        }
        size = len(_canonical(out))
        if size > self.limits["max_meta_bytes"]:
            raise PayloadTooLargeError(
                f"site {site!r}: metadata is {size} bytes, the cap is {self.limits['max_meta_bytes']}; keep "
                "only "
                "small fields in 'extra'"
            )
        return out

    def _check_adapter(self, adapter: Any, site: str, base: str) -> tuple[bytes, int]:
        """Validate an adapter (LoraAdapter or canonical bytes) against ``base``; returns (blob, max rank)."""
        from common.lora import LoraAdapter, LoraFormatError, adapter_from_bytes, adapter_to_bytes

        lim = self.limits
        max_bytes = lim["max_blob_bytes"]
        if isinstance(adapter, (bytes, bytearray, memoryview)):
            blob = bytes(adapter)
            if len(blob) > max_bytes:
                raise PayloadTooLargeError(
                    f"site {site!r}: adapter blob is {len(blob)} bytes, the registry cap is {max_bytes}; "
                    "lower the "
                    "rank or the number of target modules"
                )
            try:
                header = _parse_safetensors_header(blob)
            except AdapterFormatError as exc:
                raise AdapterFormatError(
                    f"site {site!r}: {exc}; send exactly common.lora.adapter_to_bytes(adapter)"
                ) from None
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                tag = info.get("dtype") if isinstance(info, dict) else None
                if tag not in ALLOWED_DTYPES:
                    raise DtypeError(
                        f"site {site!r}: tensor {key} has dtype {tag}; accepted: float32, bfloat16, float16"
                    )
            try:
                parsed = adapter_from_bytes(blob)
            except LoraFormatError as exc:
                raise AdapterFormatError(
                    f"site {site!r}: {exc}; the registry accepts only common.lora.adapter_to_bytes(adapter) "
                    "(a PEFT directory: load it with common.lora.load_peft_adapter first; resend if the blob "
                    "was cut in transit)"
                ) from exc
            self._check_modules(parsed, site, base)
            try:
                canonical = adapter_to_bytes(parsed)
            except (LoraFormatError, KeyError) as exc:
                raise AdapterFormatError(f"site {site!r}: adapter cannot be re-encoded ({exc})") from exc
            if canonical != blob:
                raise AdapterFormatError(
                    f"site {site!r}: adapter blob is not in canonical form; encode it with "
                    "common.lora.adapter_to_bytes (its sha256 is the adapter's id)"
                )
            return blob, max(m.rank for m in parsed.modules.values())
        if not isinstance(adapter, LoraAdapter):
            raise AdapterFormatError(
                f"site {site!r}: adapter must be a common.lora.LoraAdapter or its canonical bytes; got "
                f"{type(adapter).__name__}"
            )
        for name, m in adapter.modules.items():
            for label, t in (("A", m.A), ("B", m.B)):
                dt = str(t.dtype).removeprefix("torch.")
                if dt not in ALLOWED_DTYPES.values():
                    raise DtypeError(
                        f"site {site!r}: module {name} lora_{label} has dtype {dt}; accepted: float32, "
                        "bfloat16, "
                        "float16"
                    )
        est = sum(m.A.numel() * m.A.element_size() + m.B.numel() * m.B.element_size()
                  for m in adapter.modules.values())
        if est > max_bytes:
            raise PayloadTooLargeError(
                f"site {site!r}: adapter tensors are {est} bytes, the registry cap is {max_bytes}; lower the "
                "rank or the number of target modules"
            )
        self._check_modules(adapter, site, base)
        blob = adapter_to_bytes(adapter)
        if len(blob) > max_bytes:
            raise PayloadTooLargeError(
                f"site {site!r}: adapter blob is {len(blob)} bytes, the registry cap is {max_bytes}; lower "
                "the rank "
                "or the number of target modules"
            )
        return blob, max(m.rank for m in adapter.modules.values())

    def _check_modules(self, adapter: Any, site: str, base: str) -> None:
        import torch

        lim = self.limits
        shapes = self.bases[base]["modules"]
        if not adapter.modules:
            raise AdapterFormatError(f"site {site!r}: adapter has no modules")
        if len(adapter.modules) > lim["max_modules"]:
            raise PayloadTooLargeError(
                f"site {site!r}: adapter has {len(adapter.modules)} modules, the cap is {lim['max_modules']}"
            )
        for name in sorted(adapter.modules):
            m = adapter.modules[name]
            if name not in shapes:
                near = [s for s in shapes if s.split(".")[-1] == name.split(".")[-1]][:3]
                raise UnknownModuleError(
                    f"site {site!r}: module {name!r} does not exist in base {base}"
                    + (f" (e.g. {near})" if near else "")
                    + "; module names are base-model paths such as 'model.layers.0.self_attn.q_proj'"
                )
            out, inp = shapes[name]
            r = int(m.A.shape[0])
            if tuple(m.A.shape) != (r, inp) or tuple(m.B.shape) != (out, r):
                raise ShapeMismatchError(
                    f"site {site!r}: module {name}: A {tuple(m.A.shape)} / B {tuple(m.B.shape)} do not fit "
                    "the base "
                    f"module (out={out}, in={inp}); expected A [r, {inp}] and B [{out}, r] — was the adapter "
                    "trained on another base model?"
                )
            if r < 1 or r > lim["max_rank"]:
                raise RankError(
                    f"site {site!r}: module {name} has rank {r}; the registry accepts 1..{lim['max_rank']}"
                )
            if not math.isfinite(m.scale):
                raise NonFiniteError(f"site {site!r}: module {name} has a non-finite scale {m.scale}")
            for label, t in (("A", m.A), ("B", m.B)):
                finite = torch.isfinite(t)
                if not bool(finite.all()):
                    nbad = int((~finite).sum())
                    kinds = []
                    if bool(torch.isnan(t).any()):
                        kinds.append("NaN")
                    if bool(torch.isinf(t).any()):
                        kinds.append("Inf")
                    raise NonFiniteError(
                        f"site {site!r}: module {name} lora_{label} has {nbad} non-finite value(s) "
                        f"({'/'.join(kinds)}); the training diverged — retrain (lower lr) before submitting"
                    )
            # ‖s·B·A‖_F² = s²·trace((BᵀB)(AAᵀ)): two r×r products, never the dense out×in update
            A64, B64 = m.A.to(torch.float64), m.B.to(torch.float64)
            norm = abs(m.scale) * math.sqrt(max(float(torch.trace((B64.T @ B64) @ (A64 @ A64.T))), 0.0))
            cap = float(lim["max_delta_norm"])
            if not norm <= cap:
                raise NormError(
                    f"site {site!r}: module {name} has ‖scale·B·A‖_F = {norm:.3g}, above the registry's cap "
                    f"{cap:.3g} (limits.max_delta_norm); the training diverged or the factors were scaled — "
                    "retrain before submitting"
                )

    def _prepare(self, adapter: Any, z: Any, meta: AdapterMeta | Mapping[str, Any],
                 expected_sha256: str | None) -> _Prepared:
        """Validate everything; raise a ValidationError or return what will be written."""
        m = self._check_meta(meta)
        site = m["site"]
        who = f"site {site!r}"
        if m["base_fingerprint"] not in self.bases:
            known = ", ".join(sorted(self.bases)) or "none"
            raise UnknownBaseError(
                f"{who}: base model fingerprint {m['base_fingerprint']} is not accepted by this registry "
                "(known: "
                f"{known}); train on the registry's base model, or add it with Registry.add_base"
            )
        z32 = self._check_z(z, who)
        expected = (None if expected_sha256 is None
                    else _normalize_sha(expected_sha256, f"{who}: expected_sha256"))
        if expected is not None and isinstance(adapter, (bytes, bytearray, memoryview)):
            got = _sha256(bytes(adapter))
            if got != expected:
                raise BlobHashMismatchError(
                    f"{who}: adapter blob hashes to {got} but the submission announced {expected}; the "
                    "adapter was "
                    "altered or truncated in transit — resend it"
                )
        blob, rank = self._check_adapter(adapter, site, m["base_fingerprint"])
        sha = _sha256(blob)
        if expected is not None and sha != expected:
            raise BlobHashMismatchError(
                f"{who}: adapter blob hashes to {sha} but the submission announced {expected}; the adapter "
                "was "
                "altered in transit, or the site hashed something other than common.lora.adapter_to_bytes"
            )
        m["rank"] = rank
        z_sha = _sha256(z32.astype("<f4").tobytes())
        key = _sha256(_canonical([site, m["task"], sha, z_sha]).encode())[:_ID_HASH_LEN]
        rid = f"{site}:{m['task']}:{key}"
        return _Prepared(rid, z32, m, blob, sha, z_sha)

    def _reject(self, exc: ValidationError, meta: Any, item: int | None = None,
                extra: Mapping[str, Any] | None = None) -> None:
        site = getattr(meta, "site", None) if not isinstance(meta, Mapping) else meta.get("site")
        fields_: dict[str, Any] = {**(extra or {}), "site": site if isinstance(site, str) else None,
                                   "reason": str(exc), "error": type(exc).__name__}
        if item is not None:
            fields_["item"] = item
        self.audit.append("submission.rejected", **fields_)

    # ---- writing ----------------------------------------------------------------------------

    def _blob_path(self, sha: str) -> Path:
        return self.path / BLOBS_DIR / "sha256" / sha[:2] / sha

    def _stored_size(self, nbytes: int) -> int:
        """Size on disk of a blob of ``nbytes`` plaintext bytes."""
        return nbytes if self.blob_encryption is None else blobcrypt.encrypted_size(nbytes)

    def _plaintext(self, sha: str, data: bytes) -> bytes:
        """The adapter bytes of a stored blob (decrypted in an encrypted registry; raises
        ``blobcrypt.BlobKeyError`` / ``BlobAuthError``). The caller still checks the sha256."""
        key = self._require_blob_key("reading adapter bytes")
        return data if key is None else blobcrypt.decrypt(key, data, sha)

    def _blob_ok(self, sha: str, nbytes: int) -> bool:
        p = self._blob_path(sha)
        try:
            if p.stat().st_size != self._stored_size(nbytes):
                return False
            data = self._plaintext(sha, p.read_bytes())
        except (FileNotFoundError, blobcrypt.BlobAuthError):
            return False
        except BlobKeyError:
            raise
        except blobcrypt.BlobKeyError:  # encrypted with another key: rewrite it with ours
            return False
        return _sha256(data) == sha

    def _write_blobs(self, blobs: Mapping[str, bytes]) -> None:
        """Durably store new blobs: temp file in the final directory -> fsync -> os.replace ->
        fsync the directory, all before any record naming them is appended.

        The temp files of a batch are fsynced concurrently (fsync releases the GIL), so the
        filesystem journal commits them together instead of once per blob; on a busy disk that
        is the difference between ~6 ms and a fraction of a millisecond per adapter."""
        if not blobs:
            return
        key = self._require_blob_key("storing adapters")
        pending: list[tuple[str, Path]] = []
        try:
            for sha, blob in blobs.items():
                if key is not None:
                    blob = blobcrypt.encrypt(key, blob, sha)
                final = self._blob_path(sha)
                final.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + sha[:12] + "-", dir=final.parent)
                pending.append((tmp, final))
                os.fchmod(fd, 0o444)  # blobs are never rewritten in place
                with os.fdopen(fd, "wb") as fh:
                    half = len(blob) // 2
                    fh.write(blob[:half])
                    if os.environ.get("RPE_CRASH_AT"):
                        fh.flush()
                        _crash_point("mid_blob")
                    fh.write(blob[half:])
            _parallel(_fsync_path, [tmp for tmp, _ in pending])
            _crash_point("after_blob_tmp")
            for tmp, final in pending:
                os.replace(tmp, final)
        except BaseException:
            for tmp, _ in pending:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            raise
        _parallel(_fsync_dir, sorted({final.parent for _, final in pending}))

    def _append(self, lines: Sequence[str]) -> None:
        data = "".join(line + "\n" for line in lines).encode()
        path = self.path / RECORDS_NAME
        with open(path, "ab") as fh:
            if os.environ.get("RPE_CRASH_AT") and len(data) > 2:
                fh.write(data[: len(data) // 2])
                fh.flush()
                _crash_point("mid_record")
                fh.write(data[len(data) // 2:])
            else:
                fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        self._offset += len(data)
        self._line_count += len(lines)

    def _line(self, p: _Prepared) -> str:
        return _canonical({"op": "add", "id": p.id, "blob_sha256": p.sha, "bytes": len(p.blob),
                           "z_b64": _z_b64(p.z), "z_sha256": p.z_sha, "meta": p.meta,
                           "ts": p.meta["created_at"], **self._encryption_fields()})

    def _existing(self, p: _Prepared) -> Record | None:
        """The live record with p's id if it is the same submission; raise if the metadata differs."""
        row = self._row.get(p.id)
        if row is None or not self._live[row]:
            return None
        old, new = _core_meta(self._meta[row]), _core_meta(p.meta)
        if old != new:
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise DuplicateRecordError(
                f"site {p.meta['site']!r}: record {p.id} already holds this adapter and z with different "
                "metadata "
                f"(fields {diff}); resubmit the identical metadata, or remove {p.id} first"
            )
        return self._record(row)

    def add(self, adapter: Any, z: Any, meta: AdapterMeta | Mapping[str, Any],
            expected_sha256: str | None = None, audit_fields: Mapping[str, Any] | None = None) -> Record:
        """Validate and store one adapter (a ``LoraAdapter`` or its canonical bytes) with its z.

        Everything is checked before anything is written; a rejection raises a ``ValidationError``
        subclass, appends one ``submission.rejected`` audit line and changes nothing else.
        Re-submitting the same (site, task, adapter, z) returns the existing record.
        ``audit_fields`` (e.g. run_id, nonce, record_digests) are added to that audit entry, so a
        caller that knows what arrived on the wire needs no second entry of its own.
        """
        return self._add_batch([(adapter, z, meta, expected_sha256)], index=True, single=True,
                               audit_fields=audit_fields)[0]

    def add_many(self, items: Iterable[Sequence[Any]], *, index: bool = True) -> list[Record]:
        """Bulk insert ``(adapter, z, meta[, expected_sha256])`` items: all validated first (one bad
        item rejects the batch, naming its index), blobs fsynced, then one records append + fsync,
        then Chroma upserts in batches of ≤ 5000. ``index=False`` leaves Chroma stale (queries stay
        exact via numpy) until ``sync_index()`` or the next open reconciles it."""
        return self._add_batch(items, index=index, single=False)

    def _add_batch(self, items: Iterable[Sequence[Any]], index: bool, single: bool,
                   audit_fields: Mapping[str, Any] | None = None) -> list[Record]:
        extra = dict(audit_fields or {})
        self._require_writable()
        self._require_blob_key("storing adapters")
        enc = self._encryption_fields()
        with self._mutex:
            self._refresh()
            prepared: list[_Prepared] = []
            seen: dict[str, int] = {}
            results: list[tuple[str, int | None]] = []  # ("new", idx) | ("old", row)
            for i, item in enumerate(items):
                item = tuple(item)
                if len(item) not in (3, 4):
                    raise RegistryError(f"item {i}: expected (adapter, z, meta[, expected_sha256])")
                adapter, z, meta = item[:3]
                expected = item[3] if len(item) == 4 else None
                try:
                    p = self._prepare(adapter, z, meta, expected)
                    existing = self._existing(p)
                    if existing is None and p.id in seen:
                        q = prepared[seen[p.id]]
                        if _core_meta(q.meta) != _core_meta(p.meta):
                            raise DuplicateRecordError(
                                f"item {i} repeats record {p.id} of item {seen[p.id]} with different "
                                "metadata")
                except ValidationError as exc:
                    if not single:
                        exc.args = (f"item {i}: {exc}",) + exc.args[1:]
                    self._reject(exc, meta, None if single else i, extra)
                    raise
                if existing is not None:
                    results.append(("old", self._row[p.id]))
                elif p.id in seen:
                    results.append(("new", seen[p.id]))
                else:
                    seen[p.id] = len(prepared)
                    results.append(("new", len(prepared)))
                    prepared.append(p)
            rows = self._commit(prepared, index) if prepared else []
            out: list[Record] = []
            for kind, ref in results:
                row = rows[ref] if kind == "new" else ref
                out.append(self._record(row))
            if not single:
                self._audit_bulk(prepared, rows, len(results))
                return out
            announced: set[int] = set()
            for kind, ref in results:
                if kind == "new" and ref not in announced:
                    announced.add(ref)
                    p = prepared[ref]
                    self.audit.append("submission.accepted", **{
                        **extra, "site": p.meta["site"], "record_id": p.id, "blob_sha256": p.sha,
                        "bytes": len(p.blob), "z_sha256": p.z_sha, "task": p.meta["task"],
                        "base_fingerprint": p.meta["base_fingerprint"], "privacy": p.meta.get("privacy"),
                        **enc})
                else:
                    r = self._record(ref if kind == "old" else rows[ref])
                    self.audit.append("submission.accepted", **{
                        **extra, "site": r.meta.site, "record_id": r.id, "blob_sha256": r.blob_sha256,
                        "bytes": r.bytes, "z_sha256": r.z_sha256, "task": r.meta.task,
                        "base_fingerprint": r.meta.base_fingerprint, "privacy": r.meta.privacy,
                        "duplicate": True, **enc})
            return out

    def _audit_bulk(self, prepared: list[_Prepared], rows: list[int], n_items: int) -> None:
        """One audit line per ``add_many`` call (an fsynced line per record would dominate a bulk
        load): the count and a digest of the new (id, blob, z) triples, recomputable from
        records.jsonl, pin exactly what was added."""
        triples = [[p.id, p.sha, p.z_sha] for p in prepared]
        self.audit.append(
            "registry.bulk_add", count=len(prepared), duplicates=n_items - len(prepared),
            records_sha256=_sha256(_canonical(triples).encode()),
            first_id=prepared[0].id if prepared else None, last_id=prepared[-1].id if prepared else None,
            sites=sorted({p.meta["site"] for p in prepared}), **self._encryption_fields(),
        )

    def _commit(self, prepared: list[_Prepared], index: bool) -> list[int]:
        ts = _now()
        new_blobs: dict[str, bytes] = {}
        for p in prepared:
            p.meta["created_at"] = ts
            if p.sha not in new_blobs and not self._blob_ok(p.sha, len(p.blob)):
                new_blobs[p.sha] = p.blob
        self._write_blobs(new_blobs)
        if new_blobs:
            _crash_point("after_blob")
        lines = [self._line(p) for p in prepared]
        self._append(lines)
        _crash_point("after_record")
        Z = np.stack([p.z for p in prepared])
        rows = self._apply_adds([(p.id, p.meta, p.sha, len(p.blob), p.z_sha) for p in prepared], Z)
        if index:
            self._index_upsert(rows)
            _crash_point("after_index")
        elif self._col is not None:
            self._index_fresh = False
        return rows

    def remove(self, record_id: str, reason: str | None = None) -> Record:
        """Tombstone a record (it disappears from list/query/get) and delete it from Chroma.

        The blob stays (audited compositions reference it); ``gc()`` deletes unreferenced blobs.
        """
        self._require_writable()
        with self._mutex:
            self._refresh()
            row = self._row.get(record_id)
            if row is None or not self._live[row]:
                raise RecordNotFoundError(f"no record {record_id!r} in {self.path}; see `rpe registry ls`")
            rec = self._record(row)
            self._append([_canonical({"op": "remove", "id": record_id, "reason": reason, "ts": _now()})])
            self._apply_remove(record_id)
            if self._col is not None:
                try:
                    self._col.delete(ids=[record_id])
                except Exception as exc:  # noqa: BLE001 - the index is a cache; the tombstone is durable
                    log.warning("registry %s: Chroma delete failed (%s); index will be reconciled",
                                self.path, exc)
                    self._index_fresh = False
            self.audit.append("registry.remove", record_id=record_id, site=rec.meta.site,
                              blob_sha256=rec.blob_sha256, reason=reason)
            return rec

    # ---- reading ----------------------------------------------------------------------------

    def _record(self, row: int) -> Record:
        meta = dict(self._meta[row])
        meta["extra"] = dict(meta.get("extra") or {})
        sha, nbytes, zsha = self._blob[row]
        return Record(self._ids[row], self._Z[row].copy(), AdapterMeta(**meta), sha, nbytes, zsha)

    def __len__(self) -> int:
        with self._mutex:
            self._refresh()
            return self._n_live

    def __contains__(self, record_id: object) -> bool:
        with self._mutex:
            self._refresh()
            row = self._row.get(record_id) if isinstance(record_id, str) else None
            return row is not None and bool(self._live[row])

    def get(self, record_id: str) -> Record:
        """The live record ``record_id`` (``RecordNotFoundError`` if unknown or removed)."""
        with self._mutex:
            self._refresh()
            row = self._row.get(record_id)
            if row is None or not self._live[row]:
                raise RecordNotFoundError(f"no record {record_id!r} in {self.path}; see `rpe registry ls`")
            return self._record(row)

    def blob_path(self, record_id: str) -> Path:
        """Where the record's adapter bytes live (read-only: never modify a blob). In an encrypted
        registry the file holds ciphertext; ``load_blob`` gives the adapter bytes."""
        return self._blob_path(self.get(record_id).blob_sha256)

    def load_blob(self, record_id: str) -> bytes:
        """The adapter's canonical bytes (decrypted if the registry encrypts blobs), re-verified
        against their sha256."""
        rec = self.get(record_id)
        self._require_blob_key(f"loading the adapter of record {record_id}")
        p = self._blob_path(rec.blob_sha256)
        try:
            data = self._plaintext(rec.blob_sha256, p.read_bytes())
        except FileNotFoundError:
            raise BlobCorruptError(
                f"blob {rec.blob_sha256} of record {record_id} is missing from {p.parent}; restore it from a "
                "backup "
                "or remove the record and have the site resubmit"
            ) from None
        except blobcrypt.BlobAuthError as exc:
            raise BlobCorruptError(
                f"blob of record {record_id} at {p}: {exc}; restore it from a backup or have the site resubmit"
            ) from None
        except BlobKeyError:
            raise
        except blobcrypt.BlobKeyError as exc:
            raise BlobKeyError(f"record {record_id} ({p}): {exc}") from None
        got = _sha256(data)
        if got != rec.blob_sha256:
            raise BlobCorruptError(
                f"blob of record {record_id} at {p} hashes to {got}, not {rec.blob_sha256}: the file was "
                "altered "
                "on disk; restore it from a backup or have the site resubmit"
            )
        return data

    def load_adapter(self, record_id: str) -> Any:
        """The record's ``LoraAdapter`` (bytes re-verified against the stored sha256 first)."""
        from common.lora import adapter_from_bytes

        return adapter_from_bytes(self.load_blob(record_id))

    def list(self, task: str | None = None, modality: str | None = None, base: str | None = None,
             site: str | None = None) -> builtins.list[Record]:
        """Live records matching every given filter, in insertion order."""
        with self._mutex:
            self._refresh()
            mask = self._mask(task=task, modality=modality, base=base, site=site)
            return [self._record(int(r)) for r in np.flatnonzero(mask)]

    def ids(self) -> builtins.list[str]:
        """Ids of all live records, in insertion order."""
        with self._mutex:
            self._refresh()
            return [self._ids[int(r)] for r in np.flatnonzero(self._live[: self._n])]

    def embeddings(self, ids: Sequence[str]) -> np.ndarray:
        """The z of the given records as a float32 ``[len(ids), dim]`` matrix."""
        with self._mutex:
            self._refresh()
            rows = []
            for rid in ids:
                row = self._row.get(rid)
                if row is None or not self._live[row]:
                    raise RecordNotFoundError(f"no record {rid!r} in {self.path}")
                rows.append(row)
            return self._Z[np.asarray(rows, dtype=np.int64)].copy()

    def distinct(self, key: str, task: str | None = None, modality: str | None = None,
                 base: str | None = None, site: str | None = None) -> dict[str, int]:
        """``{value: live record count}`` of ``key`` (site, task, modality or base) among the records
        matching the filters — cheap (no Record objects), for the composer and dashboards."""
        if key not in self._codes:
            raise QueryError(f"key must be one of {sorted(self._codes)}; got {key!r}")
        with self._mutex:
            self._refresh()
            rows = np.flatnonzero(self._mask(task=task, modality=modality, base=base, site=site))
            inv = {c: v for v, c in self._vocab[key].items()}
            codes, counts = np.unique(self._codes[key][rows], return_counts=True)
            return {inv[int(c)]: int(n) for c, n in zip(codes, counts, strict=True)}

    def _mask(self, task: str | None = None, modality: str | None = None, base: str | None = None,
              site: str | None = None, exclude_site: str | None = None) -> np.ndarray:
        n = self._n
        mask = self._live[:n].copy()
        for key, value in (("task", task), ("modality", modality), ("base", base), ("site", site)):
            if value is None:
                continue
            code = self._vocab[key].get(value)
            if code is None:
                return np.zeros(n, dtype=bool)
            mask &= self._codes[key][:n] == code
        if exclude_site is not None:
            code = self._vocab["site"].get(exclude_site)
            if code is not None:
                mask &= self._codes["site"][:n] != code
        return mask

    # ---- query ------------------------------------------------------------------------------

    def query(self, z: Any, k: int, task: str | None = None, modality: str | None = None,
              base: str | None = None, exclude_site: str | None = None,
              method: str = "auto") -> builtins.list[Hit]:
        """The exact k nearest live records to ``z`` by squared L2 (ties: earlier record first).

        ``method``: ``"auto"`` (brute force when eligible × dim ≤ BRUTE_FORCE_BUDGET, else the
        certified Chroma path), ``"brute"``, ``"index"`` (Chroma candidates + exact certification;
        same answer), or ``"approx"`` (Chroma candidates re-ranked exactly but *not* certified:
        faster on huge registries, may miss true neighbours that HNSW misses).
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise QueryError(f"k must be a positive integer; got {k!r}")
        if method not in ("auto", "brute", "index", "approx"):
            raise QueryError(f"method must be auto, brute, index or approx; got {method!r}")
        q = self._check_z(z, "the query")
        with self._mutex:
            self._refresh()
            elig = self._mask(task=task, modality=modality, base=base, exclude_site=exclude_site)
            n_elig = int(elig.sum())
            if k > n_elig:
                given = (("task", task), ("modality", modality), ("base", base),
                         ("exclude_site", exclude_site))
                filt = ", ".join(f"{n}={v!r}" for n, v in given if v is not None)
                absent = []
                for key, value in (("task", task), ("modality", modality), ("base", base)):
                    if value is not None and value not in self.distinct(key):
                        present = ", ".join(sorted(self.distinct(key))) or "none"
                        absent.append(f"no record has {key}={value!r} ({key}s present: {present})")
                raise NotEnoughRecordsError(
                    f"asked for k={k} nearest adapters but only {n_elig} record(s) match"
                    + (f" ({filt})" if filt else "") + "; " + "; ".join(absent + ["lower k or widen the filters"])
                )
            if method == "auto":
                use_index = (n_elig * self.embedding_dim > BRUTE_FORCE_BUDGET and self._index_misses <= 0)
                if not use_index and self._index_misses > 0:
                    self._index_misses -= 1
                method = "index" if use_index else "brute"
            if method == "brute":
                rows, dist = self._search_brute(q, elig, int(k))
            else:
                rows, dist = self._search_index(q, elig, int(k), certify=(method == "index"),
                                                where=self._where(task, modality, base, exclude_site))
            return [Hit(self._record(int(r)), float(d)) for r, d in zip(rows, dist, strict=True)]

    def _exact(self, rows: np.ndarray, q: np.ndarray) -> np.ndarray:
        """float64 squared L2 from the stored float32 rows (chunked to bound memory)."""
        out = np.empty(rows.shape[0], dtype=np.float64)
        q64 = q.astype(np.float64)
        step = max(1, (1 << 22) // self.embedding_dim)
        for s in range(0, rows.shape[0], step):
            diff = self._Z[rows[s:s + step]].astype(np.float64)
            diff -= q64
            out[s:s + step] = np.einsum("ij,ij->i", diff, diff)
        return out

    @staticmethod
    def _top(rows: np.ndarray, dist: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        order = np.lexsort((rows, dist))[:k]
        return rows[order], dist[order]

    def _search_brute(self, q: np.ndarray, elig: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """One float32 BLAS pass, then exact float64 distances for every row whose rounding error
        bound (≈2d·u·(‖x‖²+‖q‖²)) reaches the k-th best upper bound: the result is exactly the
        float64 brute force, not an approximation of it."""
        n = self._n
        n_elig = int(elig.sum())
        if n_elig < 0.3 * n:
            sub = np.flatnonzero(elig)
            s = self._Z[sub] @ q
            n2 = self._n2[sub]
        else:
            sub = None
            s = self._Z[:n] @ q
            n2 = self._n2[:n]
        qn = float(np.dot(q.astype(np.float64), q.astype(np.float64)))
        approx = n2 - 2.0 * s.astype(np.float64) + qn
        # |error| of n2 (float32 sum) plus that of 2·x·q (float32 BLAS) is at most
        # ~2(d+2)·u·(‖x‖² + ‖q‖²): candidates within that of the k-th best get an exact check.
        tol = (2 * self.embedding_dim + 8) * _U32 * (n2 + qn) + 1e-300
        if sub is None:
            approx[~elig] = np.inf
        upper = approx + tol
        kth = np.partition(upper, k - 1)[k - 1]
        cand = np.flatnonzero(approx - tol <= kth)
        rows = cand if sub is None else sub[cand]
        rows = rows[elig[rows]]
        return self._top(rows, self._exact(rows, q), k)

    def _where(self, task: str | None, modality: str | None, base: str | None,
               exclude_site: str | None) -> dict[str, Any] | None:
        clauses: builtins.list[dict[str, Any]] = []
        for key, value in (("task", task), ("modality", modality), ("base", base)):
            if value is not None:
                clauses.append({key: value})
        if exclude_site is not None:
            clauses.append({"site": {"$ne": exclude_site}})
        if not clauses:
            return None
        return clauses[0] if len(clauses) == 1 else {"$and": clauses}

    def _ensure_projection(self) -> dict[str, Any]:
        """PCA basis (from a sample of live z) giving lower bounds ‖Pᵀ(x−q)‖² ≤ ‖x−q‖² for every row.

        Any orthonormal P gives a valid bound, so drift after it was built costs speed, never
        correctness."""
        if self._proj is not None and (not self._proj.get("weak") or self._n <= 2 * self._proj["n"]):
            return self._proj
        d = self.embedding_dim
        m = min(_LB_DIM, d)
        live = np.flatnonzero(self._live[: self._n])
        rng = np.random.default_rng(0)
        sample = live if live.size <= 1024 else np.sort(rng.choice(live, 1024, replace=False))
        X = self._Z[sample].astype(np.float64)
        mu = X.mean(axis=0) if X.shape[0] else np.zeros(d)
        basis = np.zeros((0, d))
        explained = 1.0
        if X.shape[0] > 1:
            Xc = X - mu
            evals, evecs = np.linalg.eigh(Xc @ Xc.T)  # s × s Gram matrix: cheap even for d = 4096
            top = np.argsort(evals)[::-1][:m]
            top = top[evals[top] > evals.max() * 1e-12]
            explained = float(evals[top].sum() / max(evals.sum(), 1e-300)) if top.size else 0.0
            if explained < _LB_MIN_EXPLAINED:
                # isotropic-looking data: a 64-d bound would prune almost nothing, so the index path
                # would only add work to a full scan; skip it until the registry has doubled
                self._proj = {"weak": True, "n": self._n, "explained": explained}
                return self._proj
            if top.size:
                basis = (Xc.T @ evecs[:, top]).T  # principal directions (unnormalised)
        rows = [basis] if basis.shape[0] else []
        if basis.shape[0] < m:  # too few samples: complete with random directions
            rows.append(rng.standard_normal((m - basis.shape[0], d)))
        q, _ = np.linalg.qr(np.vstack(rows).T)  # orthonormal columns, leading ones span the PCA subspace
        basis = q.T[:m]
        P = np.ascontiguousarray(basis.T)  # d × m, orthonormal columns
        cap = self._Z.shape[0]
        self._proj = {"mu": mu, "P": P, "Y": np.zeros((cap, m)), "yn": np.zeros(cap), "n": self._n,
                      "explained": explained}
        self._project_rows(np.arange(self._n))
        return self._proj

    def _project_rows(self, rows: np.ndarray) -> None:
        pr = self._proj
        assert pr is not None
        step = max(1, (1 << 22) // self.embedding_dim)
        for s in range(0, rows.shape[0], step):
            r = rows[s:s + step]
            y = (self._Z[r].astype(np.float64) - pr["mu"]) @ pr["P"]
            pr["Y"][r] = y
            pr["yn"][r] = np.einsum("ij,ij->i", y, y)

    def _search_index(self, q: np.ndarray, elig: np.ndarray, k: int, certify: bool,
                      where: dict[str, Any] | None) -> tuple[np.ndarray, np.ndarray]:
        """Chroma proposes 8·k candidates, numpy re-ranks them exactly; with ``certify`` every
        eligible row whose PCA lower bound is below the k-th candidate distance is checked too,
        so the result equals brute force. Falls back to brute force when the bound prunes little
        (e.g. isotropic random data), and then skips this path for a while."""
        n = self._n
        n_elig = int(elig.sum())
        if certify and self._ensure_projection().get("weak"):
            return self._search_brute(q, elig, k)
        want = min(CANDIDATE_FACTOR * k, n_elig)
        cand = self._chroma_candidates(q, want, where)
        cand = cand[elig[cand]] if cand.size else cand
        pr = self._ensure_projection() if (certify or cand.size < k) else None
        lb = None
        if pr is not None and pr.get("weak"):  # uncertified path without a usable bound
            pr = None
            if cand.size < k:
                return self._search_brute(q, elig, k)
        if pr is not None:
            yq = (q.astype(np.float64) - pr["mu"]) @ pr["P"]
            yqn = float(yq @ yq)
            lb = pr["yn"][:n] - 2.0 * (pr["Y"][:n] @ yq) + yqn
            lb -= 1e-9 * (pr["yn"][:n] + yqn) + 1e-300  # float64 rounding slack: keep it a lower bound
            lb[~elig] = np.inf
        if cand.size < k:  # Chroma unavailable or stale: seed from the lower bound order
            assert lb is not None
            extra = np.argpartition(lb, want - 1)[:want]
            cand = np.unique(np.concatenate([cand, extra[elig[extra]]]))
        cand = np.unique(cand)
        dist = self._exact(cand, q)
        if not certify:
            return self._top(cand, dist, k)
        assert lb is not None
        dk = np.partition(dist, k - 1)[k - 1]
        maybe = np.flatnonzero(lb <= dk)
        if maybe.size > 0.25 * n_elig:
            self._index_misses = 20
            return self._search_brute(q, elig, k)
        rest = np.setdiff1d(maybe, cand, assume_unique=True)
        rows = np.concatenate([cand, rest])
        dist = np.concatenate([dist, self._exact(rest, q)])
        return self._top(rows, dist, k)

    def _chroma_candidates(self, q: np.ndarray, want: int, where: dict[str, Any] | None) -> np.ndarray:
        if self._col is None or not self._index_fresh or want < 1:
            return np.zeros(0, dtype=np.int64)
        try:
            res = self._col.query(query_embeddings=[q], n_results=want, where=where, include=["distances"])
            ids = res["ids"][0]
        except Exception as exc:  # noqa: BLE001 - the index is only an accelerator
            log.warning("registry %s: Chroma query failed (%s); using the exact fallback", self.path, exc)
            return np.zeros(0, dtype=np.int64)
        return np.asarray([self._row[i] for i in ids if i in self._row], dtype=np.int64)

    # ---- the Chroma index -------------------------------------------------------------------

    def _chroma_connect(self) -> None:
        import chromadb
        from chromadb.config import Settings

        spec = self._chroma_spec
        assert spec is not None
        settings = Settings(anonymized_telemetry=False)
        if spec["mode"] == "http":
            client = chromadb.HttpClient(host=spec["host"], port=spec["port"], settings=settings)
        else:
            client = chromadb.PersistentClient(path=str(self.path / CHROMA_DIR), settings=settings)
        self._chroma_client = client
        self._col = client.get_or_create_collection(
            spec["collection"], embedding_function=None, configuration={"hnsw": dict(HNSW_CONFIG)},
            metadata={"rpe_registry": self.config["registry_id"], "dim": self.embedding_dim},
        )
        owner = (self._col.metadata or {}).get("rpe_registry")
        if owner not in (None, self.config["registry_id"]):
            self._col = None
            raise RegistryError(
                f"Chroma collection {spec['collection']!r} belongs to another registry ({owner}); configure "
                "a "
                "different collection name for this registry"
            )

    def _chroma_disconnect(self) -> None:
        client, self._chroma_client, self._col = self._chroma_client, None, None
        if client is not None and hasattr(client, "close"):
            with contextlib.suppress(Exception):
                client.close()

    def _chroma_metadata(self, row: int) -> dict[str, Any]:
        meta = self._meta[row]
        return {"site": meta["site"], "task": meta["task"], "modality": meta["modality"],
                "base": meta["base_fingerprint"], "sample_count": int(meta["sample_count"]),
                "rank": int(meta["rank"]), "blob_sha256": self._blob[row][0],
                "created_at": meta["created_at"]}

    def _index_upsert(self, rows: Sequence[int]) -> None:
        if self._col is None:
            return
        try:
            for s in range(0, len(rows), CHROMA_BATCH):
                chunk = np.asarray(rows[s:s + CHROMA_BATCH], dtype=np.int64)
                self._col.upsert(ids=[self._ids[r] for r in chunk], embeddings=self._Z[chunk],
                                 metadatas=[self._chroma_metadata(int(r)) for r in chunk])
        except Exception as exc:  # noqa: BLE001 - the record is durable; the index is a cache
            log.warning("registry %s: Chroma upsert failed (%s); queries stay exact, index will be "
                        "reconciled", self.path, exc)
            self._index_fresh = False

    def _chroma_ids(self) -> set[str]:
        out: set[str] = set()
        offset = 0
        page = 20_000
        while True:
            got = self._col.get(include=[], limit=page, offset=offset)["ids"]
            out.update(got)
            if len(got) < page:
                return out
            offset += page

    def _chroma_check(self) -> tuple[bool, str]:
        """Reconcile the open collection with the records; False if it must be rebuilt."""
        live = np.flatnonzero(self._live[: self._n])
        live_ids = {self._ids[r] for r in live}
        have = self._chroma_ids()
        extra = sorted(have - live_ids)
        missing = sorted(live_ids - have)
        if len(extra) + len(missing) > max(1000, len(live_ids) // 2):
            return False, f"{len(missing)} missing / {len(extra)} extra ids"
        if extra:
            for s in range(0, len(extra), CHROMA_BATCH):
                self._col.delete(ids=extra[s:s + CHROMA_BATCH])
        if missing:
            rows = [self._row[i] for i in missing]
            for s in range(0, len(rows), CHROMA_BATCH):
                chunk = np.asarray(rows[s:s + CHROMA_BATCH], dtype=np.int64)
                self._col.upsert(ids=[self._ids[r] for r in chunk], embeddings=self._Z[chunk],
                                 metadatas=[self._chroma_metadata(int(r)) for r in chunk])
        count = self._col.count()
        if count != len(live_ids):
            return False, f"count {count} != {len(live_ids)} records"
        if live.size:
            rng = np.random.default_rng()
            sample = rng.choice(live, min(16, live.size), replace=False)
            got = self._col.get(ids=[self._ids[r] for r in sample], include=["embeddings"])
            by_id = dict(zip(got["ids"], got["embeddings"], strict=True))
            for r in sample:
                emb = by_id.get(self._ids[r])
                if emb is None or not np.array_equal(np.asarray(emb, dtype=np.float32), self._Z[r]):
                    return False, f"stored vector of {self._ids[r]} differs from the records"
            res = self._col.query(query_embeddings=[self._Z[sample[0]]], n_results=min(4, live.size),
                                  include=["distances"])
            if not res["ids"] or not res["ids"][0]:
                return False, "probe query returned nothing"
        if extra or missing:
            log.info("registry %s: Chroma reconciled (%d upserted, %d deleted)", self.path, len(missing),
                     len(extra))
        return True, ""

    def sync_index(self, rebuild: bool = False) -> None:
        """Reconcile Chroma with the records (or rebuild it from them). Never affects the records."""
        self._require_writable()
        if self._chroma_spec is None:
            return
        with self._mutex:
            self._refresh()
            reason = "requested"
            if not rebuild:
                try:
                    if self._col is None:
                        self._chroma_connect()
                    ok, reason = self._chroma_check()
                except RegistryError:
                    raise
                except Exception as exc:  # noqa: BLE001 - any Chroma failure means: rebuild
                    ok, reason = False, f"{type(exc).__name__}: {exc}"
                if ok:
                    self._index_fresh = True
                    return
            log.warning("registry %s: rebuilding the Chroma index from records.jsonl (%s)", self.path, reason)
            try:
                self._rebuild_index()
            except RegistryError:
                raise
            except Exception as exc:  # noqa: BLE001 - queries stay exact without the index
                self._index_fresh = False
                self.index_error = f"{type(exc).__name__}: {exc}"
                log.warning("registry %s: Chroma index unavailable (%s); queries use numpy only", self.path,
                            self.index_error)
                return
            self.audit.append("registry.reindex", reason=reason[:500], records=self._n_live)

    def _rebuild_index(self) -> None:
        spec = self._chroma_spec
        assert spec is not None
        self._chroma_disconnect()
        if spec["mode"] == "embedded":
            from chromadb.api.shared_system_client import SharedSystemClient

            key = str(self.path / CHROMA_DIR)
            system = SharedSystemClient._identifier_to_system.pop(key, None)
            SharedSystemClient._identifier_to_refcount.pop(key, None)
            if system is not None:
                with contextlib.suppress(Exception):
                    system.stop()
            shutil.rmtree(self.path / CHROMA_DIR, ignore_errors=True)
        else:
            import chromadb
            from chromadb.config import Settings

            client = chromadb.HttpClient(host=spec["host"], port=spec["port"],
                                         settings=Settings(anonymized_telemetry=False))
            try:
                col = client.get_collection(spec["collection"])
                owner = (col.metadata or {}).get("rpe_registry")
                if owner not in (None, self.config["registry_id"]):
                    raise RegistryError(
                        f"Chroma collection {spec['collection']!r} belongs to another registry ({owner}); "
                        "configure a different collection name for this registry"
                    )
                client.delete_collection(spec["collection"])
            except RegistryError:
                raise
            except Exception:  # noqa: BLE001 - absent collection
                pass
        self._chroma_connect()
        self._index_fresh = True
        self._index_upsert(np.flatnonzero(self._live[: self._n]).tolist())

    @property
    def index_ready(self) -> bool:
        """True when Chroma holds exactly the live records (the index query path may use it)."""
        return self._col is not None and self._index_fresh

    # ---- maintenance ------------------------------------------------------------------------

    def _all_blobs(self) -> Iterator[Path]:
        sha_dir = self.path / BLOBS_DIR / "sha256"
        if not sha_dir.is_dir():
            return
        for sub in sorted(sha_dir.iterdir()):
            if sub.is_dir():
                for p in sorted(sub.iterdir()):
                    if not p.name.startswith(TMP_PREFIX):
                        yield p

    def verify(self, full: bool = False) -> builtins.list[str]:
        """Problems found: missing or wrong-size blobs of live records (``full``: re-hash every
        blob, decrypting it first in an encrypted registry, which needs the key), orphan blobs,
        and Chroma disagreement. Empty list = consistent."""
        problems: builtins.list[str] = []
        if full:
            self._require_blob_key("verify(full=True)")
        with self._mutex:
            self._refresh()
            referenced: set[str] = set()
            for r in range(self._n):
                sha, nbytes, _ = self._blob[r]
                referenced.add(sha)
                if not self._live[r]:
                    continue
                p = self._blob_path(sha)
                if not p.exists():
                    problems.append(f"record {self._ids[r]}: blob {sha} is missing")
                elif p.stat().st_size != self._stored_size(nbytes):
                    problems.append(f"record {self._ids[r]}: blob {sha} has {p.stat().st_size} bytes, "
                                    f"expected {self._stored_size(nbytes)}")
                elif full:
                    try:
                        ok = _sha256(self._plaintext(sha, p.read_bytes())) == sha
                    except blobcrypt.BlobKeyError as exc:
                        problems.append(f"record {self._ids[r]}: blob {sha} cannot be decrypted: {exc}")
                        continue
                    if not ok:
                        problems.append(f"record {self._ids[r]}: blob {sha} content does not match its hash")
            for p in self._all_blobs():
                if p.name not in referenced:
                    problems.append(f"orphan blob {p.name} (no record; left by an interrupted add — gc() "
                                    "removes it)")
            if self._col is not None:
                try:
                    if self._col.count() != self._n_live:
                        problems.append(f"Chroma holds {self._col.count()} vectors, records {self._n_live}")
                except Exception as exc:  # noqa: BLE001
                    problems.append(f"Chroma unreadable: {exc}")
        return problems

    def gc(self, dry_run: bool = False) -> builtins.list[str]:
        """Delete blobs referenced by no *live* record (orphans and removed records' blobs);
        returns their hashes. Run it only when audited compositions no longer need re-checking."""
        self._require_writable()
        with self._mutex:
            self._refresh()
            live = {self._blob[r][0] for r in np.flatnonzero(self._live[: self._n])}
            gone = [p for p in self._all_blobs() if p.name not in live]
            if not dry_run:
                for p in gone:
                    p.unlink()
                for d in {p.parent for p in gone}:
                    _fsync_dir(d)
                if gone:
                    self.audit.append("registry.gc", blobs=[p.name for p in gone])
            return [p.name for p in gone]

    def stats(self) -> dict[str, Any]:
        """Counts for operators and the dashboard."""
        with self._mutex:
            self._refresh()
            by = {key: self.distinct(key) for key in ("site", "task", "modality", "base")}
            return {"records": self._n_live, "removed": self._n - self._n_live,
                    "embedding_dim": self.embedding_dim, "representation": self.representation,
                    "bases": sorted(self.bases), "by": by, "index_ready": self.index_ready,
                    "blob_encryption": self.blob_encryption}

    # ---- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        """Release Chroma and the writer lock (idempotent)."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self._chroma_disconnect()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __repr__(self) -> str:
        return f"Registry({str(self.path)!r}, records={self._n_live}, dim={self.embedding_dim})"

