"""The fixed Flower message vocabulary between the coordinator and a site.

Everything that crosses the wire is described here, once, and checked on both sides: the site
refuses to *send* anything that does not match (``check_reply``), the coordinator refuses to
*accept* anything that does not match (the ``parse_*`` functions), and a site's auditor can read
this file to know what can ever leave the hospital.

Message types (``message_type`` of the Flower message) and what each side may put in them:

===================  =========================================  ===========================================
message type         request (coordinator -> site)              reply (site -> coordinator)
===================  =========================================  ===========================================
``query.whoami``     ``config``                                 ``whoami`` (site id, tasks, counts)
``train``            ``config`` (task, steps, LoRA spec, ...)   ``adapter``, ``embedding``, ``meta``
``query.embed``      ``config``                                 ``embedding``, ``meta``
``train.apply``      ``adapter``, ``config``                    ``metrics``, ``receipt``
``train.evaluate``   ``config`` (arms), ``adapter-<i>`` per arm  ``metrics`` (``a<i>_*``, ``base_*``), ``receipt``
===================  =========================================  ===========================================

Records:

- ``adapter``: ArrayRecord with exactly one 1-D float32 array ``lora_factors``: every LoRA factor
  of the LoRA config, finite, flattened (row-major) and joined in the sorted order of their PEFT
  key names (``base_model.model.<module>.lora_A.weight`` of shape ``[r, in]``, then
  ``...lora_B.weight`` of shape ``[out, r]``, module by module). The LoRA config alone fixes the
  layout, so the vector has exactly Σ r·(in + out) values. Why one array and not one per factor:
  Flower 1.41 moves every array as its own objects through the SuperLink's sqlite state, each with
  several round trips; a 30-layer q/v adapter was ~240 objects, and a ``train.evaluate`` with six
  arms kept the SuperLink CPU-bound for a minute on the local main job.
- ``embedding``: ArrayRecord with exactly one 1-D float32 array ``z``.
- ``meta``: ConfigRecord with exactly the keys of ``ENROLL_META_KEYS`` (enrolment) or
  ``EMBED_META_KEYS`` (embedding query); nested values (LoRA config, privacy settings, training
  statistics, embedding spec) are canonical JSON strings with their own fixed key sets.

The LoRA config on the wire (``lora_config``, canonical JSON)::

    {"peft_type": "LORA",
     "modules": {"model.layers.0.self_attn.q_proj": {"r": 8, "alpha": 16.0, "shape": [out, in]}, ...}}

The scale of a module is ``alpha / r`` (no rsLoRA), the ``targets`` of PEFT are the module names'
last components. Any violation raises :class:`WireError`, which names the record and the key.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from common.trust.digests import (
    canonical_json,  # noqa: F401 - the one canonical JSON; callers use wire.canonical_json
    record_digest,
)

if TYPE_CHECKING:
    from common.adapters import LoraAdapter

WIRE_SCHEMA = "rpe-wire/2"  # 2: the adapter travels as one packed array (lora_factors)

WHOAMI = "query.whoami"
ENROLL = "train"
EMBED = "query.embed"
APPLY = "train.apply"
MESSAGE_TYPES = (WHOAMI, ENROLL, EMBED, APPLY)
#: Flower ``Error.code`` of a site's refusal (request outside the vocabulary) and of a failure.
ERROR_REFUSED = 4100
ERROR_FAILED = 4101

#: record name -> record kind ("array" | "config" | "metric"), per message type, for replies.
ALLOWED_REPLY_KEYS: dict[str, dict[str, str]] = {
    WHOAMI: {"whoami": "config"},
    ENROLL: {"adapter": "array", "embedding": "array", "meta": "config"},
    EMBED: {"embedding": "array", "meta": "config"},
    APPLY: {"metrics": "metric", "receipt": "config"},
}
#: record name -> kind, per message type, for requests.
ALLOWED_REQUEST_RECORDS: dict[str, dict[str, str]] = {
    WHOAMI: {"config": "config"},
    ENROLL: {"config": "config"},
    EMBED: {"config": "config"},
    APPLY: {"adapter": "array", "config": "config"},
}

# -- request config keys (name -> accepted Python types); "nonce" is always required ---------------
_INT = (int,)
_NUM = (int, float)
_STR = (str,)
_BOOL = (bool,)
REQUEST_CONFIG_KEYS: dict[str, dict[str, tuple[type, ...]]] = {
    WHOAMI: {"nonce": _STR, "challenge": _STR},
    ENROLL: {
        "nonce": _STR,
        "task": _STR,
        "steps": _INT,
        "lr": _NUM,
        "batch_size": _INT,
        "max_length": _INT,
        "seed": _INT,
        "lora_r": _INT,
        "lora_alpha": _NUM,
        "lora_targets": _STR,
        "lora_dropout": _NUM,
        "embed_layer": _INT,
        "max_examples": _INT,
    },
    EMBED: {"nonce": _STR, "task": _STR, "embed_layer": _INT, "max_examples": _INT},
    APPLY: {
        "nonce": _STR,
        "task": _STR,
        "name": _STR,
        "lora_config": _STR,
        "blob_sha256": _STR,
        "base_fingerprint": _STR,
        "strategy": _STR,
        "sources": _STR,
        "weights": _STR,
        "evaluate": _BOOL,
        "max_eval": _INT,
        "store": _BOOL,
        "with_base": _BOOL,
        "delivery": _STR,
    },
}
REQUEST_REQUIRED: dict[str, frozenset[str]] = {
    WHOAMI: frozenset({"nonce"}),
    ENROLL: frozenset({"nonce", "task"}),
    EMBED: frozenset({"nonce"}),
    APPLY: frozenset({"nonce", "name", "lora_config", "blob_sha256", "base_fingerprint"}),
}

# -- reply key sets -------------------------------------------------------------------------------
WHOAMI_KEYS: dict[str, tuple[type, ...]] = {
    "schema": _STR,
    "site": _STR,
    "tasks": _STR,
    "groups": _STR,
    "n_examples": _INT,
    "n_labeled": _INT,
    "n_unlabeled": _INT,
    "n_eval": _INT,
    "data_ok": _BOOL,
    "signer": _STR,
    "nonce": _STR,
    # a signed ``identity`` statement (``common/trust/statements.py``) as canonical JSON; "" = the site has no key
    "identity": _STR,
}
ENROLL_META_KEYS: dict[str, tuple[type, ...]] = {
    "schema": _STR,
    "site": _STR,
    "task": _STR,
    "modality": _STR,
    "group": _STR,
    "base_fingerprint": _STR,
    "sample_count": _INT,
    "token_count": _INT,
    "lora_config": _STR,
    "blob_sha256": _STR,
    "embedding_spec": _STR,
    "privacy": _STR,
    "train_stats": _STR,
    "nonce": _STR,
    "created_at": _NUM,
    "signer": _STR,
    "signature": _STR,
}
EMBED_META_KEYS: dict[str, tuple[type, ...]] = {
    "schema": _STR,
    "site": _STR,
    "task": _STR,
    "base_fingerprint": _STR,
    "sample_count": _INT,
    "token_count": _INT,
    "embedding_spec": _STR,
    "privacy": _STR,
    "nonce": _STR,
}
RECEIPT_KEYS: dict[str, tuple[type, ...]] = {
    "schema": _STR,
    "site": _STR,
    "name": _STR,
    "blob_sha256": _STR,
    "evaluated": _BOOL,
    "nonce": _STR,
}
#: keys inside the JSON-valued meta fields
#: ``common.privacy.release_record``: DP-SGD's parameters and ε, the z mechanism's, and the total
PRIVACY_KEYS = frozenset(
    {
        "dp_sgd",
        "epsilon",
        "delta",
        "max_grad_norm",
        "noise_multiplier",
        "sample_rate",
        "steps",
        "z_mechanism",
        "z_clip",
        "z_noise_multiplier",
        "z_epsilon",
        "z_delta",
        "epsilon_total",
        "delta_total",
        "z_repeat",
    }
)
TRAIN_STATS_KEYS = frozenset(
    {
        "steps",
        "lr",
        "batch_size",
        "max_length",
        "seed",
        "loss_first",
        "loss_last",
        "seconds",
        "n_train",
        "compute_dtype",
    }
)
#: the dtypes a site may train in (``train_stats.compute_dtype``; ``common.models.compute_dtype``)
TRAIN_DTYPES = ("float32", "bfloat16")
#: what a site's node config ``compute-dtype`` may name (``auto``: the hardware decides)
COMPUTE_DTYPES = ("auto", *TRAIN_DTYPES)
EMBEDDING_SPEC_KEYS = frozenset({"representation", "layer", "dim"})
#: metric names a site may return after applying an adapter (numbers only, never text)
METRIC_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,40}$")
MAX_METRICS = 32

PEFT_PREFIX = "base_model.model."
_PEFT_KEY_RE = re.compile(r"^base_model\.model\.(?P<module>[A-Za-z0-9_.]+)\.lora_(?P<ab>[AB])\.weight$")
_MODULE_RE = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_SITE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
MAX_ADAPTER_BYTES = 512 * 1024 * 1024
MAX_EMBEDDING_DIM = 65536
MAX_STR = 4096  # no free-text field may carry a report's worth of text
MAX_LORA_CONFIG_STR = 1 << 20


class WireError(ValueError):
    """A message does not match the fixed vocabulary; ``record``/``key`` say where."""

    def __init__(self, message: str, record: str | None = None, key: str | None = None) -> None:
        where = record if key is None else f"{record}[{key!r}]"
        super().__init__(f"{where}: {message}" if where else message)
        self.record = record
        self.key = key


# -- small helpers --------------------------------------------------------------------------------
def _load_json(text: str, record: str, key: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise WireError(f"expected canonical JSON ({exc.msg})", record, key) from None


def _check_config(
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


def _record(content: RecordDict, name: str, kind: str) -> Any:
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
        _record(content, name, kind)


def _to_array(x: np.ndarray) -> Array:
    return Array.from_numpy_ndarray(np.ascontiguousarray(x))


def _numpy(arr: Array, record: str, key: str, finite: bool = True) -> np.ndarray:
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


# -- LoRA config ----------------------------------------------------------------------------------
def peft_keys(module: str) -> tuple[str, str]:
    """PEFT state-dict keys of a module's A and B factors."""
    return f"{PEFT_PREFIX}{module}.lora_A.weight", f"{PEFT_PREFIX}{module}.lora_B.weight"


