"""The segmentation task family: LoRA on a frozen SAM-style model, site embedding z, DICE.

- **Adapter**: a plain PEFT LoRA on the mask decoder's attention projections (q/k/v/out) by
  default; ``targets=("decoder", "last-stage")`` adds the linears of the encoder's last stage,
  ``"neck"`` its convolutions (PEFT conv LoRA, which ``common.adapters.lora`` cannot compose yet). Trained
  with BCE + soft Dice on the site's (augmented) training slices. With decoder-only targets the
  frozen encoder's image embeddings are computed once and cached on disk per site, keyed by the
  model fingerprint and the image bytes, so training and evaluation never re-run the encoder.
- **z**: the spatial mean of the frozen encoder's feature map, averaged over a site's images
  (256-d for LiteMedSAM). With ``clip_norm`` each image's vector is L2-clipped first, so the
  Gaussian mechanism of ``common.privacy.ZMechanism`` applies with ``n_tokens = n_images``.
- **Prompts**: ``none``, ``center`` (a fixed centred box covering ``center_frac`` of each side)
  or ``jitter`` (the true box, each edge moved by up to ``jitter`` x the box size). The default is
  the weak ``center`` prompt: with the true box LiteMedSAM already scores DICE 0.78-0.95 and
  adaptation cannot show.
- **Score**: DICE per image (at the original resolution) and its mean per site; HD95 optional.
"""

from __future__ import annotations

import copy
import hashlib
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.adapters import LoraAdapter, delta_dict, load_peft_adapter
from common.embedding import EmbeddingResult
from common.families.segmentation import sam
from common.models import cache_dir

REPRESENTATION = "sam-encoder-mean"
ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "out_proj")
_CACHE_VERSION = "v1"


class SegmentationConfigError(ValueError):
    """A segmentation setting (prompt, targets, data) is not valid."""


@dataclass(frozen=True)
class PromptSpec:
    """How the box prompt is made: ``none``, ``center`` or ``jitter`` (see the module docstring)."""

    mode: str = "center"
    center_frac: float = 0.5
    jitter: float = 0.25

    def __post_init__(self) -> None:
        if self.mode not in ("none", "center", "jitter"):
            raise SegmentationConfigError(f"prompt mode {self.mode!r}; use 'none', 'center' or 'jitter'")


@dataclass(frozen=True)
class SegLoraSpec:
    """Which modules get a LoRA and of what rank."""

    rank: int = 4
    alpha: float = 8.0
    targets: tuple[str, ...] = ("decoder",)
    prompt: PromptSpec = field(default_factory=PromptSpec)
    batch_size: int = 2


def target_modules(model: nn.Module, targets: Sequence[str] = ("decoder",)) -> list[str]:
    """Exact module names for ``targets``: 'decoder' (attention q/k/v/out of the mask decoder's
    transformer), 'last-stage' (every linear of the encoder's last stage), 'neck' (its convs)."""
    names: list[str] = []
    last = f"image_encoder.layers.{len(model.image_encoder.layers) - 1}."
    for name, mod in model.named_modules():
        if (
            "decoder" in targets
            and name.startswith("mask_decoder.transformer.")
            and name.rsplit(".", 1)[-1] in ATTN_PROJ
            and isinstance(mod, nn.Linear)
        ):
            names.append(name)
        elif "last-stage" in targets and name.startswith(last) and isinstance(mod, nn.Linear):
            names.append(name)
        elif "neck" in targets and name.startswith("image_encoder.neck.") and isinstance(mod, nn.Conv2d):
            names.append(name)
    unknown = set(targets) - {"decoder", "last-stage", "neck"}
    if unknown or not names:
        raise SegmentationConfigError(f"targets {list(targets)} select no modules; use 'decoder', 'last-stage', 'neck'")
    return names


# --------------------------------------------------------------------------------------------
# Prompts and scores
# --------------------------------------------------------------------------------------------


