"""PEFT adapter directories <-> ``common.adapters.lora.LoraAdapter`` (read and write, no base model).

Split from ``common/adapters/lora.py``: this file changes when PEFT's on-disk format does.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from common.adapters.lora import (
    _BASE_MODIFYING_INITS,
    _SUFFIX_A,
    _SUFFIX_B,
    CONFIG_NAME,
    PEFT_PREFIX,
    WEIGHTS_NAME,
    LoraAdapter,
    LoraFormatError,
    LoraModule,
    peft_key,
)
from common.files.safeio import UnsafeInputError, check_pattern_key, loads_json, read_regular_file

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
            raise LoraFormatError(f"rank_pattern/alpha_pattern key {key!r} is not a valid regex: {exc}") from exc
    return name


def _peft_rank_alpha(config: Mapping, name: str) -> tuple[int, float]:
    """The (r, lora_alpha) PEFT assigns to module ``name`` under ``config`` (checked by
    :func:`check_peft_numbers` first: ints >= 1, finite numbers, module-name pattern keys)."""
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    r = rank_pattern.get(_peft_pattern_key(rank_pattern, name), config.get("r", 8))
    alpha = alpha_pattern.get(_peft_pattern_key(alpha_pattern, name), config.get("lora_alpha", 8))
    return int(r), alpha


#: the largest LoRA rank an adapter_config.json may name (far above any real adapter's)
MAX_CONFIG_RANK = 1 << 16
#: the most rank_pattern / alpha_pattern entries (one per module at most; a 4096-module cap elsewhere)
MAX_PATTERN_KEYS = 4096
#: the largest adapter_config.json read (real ones are a few KiB)
MAX_CONFIG_BYTES = 1 << 20


def _rank_value(value: Any, field: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LoraFormatError(f"{where}: {field} is {value!r}; expected a whole number >= 1 (the LoRA rank)")
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise LoraFormatError(f"{where}: {field} is {value!r}; expected a whole number >= 1 (the LoRA rank)")
    if not 1 <= value <= MAX_CONFIG_RANK:
        raise LoraFormatError(f"{where}: {field} is {value!r}; expected a rank from 1 to {MAX_CONFIG_RANK}")
    return int(value)


def _alpha_value(value: Any, field: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LoraFormatError(f"{where}: {field} is {value!r}; expected a finite number (lora_alpha)")
    if abs(value) > 1e12:
        raise LoraFormatError(f"{where}: {field} is {value!r}; expected |lora_alpha| <= 1e12")
    return value


def check_peft_numbers(config: Mapping, where: str) -> None:
    """Issue 26 class 9: ``r``, ``lora_alpha`` and the ``rank_pattern`` / ``alpha_pattern`` entries
    of an adapter config are checked before any arithmetic, so ``lora_alpha: "8"``, ``r: 1e400`` or
    ``r: 0`` is a :class:`LoraFormatError` naming the field, never a TypeError / OverflowError /
    ZeroDivisionError, and a pattern key is a module name (``common.files.safeio.check_pattern_key``),
    never a regular expression that backtracks for hours (``(.|.)*Z``)."""
    _rank_value(config.get("r", 8), "r", where)
    _alpha_value(config.get("lora_alpha", 8), "lora_alpha", where)
    for field, check in (("rank_pattern", _rank_value), ("alpha_pattern", _alpha_value)):
        pattern = config.get(field) or {}
        if not isinstance(pattern, dict):
            raise LoraFormatError(f"{where}: {field} is {type(pattern).__name__}; expected an object {{module: value}}")
        if len(pattern) > MAX_PATTERN_KEYS:
            raise LoraFormatError(f"{where}: {field} has {len(pattern)} entries; the limit is {MAX_PATTERN_KEYS}")
        for key, value in pattern.items():
            try:
                check_pattern_key(key, f"{where}: {field}")
            except UnsafeInputError as exc:
                raise LoraFormatError(str(exc)) from None
            check(value, f"{field}[{key!r}]", where)


def read_peft_config(config_path: Path) -> dict:
    """A PEFT ``adapter_config.json`` read with the hardened reader (``common.files.safeio``): a
    regular file of at most ``MAX_CONFIG_BYTES``, JSON nested at most 64 deep (a 200,000-deep file is
    a clear :class:`LoraFormatError`, not a ``RecursionError``), an object."""
    try:
        config = loads_json(read_regular_file(config_path, MAX_CONFIG_BYTES, what=CONFIG_NAME), str(config_path))
    except UnsafeInputError as exc:
        raise LoraFormatError(f"{exc}; expected the {CONFIG_NAME} PEFT save_pretrained writes") from None
    if not isinstance(config, dict):
        raise LoraFormatError(f"{config_path}: expected a JSON object")
    return config


def _check_plain_lora_config(config: Mapping, where: str) -> None:
    def bad(problem: str, fix: str) -> LoraFormatError:
        return LoraFormatError(f"{where}: {problem}; {fix}")

    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise bad(f"peft_type is {peft_type!r}, not LORA", "only plain LoRA adapters can be composed")
    if config.get("use_dora"):
        raise bad(
            "use_dora is true (DoRA adds a magnitude vector that does not compose linearly)",
            "retrain with use_dora=False",
        )
    if config.get("modules_to_save"):
        raise bad(
            f"modules_to_save={config['modules_to_save']!r} stores full copies of modules",
            "retrain without modules_to_save (only LoRA factors can be composed)",
        )
    if config.get("bias", "none") != "none":
        raise bad(f"bias={config['bias']!r} trains bias vectors", "retrain with bias='none'")
    if config.get("lora_bias"):
        raise bad("lora_bias is true (a bias on lora_B)", "retrain with lora_bias=False")
    if config.get("fan_in_fan_out"):
        raise bad(
            "fan_in_fan_out is true (Conv1D-style transposed weights)",
            "use a model with nn.Linear layers and fan_in_fan_out=False",
        )
    if config.get("target_parameters"):
        raise bad("target_parameters is set (LoRA on raw nn.Parameters)", "target nn.Linear modules instead")
    if config.get("trainable_token_indices"):
        raise bad(
            "trainable_token_indices is set (trainable embedding rows)", "retrain without trainable_token_indices"
        )
    if config.get("layer_replication"):
        raise bad("layer_replication is set (changes the model's layer structure)", "retrain without layer_replication")
    variants = (
        "alora_invocation_tokens",
        "use_bdlora",
        "arrow_config",
        "kasa_config",
        "monteclora_config",
        "velora_config",
    )
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
            raise bad(
                f"init_lora_weights={init!r} also rewrote the base weights, so the factors are not a "
                "delta on the original base model",
                "re-save with save_pretrained(..., path_initial_model_for_weight_conversion=...)",
            )


def load_peft_adapter(path: str | os.PathLike[str]) -> LoraAdapter:
    """Read a stock PEFT LoRA directory (``adapter_config.json`` + ``adapter_model.safetensors``).

    Per-module rank and alpha follow PEFT's own ``rank_pattern`` / ``alpha_pattern`` matching; the
    scale is ``alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``). Tensors keep their stored
    dtype. Anything that is not a plain LoRA on linear layers raises :class:`LoraFormatError`.
    """
    return load_peft_adapters([path])[0]


def load_peft_adapters(paths: Sequence[str | os.PathLike[str]]) -> list[LoraAdapter]:
    """:func:`load_peft_adapter` for several directories: every config is checked before any
    weights are read. A weights file that is not valid safetensors raises
    :class:`LoraFormatError` naming it. (Reading them into one shared buffer instead was measured
    slower: fresh memory for all k inputs at once costs more than safetensors' per-tensor copies.)
    """
    checked = [_checked_peft_dir(Path(p)) for p in paths]
    adapters = []
    for directory, config, weights_path in checked:
        try:
            tensors = load_file(str(weights_path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise LoraFormatError(f"{weights_path}: not a valid safetensors file ({exc}); re-save the adapter") from exc
        adapters.append(_adapter_from_peft_tensors(directory, config, tensors))
    return adapters


def _checked_peft_dir(directory: Path) -> tuple[Path, dict, Path]:
    """(directory, its checked adapter config, the weights file's path) of a PEFT LoRA directory."""
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise LoraFormatError(f"{directory}: no {CONFIG_NAME}; expected a directory written by PEFT save_pretrained")
    config = read_peft_config(config_path)
    _check_plain_lora_config(config, str(directory))
    check_peft_numbers(config, str(config_path))

    weights_path = directory / WEIGHTS_NAME
    if not weights_path.is_file():
        extra = (
            " (found a pickled adapter_model.bin: re-save with safe_serialization=True)"
            if (directory / "adapter_model.bin").exists()
            else ""
        )
        raise LoraFormatError(f"{directory}: no {WEIGHTS_NAME}{extra}")
    return directory, config, weights_path


def _adapter_from_peft_tensors(directory: Path, config: dict, tensors: Mapping[str, torch.Tensor]) -> LoraAdapter:
    """The ``LoraAdapter`` of a PEFT directory's checked config and its loaded tensors."""
    modules, base = peft_factors(directory, config, tensors)
    return LoraAdapter({name: LoraModule(A, B, scale) for name, (A, B, scale) in modules.items()}, base)


def peft_factors(
    directory: Path, config: dict, tensors: Mapping[str, Any]
) -> tuple[dict[str, tuple[Any, Any, float]], str | None]:
    """``({module: (A, B, scale)}, base model)`` of a PEFT directory's checked config and its
    tensors, checked: only plain LoRA factor keys, both factors of every module, 2-D float
    factors whose ranks agree with each other and with the config. ``tensors`` may hold anything
    with ``shape``, ``ndim`` and ``dtype`` (``common.adapters.stream_compose`` passes the header's entries)."""
    factors: dict[str, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        if "lora_magnitude_vector" in key:
            raise LoraFormatError(f"{directory}: tensor {key} is a DoRA magnitude vector; retrain with use_dora=False")
        if "lora_embedding_" in key:
            raise LoraFormatError(
                f"{directory}: tensor {key} is an embedding LoRA; only nn.Linear LoRA is "
                "supported (drop embedding layers from target_modules)"
            )
        if "modules_to_save" in key or "trainable_tokens" in key:
            raise LoraFormatError(
                f"{directory}: tensor {key} is a fully trained module copy, not a LoRA factor; "
                "retrain without modules_to_save / trainable tokens"
            )
        if not key.startswith(PEFT_PREFIX):
            raise LoraFormatError(
                f"{directory}: tensor key {key!r} does not start with {PEFT_PREFIX!r}; "
                "expected keys as written by PeftModel.save_pretrained"
            )
        if key.endswith(_SUFFIX_A):
            name, factor = key[len(PEFT_PREFIX) : -len(_SUFFIX_A)], "A"
        elif key.endswith(_SUFFIX_B):
            name, factor = key[len(PEFT_PREFIX) : -len(_SUFFIX_B)], "B"
        else:
            raise LoraFormatError(
                f"{directory}: unexpected tensor {key!r} (shape {tuple(tensor.shape)}); "
                "a plain LoRA holds only lora_A.weight / lora_B.weight"
            )
        factors.setdefault(name, {})[factor] = tensor
    if not factors:
        raise LoraFormatError(f"{directory}: {WEIGHTS_NAME} holds no LoRA factors")

    use_rslora = bool(config.get("use_rslora", False))
    modules: dict[str, tuple[Any, Any, float]] = {}
    for name in sorted(factors):
        pair = factors[name]
        for f in ("A", "B"):
            if f not in pair:
                raise LoraFormatError(
                    f"{directory}: module {name} has no lora_{f}.weight; the file is incomplete (re-save the adapter)"
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
            raise LoraFormatError(
                f"{directory}: module {name} has rank {A.shape[0]} in the tensors but "
                f"{CONFIG_NAME} (r / rank_pattern) gives it rank {r}; fix the config"
            )
        for f, t in (("A", A), ("B", B)):
            if t.dtype not in _ST_DTYPES:
                raise LoraFormatError(
                    f"{directory}: module {name}: lora_{f} has dtype {t.dtype}; LoRA factors "
                    f"are float ({', '.join(_ST_DTYPES.values())})"
                )
        modules[name] = (A, B, alpha / math.sqrt(r) if use_rslora else alpha / r)
    base = config.get("base_model_name_or_path")
    return modules, str(base) if base else None


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


def _patterns_resolve(
    names: Sequence[str],
    r0: int,
    a0: float,
    rank_pattern: dict,
    alpha_pattern: dict,
    want: Mapping[str, tuple[int, float]],
) -> bool:
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


_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}
_IOV_MAX = 512  # buffers per writev call (Linux allows 1024)


def write_all(fd: int, chunks: Sequence[bytes | memoryview]) -> None:
    """Write every byte of ``chunks`` to ``fd`` with gathered writes straight from their memory
    (a short write resumes mid-buffer)."""
    pending = [memoryview(c).cast("B") for c in chunks if len(c)]
    while pending:
        done = os.writev(fd, pending[:_IOV_MAX])
        while done and pending:  # drop what was written
            if done >= len(pending[0]):
                done -= len(pending.pop(0))
            else:
                pending[0], done = pending[0][done:], 0


def _write_fsynced(path: Path, chunks: Sequence[bytes | memoryview]) -> None:
    """Write ``chunks`` to a new file with gathered writes straight from their memory, then fsync
    it through the same descriptor (no serialised copy of the payload, no second open)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        write_all(fd, chunks)
        os.fsync(fd)
    finally:
        os.close(fd)


def safetensors_head(specs: Sequence[tuple[str, torch.dtype, Sequence[int]]], metadata: Mapping[str, str]) -> bytes:
    """The first bytes of a safetensors file whose tensors ``(name, dtype, shape)`` follow back to
    back in the order given: u64 header length, then the JSON header padded with spaces to 8."""
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    off = 0
    for name, dtype, shape in specs:
        if dtype not in _ST_DTYPES:
            raise LoraFormatError(
                f"tensor {name!r} has dtype {dtype}; adapters are stored as {', '.join(str(d) for d in _ST_DTYPES)}"
            )
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """A safetensors file (the format ``safetensors.torch.save_file`` writes: u64 header length,
    JSON header padded with spaces to 8 bytes, tensors back to back in name order), written from
    the tensors' own memory and fsynced; ``safetensors``/PEFT read it like any other."""
    names = sorted(tensors)
    flat = [tensors[n].detach().cpu().contiguous() for n in names]
    head = safetensors_head([(n, t.dtype, t.shape) for n, t in zip(names, flat, strict=True)], metadata)
    bufs = [t.reshape(-1).view(torch.uint8).numpy().data for t in flat if t.numel()]
    _write_fsynced(path, [head, *bufs])


def peft_config(want: Mapping[str, tuple[int, float]], base_model_name_or_path: str | None) -> dict:
    """The ``adapter_config.json`` of a plain LoRA whose modules have the ``(rank, lora_alpha)`` of
    ``want`` (``target_modules`` in sorted order; ``rank_pattern`` / ``alpha_pattern`` as needed)."""
    r0, a0, rank_pattern, alpha_pattern = _peft_patterns(want)
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r0,
        "lora_alpha": a0,
        "target_modules": sorted(want),
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


def peft_config_bytes(want: Mapping[str, tuple[int, float]], base_model_name_or_path: str | None) -> bytes:
    """:func:`peft_config` as the bytes of ``adapter_config.json``."""
    return (json.dumps(peft_config(want, base_model_name_or_path), indent=2) + "\n").encode()


def write_peft_config(
    directory: Path, want: Mapping[str, tuple[int, float]], base_model_name_or_path: str | None
) -> None:
    """Write (and fsync) :func:`peft_config` as ``directory/adapter_config.json``."""
    _write_fsynced(directory / CONFIG_NAME, [peft_config_bytes(want, base_model_name_or_path)])


@contextmanager
def staged_peft_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A fresh temporary directory beside ``path`` to write an adapter's files into; when the block
    ends without an error it becomes ``path`` (renamed into place, or, when ``path`` already
    exists, each file replaced atomically, config last); on an error it is removed."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
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


def save_peft_adapter(
    adapter: LoraAdapter, path: str | os.PathLike[str], base_model_name_or_path: str | None = None
) -> Path:
    """Write a standard PEFT LoRA directory that ``peft.PeftModel.from_pretrained`` loads.

    ``target_modules`` lists the exact module names; each module keeps its own rank and scale via
    ``rank_pattern`` / ``alpha_pattern`` (``lora_alpha = scale · r``; a scale PEFT cannot
    reproduce exactly, or a non-positive one, is folded into B with ``lora_alpha = r``). The files
    are written to a temporary directory and renamed into place (or, when ``path`` already exists,
    each file is replaced atomically). Returns the directory.
    """
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
    base = base_model_name_or_path if base_model_name_or_path is not None else adapter.base_model
    with staged_peft_dir(target) as tmp:
        write_safetensors(tmp / WEIGHTS_NAME, tensors, {"format": "pt"})
        write_peft_config(tmp, want, base)
    return target