def lora_config_from_arrays(arrays: Mapping[str, np.ndarray], alphas: Mapping[str, float]) -> dict[str, Any]:
    """The wire LoRA config of PEFT-keyed factors, with each module's alpha (``scale * r``)."""
    modules: dict[str, dict[str, Any]] = {}
    for key, value in arrays.items():
        m = _PEFT_KEY_RE.match(key)
        if not m:
            raise WireError("not a PEFT LoRA key (base_model.model.<module>.lora_[AB].weight)", "adapter", key)
        if m["ab"] == "A":
            module = m["module"]
            b = arrays.get(peft_keys(module)[1])
            if b is None:
                raise WireError("lora_A without lora_B", "adapter", key)
            if module not in alphas:
                raise WireError("no alpha for this module", "adapter", key)
            modules[module] = {
                "r": int(value.shape[0]),
                "alpha": float(alphas[module]),
                "shape": [int(b.shape[0]), int(value.shape[1])],
            }
    return {"peft_type": "LORA", "modules": dict(sorted(modules.items()))}


def parse_lora_config(text: str, record: str = "meta", key: str = "lora_config") -> dict[str, Any]:
    """Validate the wire LoRA config; returns it as a dict (``modules`` sorted by name)."""
    cfg = _load_json(text, record, key)
    if not isinstance(cfg, dict) or set(cfg) != {"peft_type", "modules"}:
        raise WireError("expected an object with exactly 'peft_type' and 'modules'", record, key)
    if cfg["peft_type"] != "LORA":
        raise WireError(f"peft_type {cfg['peft_type']!r} is not 'LORA'", record, key)
    modules = cfg["modules"]
    if not isinstance(modules, dict) or not modules:
        raise WireError("'modules' must be a non-empty object", record, key)
    for name, spec in modules.items():
        if not isinstance(name, str) or not _MODULE_RE.match(name):
            raise WireError(f"module name {name!r} is not a dotted module path", record, key)
        if not isinstance(spec, dict) or set(spec) != {"r", "alpha", "shape"}:
            raise WireError(f"module {name!r}: expected exactly r, alpha, shape", record, key)
        r, alpha, shape = spec["r"], spec["alpha"], spec["shape"]
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise WireError(f"module {name!r}: r must be a positive integer", record, key)
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
            raise WireError(f"module {name!r}: alpha must be a finite number", record, key)
        if (
            not isinstance(shape, list)
            or len(shape) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)
        ):
            raise WireError(f"module {name!r}: shape must be [out, in] positive integers", record, key)
        if r > min(shape):
            raise WireError(f"module {name!r}: rank {r} exceeds min(out, in) = {min(shape)}", record, key)
    return {"peft_type": "LORA", "modules": dict(sorted(modules.items()))}


