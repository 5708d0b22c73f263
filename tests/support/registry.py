"""Registry test helpers: a registry's fixed base and module shapes, random adapters and metadata
for them, a brute-force nearest-neighbour reference, and fingerprints of a registry's files.

Used by the registry's tests (``test_registry*.py``, ``test_blob_encryption.py``, ``test_cli.py``,
``test_durable.py``, ``test_peft_config_hostile.py``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from common.adapters import LoraAdapter, LoraModule
from server.registry import AdapterMeta, Registry, snapshot

BASE = "sha256:" + "ab" * 32
BASE2 = "sha256:" + "cd" * 32
SHAPES = {
    "model.layers.0.self_attn.q_proj": (32, 24),
    "model.layers.0.self_attn.v_proj": (16, 24),
    "model.layers.1.mlp.down_proj": (24, 40),
}
SHAPES2 = {"model.layers.0.self_attn.q_proj": (8, 8)}
DIM = 48
SITES = ["a", "b", "c", "d", "e"]
TASKS = ["xray-chest", "ct-head", "mr-head"]
MODALITIES = ["xray", "ct", "mr"]


def make_adapter(
    seed: int,
    rank: int = 2,
    dtype: torch.dtype = torch.float32,
    shapes: dict | None = None,
    modules: list[str] | None = None,
) -> LoraAdapter:
    shapes = shapes or SHAPES
    g = torch.Generator().manual_seed(seed)
    names = modules or list(shapes)
    return LoraAdapter(
        {
            n: LoraModule(
                torch.randn(rank, shapes[n][1], generator=g).to(dtype),
                torch.randn(shapes[n][0], rank, generator=g).to(dtype),
                0.5 + seed % 3,
            )
            for n in names
        }
    )


def make_meta(i: int, **kw) -> AdapterMeta:
    fields = dict(
        site=SITES[i % len(SITES)],
        task=TASKS[i % len(TASKS)],
        modality=MODALITIES[i % 3],
        base_fingerprint=BASE,
        sample_count=10 + i,
        token_count=100 * i,
        privacy="none",
        extra={"i": i},
    )
    fields.update(kw)
    return AdapterMeta(**fields)


def new_registry(path: Path, **kw) -> Registry:
    dim = kw.pop("dim", DIM)
    return Registry.init(path, base_fingerprint=BASE, module_shapes=SHAPES, embedding_dim=dim, **kw)


def brute_force(Z: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    d = ((Z.astype(np.float64) - q.astype(np.float32).astype(np.float64)) ** 2).sum(1)
    order = np.lexsort((np.arange(len(d)), d))[:k]
    return order, d[order]


def tree_hash(path: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under ``path`` (or of the file itself)."""
    if path.is_file():
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def state(root: Path) -> dict:
    return {name: tree_hash(root / name) for name in ("records.jsonl", "blobs", "chroma", "registry.json")}


def audit_lines(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "audit.jsonl").read_text().splitlines()]


def rewrite_snapshot(path: Path, mutate) -> None:
    """Rewrite the snapshot with ``mutate(header, body: bytearray)`` applied and its checksum redone
    (what someone editing it on purpose would do)."""
    raw = path.read_bytes()
    m = len(snapshot.MAGIC)
    hl = int.from_bytes(raw[m : m + 8], "little")
    head, body = json.loads(raw[m + 8 : m + 8 + hl]), bytearray(raw[m + 8 + hl :])
    mutate(head, body)
    head["body_sha256"] = hashlib.sha256(bytes(body)).hexdigest()
    h = json.dumps(head, sort_keys=True).encode()
    path.write_bytes(snapshot.MAGIC + len(h).to_bytes(8, "little") + h + bytes(body))
