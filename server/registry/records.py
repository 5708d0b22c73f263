"""The registry's value types: what a site says (``AdapterMeta``), what is stored (``Record``), what a
query returns (``Hit``), and a validated submission not yet written (``Prepared``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from server.registry.errors import MetadataError


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
class Prepared:
    """A fully validated submission, ready to be written (nothing written yet)."""

    id: str
    z: np.ndarray
    meta: dict[str, Any]
    blob: bytes
    sha: str
    z_sha: str
