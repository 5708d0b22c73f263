"""Every error the registry raises on purpose, so callers (CLI, ServerApp, tests) can catch by type.

``ValidationError`` means a submission was rejected and nothing was written; ``QueryError`` a query
that cannot be answered as asked; the rest are about the registry's files and lifetime.
"""

from __future__ import annotations

from server.registry import blobcrypt


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


class RegistryStorageError(RegistryError, OSError):
    """A write failed (disk full, I/O error); nothing was stored and the registry is as before.

    ``stage`` names the write point: "adapter blob", "record line", "audit entry", "registry.json"."""

    def __init__(self, message: str, stage: str = "") -> None:
        super().__init__(message)
        self.stage = stage

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


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


class UpdateNormBoundError(NormError):
    """An adapter's ‖ΔW‖ is far above the registry's own adapters of that base and task (one site
    must not steer every composition); the message names the site, the module and the bound."""


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
