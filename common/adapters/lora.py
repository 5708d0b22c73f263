"""LoRA adapter maths on plain tensors: load/save PEFT directories, canonical bytes, composition.

A LoRA adapter changes a linear layer's weight ``W0`` (``out x in``) by ``ΔW = s · B A`` with
``A: r x in``, ``B: out x r`` and a scalar scale ``s`` (PEFT: ``lora_alpha / r``, or
``lora_alpha / sqrt(r)`` with rsLoRA). Composing k adapters with weights ``w_i`` gives the
retrieval-based parameter ensemble

    θ = θ0 + Σ_i w_i s_i B_i A_i          (per target module)

which is *exactly* another LoRA of rank ``Σ r_i``: stack the ``A_i`` row-wise and put the
``w_i s_i B_i`` side by side (:func:`compose`). Its best rank-r approximation (Eckart–Young) is
found from a QR of each stacked factor and the SVD of a small ``R x R`` core, never forming the
dense ``out x in`` update.

Nothing here loads a base model. Module names are base-model module paths such as
``model.layers.0.self_attn.q_proj`` (a PEFT tensor key minus the ``base_model.model.`` prefix and
the ``.lora_A.weight`` suffix).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from safetensors.torch import load

__all__ = [
    "FORMAT_TAG",
    "LoraAdapter",
    "LoraFormatError",
    "LoraModule",
    "adapter_from_arrays",
    "adapter_from_bytes",
    "adapter_to_arrays",
    "adapter_to_bytes",
    "canonical_head",
    "delta_dict",
    "peft_key",
]

FORMAT_TAG = "rpe-lora-v1"
PEFT_PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_SUFFIX_A = ".lora_A.weight"
_SUFFIX_B = ".lora_B.weight"

# safetensors dtype names of the float dtypes an adapter may hold.
_ST_DTYPES: dict[torch.dtype, str] = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float64: "F64",
}
_DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
_PRECISION = {torch.float16: 0, torch.bfloat16: 0, torch.float32: 1, torch.float64: 2}
# Below this many factor elements ((out + in) * R) the truncated SVD runs in float64.
_FLOAT64_LIMIT = 1 << 20
# init_lora_weights values whose training also rewrote the base weights: such an adapter is only
# valid on that modified base model unless PEFT converted it on save.
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


class LoraFormatError(ValueError):
    """The adapter is not a plain LoRA this module can handle, or the arguments do not fit together."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(eq=False)
class LoraModule:
    """One target module's factors: ``ΔW = scale · B @ A`` with ``A: [r, in]`` and ``B: [out, r]``."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float = 1.0

    def __post_init__(self) -> None:
        self.A = self.A.detach()
        self.B = self.B.detach()
        if self.A.ndim != 2 or self.B.ndim != 2:
            raise LoraFormatError(
                f"LoRA factors must be 2-D (A: [r, in], B: [out, r]), got A {tuple(self.A.shape)} and "
                f"B {tuple(self.B.shape)}; convolution LoRA is not supported"
            )
        if self.A.shape[0] != self.B.shape[1]:
            raise LoraFormatError(
                f"LoRA rank mismatch: A {tuple(self.A.shape)} has {self.A.shape[0]} rows but B "
                f"{tuple(self.B.shape)} has {self.B.shape[1]} columns; they must be equal"
            )
        if self.A.shape[0] < 1:
            raise LoraFormatError("LoRA rank must be at least 1")
        for label, t in (("A", self.A), ("B", self.B)):
            if t.dtype not in _ST_DTYPES:
                raise LoraFormatError(f"LoRA factor {label} has dtype {t.dtype}; expected a float dtype")
        self.scale = float(self.scale)
        if not math.isfinite(self.scale):
            raise LoraFormatError(f"LoRA scale must be finite, got {self.scale}")

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """``(out_features, in_features)`` of the weight this module updates."""
        return int(self.B.shape[0]), int(self.A.shape[1])

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense update ``scale · B @ A`` (``[out, in]``), computed in ``dtype`` (float32)."""
        return (self.B.to(dtype) @ self.A.to(dtype)).mul_(self.scale)


def factors_dtype(modules: Iterable[Any]) -> torch.dtype:
    """The common dtype of the ``A`` and ``B`` factors of ``modules`` (float32 when they differ);
    anything with ``A.dtype`` and ``B.dtype`` will do (``common.adapters.stream_compose`` passes header entries)."""
    dtypes = {t.dtype for m in modules for t in (m.A, m.B)}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