def true_box(mask: np.ndarray) -> np.ndarray | None:
    """(x0, y0, x1, y1) in the mask's pixels, or None for an empty mask."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return None
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float64)


def make_boxes(
    masks: Sequence[np.ndarray], prompt: PromptSpec, rng: np.random.Generator | None = None
) -> torch.Tensor | None:
    """Box prompts ``[B, 4]`` in 256-pixel model coordinates (None for mode 'none').

    'jitter' needs the masks (a simulated user drawing a rough box); 'center' does not.
    """
    if prompt.mode == "none":
        return None
    size = sam.IMG_SIZE
    boxes = []
    for m in masks:
        if prompt.mode == "center":
            half = prompt.center_frac * size / 2
            boxes.append([size / 2 - half, size / 2 - half, size / 2 + half, size / 2 + half])
            continue
        h, w = m.shape
        box = true_box(m)
        if box is None:
            box = np.array([0, 0, w - 1, h - 1], dtype=np.float64)
        box = box * np.array([size / w, size / h, size / w, size / h])
        bw, bh = box[2] - box[0], box[3] - box[1]
        r = rng if rng is not None else np.random.default_rng(0)
        box = box + r.uniform(-prompt.jitter, prompt.jitter, 4) * np.array([bw, bh, bw, bh])
        x0, x1 = sorted(np.clip(box[[0, 2]], 0, size - 1))
        y0, y1 = sorted(np.clip(box[[1, 3]], 0, size - 1))
        boxes.append([x0, y0, x1, y1])
    return torch.tensor(boxes, dtype=torch.float32)


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """``2|P ∩ T| / (|P| + |T|)``; 1.0 when both are empty."""
    p, t = np.asarray(pred, bool), np.asarray(truth, bool)
    if p.shape != t.shape:
        raise ValueError(f"prediction {p.shape} and mask {t.shape} differ in shape")
    denom = p.sum() + t.sum()
    return 1.0 if denom == 0 else float(2.0 * np.logical_and(p, t).sum() / denom)


def hd95(pred: np.ndarray, truth: np.ndarray) -> float:
    """95th-percentile symmetric Hausdorff distance between mask surfaces, in pixels (inf if one is empty)."""
    from scipy.ndimage import binary_erosion, distance_transform_edt

    p, t = np.asarray(pred, bool), np.asarray(truth, bool)
    if not p.any() and not t.any():
        return 0.0
    if not p.any() or not t.any():
        return float("inf")
    sp, st = p & ~binary_erosion(p), t & ~binary_erosion(t)
    d_to_t, d_to_p = distance_transform_edt(~st), distance_transform_edt(~sp)
    return float(np.percentile(np.concatenate([d_to_t[sp], d_to_p[st]]), 95))


# --------------------------------------------------------------------------------------------
# Frozen embeddings, cached on disk by content
# --------------------------------------------------------------------------------------------


def _image_key(fp: str, image: np.ndarray) -> str:
    digest = hashlib.sha256(f"{_CACHE_VERSION}|{fp}|{image.dtype}|{image.shape}|".encode())
    digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()


def embeddings(
    model: nn.Module, images: Sequence[np.ndarray], site: str = "_", cache: Path | None = None
) -> torch.Tensor:
    """Frozen encoder embeddings ``[N, C, 64, 64]``, cached per site under ``cache`` (default
    ``~/.cache/rpe/seg-embeddings/<fingerprint>/<site>/<sha256 of image>.pt``)."""
    fp = sam.model_fingerprint(model)
    root = (cache or cache_dir() / "seg-embeddings") / fp.split(":")[-1][:16] / site
    keys = [_image_key(fp, im) for im in images]
    out: list[torch.Tensor | None] = []
    for k in keys:
        path = root / f"{k}.pt"
        out.append(torch.load(path, weights_only=True) if path.is_file() else None)
    todo = [i for i, t in enumerate(out) if t is None]
    if todo:
        fresh = sam.encode(model, torch.stack([sam.preprocess(images[i]) for i in todo]))
        root.mkdir(parents=True, exist_ok=True)
        for i, emb in zip(todo, fresh, strict=True):
            out[i] = emb.clone()
            tmp = root / f".{keys[i]}.tmp"
            torch.save(out[i], tmp)
            tmp.replace(root / f"{keys[i]}.pt")
    return torch.stack(out)  # type: ignore[arg-type]


def _mask_256(masks: Sequence[np.ndarray]) -> torch.Tensor:
    t = torch.stack([torch.from_numpy(np.asarray(m, np.float32)) for m in masks])[:, None]
    return (F.interpolate(t, size=(sam.IMG_SIZE, sam.IMG_SIZE), mode="nearest") > 0.5).float()


def _needs_encoder(names: Sequence[str]) -> bool:
    return any(n.startswith("image_encoder.") for n in names)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def seg_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits + soft Dice (1 - 2Σpt / (Σp + Σt)), averaged over the batch."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    inter = (p * target).sum(dim=(1, 2, 3))
    soft = 1.0 - (2.0 * inter + 1.0) / (p.sum(dim=(1, 2, 3)) + target.sum(dim=(1, 2, 3)) + 1.0)
    return bce + soft.mean()


def train_adapter(
    model: nn.Module,
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    spec: SegLoraSpec | None = None,
    steps: int = 30,
    lr: float = 2e-3,
    seed: int = 0,
    site: str = "_",
    cache: Path | None = None,
    out_dir: str | Path | None = None,
) -> tuple[LoraAdapter, dict[str, Any]]:
    """Train a LoRA with stock PEFT on a frozen copy of ``model``; return it and training stats.

    ``images``/``masks`` are the site's (augmented) training pairs. The adapter is saved with
    ``PeftModel.save_pretrained`` (to ``out_dir`` if given) and read back with
    ``common.adapters.lora.load_peft_adapter``, so what is returned is exactly the standard PEFT file.
    """
    from peft import LoraConfig, get_peft_model

    spec = spec or SegLoraSpec()
    if len(images) != len(masks) or not images:
        raise SegmentationConfigError(f"{len(images)} images and {len(masks)} masks: need matching, non-empty")
    t0 = time.perf_counter()
    names = target_modules(model, spec.targets)
    base_fp = sam.model_fingerprint(model)
    work = copy.deepcopy(model)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    config = LoraConfig(
        r=spec.rank, lora_alpha=spec.alpha, target_modules=names, lora_dropout=0.0, bias="none", init_lora_weights=True
    )
    peft_model = get_peft_model(work, config)
    inner = peft_model.base_model.model
    with_encoder = _needs_encoder(names)
    if with_encoder:
        inputs = torch.stack([sam.preprocess(im) for im in images])
    else:
        inputs = embeddings(model, images, site, cache)
    targets = _mask_256(masks)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    peft_model.train()
    for _ in range(steps):
        idx = rng.choice(len(images), size=min(spec.batch_size, len(images)), replace=False)
        boxes = make_boxes([masks[i] for i in idx], spec.prompt, rng)
        x = inputs[idx]
        emb = inner.image_encoder(x) if with_encoder else x
        loss = seg_loss(sam.decode(inner, emb, boxes), targets[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    peft_model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(out_dir) if out_dir is not None else Path(tmp) / "adapter"
        peft_model.save_pretrained(str(target))
        adapter = load_peft_adapter(target)
    adapter.base_model = base_fp
    stats = {
        "steps": steps,
        "lr": lr,
        "seed": seed,
        "n_train": len(images),
        "loss_first": losses[0] if losses else None,
        "loss_last": float(np.mean(losses[-5:])) if losses else None,
        "seconds": time.perf_counter() - t0,
        "targets": list(spec.targets),
        "rank": spec.rank,
        "prompt": spec.prompt.mode,
        "n_modules": len(names),
    }
    return adapter, stats


# --------------------------------------------------------------------------------------------
# Site embedding z
# --------------------------------------------------------------------------------------------


def site_embedding(
    model: nn.Module,
    images: Sequence[np.ndarray],
    clip_norm: float | None = None,
    site: str = "_",
    cache: Path | None = None,
) -> EmbeddingResult:
    """z = mean over images of the spatial mean of the frozen encoder map (per-image L2-clipped to
    ``clip_norm`` when given). ``n_tokens`` is the image count: one image is one privacy unit."""
    if not images:
        from common.embedding import EmptyDatasetError

        raise EmptyDatasetError(f"site {site!r} has no images to embed")
    vecs = embeddings(model, images, site, cache).mean(dim=(2, 3)).double().numpy()
    raw = vecs.copy()
    n_clipped = 0
    if clip_norm is not None:
        if not clip_norm > 0:
            raise SegmentationConfigError(f"clip_norm must be positive, got {clip_norm}")
        norms = np.linalg.norm(vecs, axis=1)
        factor = np.minimum(1.0, clip_norm / np.maximum(norms, 1e-12))
        n_clipped = int((factor < 1.0).sum())
        vecs = vecs * factor[:, None]
    z = vecs.mean(axis=0).astype(np.float32)
    return EmbeddingResult(
        z=z,
        n_tokens=len(images),
        n_examples=len(images),
        layer=None,
        representation=REPRESENTATION,
        clip_norm=clip_norm,
        n_clipped=n_clipped,
        example_sums=raw,
        example_tokens=np.ones(len(images), dtype=np.int64),
    )


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def with_adapter(model: nn.Module, adapter: LoraAdapter | None) -> nn.Module:
    """The base model with ``ΔW = Σ scale · B A`` merged in (exact; ``model`` is unchanged)."""
    return model if adapter is None else sam.merged_copy(model, delta_dict(adapter))


@torch.no_grad()
def predict(
    model: nn.Module,
    adapter: LoraAdapter | None,
    images: Sequence[np.ndarray],
    masks_for_prompt: Sequence[np.ndarray] | None,
    prompt: PromptSpec,
    site: str = "_",
    cache: Path | None = None,
    seed: int = 0,
    merged: nn.Module | None = None,
) -> list[np.ndarray]:
    """Binary masks at each image's own resolution (logits > 0, bilinear upsampling). ``merged``:
    ``with_adapter(model, adapter)`` made once by a caller that predicts image by image."""
    merged = merged if merged is not None else with_adapter(model, adapter)
    if adapter is not None and _needs_encoder(list(adapter.modules)):
        emb = sam.encode(merged, torch.stack([sam.preprocess(im) for im in images]))
    else:
        emb = embeddings(model, images, site, cache)
    ref = masks_for_prompt if masks_for_prompt is not None else [np.zeros(im.shape[:2], bool) for im in images]
    boxes = make_boxes(ref, prompt, np.random.default_rng(seed))
    logits = sam.decode(merged, emb, boxes)
    out = []
    for i, im in enumerate(images):
        up = F.interpolate(logits[i : i + 1], size=im.shape[:2], mode="bilinear", align_corners=False)
        out.append((up[0, 0] > 0).numpy())
    return out


def mask_digest(mask: np.ndarray) -> str:
    """sha256 of a binary mask's shape and packed bits: equal digests, identical masks."""
    m = np.ascontiguousarray(np.asarray(mask, dtype=bool))
    return hashlib.sha256(repr(m.shape).encode() + np.packbits(m).tobytes()).hexdigest()


