"""Multi-site segmentation data: real prostate MRI and fundus sites, augmentation, virtual scanners.

Data is read at run time from the data root (``$RPE_DATA_DIR``, else ``../shared/data`` beside the
checkout) and never copied into the repository. Each site has a ``train`` and a ``test`` split of
(image, binary mask) pairs; images stay uint8 as on disk.

- ``prostate-multisite``: six sites, grey 384x384 T2 slices; masks are inverted on disk
  (0 = prostate). Pairs are matched by file name, which drops the I2CVB/train off-by-one
  (images 00_01..03, masks 00_00..02: only 00_01 and 00_02 are used).
- ``fundus-multidomain``: four cameras, RGB 800x800 ROIs; optic disc = mask < 250, cup = mask < 64.

:func:`augment` makes training copies within a site (flips, small rotations and scales, intensity
jitter); test slices are never augmented. Simulated scanner sites, used only by the benchmarks,
are ``benchmarks/virtual_scanners.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.dataroot import data_root as _common_data_root
from common.dataroot import dataset_dir

PROSTATE = "prostate-multisite"
FUNDUS = "fundus-multidomain"
PROSTATE_SITES = ("RUNMC", "BMC", "I2CVB", "UCL", "BIDMC", "HK")
FUNDUS_SITES = ("Domain1", "Domain2", "Domain3", "Domain4")
FUNDUS_THRESHOLDS = {"disc": 250, "cup": 64}


class DataRootError(FileNotFoundError):
    """The data root or a dataset folder in it is missing."""


def data_root() -> Path:
    """The data root (``common.dataroot.data_root``: ``$RPE_DATA_DIR``, else ``../shared/data`` beside the checkout)."""
    root = _common_data_root()
    if not root.is_dir():
        raise DataRootError(
            f"data root {root} does not exist; set RPE_DATA_DIR to the folder that holds "
            f"{PROSTATE}/ and {FUNDUS}/ (they come unmodified from GitHub MQinghe/UST-RUN)"
        )
    return root


@dataclass
class SegSite:
    """One site's slices: ``images`` uint8 (H, W) or (H, W, 3), ``masks`` bool (H, W), per split."""

    name: str
    dataset: str
    train_images: list[np.ndarray]
    train_masks: list[np.ndarray]
    test_images: list[np.ndarray]
    test_masks: list[np.ndarray]
    simulated: bool = False
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def all_images(self) -> list[np.ndarray]:
        """Every image of the site (unlabelled use only: z needs no masks)."""
        return [*self.train_images, *self.test_images]


#: the largest image a site or ``rpe segment`` decodes (width x height) and the largest file it reads:
#: a PNG "decompression bomb" (a few KB that claim 10^5 x 10^5 pixels) is refused before decoding
MAX_IMAGE_PIXELS = 64 << 20
MAX_IMAGE_FILE_BYTES = 256 << 20


class ImageError(ValueError):
    """An image or mask file that cannot be used (unreadable, too large, of the wrong size)."""


def open_image(path: Path, what: str = "image", convert: bool = False) -> np.ndarray:
    """The pixels of image file ``path`` as a uint8 array, in bounded memory and time: a regular file
    of at most ``MAX_IMAGE_FILE_BYTES`` (``common.files.safeio``), whose header claims at most
    ``MAX_IMAGE_PIXELS`` pixels (checked before anything is decoded; Pillow's own bomb guard is
    turned into the same error). ``convert``: anything not grey or RGB becomes grey or RGB.
    ``ImageError`` (a ``ValueError``) names the file, what is wrong and the limit."""
    import io
    import warnings

    from PIL import Image, UnidentifiedImageError

    from common.files.safeio import UnsafeInputError, read_regular_file

    try:
        data = read_regular_file(path, MAX_IMAGE_FILE_BYTES, what)
    except UnsafeInputError as exc:
        raise ImageError(str(exc)) from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if w * h > MAX_IMAGE_PIXELS:
                    raise ImageError(
                        f"{what} {path}: {w}x{h} pixels, more than the limit of {MAX_IMAGE_PIXELS} "
                        "(a decompression bomb or not an image of this task); nothing was decoded"
                    )
                if convert and im.mode not in ("L", "RGB"):
                    return np.array(im.convert("RGB" if "A" in im.mode else "L"))
                return np.array(im)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{what} {path}: refused as a decompression bomb ({exc})") from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise ImageError(f"{what} {path}: not a readable image ({exc})") from None


def _read_png(path: Path, what: str = "image") -> np.ndarray:
    return open_image(path, what)


