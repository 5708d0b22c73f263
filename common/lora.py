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
import os
import re
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "FORMAT_TAG",
    "LoraAdapter",
    "LoraFormatError",
    "LoraModule",
    "adapter_from_arrays",
    "adapter_from_bytes",
    "adapter_to_arrays",
    "adapter_to_bytes",
    "compose",
    "delta_dict",
    "load_peft_adapter",
    "peft_key",
    "save_peft_adapter",
    "singular_values",
    "truncation_error",
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
        dtypes = {t.dtype for m in self.modules.values() for t in (m.A, m.B)}
        return dtypes.pop() if len(dtypes) == 1 else torch.float32

    def num_parameters(self) -> int:
        return sum(m.A.numel() + m.B.numel() for m in self.modules.values())

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> LoraAdapter:
        """A copy with every factor moved/cast (tensors are shared where nothing changes)."""
        return LoraAdapter(
            {n: LoraModule(m.A.to(device=device, dtype=dtype), m.B.to(device=device, dtype=dtype), m.scale)
             for n, m in self.modules.items()},
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
# PEFT directories
# --------------------------------------------------------------------------------------------

def _peft_pattern_key(pattern_keys: Iterable[str], name: str) -> str:
    """PEFT 0.21's ``get_pattern_key``: the first key that regex-matches a dot-suffix of ``name``."""
    for key in pattern_keys:
        try:
            if re.match(rf"(.*\.)?({key})$", name):
                return key
        except re.error as exc:
            raise LoraFormatError(
                f"rank_pattern/alpha_pattern key {key!r} is not a valid regex: {exc}"
            ) from exc
    return name


def _peft_rank_alpha(config: Mapping, name: str) -> tuple[int, float]:
    """The (r, lora_alpha) PEFT assigns to module ``name`` under ``config``."""
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    r = rank_pattern.get(_peft_pattern_key(rank_pattern, name), config.get("r", 8))
    alpha = alpha_pattern.get(_peft_pattern_key(alpha_pattern, name), config.get("lora_alpha", 8))
    return int(r), alpha


def _check_plain_lora_config(config: Mapping, where: str) -> None:
    def bad(problem: str, fix: str) -> LoraFormatError:
        return LoraFormatError(f"{where}: {problem}; {fix}")

    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise bad(f"peft_type is {peft_type!r}, not LORA", "only plain LoRA adapters can be composed")
    if config.get("use_dora"):
        raise bad("use_dora is true (DoRA adds a magnitude vector that does not compose linearly)",
                  "retrain with use_dora=False")
    if config.get("modules_to_save"):
        raise bad(f"modules_to_save={config['modules_to_save']!r} stores full copies of modules",
                  "retrain without modules_to_save (only LoRA factors can be composed)")
    if config.get("bias", "none") != "none":
        raise bad(f"bias={config['bias']!r} trains bias vectors", "retrain with bias='none'")
    if config.get("lora_bias"):
        raise bad("lora_bias is true (a bias on lora_B)", "retrain with lora_bias=False")
    if config.get("fan_in_fan_out"):
        raise bad("fan_in_fan_out is true (Conv1D-style transposed weights)",
                  "use a model with nn.Linear layers and fan_in_fan_out=False")
    if config.get("target_parameters"):
        raise bad("target_parameters is set (LoRA on raw nn.Parameters)", "target nn.Linear modules instead")
    if config.get("trainable_token_indices"):
        raise bad("trainable_token_indices is set (trainable embedding rows)",
                  "retrain without trainable_token_indices")
    if config.get("layer_replication"):
        raise bad("layer_replication is set (changes the model's layer structure)",
                  "retrain without layer_replication")
    variants = ("alora_invocation_tokens", "use_bdlora", "arrow_config", "kasa_config", "monteclora_config",
                "velora_config")
    for variant in variants:
        if config.get(variant):
            raise bad(f"{variant} is set (a LoRA variant, not a plain LoRA)", "retrain as a plain LoRA")
    if config.get("use_qalora"):
        raise bad("use_qalora is true (a LoRA variant, not a plain LoRA)", "retrain as a plain LoRA")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str):
        if init == "mica":
            raise bad("init_lora_weights='mica' is a LoRA variant", "retrain as a plain LoRA")
        if init.startswith(_BASE_MODIFYING_INITS):
            raise bad(f"init_lora_weights={init!r} also rewrote the base weights, so the factors are not a "
                      "delta on the original base model",
                      "re-save with save_pretrained(..., path_initial_model_for_weight_conversion=...)")