@dataclass(eq=False)
class LoraAdapter:
    """A LoRA adapter: ``{module name: LoraModule}`` plus the base model it was trained on."""

    modules: dict[str, LoraModule] = field(default_factory=dict)
    base_model: str | None = None

    @property
    def target_modules(self) -> list[str]:
        return sorted(self.modules)

    @property
    def ranks(self) -> dict[str, int]:
        return {name: m.rank for name, m in self.modules.items()}

    @property
    def dtype(self) -> torch.dtype:
        """The common dtype of the factors (float32 when they differ)."""
        return factors_dtype(self.modules.values())

    def num_parameters(self) -> int:
        return sum(m.A.numel() + m.B.numel() for m in self.modules.values())

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> LoraAdapter:
        """A copy with every factor moved/cast (tensors are shared where nothing changes)."""
        return LoraAdapter(
            {
                n: LoraModule(m.A.to(device=device, dtype=dtype), m.B.to(device=device, dtype=dtype), m.scale)
                for n, m in self.modules.items()
            },
            self.base_model,
        )


def peft_key(name: str, factor: str) -> str:
    """The tensor key PEFT's ``save_pretrained`` uses, e.g. ``base_model.model.<name>.lora_A.weight``."""
    if factor not in ("A", "B"):
        raise ValueError(f"factor must be 'A' or 'B', got {factor!r}")
    return f"{PEFT_PREFIX}{name}.lora_{factor}.weight"