def _read_pairs(pairs: list[tuple[Path, Path]]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Images and masks of name-matched pairs; a mask whose size differs from its image's is refused
    (it would be trained and scored against the wrong pixels), naming both files and sizes."""
    imgs, masks = [], []
    for ipath, mpath in pairs:
        img, mask = _read_png(ipath, "image"), _read_png(mpath, "mask")
        if img.shape[:2] != mask.shape[:2]:
            raise ImageError(
                f"mask {mpath} is {mask.shape[1]}x{mask.shape[0]} but its image {ipath} is "
                f"{img.shape[1]}x{img.shape[0]}; a mask must have its image's size (fix or remove the pair)"
            )
        imgs.append(img)
        masks.append(mask)
    return imgs, masks


def _pairs(image_dir: Path, mask_dir: Path) -> list[tuple[Path, Path]]:
    if not image_dir.is_dir() or not mask_dir.is_dir():
        raise DataRootError(f"expected {image_dir} and {mask_dir}; is the data root right?")
    names = sorted({p.name for p in image_dir.glob("*.png")} & {p.name for p in mask_dir.glob("*.png")})
    if not names:
        raise DataRootError(f"no name-matched image/mask pairs in {image_dir} and {mask_dir}")
    return [(image_dir / n, mask_dir / n) for n in names]


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def read_images(path: Path) -> list[np.ndarray]:
    """The images in folder ``path`` (sorted by name; or the one image file ``path``), grey (H, W)
    or RGB (H, W, 3) uint8 as a site's slices are. ``ValueError`` names what is wrong."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    elif path.is_file():
        files = [path]
    else:
        raise ValueError(f"{path} does not exist; name a folder of images or one image file")
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {path}")
    out = []
    for f in files:
        arr = open_image(f, "image", convert=True)
        out.append(arr[..., :3] if arr.ndim == 3 else arr)
    return out


def load_prostate_site(site: str, root: Path | None = None) -> SegSite:
    """A prostate site; masks are inverted on disk (0 = prostate), pairs matched by name."""
    if site not in PROSTATE_SITES:
        raise KeyError(f"unknown prostate site {site!r}; sites: {', '.join(PROSTATE_SITES)}")
    base = (root / PROSTATE if root else dataset_dir(PROSTATE)) / site
    splits = {}
    for split in ("train", "test"):
        imgs, raw_masks = _read_pairs(_pairs(base / split / "image", base / split / "mask"))
        masks = [m < 128 for m in raw_masks]
        splits[split] = (
            [i if i.ndim == 2 else i[..., 0] for i in imgs],
            [m if m.ndim == 2 else m[..., 0] for m in masks],
        )
    return SegSite(site, PROSTATE, *splits["train"], *splits["test"])


def load_fundus_site(domain: str, structure: str = "disc", root: Path | None = None) -> SegSite:
    """A fundus domain; ``structure`` 'disc' (mask < 250) or 'cup' (mask < 64)."""
    if domain not in FUNDUS_SITES:
        raise KeyError(f"unknown fundus domain {domain!r}; domains: {', '.join(FUNDUS_SITES)}")
    if structure not in FUNDUS_THRESHOLDS:
        raise KeyError(f"unknown fundus structure {structure!r}; use 'disc' or 'cup'")
    base = (root / FUNDUS if root else dataset_dir(FUNDUS)) / domain
    splits = {}
    for split in ("train", "test"):
        imgs, masks = _read_pairs(_pairs(base / split / "ROIs" / "image", base / split / "ROIs" / "mask"))
        imgs = [i[..., :3] for i in imgs]
        masks = [(m if m.ndim == 2 else m[..., 0]) < FUNDUS_THRESHOLDS[structure] for m in masks]
        splits[split] = (imgs, masks)
    return SegSite(domain, f"{FUNDUS}:{structure}", *splits["train"], *splits["test"])


def load_sites(dataset: str, root: Path | None = None) -> list[SegSite]:
    """All real sites of ``prostate-multisite`` or ``fundus-multidomain[:disc|:cup]``."""
    if dataset == PROSTATE:
        return [load_prostate_site(s, root) for s in PROSTATE_SITES]
    name, _, structure = dataset.partition(":")
    if name == FUNDUS:
        return [load_fundus_site(d, structure or "disc", root) for d in FUNDUS_SITES]
    raise KeyError(f"unknown segmentation dataset {dataset!r}; use {PROSTATE!r} or {FUNDUS!r}[:disc|:cup]")


# --------------------------------------------------------------------------------------------
# Augmentation within a site (training only)
# --------------------------------------------------------------------------------------------


def _affine(arr: np.ndarray, angle_deg: float, scale: float, order: int) -> np.ndarray:
    from scipy.ndimage import affine_transform

    h, w = arr.shape[:2]
    a = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]) / scale
    centre = np.array([(h - 1) / 2, (w - 1) / 2])
    offset = centre - rot @ centre
    if arr.ndim == 2:
        return affine_transform(arr, rot, offset=offset, order=order, mode="nearest")
    return np.stack(
        [affine_transform(arr[..., c], rot, offset=offset, order=order, mode="nearest") for c in range(arr.shape[2])],
        axis=-1,
    )


def augment(
    image: np.ndarray,
    mask: np.ndarray,
    rng: np.random.Generator,
    max_angle: float = 10.0,
    scale_range: tuple[float, float] = (0.9, 1.1),
    gamma_range: tuple[float, float] = (0.8, 1.25),
) -> tuple[np.ndarray, np.ndarray]:
    """One random training copy: horizontal flip (p=0.5), rotation, scale, gamma and contrast jitter."""
    img = image.astype(np.float32)
    msk = mask.astype(np.float32)
    if rng.random() < 0.5:
        img, msk = img[:, ::-1], msk[:, ::-1]
    angle, scale = rng.uniform(-max_angle, max_angle), rng.uniform(*scale_range)
    img, msk = _affine(np.ascontiguousarray(img), angle, scale, 1), _affine(np.ascontiguousarray(msk), angle, scale, 0)
    gamma, contrast = rng.uniform(*gamma_range), rng.uniform(0.9, 1.1)
    img = 255.0 * (np.clip(img, 0, 255) / 255.0) ** gamma
    img = np.clip((img - img.mean()) * contrast + img.mean(), 0, 255)
    return img.astype(np.uint8), msk > 0.5


def augmented_train(site: SegSite, copies: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The site's training pairs plus ``copies`` augmented copies of each (test slices untouched)."""
    rng = np.random.default_rng(seed)
    images, masks = list(site.train_images), list(site.train_masks)
    for _ in range(copies):
        for img, msk in zip(site.train_images, site.train_masks, strict=True):
            a, b = augment(img, msk, rng)
            images.append(a)
            masks.append(b)
    return images, masks