def evaluate(
    model: nn.Module,
    adapter: LoraAdapter | None,
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    prompt: PromptSpec | None = None,
    site: str = "_",
    cache: Path | None = None,
    with_hd95: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """``{"dice": site mean, "dice_per_image": [...], "n": N}`` (+ ``hd95`` when asked)."""
    prompt = prompt or PromptSpec()
    preds = predict(model, adapter, images, masks, prompt, site, cache, seed)
    per = [dice(p, t) for p, t in zip(preds, masks, strict=True)]
    result: dict[str, Any] = {"dice": float(np.mean(per)), "dice_per_image": per, "n": len(per)}
    # what each slice's predicted mask is, as a digest (client/arms.py: identical outputs between arms)
    result["outputs"] = [mask_digest(p) for p in preds]
    if with_hd95:
        result["hd95"] = float(np.mean([hd95(p, t) for p, t in zip(preds, masks, strict=True)]))
    return result


@dataclass
class SegmentationTask:
    """The segmentation family behind a narrow API a site handler can call (cf. ``common.families.report.task.Task``)."""

    name: str = "segmentation"
    representation: str = REPRESENTATION
    spec: SegLoraSpec = field(default_factory=SegLoraSpec)
    augment_copies: int = 1
    cache: Path | None = None

    def train_adapter(
        self, model: nn.Module, site: Any, steps: int = 30, lr: float = 2e-3, seed: int = 0
    ) -> tuple[LoraAdapter, dict[str, Any]]:
        """Train on a :class:`common.families.segmentation.data.SegSite`'s training slices plus augmented copies."""
        from common.families.segmentation.data import augmented_train

        images, masks = augmented_train(site, self.augment_copies, seed)
        return train_adapter(model, images, masks, self.spec, steps, lr, seed, site.name, self.cache)

    def site_embedding(
        self, model: nn.Module, images: Sequence[np.ndarray], clip_norm: float | None = None, site: str = "_"
    ) -> EmbeddingResult:
        return site_embedding(model, images, clip_norm, site, self.cache)

    def evaluate(
        self, model: nn.Module, adapter: LoraAdapter | None, site: Any, with_hd95: bool = False
    ) -> dict[str, Any]:
        """DICE on the site's test slices."""
        return evaluate(
            model, adapter, site.test_images, site.test_masks, self.spec.prompt, site.name, self.cache, with_hd95
        )