def adapter_to_wire(adapter: LoraAdapter) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(PEFT-keyed float32 arrays, wire LoRA config) of an adapter; alpha = scale * r per module."""
    from common.adapters import adapter_to_arrays

    raw, _ = adapter_to_arrays(adapter)
    arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in raw.items()}
    alphas = {name: m.scale * m.rank for name, m in adapter.modules.items()}
    return arrays, lora_config_from_arrays(arrays, alphas)


def adapter_from_wire(
    arrays: Mapping[str, np.ndarray], lora_config: Mapping[str, Any], base_model: str | None = None
) -> LoraAdapter:
    """The adapter a validated (arrays, LoRA config) pair describes (scale = alpha / r, float32)."""
    import torch

    from common.adapters import LoraAdapter, LoraModule

    modules = {}
    for name, spec in lora_config["modules"].items():
        a_key, b_key = peft_keys(name)
        modules[name] = LoraModule(
            torch.from_numpy(np.array(arrays[a_key], dtype=np.float32)),
            torch.from_numpy(np.array(arrays[b_key], dtype=np.float32)),
            float(spec["alpha"]) / int(spec["r"]),
        )
    return LoraAdapter(modules, base_model)


def wire_normalized(adapter: LoraAdapter, base_model: str | None = None) -> LoraAdapter:
    """The adapter exactly as the other side will rebuild it from the wire (float32, alpha/r scale).

    Both sides hash *this* form (``adapter_to_bytes``), so ``blob_sha256`` names exactly what
    travelled, even where ``scale * r / r`` is not bit-identical to ``scale``.
    """
    arrays, cfg = adapter_to_wire(adapter)
    return adapter_from_wire(arrays, cfg, adapter.base_model if base_model is None else base_model)


@dataclass(frozen=True)
class WireAdapter:
    """An adapter in its one wire form, made once: the float32 factors (``arrays``, what the
    ArrayRecord carries), the wire LoRA config, the canonical bytes (``blob``, what the registry
    stores) and their sha256 (what every log names)."""

    adapter: LoraAdapter
    arrays: dict[str, np.ndarray]
    lora_config: dict[str, Any]
    blob: bytes
    sha256: str


def encode_adapter(adapter: LoraAdapter, base_model: str | None = None) -> WireAdapter:
    """Put an adapter in wire form once (float32, scale = alpha / r) and hash its canonical bytes once."""
    from common.adapters import adapter_to_bytes

    arrays, cfg = adapter_to_wire(adapter)
    normalized = adapter_from_wire(arrays, cfg, adapter.base_model if base_model is None else base_model)
    blob = adapter_to_bytes(normalized)
    return WireAdapter(normalized, arrays, cfg, blob, hashlib.sha256(blob).hexdigest())


def adapter_sha256(adapter: LoraAdapter) -> str:
    """sha256 of the canonical bytes of an adapter already in wire form (``wire_normalized``)."""
    from common.adapters import adapter_to_bytes

    return hashlib.sha256(adapter_to_bytes(adapter)).hexdigest()


#: the one array of an ``adapter`` record (the module docstring says why one)
PACKED_KEY = "lora_factors"


def factor_layout(lora_config: Mapping[str, Any]) -> list[tuple[str, tuple[int, int]]]:
    """(PEFT key, shape) of every factor of a LoRA config, in packing order (sorted keys)."""
    expected: dict[str, tuple[int, int]] = {}
    for name, spec in lora_config["modules"].items():
        a_key, b_key = peft_keys(name)
        out_f, in_f = spec["shape"]
        expected[a_key] = (spec["r"], in_f)
        expected[b_key] = (out_f, spec["r"])
    return sorted(expected.items())


def adapter_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """The ``adapter`` record of PEFT-keyed factors: ONE float32 vector, the factors flattened and
    joined in sorted key order (the order :func:`factor_layout` gives for their LoRA config)."""
    parts = [np.asarray(arrays[k], dtype=np.float32).ravel() for k in sorted(arrays)]
    return ArrayRecord({PACKED_KEY: _to_array(np.concatenate(parts) if parts else np.zeros(0, np.float32))})


def parse_adapter(
    rec: ArrayRecord, lora_config: Mapping[str, Any], record: str = "adapter", max_bytes: int = MAX_ADAPTER_BYTES
) -> dict[str, np.ndarray]:
    """Exactly the A/B factors of every module in ``lora_config`` (views into the one packed vector),
    each finite, with the shapes the config gives."""
    layout = factor_layout(lora_config)
    keys = sorted(rec.keys())
    if keys != [PACKED_KEY]:
        raise WireError(
            f"expected exactly one array {PACKED_KEY!r} (every factor of the LoRA config, flattened "
            f"and joined in sorted key order), got {keys[:4]}{' ...' if len(keys) > 4 else ''}",
            record,
        )
    arr = rec[PACKED_KEY]
    want = sum(rows * cols for _, (rows, cols) in layout)
    if max(want * 4, len(arr.data)) > max_bytes:
        raise WireError(f"{max(want * 4, len(arr.data))} bytes exceed the limit of {max_bytes}", record, PACKED_KEY)
    if list(arr.shape) != [want]:
        raise WireError(
            f"shape {list(arr.shape)} does not match the LoRA config: {len(layout)} factors of {want} values in all",
            record,
            PACKED_KEY,
        )
    flat = _numpy(arr, record, PACKED_KEY, finite=False)
    out: dict[str, np.ndarray] = {}
    start = 0
    for key, (rows, cols) in layout:
        part = flat[start : start + rows * cols].reshape(rows, cols)
        start += rows * cols
        if not np.all(np.isfinite(part)):
            raise WireError(f"contains NaN or inf (factor {key})", record, PACKED_KEY)
        out[key] = part
    return out


def embedding_record(z: np.ndarray) -> ArrayRecord:
    """ArrayRecord with the single float32 vector ``z``."""
    z = np.asarray(z, dtype=np.float32)
    if z.ndim != 1:
        raise WireError(f"z must be 1-D, got shape {list(z.shape)}", "embedding", "z")
    return ArrayRecord({"z": _to_array(z)})


def parse_embedding(rec: ArrayRecord, dim: int | None = None, record: str = "embedding") -> np.ndarray:
    """Exactly one 1-D finite float32 array ``z`` (of ``dim`` values when given)."""
    if set(rec.keys()) != {"z"}:
        raise WireError(f"expected exactly one array 'z', got {sorted(rec.keys())}", record)
    arr = rec["z"]
    if len(arr.shape) != 1 or not 0 < arr.shape[0] <= MAX_EMBEDDING_DIM:
        raise WireError(
            f"expected a 1-D vector of 1..{MAX_EMBEDDING_DIM} values, got shape {list(arr.shape)}", record, "z"
        )
    if dim is not None and arr.shape[0] != dim:
        raise WireError(f"{arr.shape[0]} values, but the embedding spec says dim={dim}", record, "z")
    return _numpy(arr, record, "z")


def _parse_json_object(
    text: str, allowed: frozenset[str], record: str, key: str, exact: bool = False
) -> dict[str, Any]:
    obj = _load_json(text, record, key)
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


def _check_common(meta: Mapping[str, Any], record: str) -> None:
    if meta["schema"] != WIRE_SCHEMA:
        raise WireError(f"schema {meta['schema']!r} is not {WIRE_SCHEMA!r}", record, "schema")
    if not _SITE_RE.match(meta["site"]):
        raise WireError("not a valid site id", record, "site")
    for key in ("sample_count", "token_count"):
        if key in meta and meta[key] < 0:
            raise WireError("must be >= 0", record, key)


# -- requests -------------------------------------------------------------------------------------
def build_request(
    message_type: str, config: Mapping[str, Any], adapter: Mapping[str, np.ndarray] | None = None
) -> RecordDict:
    """Request content for ``message_type`` (validated with the same rules the site applies)."""
    if message_type not in MESSAGE_TYPES:
        raise WireError(f"unknown message type {message_type!r}; known: {list(MESSAGE_TYPES)}")
    _check_config(config, REQUEST_CONFIG_KEYS[message_type], "config", REQUEST_REQUIRED[message_type], exact=False)
    records: dict[str, Any] = {"config": ConfigRecord(dict(config))}
    if message_type == APPLY:
        if adapter is None:
            raise WireError("train.apply needs the composed adapter", "adapter")
        records["adapter"] = adapter_record(adapter)
    elif adapter is not None:
        raise WireError(f"{message_type} carries no adapter", "adapter")
    content = RecordDict(records)
    parse_request(message_type, content)
    return content


@dataclass
class Request:
    """A validated request: its config and, for ``train.apply``, the adapter factors."""

    message_type: str
    config: dict[str, Any]
    adapter: dict[str, np.ndarray] | None = None
    lora_config: dict[str, Any] | None = None
    #: ``train.evaluate``: one ``(arm description, adapter factors)`` per arm
    arms: list[tuple[dict[str, Any], dict[str, np.ndarray]]] | None = None


def parse_request(message_type: str, content: RecordDict) -> Request:
    """Site side: refuse unknown message types, records or config keys (the site sends nothing then)."""
    if message_type == EVALUATE:
        return parse_evaluate_request(content)
    if message_type not in MESSAGE_TYPES:
        raise WireError(f"unknown message type {message_type!r}; this site answers only {list(MESSAGE_TYPES)}")
    check_records(content, ALLOWED_REQUEST_RECORDS[message_type], f"a {message_type} request")
    config = _check_config(
        dict(_record(content, "config", "config")),
        REQUEST_CONFIG_KEYS[message_type],
        "config",
        REQUEST_REQUIRED[message_type],
        exact=False,
    )
    req = Request(message_type, config)
    if message_type == APPLY:
        if not _SHA256_RE.match(config["blob_sha256"]):
            raise WireError("expected 64 lowercase hex digits", "config", "blob_sha256")
        req.lora_config = parse_lora_config(config["lora_config"], "config", "lora_config")
        req.adapter = parse_adapter(_record(content, "adapter", "array"), req.lora_config)
    return req


# -- replies --------------------------------------------------------------------------------------
def build_whoami_reply(info: Mapping[str, Any]) -> RecordDict:
    """``whoami`` ConfigRecord with exactly ``WHOAMI_KEYS`` (counts only, never data)."""
    values = _check_config(info, WHOAMI_KEYS, "whoami")
    content = RecordDict({"whoami": ConfigRecord(values)})
    parse_whoami_reply(content)
    return content


def parse_whoami_reply(content: RecordDict) -> dict[str, Any]:
    check_records(content, ALLOWED_REPLY_KEYS[WHOAMI], "a query.whoami reply")
    info = _check_config(dict(_record(content, "whoami", "config")), WHOAMI_KEYS, "whoami")
    _check_common(info, "whoami")
    for key in ("tasks", "groups"):
        value = _load_json(info[key], "whoami", key)
        if not isinstance(value, list) or not all(isinstance(v, str) and len(v) <= 64 for v in value):
            raise WireError("expected a JSON list of short strings", "whoami", key)
        info[key] = value
    return info


@dataclass
class EnrollPayload:
    """What a site sends when it enrols: the adapter factors, z and the metadata."""

    arrays: dict[str, np.ndarray]
    lora_config: dict[str, Any]
    z: np.ndarray
    meta: dict[str, Any]
    embedding_spec: dict[str, Any] = field(default_factory=dict)
    privacy: dict[str, Any] = field(default_factory=dict)
    train_stats: dict[str, Any] = field(default_factory=dict)


def build_enroll_reply(
    arrays: Mapping[str, np.ndarray], z: np.ndarray, meta: Mapping[str, Any], check: bool = True
) -> RecordDict:
    """The three records of an enrolment reply, validated exactly as the coordinator will.

    ``check=False`` skips that validation for a caller that validates the reply itself right
    after (the ClientApp's gate, ``check_reply``), so the site decodes the adapter once, not twice.
    """
    content = RecordDict(
        {
            "adapter": adapter_record(arrays),
            "embedding": embedding_record(z),
            "meta": ConfigRecord(dict(meta)),
        }
    )
    if check:
        parse_enroll_reply(content)
    return content


def parse_enroll_reply(content: RecordDict, max_adapter_bytes: int = MAX_ADAPTER_BYTES) -> EnrollPayload:
    """Coordinator side: exactly adapter + embedding + meta, every key and shape as specified."""
    check_records(content, ALLOWED_REPLY_KEYS[ENROLL], "a train (enrol) reply")
    meta = _check_config(dict(_record(content, "meta", "config")), ENROLL_META_KEYS, "meta")
    _check_common(meta, "meta")
    if not _SHA256_RE.match(meta["blob_sha256"]):
        raise WireError("expected 64 lowercase hex digits", "meta", "blob_sha256")
    lora_config = parse_lora_config(meta["lora_config"])
    spec = _parse_json_object(meta["embedding_spec"], EMBEDDING_SPEC_KEYS, "meta", "embedding_spec", exact=True)
    privacy = _parse_json_object(meta["privacy"], PRIVACY_KEYS, "meta", "privacy")
    stats = _parse_json_object(meta["train_stats"], TRAIN_STATS_KEYS, "meta", "train_stats")
    if stats.get("compute_dtype", "float32") not in TRAIN_DTYPES:
        raise WireError(f"compute_dtype must be one of {list(TRAIN_DTYPES)}", "meta", "train_stats")
    if not isinstance(spec["dim"], int):
        raise WireError("embedding_spec.dim must be an integer", "meta", "embedding_spec")
    arrays = parse_adapter(_record(content, "adapter", "array"), lora_config, max_bytes=max_adapter_bytes)
    z = parse_embedding(_record(content, "embedding", "array"), spec["dim"])
    return EnrollPayload(arrays, lora_config, z, meta, spec, privacy, stats)


def build_embed_reply(z: np.ndarray, meta: Mapping[str, Any]) -> RecordDict:
    """``embedding`` (z alone) and its small ``meta`` record."""
    content = RecordDict({"embedding": embedding_record(z), "meta": ConfigRecord(dict(meta))})
    parse_embed_reply(content)
    return content


def parse_embed_reply(content: RecordDict) -> tuple[np.ndarray, dict[str, Any]]:
    check_records(content, ALLOWED_REPLY_KEYS[EMBED], "a query.embed reply")
    meta = _check_config(dict(_record(content, "meta", "config")), EMBED_META_KEYS, "meta")
    _check_common(meta, "meta")
    spec = _parse_json_object(meta["embedding_spec"], EMBEDDING_SPEC_KEYS, "meta", "embedding_spec", exact=True)
    _parse_json_object(meta["privacy"], PRIVACY_KEYS, "meta", "privacy")
    z = parse_embedding(_record(content, "embedding", "array"), spec["dim"])
    meta["embedding_spec"] = spec
    return z, meta


def build_apply_reply(metrics: Mapping[str, float], receipt: Mapping[str, Any]) -> RecordDict:
    """Metrics (numbers only) and a receipt naming what was stored."""
    content = RecordDict(
        {"metrics": MetricRecord({k: float(v) for k, v in metrics.items()}), "receipt": ConfigRecord(dict(receipt))}
    )
    parse_apply_reply(content)
    return content


def parse_apply_reply(content: RecordDict) -> tuple[dict[str, float], dict[str, Any]]:
    check_records(content, ALLOWED_REPLY_KEYS[APPLY], "a train.apply reply")
    return parse_metrics_and_receipt(content, MAX_METRICS)


def parse_metrics_and_receipt(content: RecordDict, max_metrics: int) -> tuple[dict[str, float], dict[str, Any]]:
    """(metrics, receipt) of a reply that carries scores: at most ``max_metrics`` finite scalars
    under short lowercase names, and a receipt with the common keys (``train.apply``, ``train.evaluate``)."""
    metrics_rec = _record(content, "metrics", "metric")
    if len(metrics_rec) > max_metrics:
        raise WireError(f"{len(metrics_rec)} metrics exceed the limit of {max_metrics}", "metrics")
    metrics: dict[str, float] = {}
    for key, value in metrics_rec.items():
        if not METRIC_NAME_RE.match(key):
            raise WireError("metric names are short lowercase identifiers", "metrics", key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise WireError("metrics are finite scalars", "metrics", key)
        metrics[key] = float(value)
    receipt = _check_config(dict(_record(content, "receipt", "config")), RECEIPT_KEYS, "receipt")
    _check_common(receipt, "receipt")
    return metrics, receipt


_PARSERS = {
    WHOAMI: parse_whoami_reply,
    ENROLL: parse_enroll_reply,
    EMBED: parse_embed_reply,
    APPLY: parse_apply_reply,
}


def check_reply(message_type: str, content: RecordDict) -> None:
    """Site side, last gate before anything leaves: the reply matches the vocabulary exactly."""
    if message_type not in _PARSERS:
        raise WireError(f"unknown message type {message_type!r}; a site replies only to {list(MESSAGE_TYPES)}")
    _PARSERS[message_type](content)


def describe(content: RecordDict) -> list[dict[str, Any]]:
    """What a message carries, for egress and audit logs: names, kinds, keys, shapes, bytes, sha256.

    Never the values of arrays; config values verbatim when they are scalars or strings up to 256
    characters, else their length and sha256. ``digest`` is ``common.trust.digests.record_digest`` of the
    record, the hash the site's egress log and the coordinator's audit log both record.
    """
    out: list[dict[str, Any]] = []
    for name, rec in content.items():
        entry: dict[str, Any] = {"record": name}
        if isinstance(rec, ArrayRecord):
            tensors = []
            total = 0
            for key in sorted(rec.keys()):
                arr = rec[key]
                n = int(np.prod(arr.shape)) * np.dtype(arr.dtype).itemsize
                total += n
                tensors.append({"key": key, "dtype": arr.dtype, "shape": list(arr.shape), "bytes": n})
            entry.update(kind="array", tensors=tensors, bytes=total)
        elif isinstance(rec, ConfigRecord):
            keys = {}
            for key in sorted(rec.keys()):
                value = rec[key]
                if isinstance(value, (bool, int, float)):
                    keys[key] = value
                elif isinstance(value, str) and len(value) <= 256:
                    keys[key] = value
                elif isinstance(value, str):
                    keys[key] = {"chars": len(value), "sha256": hashlib.sha256(value.encode()).hexdigest()}
                else:
                    keys[key] = type(value).__name__
            entry.update(kind="config", keys=keys)
        elif isinstance(rec, MetricRecord):
            entry.update(kind="metric", keys={k: rec[k] for k in sorted(rec.keys())})
        else:
            entry.update(kind=type(rec).__name__)
        entry["digest"] = record_digest(rec)
        out.append(entry)
    return out


# -- train.evaluate (every arm of one target in one message): common/protocol/arms.py, registered here --
from common.protocol.arms import (  # noqa: E402, F401 - needs the helpers above; its names are this vocabulary's
    ARM_KEYS,
    EVALUATE,
    MAX_ARMS,
    MAX_EVALUATE_METRICS,
    arms_digest,
    build_evaluate_reply,
    build_evaluate_request,
    parse_evaluate_reply,
    parse_evaluate_request,
)

MESSAGE_TYPES = (*MESSAGE_TYPES, EVALUATE)
REQUEST_CONFIG_KEYS[EVALUATE] = {
    "nonce": _STR,
    "task": _STR,
    "arms": _STR,
    "max_eval": _INT,
    "with_base": _BOOL,
    "delivery": _STR,
}
REQUEST_REQUIRED[EVALUATE] = frozenset({"nonce", "arms"})
ALLOWED_REPLY_KEYS[EVALUATE] = {"metrics": "metric", "receipt": "config"}
#: plus exactly one ``adapter-<i>`` ArrayRecord per arm the config describes (``wire_arms._arm_records``)
ALLOWED_REQUEST_RECORDS[EVALUATE] = {"config": "config"}
_PARSERS[EVALUATE] = parse_evaluate_reply
