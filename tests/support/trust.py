"""Trust test helpers: a small registry (its base, two module shapes, 8-dim z) and random adapters,
metadata and embeddings for it (``test_registry_trust.py``, ``test_norm_bound_sites.py``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from common.adapters import LoraAdapter, LoraModule
from server.registry import AdapterMeta, Registry

BASE = "sha256:" + "3c" * 32
SHAPES = {"model.layers.0.self_attn.q_proj": (12, 10), "model.layers.0.self_attn.v_proj": (6, 10)}
DIM = 8


def adapter(seed: int, scale: float = 1.0) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    return LoraAdapter(
        {
            n: LoraModule(torch.randn(2, i, generator=g) * 0.1, torch.randn(o, 2, generator=g) * 0.1, 2.0 * scale)
            for n, (o, i) in SHAPES.items()
        }
    )


def meta(site: str, task: str = "t") -> AdapterMeta:
    return AdapterMeta(site=site, task=task, modality="text", base_fingerprint=BASE, sample_count=5)


def z(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)


def make(tmp_path: Path, n: int = 3) -> tuple[Path, list[str]]:
    root = tmp_path / "reg"
    Registry.init(root, base_fingerprint=BASE, module_shapes=SHAPES, embedding_dim=DIM).close()
    with Registry(root, chroma="off") as reg:
        ids = [reg.add(adapter(i), z(i), meta(f"s{i}")).id for i in range(n)]
    return root, ids
