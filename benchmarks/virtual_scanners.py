"""Virtual scanner sites for the segmentation benchmarks (simulated, never a site's real data).

:func:`make_virtual_site` applies a seeded scanner profile (bias field, gamma and contrast, Rician
noise, resolution loss, histogram matching to another real site) to a real site's slices; the
result is marked ``simulated`` and carries its profile. Used by ``benchmarks/seg_loo.py``
(``--virtual``); it lives here, not in ``common/``, because no site or coordinator runs it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from common.families.segmentation.data import SegSite


@dataclass(frozen=True)
class ScannerProfile:
    """Parameters of a simulated scanner; saved as JSON beside every result that uses it."""

    seed: int
    bias_strength: float  # peak relative gain change of the smooth bias field
    bias_cycles: float  # spatial frequency of the bias field (periods across the image)
    gamma: float
    contrast: float
    rician_sigma: float  # noise std in 8-bit units, Rician (magnitude of complex Gaussian)
    downsample: float  # resolution loss factor (1 = none)
    match_site: str | None  # real site whose intensity histogram the result is matched to
    simulated: bool = True

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def random_profile(seed: int, match_sites: tuple[str, ...] = ()) -> ScannerProfile:
    """A seeded random scanner profile (histogram matching to one of ``match_sites`` if given)."""
    rng = np.random.default_rng(seed)
    return ScannerProfile(
        seed=seed,
        bias_strength=float(rng.uniform(0.1, 0.4)),
        bias_cycles=float(rng.uniform(0.3, 1.0)),
        gamma=float(rng.uniform(0.6, 1.6)),
        contrast=float(rng.uniform(0.7, 1.3)),
        rician_sigma=float(rng.uniform(0.0, 8.0)),
        downsample=float(rng.choice([1.0, 1.5, 2.0, 3.0])),
        match_site=str(rng.choice(match_sites)) if match_sites else None,
    )


def _hist_match(img: np.ndarray, ref: np.ndarray) -> np.ndarray:
    src_vals, src_idx, src_counts = np.unique(img.ravel(), return_inverse=True, return_counts=True)
    ref_vals, ref_counts = np.unique(ref.ravel(), return_counts=True)
    src_q = np.cumsum(src_counts) / img.size
    ref_q = np.cumsum(ref_counts) / ref.size
    return np.interp(src_q, ref_q, ref_vals)[src_idx].reshape(img.shape)


def apply_profile(image: np.ndarray, profile: ScannerProfile, reference: list[np.ndarray] | None = None) -> np.ndarray:
    """``image`` as the simulated scanner would show it (deterministic given the profile)."""
    from scipy.ndimage import zoom

    rng = np.random.default_rng(profile.seed)
    img = image.astype(np.float64)
    h, w = img.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    phase = rng.uniform(0, 2 * np.pi, size=2)
    field_ = 1.0 + profile.bias_strength * np.sin(2 * np.pi * profile.bias_cycles * yy + phase[0]) * np.cos(
        2 * np.pi * profile.bias_cycles * xx + phase[1]
    )
    img = img * (field_ if img.ndim == 2 else field_[..., None])
    img = 255.0 * (np.clip(img, 0, 255) / 255.0) ** profile.gamma
    img = np.clip((img - img.mean()) * profile.contrast + img.mean(), 0, 255)
    if profile.downsample > 1.0:
        f = 1.0 / profile.downsample
        factors = (f, f) if img.ndim == 2 else (f, f, 1)
        small = zoom(img, factors, order=1)
        back = (h / small.shape[0], w / small.shape[1]) + (() if img.ndim == 2 else (1,))
        img = zoom(small, back, order=1)[:h, :w]
    if profile.rician_sigma > 0:
        n1, n2 = rng.normal(0, profile.rician_sigma, img.shape), rng.normal(0, profile.rician_sigma, img.shape)
        img = np.sqrt((img + n1) ** 2 + n2**2)
    if reference:
        ref = np.concatenate([r.astype(np.float64).ravel() for r in reference])
        img = _hist_match(np.clip(img, 0, 255).round(), ref)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_virtual_site(source: SegSite, profile: ScannerProfile, name: str, reference: SegSite | None = None) -> SegSite:
    """A simulated site: ``source``'s slices (masks unchanged) through the scanner ``profile``."""
    ref = reference.all_images if reference is not None else None

    def tf(images: list[np.ndarray]) -> list[np.ndarray]:
        return [apply_profile(im, profile, ref) for im in images]

    meta = {"profile": asdict(profile), "source_site": source.name}
    return SegSite(
        name,
        source.dataset,
        tf(source.train_images),
        list(source.train_masks),
        tf(source.test_images),
        list(source.test_masks),
        simulated=True,
        meta=meta,
    )


def save_profile(profile: ScannerProfile, path: str | os.PathLike[str]) -> Path:
    """Write the profile's JSON (parameters + ``simulated: true``)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(asdict(profile), indent=2, sort_keys=True) + "\n")
    return out
