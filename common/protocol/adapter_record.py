"""The adapter and the embedding as records: the wire LoRA config, the one packed ``lora_factors``
array (``vocabulary.py`` says why one), the ``z`` vector, and :class:`WireAdapter`, the adapter in
its one wire form (float32 factors, canonical bytes and their sha256) made once at the sender.

``common.adapters`` (which imports torch) is imported inside the functions that build a
``LoraAdapter``, so that the vocabulary and every parser stay importable without torch.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ArrayRecord

from common.protocol.checks import decode_array, load_json, to_array
from common.protocol.vocabulary import (
    MAX_ADAPTER_BYTES,
    MAX_EMBEDDING_DIM,
    MODULE_RE,
    PACKED_KEY,
    PEFT_KEY_RE,
    PEFT_PREFIX,
    WireError,
)

if TYPE_CHECKING:
    from common.adapters import LoraAdapter


def peft_keys(module: str) -> tuple[str, str]:
    """PEFT state-dict keys of a module's A and B factors."""
    return f"{PEFT_PREFIX}{module}.lora_A.weight", f"{PEFT_PREFIX}{module}.lora_B.weight"


def lora_config_from_arrays(arrays: Mapping[str, np.ndarray], alphas: Mapping[str, float]) -> dict[str, Any]:
    """The wire LoRA config of PEFT-keyed factors, with each module's alpha (``scale * r``)."""
    modules: dict[str, dict[str, Any]] = {}
    for key, value in arrays.items():
        m = PEFT_KEY_RE.match(key)
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
    cfg = load_json(text, record, key)
    if not isinstance(cfg, dict) or set(cfg) != {"peft_type", "modules"}:
        raise WireError("expected an object with exactly 'peft_type' and 'modules'", record, key)
    if cfg["peft_type"] != "LORA":
        raise WireError(f"peft_type {cfg['peft_type']!r} is not 'LORA'", record, key)
    modules = cfg["modules"]
    if not isinstance(modules, dict) or not modules:
        raise WireError("'modules' must be a non-empty object", record, key)
    for name, spec in modules.items():
        if not isinstance(name, str) or not MODULE_RE.match(name):
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
    from common.adapters import adapter_to_arrays  # lazy: common.adapters imports torch

    raw, _ = adapter_to_arrays(adapter)
    arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in raw.items()}
    alphas = {name: m.scale * m.rank for name, m in adapter.modules.items()}
    return arrays, lora_config_from_arrays(arrays, alphas)


def adapter_from_wire(
    arrays: Mapping[str, np.ndarray], lora_config: Mapping[str, Any], base_model: str | None = None
) -> LoraAdapter:
    """The adapter a validated (arrays, LoRA config) pair describes (scale = alpha / r, float32)."""
    import torch  # lazy: the parsers need no torch; only building a LoraAdapter does

    from common.adapters import LoraAdapter, LoraModule  # lazy: imports torch

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
    from common.adapters import adapter_to_bytes  # lazy: common.adapters imports torch

    arrays, cfg = adapter_to_wire(adapter)
    normalized = adapter_from_wire(arrays, cfg, adapter.base_model if base_model is None else base_model)
    blob = adapter_to_bytes(normalized)
    return WireAdapter(normalized, arrays, cfg, blob, hashlib.sha256(blob).hexdigest())


def adapter_sha256(adapter: LoraAdapter) -> str:
    """sha256 of the canonical bytes of an adapter already in wire form (``wire_normalized``)."""
    from common.adapters import adapter_to_bytes  # lazy: common.adapters imports torch

    return hashlib.sha256(adapter_to_bytes(adapter)).hexdigest()


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
    return ArrayRecord({PACKED_KEY: to_array(np.concatenate(parts) if parts else np.zeros(0, np.float32))})


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
    flat = decode_array(arr, record, PACKED_KEY, finite=False)
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
    return ArrayRecord({"z": to_array(z)})


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
    return decode_array(arr, record, "z")