def load_peft_adapter(path: str | os.PathLike[str]) -> LoraAdapter:
    """Read a stock PEFT LoRA directory (``adapter_config.json`` + ``adapter_model.safetensors``).

    Per-module rank and alpha follow PEFT's own ``rank_pattern`` / ``alpha_pattern`` matching; the
    scale is ``alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``). Tensors keep their stored
    dtype. Anything that is not a plain LoRA on linear layers raises :class:`LoraFormatError`.
    """
    from safetensors.torch import load_file

    directory = Path(path)
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise LoraFormatError(
            f"{directory}: no {CONFIG_NAME}; expected a directory written by PEFT save_pretrained"
        )
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise LoraFormatError(f"{config_path}: not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise LoraFormatError(f"{config_path}: expected a JSON object")
    _check_plain_lora_config(config, str(directory))

    weights_path = directory / WEIGHTS_NAME
    if not weights_path.is_file():
        extra = " (found a pickled adapter_model.bin: re-save with safe_serialization=True)" if (
            directory / "adapter_model.bin").exists() else ""
        raise LoraFormatError(f"{directory}: no {WEIGHTS_NAME}{extra}")
    tensors = load_file(str(weights_path))

    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if "lora_magnitude_vector" in key:
            raise LoraFormatError(
                f"{directory}: tensor {key} is a DoRA magnitude vector; retrain with use_dora=False"
            )
        if "lora_embedding_" in key:
            raise LoraFormatError(f"{directory}: tensor {key} is an embedding LoRA; only nn.Linear LoRA is "
                                  "supported (drop embedding layers from target_modules)")
        if "modules_to_save" in key or "trainable_tokens" in key:
            raise LoraFormatError(
                f"{directory}: tensor {key} is a fully trained module copy, not a LoRA factor; "
                "retrain without modules_to_save / trainable tokens"
            )
        if not key.startswith(PEFT_PREFIX):
            raise LoraFormatError(f"{directory}: tensor key {key!r} does not start with {PEFT_PREFIX!r}; "
                                  "expected keys as written by PeftModel.save_pretrained")
        if key.endswith(_SUFFIX_A):
            name, factor = key[len(PEFT_PREFIX):-len(_SUFFIX_A)], "A"
        elif key.endswith(_SUFFIX_B):
            name, factor = key[len(PEFT_PREFIX):-len(_SUFFIX_B)], "B"
        else:
            raise LoraFormatError(f"{directory}: unexpected tensor {key!r} (shape {tuple(tensor.shape)}); "
                                  "a plain LoRA holds only lora_A.weight / lora_B.weight")
        factors.setdefault(name, {})[factor] = tensor
    if not factors:
        raise LoraFormatError(f"{directory}: {WEIGHTS_NAME} holds no LoRA factors")

    use_rslora = bool(config.get("use_rslora", False))
    modules: dict[str, LoraModule] = {}
    for name in sorted(factors):
        pair = factors[name]
        for f in ("A", "B"):
            if f not in pair:
                raise LoraFormatError(
                    f"{directory}: module {name} has no lora_{f}.weight; the file is incomplete "
                    "(re-save the adapter)"
                )
        A, B = pair["A"], pair["B"]
        if A.ndim != 2 or B.ndim != 2:
            raise LoraFormatError(
                f"{directory}: module {name} has A {tuple(A.shape)} and B {tuple(B.shape)}; "
                "only nn.Linear LoRA (2-D factors) is supported"
            )
        if A.shape[0] != B.shape[1]:
            raise LoraFormatError(
                f"{directory}: module {name}: lora_A {tuple(A.shape)} has rank {A.shape[0]} "
                f"but lora_B {tuple(B.shape)} has rank {B.shape[1]}; the file is corrupt"
            )
        r, alpha = _peft_rank_alpha(config, name)
        if A.shape[0] != r:
            raise LoraFormatError(f"{directory}: module {name} has rank {A.shape[0]} in the tensors but "
                                  f"{CONFIG_NAME} (r / rank_pattern) gives it rank {r}; fix the config")
        scale = alpha / math.sqrt(r) if use_rslora else alpha / r
        modules[name] = LoraModule(A, B, scale)
    base = config.get("base_model_name_or_path")
    return LoraAdapter(modules, str(base) if base else None)


def _peft_alpha_and_B(module: LoraModule) -> tuple[float | int, torch.Tensor]:
    """(lora_alpha, B) such that PEFT's ``alpha / r`` reproduces the scale; else fold it into B."""
    r, s = module.rank, module.scale
    if s > 0:
        alpha = s * r
        if alpha.is_integer() and abs(alpha) < 2**53:
            alpha = int(alpha)
        if alpha / r == s:
            return alpha, module.B
    folded = (module.B.float() * s).to(module.B.dtype) if module.B.dtype != torch.float64 else module.B * s
    return r, folded


def _pattern_order(keys: Iterable[str]) -> list[str]:
    # PEFT takes the first matching key: longest first means a module's own key wins over any
    # shorter key that merely matches a dot-suffix of its name.
    return sorted(keys, key=lambda k: (-len(k), k))


def _patterns_resolve(names: Sequence[str], r0: int, a0: float, rank_pattern: dict, alpha_pattern: dict,
                      want: Mapping[str, tuple[int, float]]) -> bool:
    config = {"r": r0, "lora_alpha": a0, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}
    return all(_peft_rank_alpha(config, n) == want[n] for n in names)


def _peft_patterns(want: Mapping[str, tuple[int, float]]) -> tuple[int, float, dict, dict]:
    """Default (r, alpha) plus rank_pattern / alpha_pattern giving every module exactly its own values.

    First try literal module names for the modules that differ from the default (readable). PEFT
    treats keys as regexes (``.`` matches any character, matched at a dot boundary), so the result
    is checked with PEFT's own matching rule; if any module would resolve wrongly, every module
    gets an escaped (``re.escape``) key, longest first, which can only match its own name.
    """
    names = list(want)
    (r0, a0), _ = min(Counter(want.values()).items(), key=lambda kv: (-kv[1], kv[0]))
    rank_pattern = {n: want[n][0] for n in _pattern_order(n for n in names if want[n][0] != r0)}
    alpha_pattern = {n: want[n][1] for n in _pattern_order(n for n in names if want[n][1] != a0)}
    if _patterns_resolve(names, r0, a0, rank_pattern, alpha_pattern, want):
        return r0, a0, rank_pattern, alpha_pattern
    rank_pattern = {re.escape(n): want[n][0] for n in _pattern_order(names)}
    alpha_pattern = {re.escape(n): want[n][1] for n in _pattern_order(names)}
    if not _patterns_resolve(names, r0, a0, rank_pattern, alpha_pattern, want):  # pragma: no cover
        raise LoraFormatError("could not express the per-module ranks as a PEFT rank_pattern")
    return r0, a0, rank_pattern, alpha_pattern


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def save_peft_adapter(adapter: LoraAdapter, path: str | os.PathLike[str],
                      base_model_name_or_path: str | None = None) -> Path:
    """Write a standard PEFT LoRA directory that ``peft.PeftModel.from_pretrained`` loads.

    ``target_modules`` lists the exact module names; each module keeps its own rank and scale via
    ``rank_pattern`` / ``alpha_pattern`` (``lora_alpha = scale · r``; a scale PEFT cannot
    reproduce exactly, or a non-positive one, is folded into B with ``lora_alpha = r``). The files
    are written to a temporary directory and renamed into place (or, when ``path`` already exists,
    each file is replaced atomically). Returns the directory.
    """
    from safetensors.torch import save_file

    if not adapter.modules:
        raise LoraFormatError("cannot save an adapter with no modules")
    target = Path(path)
    names = sorted(adapter.modules)
    want: dict[str, tuple[int, float]] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name in names:
        module = adapter.modules[name]
        alpha, B = _peft_alpha_and_B(module)
        want[name] = (module.rank, alpha)
        tensors[peft_key(name, "A")] = module.A.contiguous()
        tensors[peft_key(name, "B")] = B.contiguous()
    r0, a0, rank_pattern, alpha_pattern = _peft_patterns(want)
    base = base_model_name_or_path if base_model_name_or_path is not None else adapter.base_model
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base,
        "r": r0,
        "lora_alpha": a0,
        "target_modules": names,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
        "revision": None,
    }

    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        cpu = {k: v.cpu() for k, v in tensors.items()}
        save_file(cpu, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            _fsync_file(tmp / name)
        os.chmod(tmp, 0o755)
        renamed = False
        if not target.exists():
            try:
                os.rename(tmp, target)
                renamed = True
            except OSError:
                renamed = False  # someone created it meanwhile: fall back to per-file replacement
        if not renamed:
            for name in (WEIGHTS_NAME, CONFIG_NAME):  # config last: it names what the weights hold
                os.replace(tmp / name, target / name)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


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
    return json.dumps({"base_model": adapter.base_model, "format": FORMAT_TAG, "modules": modules},
                      sort_keys=True, separators=(",", ":"), allow_nan=False)


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
            raise LoraFormatError(
                f"{where}: module {name} has rank {module.rank} but the metadata says {info['rank']}"
            )
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
    if sys.byteorder != "little":  # pragma: no cover
        raise RuntimeError("adapter_to_bytes assumes a little-endian host")
    entries: list[tuple[str, torch.Tensor]] = []
    for name, m in adapter.modules.items():
        entries.append((peft_key(name, "A"), m.A))
        entries.append((peft_key(name, "B"), m.B))
    # Larger items first, then by name (as safetensors does): every tensor starts aligned.
    entries.sort(key=lambda kv: (-kv[1].element_size(), kv[0]))
    header: dict[str, dict] = {}
    buffers: list[np.ndarray] = []
    offset = 0
    for key, t in entries:
        flat = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        header[key] = {
            "dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + flat.size]
        }
        buffers.append(flat)
        offset += flat.size
    header["__metadata__"] = {"format": "pt", "rpe_format": FORMAT_TAG, "rpe_lora": _lora_meta(adapter)}
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    return b"".join([len(raw).to_bytes(8, "little"), raw, *buffers])


def _read_safetensors_metadata(data: bytes) -> dict:
    if len(data) < 8:
        raise LoraFormatError("adapter blob is too short to be safetensors")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise LoraFormatError("adapter blob has a truncated safetensors header")
    try:
        header = json.loads(bytes(data[8:8 + n]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoraFormatError(f"adapter blob has an unreadable safetensors header ({exc})") from exc
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


def adapter_from_bytes(data: bytes) -> LoraAdapter:
    """Inverse of :func:`adapter_to_bytes` (tensors keep their stored dtype)."""
    from safetensors.torch import load

    meta = _read_safetensors_metadata(data)
    if meta.get("rpe_format") != FORMAT_TAG or "rpe_lora" not in meta:
        raise LoraFormatError(
            f"adapter blob has rpe_format {meta.get('rpe_format')!r}, expected {FORMAT_TAG!r}"
        )
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
        raise LoraFormatError(
            f"adapter arrays config has format {config.get('format')!r}, expected {FORMAT_TAG!r}"
        )
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


# --------------------------------------------------------------------------------------------
# Composition
# --------------------------------------------------------------------------------------------

def _scaled_columns(parts: Sequence[tuple[LoraModule, float]], dtype: torch.dtype) -> torch.Tensor:
    """``[c_1 B_1, c_2 B_2, ...]`` (``out x Σr``) in ``dtype``, written straight into one buffer."""
    first = parts[0][0].B
    out = torch.empty((first.shape[0], sum(m.rank for m, _ in parts)), dtype=dtype, device=first.device)
    col = 0
    for m, c in parts:
        src = m.B
        # mul() computes in its input's dtype and only casts on write: upcast an input that is not
        # more precise than the output (bf16 -> fp32, fp32 -> fp64, fp16 <-> bf16 via fp32).
        if src.dtype != dtype and _PRECISION[src.dtype] <= _PRECISION[dtype]:
            src = src.to(torch.promote_types(src.dtype, dtype))
        torch.mul(src, c, out=out[:, col:col + m.rank])
        col += m.rank
    return out


def _stacked_rows(parts: Sequence[tuple[LoraModule, float]], dtype: torch.dtype) -> torch.Tensor:
    return torch.cat([m.A for m, _ in parts], dim=0).to(dtype)


def _compute_dtype(out: int, inp: int, rank: int, dtype: torch.dtype) -> torch.dtype:
    if dtype == torch.float64 or (out + inp) * rank <= _FLOAT64_LIMIT:
        return torch.float64
    return torch.float32


def _householder(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Householder QR of a tall ``M`` (``n x R``): (reflectors, tau, R factor ``min(n, R) x R``).

    Q is never formed: :func:`torch.ormqr` applies it to the few columns we keep, which costs
    far less than building the explicit ``n x R`` Q (about half the time of ``linalg.qr``).
    """
    a, tau = torch.geqrf(M)
    k = min(M.shape)
    return a[:, :k], tau, a[:k].triu()


def _truncate(B: torch.Tensor, A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors ``(B', A')`` of ``B @ A`` with balanced ``√S`` on each side.

    ``B = Q_B R_B`` and ``A^T = Q_A R_A`` give ``B A = Q_B (R_B R_A^T) Q_A^T``; with the small SVD
    ``R_B R_A^T = U S V^T``: ``B' = Q_B U_r √S_r`` and ``A' = √S_r V_r^T Q_A^T``.
    """
    try:
        a_B, tau_B, R_B = _householder(B)
        a_A, tau_A, R_A = _householder(A.mT)
    except NotImplementedError:  # a backend without geqrf/ormqr: explicit Q
        Q_B, R_B = torch.linalg.qr(B)
        Q_A, R_A = torch.linalg.qr(A.mT)
        U, S, Vh = torch.linalg.svd(R_B @ R_A.mT, full_matrices=False)
        r = min(rank, S.shape[0])
        root = S[:r].sqrt()
        return Q_B @ (U[:, :r] * root), (Vh[:r] * root[:, None]) @ Q_A.mT
    U, S, Vh = torch.linalg.svd(R_B @ R_A.mT, full_matrices=False)
    r = min(rank, S.shape[0])
    root = S[:r].sqrt()
    left = B.new_zeros((B.shape[0], r))
    left[: U.shape[0]] = U[:, :r] * root
    right = A.new_zeros((A.shape[1], r))
    right[: Vh.shape[1]] = Vh[:r].mT * root
    return torch.ormqr(a_B, tau_B, left), torch.ormqr(a_A, tau_A, right).mT


def _check_max_rank(max_rank: object) -> int:
    """``max_rank`` as an int >= 1: an int / np.integer (not bool) or a finite integral float.

    Checked before any ``int()`` call, so NaN, Inf, bools and strings raise LoraFormatError (not a
    bare ValueError / OverflowError / TypeError).
    """
    ok = False
    if isinstance(max_rank, (bool, np.bool_)):
        pass
    elif isinstance(max_rank, (int, np.integer)):
        ok = max_rank >= 1
    elif isinstance(max_rank, (float, np.floating)):
        ok = math.isfinite(max_rank) and float(max_rank).is_integer() and max_rank >= 1
    if not ok:
        raise LoraFormatError(f"max_rank must be a positive integer or None, got {max_rank!r}")
    return int(max_rank)


def compose(adapters: Sequence[LoraAdapter], weights: Sequence[float] | np.ndarray | torch.Tensor,
            max_rank: int | None = None, dtype: torch.dtype | None = None) -> LoraAdapter:
    """The weighted sum ``Σ w_i s_i B_i A_i`` of LoRA adapters, per module, as one LoRA (scale 1).

    Exact by default: a module's ``A`` is the ``A_i`` of every adapter that has it stacked
    row-wise and its ``B`` the ``w_i s_i B_i`` side by side (rank ``Σ r_i``). Adapters may differ
    in rank, scale and target modules; weights may be negative. With ``max_rank=r`` a module
    whose total rank exceeds r is replaced by its best rank-r approximation (Eckart–Young, split
    ``B' = Q_B U_r √S_r``, ``A' = √S_r V_r^T Q_A^T``) computed in float32 (float64 when small)
    without forming the dense update. ``dtype`` is the output dtype (default: the inputs'
    common dtype). ``base_model`` is kept when all adapters that name one agree, else None.
    """
    adapters = list(adapters)
    if isinstance(weights, torch.Tensor):
        weights = weights.detach().cpu().tolist()
    w = [float(x) for x in np.asarray(weights, dtype=np.float64).reshape(-1)]
    if not adapters:
        raise LoraFormatError("compose needs at least one adapter")
    if len(w) != len(adapters):
        raise LoraFormatError(
            f"compose got {len(adapters)} adapters but {len(w)} weights; pass one weight per adapter"
        )
    bad = [i for i, x in enumerate(w) if not math.isfinite(x)]
    if bad:
        raise LoraFormatError(
            f"compose weights must be finite; weight(s) at index {bad} are {[w[i] for i in bad]}"
        )
    if max_rank is not None:
        max_rank = _check_max_rank(max_rank)

    if dtype is None:
        dtype = adapters[0].dtype
        for a in adapters[1:]:
            dtype = torch.promote_types(dtype, a.dtype)
    names = list(dict.fromkeys(n for a in adapters for n in a.modules))
    bases = {a.base_model for a in adapters if a.base_model}
    modules: dict[str, LoraModule] = {}
    for name in names:
        parts = [
            (a.modules[name], wi * a.modules[name].scale)
            for a, wi in zip(adapters, w, strict=True)
            if name in a.modules
        ]
        shapes = {m.shape for m, _ in parts}
        if len(shapes) > 1:
            detail = ", ".join(f"adapter {i}: {a.modules[name].shape}" for i, a in enumerate(adapters)
                               if name in a.modules)
            raise LoraFormatError(f"module {name} has different (out, in) shapes across adapters ({detail}); "
                                  "the adapters were trained on different base models")
        out, inp = shapes.pop()
        total = sum(m.rank for m, _ in parts)
        if max_rank is None or total <= max_rank:
            modules[name] = LoraModule(_stacked_rows(parts, dtype), _scaled_columns(parts, dtype), 1.0)
            continue
        cd = _compute_dtype(out, inp, total, dtype)
        B_new, A_new = _truncate(_scaled_columns(parts, cd), _stacked_rows(parts, cd), int(max_rank))
        modules[name] = LoraModule(A_new.to(dtype).contiguous(), B_new.to(dtype), 1.0)
    return LoraAdapter(modules, bases.pop() if len(bases) == 1 else None)


def singular_values(module: LoraModule) -> torch.Tensor:
    """Singular values (descending) of ``scale · B @ A``, without forming it (float64 when small)."""
    out, inp = module.shape
    cd = _compute_dtype(out, inp, module.rank, torch.float32)
    R_B = torch.linalg.qr(module.B.to(cd), mode="r").R
    R_A = torch.linalg.qr(module.A.to(cd).mT, mode="r").R
    return torch.linalg.svdvals(R_B @ R_A.mT) * abs(module.scale)


def truncation_error(adapter: LoraAdapter, max_rank: int) -> dict[str, float]:
    """Per module, the Frobenius error ``sqrt(Σ_{j>r} σ_j²)`` of the best rank-``max_rank`` approximation."""
    errors: dict[str, float] = {}
    for name, m in adapter.modules.items():
        s = singular_values(m)
        errors[name] = float(s[max_rank:].square().sum().sqrt()) if m.rank > max_rank else 0.0
    return errors
