"""A toy task family for the tests: its own data, a tiny model, its own metric (``accuracy``).

It exists to prove that a family is one folder behind ``common.families.base.Family``: the site
handlers, the ServerApp, bootstrap and reporting run it without naming it.

- **Data**: ``<data-path>/train.jsonl`` and ``eval.jsonl``, one example per line:
  ``{"x": [8 floats], "y": 0 or 1}`` (:func:`write_toy_site` makes a site whose labels follow its
  own direction ``w``, so sites differ as hospitals do).
- **Model**: ``h = relu(proj(x))``, ``logits = head(h)`` with two ``nn.Linear`` layers, saved as
  ``<model-path>/toy.safetensors``; its fingerprint is the file's sha256 (:func:`make_toy_base`).
- **LoRA**: on ``proj`` (rank and alpha from the request), trained by plain gradient descent on
  cross-entropy, a few milliseconds.
- **z**: the mean over examples of ``proj(x)`` of the frozen base (each example's vector clipped
  to ``clip_norm`` when the site's Gaussian mechanism is on), 8 values.
- **Score**: ``accuracy`` of ``argmax(logits)`` on the held-out examples.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.families.base import (
    Base,
    DataCounts,
    DPSettings,
    FamilyError,
    RegistryBase,
    RegistrySpec,
    SiteDataset,
    SiteInputs,
    TrainPlan,
    TrainResult,
)

DIM = 8
WEIGHTS = "toy.safetensors"
REPRESENTATION = "toy-proj-mean"


def make_toy_base(out_dir: Path, seed: int = 0) -> Path:
    """A tiny base model (``proj`` 8x8, ``head`` 2x8) in ``out_dir/toy.safetensors``."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {
        "proj.weight": torch.eye(DIM) + 0.1 * torch.randn(DIM, DIM, generator=g),
        "proj.bias": torch.zeros(DIM),
        "head.weight": torch.randn(2, DIM, generator=g),
        "head.bias": torch.zeros(2),
    }
    save_file(state, str(out_dir / WEIGHTS))
    return out_dir


def write_toy_site(root: Path, seed: int, n_train: int = 12, n_eval: int = 6) -> Path:
    """A site's data: points around a site-specific centre, labelled by a site-specific direction."""
    rng = np.random.default_rng(seed)
    centre, w = rng.normal(0, 2, DIM), rng.normal(0, 1, DIM)
    root.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.jsonl", n_train), ("eval.jsonl", n_eval)):
        x = centre + rng.normal(0, 1, (n, DIM))
        y = ((x - centre) @ w > 0).astype(int)
        rows = [{"x": [round(float(v), 6) for v in xi], "y": int(yi)} for xi, yi in zip(x, y, strict=True)]
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _model(path: str) -> Any:
    import torch
    from safetensors.torch import load_file

    class Toy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(DIM, DIM)
            self.head = torch.nn.Linear(DIM, 2)

        def forward(self, x: torch.Tensor, delta: torch.Tensor | None = None) -> torch.Tensor:
            w = self.proj.weight if delta is None else self.proj.weight + delta
            return self.head(torch.relu(torch.nn.functional.linear(x, w, self.proj.bias)))

    model = Toy()
    model.load_state_dict(load_file(str(Path(path) / WEIGHTS)))
    model.requires_grad_(False)
    return model


def _read(path: Path) -> list[tuple[list[float], int]]:
    if not path.is_file():
        return []
    try:
        return [(row["x"], int(row["y"])) for row in map(json.loads, path.read_text().splitlines()) if row]
    except (ValueError, KeyError, TypeError) as exc:
        raise FamilyError(f"{path}: not toy data ({exc})") from None


