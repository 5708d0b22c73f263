"""How a message's parts are checked against the vocabulary (``vocabulary.py``): records present
and of the right kind, config keys known and typed, arrays decoded and finite, JSON fields with
fixed key sets. Every message parser (``messages.py``, ``arms.py``) is built from these, so a rule
changes in one place for every message type.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from common.protocol.vocabulary import (
    MAX_LORA_CONFIG_STR,
    MAX_OPTIONS,
    MAX_STR,
    METRIC_NAME_RE,
    RECEIPT_KEYS,
    SITE_RE,
    WIRE_SCHEMA,
    WireError,
)


def load_json(text: str, record: str, key: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise WireError(f"expected canonical JSON ({exc.msg})", record, key) from None


def check_config(
    values: Mapping[str, Any],
    spec: Mapping[str, tuple[type, ...]],
    record: str,
    required: frozenset[str] | None = None,
    exact: bool = True,
) -> dict[str, Any]:
    """Every key known and of the right type; ``exact`` also requires every key to be present."""
    out: dict[str, Any] = {}
    unknown = sorted(set(values) - set(spec))
    if unknown:
        raise WireError(f"unknown key(s) {unknown}; allowed: {sorted(spec)}", record, unknown[0])
    need = set(spec) if exact else set(required or ())
    missing = sorted(need - set(values))
    if missing:
        raise WireError(f"missing key(s) {missing}", record, missing[0])
    for key, value in values.items():
        types = spec[key]
        if isinstance(value, bool) and bool not in types:
            raise WireError(f"expected {'/'.join(t.__name__ for t in types)}, got bool", record, key)
        if not isinstance(value, types):
            raise WireError(f"expected {'/'.join(t.__name__ for t in types)}, got {type(value).__name__}", record, key)
        if isinstance(value, str):
            limit = MAX_LORA_CONFIG_STR if key == "lora_config" else MAX_STR
            if len(value) > limit:
                raise WireError(f"string of {len(value)} characters exceeds the limit of {limit}", record, key)
        if isinstance(value, float) and not math.isfinite(value):
            raise WireError("not a finite number", record, key)
        out[key] = value
    return out


def get_record(content: RecordDict, name: str, kind: str) -> Any:
    """The record ``name`` of ``content``, which must be of ``kind`` ("array" | "config" | "metric")."""
    if name not in content:
        raise WireError("record missing", name)
    rec = content[name]
    expected = {"array": ArrayRecord, "config": ConfigRecord, "metric": MetricRecord}[kind]
    if not isinstance(rec, expected):
        raise WireError(f"expected a {expected.__name__}, got {type(rec).__name__}", name)
    return rec


def check_records(content: RecordDict, allowed: Mapping[str, str], what: str) -> None:
    """Exactly the allowed record names, each of the allowed kind."""
    names = set(content.keys())
    extra = sorted(names - set(allowed))
    if extra:
        raise WireError(f"{what} may only carry records {sorted(allowed)}; refusing {extra}", extra[0])
    missing = sorted(set(allowed) - names)
    if missing:
        raise WireError(f"{what} lacks record(s) {missing}", missing[0])
    for name, kind in allowed.items():
        get_record(content, name, kind)


def to_array(x: np.ndarray) -> Array:
    """A Flower ``Array`` of ``x`` (C-contiguous, numpy serialisation)."""
    return Array.from_numpy_ndarray(np.ascontiguousarray(x))


def decode_array(arr: Array, record: str, key: str, finite: bool = True) -> np.ndarray:
    """The float32 values of a received array, checked against its own header (and finite)."""
    if arr.stype != "numpy.ndarray":
        raise WireError(f"array serialisation {arr.stype!r} is not numpy.ndarray", record, key)
    if arr.dtype != "float32":
        raise WireError(f"dtype {arr.dtype} is not float32", record, key)
    try:
        value = arr.numpy()
    except Exception as exc:  # noqa: BLE001 - any decoding failure is a malformed message
        raise WireError(f"cannot decode array ({exc})", record, key) from None
    if value.dtype != np.float32 or list(value.shape) != list(arr.shape):
        raise WireError(
            f"decoded array {value.dtype}{list(value.shape)} does not match its header {arr.dtype}{list(arr.shape)}",
            record,
            key,
        )
    if finite and not np.all(np.isfinite(value)):
        raise WireError("contains NaN or inf", record, key)
    return value


def parse_json_object(text: str, allowed: frozenset[str], record: str, key: str, exact: bool = False) -> dict[str, Any]:
    """A JSON-object field of a meta record: only ``allowed`` keys (all of them when ``exact``),
    each value a number, bool, null or a short string."""
    obj = load_json(text, record, key)
    if not isinstance(obj, dict):
        raise WireError("expected a JSON object", record, key)
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise WireError(f"unknown field(s) {unknown}; allowed: {sorted(allowed)}", record, key)
    if exact and set(obj) != allowed:
        raise WireError(f"missing field(s) {sorted(allowed - set(obj))}", record, key)
    for name, value in obj.items():
        if value is None or isinstance(value, (bool, int, float)):
            continue
        if isinstance(value, str) and len(value) <= 64:
            continue
        raise WireError(f"field {name!r} must be a number, bool, null or a short string", record, key)
    return obj


def parse_options(text: str, record: str = "config", key: str = "options") -> dict[str, Any]:
    """A request's ``options``: a flat JSON object of at most ``MAX_OPTIONS`` settings, each named
    like a metric and valued by a number, bool or short string (never nested, never null)."""
    obj = load_json(text, record, key)
    if not isinstance(obj, dict):
        raise WireError("expected a JSON object", record, key)
    if len(obj) > MAX_OPTIONS:
        raise WireError(f"{len(obj)} settings exceed the limit of {MAX_OPTIONS}", record, key)
    for name, value in obj.items():
        if not METRIC_NAME_RE.match(name):
            raise WireError(f"setting name {name!r} is not a plain lowercase name", record, key)
        if isinstance(value, (bool, int, float)) and not (isinstance(value, float) and not math.isfinite(value)):
            continue
        if isinstance(value, str) and len(value) <= 256:
            continue
        raise WireError(f"setting {name!r} must be a finite number, bool or a string of <= 256 characters", record, key)
    return obj


def check_common(meta: Mapping[str, Any], record: str) -> None:
    """The keys every reply shares: the schema version, a valid site id, non-negative counts."""
    if meta["schema"] != WIRE_SCHEMA:
        raise WireError(f"schema {meta['schema']!r} is not {WIRE_SCHEMA!r}", record, "schema")
    if not SITE_RE.match(meta["site"]):
        raise WireError("not a valid site id", record, "site")
    for key in ("sample_count", "token_count"):
        if key in meta and meta[key] < 0:
            raise WireError("must be >= 0", record, key)


def parse_metrics_and_receipt(content: RecordDict, max_metrics: int) -> tuple[dict[str, float], dict[str, Any]]:
    """(metrics, receipt) of a reply that carries scores: at most ``max_metrics`` finite scalars
    under short lowercase names, and a receipt with the common keys (``train.apply``, ``train.evaluate``)."""
    metrics_rec = get_record(content, "metrics", "metric")
    if len(metrics_rec) > max_metrics:
        raise WireError(f"{len(metrics_rec)} metrics exceed the limit of {max_metrics}", "metrics")
    metrics: dict[str, float] = {}
    for key, value in metrics_rec.items():
        if not METRIC_NAME_RE.match(key):
            raise WireError("metric names are short lowercase identifiers", "metrics", key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise WireError("metrics are finite scalars", "metrics", key)
        metrics[key] = float(value)
    receipt = check_config(dict(get_record(content, "receipt", "config")), RECEIPT_KEYS, "receipt")
    check_common(receipt, "receipt")
    return metrics, receipt
