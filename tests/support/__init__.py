"""Shared test fakes and factories (one place, so every test builds the same things the same way).

* ``make_tiny_llama``: a tiny random Llama with the real SmolLM2 tokenizer (seconds to build).
* ``tiny_adapter``: a random LoRA adapter on every q_proj of a model directory.
* ``write_site_data``: one site's real report data (train/eval JSONL) per report group.
* ``make_tiny_sam``: a tiny random SAM-shaped model (``TINY_SAM_CONFIG``).
* ``LocalGrid`` (from :mod:`support.grid`, the ONE in-process grid): an in-process Flower ``Grid``
  that hands each message straight to the real ClientApp.

Imported by test modules as ``from support import ...`` (``tests/conftest.py`` is loaded from
``tests/``, so pytest puts ``tests/`` on ``sys.path``); the other modules of this package hold the
shared helpers and fixtures of one area each (see ``tests/README.md``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from common.adapters import LoraAdapter, LoraModule
from common.models import SMOLLM2_TOKENIZER_DIR, TOKENIZER_FILES


def make_tiny_llama(out_dir: str | os.PathLike[str], seed: int = 0, hidden: int = 64, layers: int = 2) -> Path:
    """A tiny random Llama with the real SmolLM2 tokenizer, for fast tests (seconds, ~3 M params)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    if (out / "model.safetensors").exists():
        return out
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        shutil.copy2(SMOLLM2_TOKENIZER_DIR / name, out / name)
    return out


def tiny_adapter(model_dir: Path, seed: int, rank: int = 4, scale: float = 2.0) -> LoraAdapter:
    """A small random LoRA adapter on every layer's q_proj of the model in ``model_dir``."""
    g = torch.Generator().manual_seed(seed)
    cfg = json.loads((model_dir / "config.json").read_text())
    h = cfg["hidden_size"]
    mods = {
        f"model.layers.{i}.self_attn.q_proj": LoraModule(
            torch.randn(rank, h, generator=g) * 0.01, torch.randn(h, rank, generator=g) * 0.01, scale
        )
        for i in range(cfg["num_hidden_layers"])
    }
    return LoraAdapter(mods)


def write_site_data(root: Path, sites: dict[str, str], n: int = 14, n_eval: int = 2) -> dict[str, Path]:
    """``root/<site>/{train,eval}.jsonl`` from the first ``n`` real reports of each site's group."""
    from common.families.report.data import report_groups, split, write_jsonl

    groups = report_groups()
    out = {}
    for site, group in sites.items():
        train, held = split(groups[group][:n], n_eval, seed=0)
        write_jsonl(root / site / "train.jsonl", train)
        write_jsonl(root / site / "eval.jsonl", held)
        out[site] = root / site
    return out


#: A SAM-shaped model with LiteMedSAM's module names and small dims: builds and runs in well under a second.
TINY_SAM_CONFIG: dict[str, Any] = {
    "family": "sam-tinyvit",
    # the last width must stay 320: TinyViT's last PatchMerging keeps stride 1 only for 320/448/576
    "encoder": {
        "embed_dims": [8, 16, 24, 320],
        "depths": [1, 1, 1, 1],
        "num_heads": [1, 2, 2, 4],
        "window_sizes": [7, 7, 7, 7],
        "mlp_ratio": 1.0,
    },
    "embed_dim": 32,
    "decoder": {"depth": 2, "mlp_dim": 64, "num_heads": 2, "iou_head_hidden_dim": 32},
    "mask_in_chans": 4,
}


def make_tiny_sam(out_dir: str | os.PathLike[str] | None = None, seed: int = 0) -> Any:
    """A tiny random SAM-shaped model (``TINY_SAM_CONFIG``) for fast tests: with ``out_dir`` it is
    saved there once (``sam.save_sam``, a directory ``sam.load_sam`` reads) and the directory
    returned, else the model itself."""
    from common.families.segmentation import sam

    if out_dir is not None and (Path(out_dir) / sam.WEIGHTS_NAME).exists():
        return Path(out_dir)
    torch.manual_seed(seed)
    model = sam.build_sam(TINY_SAM_CONFIG)
    model.eval().requires_grad_(False)
    return sam.save_sam(model, out_dir) if out_dir is not None else model


from support.grid import LocalGrid  # noqa: E402 - re-exported: ``from support import LocalGrid``

__all__ = [
    "TINY_SAM_CONFIG",
    "LocalGrid",
    "make_tiny_llama",
    "make_tiny_sam",
    "tiny_adapter",
    "write_site_data",
]
