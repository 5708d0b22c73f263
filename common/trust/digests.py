"""Canonical encodings and digests shared by the site and the coordinator.

Both sides of the federation must compute *the same* hash over *the same* message without ever
exchanging the hash itself: the site writes it to its egress log (``client/egress.py``), the
coordinator writes it to its audit log (``server/audit.py``), and ``server/crosscheck.py`` later
matches the two. Any divergence in encoding would show up as a false alarm, so every encoding
lives here, in one place both sides import, and is versioned by a tag inside the hashed bytes.

Encodings (all hashes are lowercase hex sha256):

- ``canonical_json(obj)``: ``json.dumps`` with sorted keys, no whitespace, ``ensure_ascii=True``,
  NaN/inf refused. numpy scalars and arrays are converted to Python numbers / lists first.
- ``array_sha256(a)``: sha256 of the array's bytes, C-contiguous, little-endian, in the array's
  own dtype (a float32 array hashes its 4-byte values; no conversion to float64).
- ``z_sha256(z)``: ``array_sha256`` of z as a 1-D little-endian **float32** vector, because
  float32 is what travels on the wire; a float64 z hashes like its float32 cast.
- ``record_digest(record)``: one digest per Flower record (ArrayRecord / ConfigRecord /
  MetricRecord, or a plain ``dict`` with the same content). It is
  ``sha256(canonical_json(["rpe-record-v1", items]))`` where ``items`` is the list, sorted by key,
  of ``describe_value(key, value)`` without the logging-only fields: for arrays
  ``{"key", "type": "array", "dtype": name, "shape": [...], "sha256": array_sha256}``; for
  scalars ``{"key", "type": bool|int|float|str|bytes|list, "v": ...}`` with floats as
  ``float.hex()`` (exact, NaN-safe), bytes as their sha256 and lists element-wise. The record
  *kind* is deliberately not hashed, so a site that sent a ConfigRecord and a coordinator that
  converted it into a plain dict still agree.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import numpy as np

RECORD_DIGEST_TAG = "rpe-record-v1"
KIND_ARRAYS = "arrays"
KIND_CONFIG = "config"
KIND_METRICS = "metrics"
RECORD_KINDS = (KIND_ARRAYS, KIND_CONFIG, KIND_METRICS)

_SHA256_HEX = frozenset("0123456789abcdef")


def sha256_hex(data: bytes) -> str:
    """Lowercase hex sha256, the one spelling of a hash used across logs and the registry."""
    return hashlib.sha256(data).hexdigest()


def is_sha256_hex(value: object) -> bool:
    """True for a 64-character lowercase hex string (how every hash in this project is written)."""
    return isinstance(value, str) and len(value) == 64 and set(value) <= _SHA256_HEX


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def canonical_json(obj: Any) -> str:
    """Sorted keys, no whitespace, ASCII only, no NaN: the same object always gives the same text.

    Used for everything that is hashed or signed as JSON (audit entries, submission metadata),
    because ordinary ``json.dumps`` output depends on dict insertion order.
    """
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False, default=_json_default
    )


def to_numpy(value: Any) -> np.ndarray | None:
    """Return ``value`` as a numpy array if it is array-like (ndarray, Flower ``Array``, torch
    tensor), else ``None``. Scalars and lists are *not* arrays here: in a Flower ConfigRecord a
    list is a config value, not a tensor."""
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, (str, bytes, bool, int, float, list, tuple, np.generic)) or value is None:
        return None
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor, without importing torch
        return value.detach().cpu().numpy()
    if callable(getattr(value, "numpy", None)):  # flwr.app.Array
        out = value.numpy()
        if isinstance(out, np.ndarray):
            return out
    return None


def le_contiguous(a: np.ndarray) -> np.ndarray:
    """C-contiguous, little-endian copy (or view) of ``a``: the byte layout every array hash uses."""
    if a.dtype.hasobject:
        raise TypeError("object arrays cannot be hashed: their bytes are pointers, not values")
    a = np.ascontiguousarray(a)
    if a.dtype.byteorder == ">" or (a.dtype.byteorder == "=" and np.little_endian is False):
        a = a.astype(a.dtype.newbyteorder("<"))
    return a


def array_sha256(a: np.ndarray) -> str:
    """sha256 of the array's C-contiguous little-endian bytes (dtype and shape are *not* included;
    callers that need them hash them alongside, as ``record_digest`` does)."""
    return sha256_hex(le_contiguous(np.asarray(a)).tobytes())


def z_bytes(z: np.ndarray | Any) -> bytes:
    """The wire form of an embedding: 1-D, finite, little-endian float32 bytes."""
    arr = to_numpy(z)
    arr = np.asarray(z if arr is None else arr)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"z must be a non-empty 1-D vector; got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"z must be numeric; got dtype {arr.dtype}")
    arr32 = arr.astype("<f4")
    if not np.all(np.isfinite(arr32)):
        raise ValueError("z contains NaN or infinite values (after the cast to float32)")
    return arr32.tobytes()


def z_sha256(z: np.ndarray | Any) -> str:
    """sha256 of z as little-endian float32 (see ``z_bytes``): the ``z_sha256`` audit field."""
    return sha256_hex(z_bytes(z))


def _scalar_type(value: Any) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "bool"
    if isinstance(value, (int, np.integer)):
        return "int"
    if isinstance(value, (float, np.floating)):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "bytes"
    if isinstance(value, (list, tuple)):
        return "list"
    raise TypeError(f"unsupported record value of type {type(value).__name__}")


def _canonical_scalar(value: Any) -> Any:
    """Exact, type-tagged JSON form of a config/metric value (the part of the digest that pins it)."""
    kind = _scalar_type(value)
    if kind == "bool":
        return bool(value)
    if kind == "int":
        return int(value)
    if kind == "float":
        return float(value).hex()
    if kind == "str":
        return value
    if kind == "bytes":
        return {"len": len(bytes(value)), "sha256": sha256_hex(bytes(value))}
    return [[_scalar_type(v), _canonical_scalar(v)] for v in value]


def scalar_nbytes(value: Any) -> int:
    """Payload size of a config/metric value as counted in egress logs: utf-8 length of strings,
    length of bytes, 8 per number, 1 per bool, summed over lists. An approximation of what the
    value costs on the wire, good enough to spot a record that carries far more than it should."""
    kind = _scalar_type(value)
    if kind == "bool":
        return 1
    if kind in ("int", "float"):
        return 8
    if kind == "str":
        return len(value.encode("utf-8"))
    if kind == "bytes":
        return len(bytes(value))
    return sum(scalar_nbytes(v) for v in value)


def describe_value(key: str, value: Any) -> dict[str, Any]:
    """The canonical description of one record entry (what ``record_digest`` hashes).

    Arrays: ``{"key", "type": "array", "dtype", "shape", "sha256"}``; anything else:
    ``{"key", "type", "v"}`` with the exact type-tagged value from ``_canonical_scalar``.
    """
    if not isinstance(key, str):
        raise TypeError(f"record keys must be strings; got {type(key).__name__}")
    arr = to_numpy(value)
    if arr is not None:
        return {
            "key": key,
            "type": "array",
            "dtype": arr.dtype.name,
            "shape": [int(s) for s in arr.shape],
            "sha256": array_sha256(arr),
        }
    return {"key": key, "type": _scalar_type(value), "v": _canonical_scalar(value)}


def record_digest(record: Mapping[str, Any]) -> str:
    """sha256 of a record's canonical description (see the module docstring); kind-independent."""
    if not isinstance(record, Mapping):
        raise TypeError(f"a record must be a mapping of key -> value; got {type(record).__name__}")
    items = [describe_value(k, record[k]) for k in sorted(record)]
    return sha256_hex(canonical_json([RECORD_DIGEST_TAG, items]).encode("ascii"))


def record_digests(records: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """``{record name: record_digest}`` — the ``record_digests`` field of submission audit events."""
    return {name: record_digest(rec) for name, rec in records.items()}


def record_kind(name: str, record: Mapping[str, Any]) -> str:
    """Classify a record as ``arrays`` / ``config`` / ``metrics`` for logging (never for hashing).

    Flower records are recognised by class name (no flwr import needed); plain dicts holding any
    array are ``arrays``; other plain dicts are ``metrics`` when the record name mentions
    "metric" and every value is numeric, else ``config``.
    """
    cls = type(record).__name__
    if cls == "ArrayRecord":
        return KIND_ARRAYS
    if cls == "ConfigRecord":
        return KIND_CONFIG
    if cls == "MetricRecord":
        return KIND_METRICS
    values = list(record.values())
    if any(to_numpy(v) is not None for v in values):
        return KIND_ARRAYS

    def numeric(v: Any) -> bool:
        if isinstance(v, (list, tuple)):
            return all(numeric(x) for x in v)
        return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))

    if "metric" in name.lower() and all(numeric(v) for v in values):
        return KIND_METRICS
    return KIND_CONFIG