def delta_dict(adapter: LoraAdapter, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """``{module name: scale · B @ A}`` as dense tensors (for tests and small models)."""
    return {name: m.delta(dtype) for name, m in adapter.modules.items()}


# --------------------------------------------------------------------------------------------
# Canonical bytes and wire arrays
# --------------------------------------------------------------------------------------------


def _lora_meta(adapter: LoraAdapter, with_dtype: bool = False) -> str:
    modules: dict[str, dict] = {}
    for name in sorted(adapter.modules):
        m = adapter.modules[name]
        entry: dict = {"rank": m.rank, "scale": m.scale}
        if with_dtype:
            entry["dtype_A"] = _dtype_name(m.A.dtype)
            entry["dtype_B"] = _dtype_name(m.B.dtype)
        modules[name] = entry
    return json.dumps(
        {"base_model": adapter.base_model, "format": FORMAT_TAG, "modules": modules},
        sort_keys=True,
        separators=(",", ":"),
        allow_nan=False,
    )


def _adapter_from_meta(meta_json: str, tensors: Mapping[str, torch.Tensor], where: str) -> LoraAdapter:
    try:
        meta = json.loads(meta_json)
    except (TypeError, json.JSONDecodeError) as exc:
        raise LoraFormatError(f"{where}: adapter metadata is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        meta = {}
    if meta.get("format") != FORMAT_TAG or not isinstance(meta.get("modules"), dict):
        got = meta.get("format")
        raise LoraFormatError(f"{where}: adapter metadata has format {got!r}, expected {FORMAT_TAG!r}")
    expected_keys = {peft_key(n, f) for n in meta["modules"] for f in ("A", "B")}
    extra = sorted(set(tensors) - expected_keys)
    if extra:
        raise LoraFormatError(f"{where}: tensors {extra[:5]} are not described by the adapter metadata")
    modules: dict[str, LoraModule] = {}
    for name, info in meta["modules"].items():
        try:
            A, B = tensors[peft_key(name, "A")], tensors[peft_key(name, "B")]
        except KeyError as exc:
            raise LoraFormatError(f"{where}: module {name} is missing tensor {exc.args[0]}") from exc
        try:
            module = LoraModule(A, B, info["scale"])
        except LoraFormatError as exc:
            raise LoraFormatError(f"{where}: module {name}: {exc}") from exc
        if module.rank != info["rank"]:
            raise LoraFormatError(f"{where}: module {name} has rank {module.rank} but the metadata says {info['rank']}")
        modules[name] = module
    return LoraAdapter(modules, meta.get("base_model"))


def adapter_to_bytes(adapter: LoraAdapter) -> bytes:
    """The canonical, deterministic safetensors blob of an adapter (its sha256 is the blob id).

    Tensors use PEFT key names and keep their dtype; ``__metadata__`` holds ``format: pt``,
    ``rpe_format: rpe-lora-v1`` and ``rpe_lora`` (JSON: base model, per-module rank and scale).
    The header is written here with sorted keys rather than by ``safetensors.torch.save``, whose
    ``__metadata__`` order is not stable across processes when it has more than one entry. Stock
    safetensors readers (``safetensors.torch.load``) read the blob.
    """
    head, buffers = _canonical_layout(adapter)
    return b"".join([head, *buffers])


def canonical_head(adapter: LoraAdapter) -> bytes:
    """The first bytes of :func:`adapter_to_bytes` (length + JSON header), without copying a tensor.

    A blob whose tensors were read from it with its own header is canonical exactly when its head
    equals this: the header fixes every tensor's offset, and the data bytes are those tensors'."""
    return _canonical_layout(adapter)[0]


def _canonical_layout(adapter: LoraAdapter) -> tuple[bytes, list[memoryview]]:
    if sys.byteorder != "little":  # pragma: no cover
        raise RuntimeError("adapter_to_bytes assumes a little-endian host")
    entries: list[tuple[str, torch.Tensor]] = []
    for name, m in adapter.modules.items():
        entries.append((peft_key(name, "A"), m.A))
        entries.append((peft_key(name, "B"), m.B))
    # Larger items first, then by name (as safetensors does): every tensor starts aligned.
    entries.sort(key=lambda kv: (-kv[1].element_size(), kv[0]))
    header: dict[str, dict] = {}
    buffers: list[memoryview] = []
    offset = 0
    for key, t in entries:
        flat = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        header[key] = {
            "dtype": _ST_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + flat.size],
        }
        buffers.append(flat.data)
        offset += flat.size
    header["__metadata__"] = {"format": "pt", "rpe_format": FORMAT_TAG, "rpe_lora": _lora_meta(adapter)}
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    return len(raw).to_bytes(8, "little") + raw, buffers


def _read_safetensors_metadata(data: bytes) -> dict:
    if len(data) < 8:
        raise LoraFormatError("adapter blob is too short to be safetensors")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise LoraFormatError("adapter blob has a truncated safetensors header")
    try:
        header = json.loads(bytes(data[8 : 8 + n]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoraFormatError(f"adapter blob has an unreadable safetensors header ({exc})") from exc
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


def adapter_from_bytes(data: bytes) -> LoraAdapter:
    """Inverse of :func:`adapter_to_bytes` (tensors keep their stored dtype)."""
    meta = _read_safetensors_metadata(data)
    if meta.get("rpe_format") != FORMAT_TAG or "rpe_lora" not in meta:
        raise LoraFormatError(f"adapter blob has rpe_format {meta.get('rpe_format')!r}, expected {FORMAT_TAG!r}")
    try:
        tensors = load(bytes(data))
    except Exception as exc:  # safetensors raises its own error types
        raise LoraFormatError(f"adapter blob is not valid safetensors ({exc})") from exc
    return _adapter_from_meta(meta["rpe_lora"], tensors, "adapter blob")


def adapter_to_arrays(adapter: LoraAdapter) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Numpy arrays (PEFT key names) plus a flat ``{str: str}`` config, for a Flower record.

    numpy has no bfloat16, so bf16 factors travel as float32 (exact) and the config records the
    original dtype; :func:`adapter_from_arrays` casts them back, so the round trip is lossless.
    float32/float16/float64 travel unchanged. Arrays may share memory with the adapter's tensors.
    """
    arrays: dict[str, np.ndarray] = {}
    for name in sorted(adapter.modules):
        m = adapter.modules[name]
        for f, t in (("A", m.A), ("B", m.B)):
            t = t.detach().cpu()
            if t.dtype == torch.bfloat16:
                t = t.float()
            arrays[peft_key(name, f)] = t.contiguous().numpy()
    return arrays, {"format": FORMAT_TAG, "lora": _lora_meta(adapter, with_dtype=True)}


def adapter_from_arrays(arrays: Mapping[str, np.ndarray], config: Mapping[str, str]) -> LoraAdapter:
    """Inverse of :func:`adapter_to_arrays` (copies the arrays)."""
    if config.get("format") != FORMAT_TAG or "lora" not in config:
        raise LoraFormatError(f"adapter arrays config has format {config.get('format')!r}, expected {FORMAT_TAG!r}")
    meta = json.loads(config["lora"]) if isinstance(config["lora"], str) else None
    if not isinstance(meta, dict) or not isinstance(meta.get("modules"), dict):
        raise LoraFormatError("adapter arrays config has no module table")
    tensors: dict[str, torch.Tensor] = {}
    for name, info in meta["modules"].items():
        for f in ("A", "B"):
            key = peft_key(name, f)
            if key not in arrays:
                raise LoraFormatError(f"adapter arrays: module {name} is missing {key}")
            dtype_name = info.get(f"dtype_{f}", "float32")
            want = _DTYPE_NAMES.get(dtype_name)
            if want is None:
                raise LoraFormatError(f"adapter arrays: module {name} has unsupported dtype {dtype_name!r}")
            tensors[key] = torch.tensor(np.asarray(arrays[key])).to(want)
    for key in arrays:
        if key not in tensors:
            raise LoraFormatError(f"adapter arrays: array {key} is not described by the config")
    return _adapter_from_meta(config["lora"], tensors, "adapter arrays")