class ToyFamily:
    name = "toy"
    metric = "accuracy"
    metric_title = "Accuracy"
    registry = RegistrySpec(subdir="toy", representation=REPRESENTATION)
    unit = "example"
    node_config_keys: tuple[str, ...] = ()
    supports_dp = False
    default_model = ""
    #: ``init_scale``: the std of the LoRA A factor at the start (a toy family's own request setting)
    option_keys: dict[str, tuple[type, ...]] = {"init_scale": (int, float)}
    commands = ""
    demo = ""

    def counts(self, site: SiteInputs) -> DataCounts:
        try:
            data, ok = self.load_data(site), True
        except (OSError, FamilyError):
            data, ok = SiteDataset([], [], []), False
        return DataCounts(data.groups, len(data.all), len(data.train), 0, len(data.eval), ok)

    def load_data(self, site: SiteInputs) -> SiteDataset:
        train, held = _read(site.data_path / "train.jsonl"), _read(site.data_path / "eval.jsonl")
        if not train and not held:
            raise FamilyError(f"{site.data_path}: no train.jsonl or eval.jsonl")
        return SiteDataset(train, held, [], [f"toy-{site.site}"])

    def examples_from(self, path: Path) -> list[Any]:
        return [x for name in ("train.jsonl", "eval.jsonl") for x, _ in _read(path / name)]

    def z_examples(self, data: SiteDataset, enrolment: bool) -> list[Any]:
        return [x for x, _ in data.all]

    def data_digest(self, examples: Sequence[Any]) -> str:
        return hashlib.sha256(json.dumps([list(x) for x in examples]).encode()).hexdigest()

    def describe(self, data: SiteDataset) -> dict[str, str]:
        return {"modality": "toy", "group": data.groups[0]}

    def z_states(self, site: SiteInputs) -> int:
        return 1

    def base_fingerprint(self, site: SiteInputs) -> str:
        return hashlib.sha256((Path(site.model_path) / WEIGHTS).read_bytes()).hexdigest()

    def peft_base(self, site: SiteInputs) -> str:
        return str(site.model_path)

    def load_base(self, site: SiteInputs) -> Base:
        return Base(_model(site.model_path), self.base_fingerprint(site))

    def to_compute(self, base: Base, dtype: str) -> str:
        return "float32"

    def registry_base(self, model: str) -> RegistryBase:
        fp = hashlib.sha256((Path(model) / WEIGHTS).read_bytes()).hexdigest()
        return RegistryBase(fp, {"proj": (DIM, DIM), "head": (2, DIM)}, DIM, str(model))

    def train_plan(self, config: Mapping[str, Any], dp: DPSettings | None) -> TrainPlan:
        options = {
            "r": int(config.get("lora_r", 2)),
            "alpha": float(config.get("lora_alpha", 4.0)),
            "init_scale": float((config.get("options") or {}).get("init_scale", 0.1)),
        }
        return TrainPlan(
            int(config.get("steps", 20)), float(config.get("lr", 0.1)), 0, int(config.get("seed", 0)), dp, options
        )

    def train(self, base: Base, site: SiteInputs, data: SiteDataset, plan: TrainPlan) -> TrainResult:
        import time

        import torch

        from common.adapters import LoraAdapter, LoraModule

        t0 = time.monotonic()
        g = torch.Generator().manual_seed(plan.seed)
        r, scale = plan.options["r"], plan.options["alpha"] / plan.options["r"]
        a = (plan.options["init_scale"] * torch.randn(r, DIM, generator=g)).requires_grad_()
        b = torch.zeros(DIM, r, requires_grad=True)
        x = torch.tensor([xi for xi, _ in data.train], dtype=torch.float32)
        y = torch.tensor([yi for _, yi in data.train])
        opt = torch.optim.SGD([a, b], lr=plan.lr)
        losses = []
        for _ in range(plan.steps):
            loss = torch.nn.functional.cross_entropy(base.model(x, scale * b @ a), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        adapter = LoraAdapter({"proj": LoraModule(a.detach(), b.detach(), scale)}, base_model=base.fingerprint)
        stats = {
            "steps": plan.steps,
            "lr": plan.lr,
            "batch_size": len(data.train),
            "max_length": 0,
            "seed": plan.seed,
            "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None,
            "seconds": round(time.monotonic() - t0, 3),
            "n_train": len(data.train),
        }
        return TrainResult(adapter, stats)

    def embed(self, base: Base, site: SiteInputs, examples: Sequence[Any], layer: int, clip_norm: float | None) -> Any:
        import torch

        from common.embedding import EmbeddingResult

        with torch.no_grad():
            vecs = base.model.proj(torch.tensor([list(x) for x in examples], dtype=torch.float32)).double().numpy()
        raw, n_clipped = vecs.copy(), 0
        if clip_norm is not None:
            norms = np.linalg.norm(vecs, axis=1)
            factor = np.minimum(1.0, clip_norm / np.maximum(norms, 1e-12))
            n_clipped = int((factor < 1.0).sum())
            vecs = vecs * factor[:, None]
        return EmbeddingResult(
            z=vecs.mean(axis=0).astype(np.float32),
            n_tokens=len(examples),
            n_examples=len(examples),
            layer=None,
            representation=REPRESENTATION,
            clip_norm=clip_norm,
            n_clipped=n_clipped,
            example_sums=raw,
        )

    def score(
        self, base: Base, site: SiteInputs, examples: Sequence[Any], adapters: Sequence[Any]
    ) -> list[dict[str, float]]:
        import torch

        from common.adapters import delta_dict

        x = torch.tensor([xi for xi, _ in examples], dtype=torch.float32)
        y = torch.tensor([yi for _, yi in examples])
        out = []
        with torch.no_grad():
            for adapter in adapters:
                delta = None if adapter is None else delta_dict(adapter).get("proj")
                pred = base.model(x, delta).argmax(dim=1)
                out.append({"accuracy": float((pred == y).float().mean()), "n": float(len(examples))})
        return out


FAMILY = ToyFamily()
