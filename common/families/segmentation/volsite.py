"""A site's own volumes as the segmentation family's data (node config ``seg-dataset = "volumes"``).

Folder layout under the site's ``data-path`` (docs/DATA_IMAGES.md)::

    images/<case>.nii.gz   or  images/<case>/        (a DICOM series: one folder per series)
    labels/<case>.nii.gz                             (label map on the image's grid; optional)

or the same two folders under ``train/`` and ``test/`` to hold whole cases out for scoring. With the
flat layout the last ``seg-test-fraction`` of each volume's selected slices (a block at one end) is
held out. An image without a label map is unlabeled: used for z only.

Node-config keys (:data:`VOLUME_KEYS`): ``seg-mask-foreground`` (which label value(s) are the
object; ``nonzero`` by default), ``seg-window`` (``auto``, a preset or ``level,width``), ``seg-axis``
(``axial``, ``coronal``, ``sagittal``), ``seg-slices`` (``label``: slices where the object is
present; ``all``), ``seg-max-slices`` (a cap per volume, evenly spaced; 32), ``seg-test-fraction``
(0.25).

:func:`scan` reads the folder once and says what would be used, what is wrong and what is
suspicious; the family's loader and ``rpe data check`` both use it, so the check says exactly what
training will do.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.families.base import DataCheck
from common.families.segmentation.readers import read_volume
from common.families.segmentation.volumes import (
    AXES,
    Foreground,
    Volume,
    VolumeError,
    is_nifti,
    mostly_foreground,
    parse_window,
    volume_slices,
    volume_stem,
)

VOLUMES = "volumes"
VOLUME_KEYS = (
    "seg-mask-foreground",
    "seg-window",
    "seg-axis",
    "seg-slices",
    "seg-max-slices",
    "seg-test-fraction",
)


@dataclass(frozen=True)
class VolumeSettings:
    """The node-config keys of a volume site, checked."""

    fg: Foreground
    window: str = "auto"
    axis: str = "axial"
    slices: str = "label"
    cap: int = 32
    test_fraction: float = 0.25

    @classmethod
    def from_options(cls, get: Callable[[str, str], str]) -> VolumeSettings:
        try:
            fg = Foreground.parse(get("seg-mask-foreground", "nonzero"))
            win = get("seg-window", "auto")
            parse_window(win)
        except VolumeError as exc:
            raise VolumeError(f"node config: {exc}") from None
        axis, mode = get("seg-axis", "axial"), get("seg-slices", "label")
        if axis not in AXES:
            raise VolumeError(f"node config seg-axis={axis!r}: use one of {', '.join(AXES)}")
        if mode not in ("label", "all"):
            raise VolumeError(f"node config seg-slices={mode!r}: use 'label' or 'all'")
        try:
            cap, frac = int(get("seg-max-slices", "32")), float(get("seg-test-fraction", "0.25"))
        except ValueError:
            raise VolumeError(
                "node config seg-max-slices (an integer) or seg-test-fraction (a number) is malformed"
            ) from None
        if not 0.0 <= frac < 1.0:
            raise VolumeError(f"node config seg-test-fraction={frac}: use a fraction in [0, 1)")
        return cls(fg, win, axis, mode, cap, frac)

    def describe(self) -> str:
        lw = parse_window(self.window)
        win = (
            "auto (0.5-99.5 percentiles per volume)"
            if lw is None
            else f"{self.window} (level {lw[0]:g}, width {lw[1]:g})"
        )
        cap = f"at most {self.cap} per volume" if self.cap > 0 else "no cap"
        return (
            f"labels: {self.fg.describe()}; window {win}; {self.axis} slices; "
            f"slices: {'where the object is present' if self.slices == 'label' else 'all'}, {cap}"
        )


@dataclass
class VolumeScan:
    """What :func:`scan` found: the slices per split and the check's report."""

    train_images: list[np.ndarray]
    train_masks: list[np.ndarray]
    test_images: list[np.ndarray]
    test_masks: list[np.ndarray]
    unlabeled: list[np.ndarray]
    check: DataCheck
    modality: str = ""


def _entries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if (p.is_file() and is_nifti(p)) or p.is_dir())


def _label_for(labels: Path, stem: str) -> Path | None:
    for suffix in (".nii.gz", ".nii"):
        if (labels / f"{stem}{suffix}").is_file():
            return labels / f"{stem}{suffix}"
    return None


def _splits(root: Path, check: DataCheck) -> list[tuple[str, Path]]:
    if (root / "train").is_dir() or (root / "test").is_dir():
        return [(s, root / s) for s in ("train", "test") if (root / s).is_dir()]
    if (root / "images").is_dir():
        return [("all", root)]
    check.problems.append(
        f"{root}: no images/ folder (nor train/images/, test/images/); a volume site holds "
        "images/<case>.nii.gz or images/<case>/ (a DICOM series) and labels/<case>.nii.gz (docs/DATA_IMAGES.md)"
    )
    return []


def _describe(vol: Volume) -> str:
    kind = f"DICOM series of {len(vol.datasets)} instances" if vol.kind == "dicom" else "NIfTI"
    spacing = np.linalg.norm(vol.affine[:3, :3], axis=0)
    return f"{kind}, {'x'.join(map(str, vol.data.shape))} voxels of {'x'.join(f'{s:.3g}' for s in spacing)} mm"


def scan(root: Path, settings: VolumeSettings) -> VolumeScan:
    """Read a volume site folder: slices per split, and every problem and warning, each naming its file."""
    check = DataCheck("segmentation", str(root))
    out = VolumeScan([], [], [], [], [], check)
    check.lines.append(settings.describe())
    if not root.is_dir():
        check.problems.append(f"data path {root} is not a folder")
        return out
    for split, base in _splits(root, check):
        images, labels = base / "images", base / "labels"
        if not images.is_dir():
            check.problems.append(f"{images}: missing; put the {split} volumes there")
            continue
        entries = _entries(images)
        if not entries:
            check.problems.append(f"{images}: no volumes (.nii, .nii.gz or DICOM series folders)")
        stems = {volume_stem(p) for p in entries}
        if labels.is_dir():
            for lab in sorted(p for p in labels.iterdir() if p.is_file()):
                if not is_nifti(lab):
                    check.warnings.append(f"{lab}: not a NIfTI label map; ignored")
                elif volume_stem(lab) not in stems:
                    check.problems.append(
                        f"label map {lab} has no image {images}/{volume_stem(lab)}.nii.gz (or a series folder of "
                        "that name); rename one of them"
                    )
        for entry in entries:
            _scan_one(entry, _label_for(labels, volume_stem(entry)) if labels.is_dir() else None, split, settings, out)
    check.used = {"train": len(out.train_images), "eval": len(out.test_images), "unlabeled": len(out.unlabeled)}
    if not check.problems and not out.train_images and not out.unlabeled:
        check.problems.append(f"{root}: no slice would be used")
    return out


def _scan_one(entry: Path, label_path: Path | None, split: str, settings: VolumeSettings, out: VolumeScan) -> None:
    check = out.check
    try:
        image = read_volume(entry, "image")
        label = read_volume(label_path, "label map") if label_path is not None else None
    except VolumeError as exc:
        check.problems.append(str(exc))
        return
    out.modality = out.modality or image.modality
    try:
        vs = volume_slices(image, label, settings.fg, settings.axis, settings.window, settings.slices, settings.cap)
    except VolumeError as exc:
        check.problems.append(str(exc))
        return
    rel = f"{entry.parent.parent.name}/{entry.parent.name}/{entry.name}" if split != "all" else f"images/{entry.name}"
    if label is None:
        out.unlabeled += vs.images
        check.warnings.append(
            f"{rel}: no label map labels/{vs.name}.nii.gz: its {len(vs.images)} slices are used for z only"
        )
        check.lines.append(f"{rel} ({_describe(image)}): {len(vs.images)} unlabeled slices")
        return
    if not vs.indices:
        values = np.unique(np.asarray(label.data))
        shown = ", ".join(f"{v:g}" for v in values[:12]) + (" ..." if values.size > 12 else "")
        check.problems.append(
            f"label map {label_path}: no {settings.axis} slice holds the object ({settings.fg.describe()}); "
            f"its values are {shown}: set seg-mask-foreground to the object's value(s)"
        )
        return
    warn = mostly_foreground(vs.fraction, f"label map {label_path}", settings.fg)
    if warn:
        check.warnings.append(warn)
    n = len(vs.indices)
    if split == "all":
        n_test = math.ceil(settings.test_fraction * n) if n > 1 else 0
        n_train = n - n_test
        out.train_images += vs.images[:n_train]
        out.train_masks += vs.masks[:n_train]
        out.test_images += vs.images[n_train:]
        out.test_masks += vs.masks[n_train:]
        split_text = f"{n_train} train, {n_test} eval (the last {settings.test_fraction:g} of them)"
    elif split == "train":
        out.train_images += vs.images
        out.train_masks += vs.masks
        split_text = f"{n} train"
    else:
        out.test_images += vs.images
        out.test_masks += vs.masks
        split_text = f"{n} eval"
    check.lines.append(
        f"{rel} ({_describe(image)}) + {label_path.name if label_path else ''}: slices {vs.indices[0]}..{vs.indices[-1]} "
        f"({n} used, object {100 * vs.fraction:.1f} % of their pixels): {split_text}"
    )


COUNTS_CACHE = "seg-volume-counts.json"


def _fingerprint(root: Path, settings: VolumeSettings) -> str:
    """What the counts depend on: the settings and every file's path, size and mtime under ``root``."""
    import hashlib

    h = hashlib.sha256(repr(settings).encode())
    parts = [root / d for d in ("images", "labels", "train", "test")]  # the layout only, not a work dir in it
    files = sorted(p for d in parts if d.is_dir() for p in [d, *d.rglob("*")])
    for p in files:
        try:
            st = p.stat()
        except OSError:
            continue
        h.update(f"{p.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}|{p.is_dir()}\n".encode())
    return h.hexdigest()


def cached_counts(root: Path, settings: VolumeSettings, work_dir: Path) -> dict[str, int] | None:
    """The slices per split of a clean site (``scan``'s ``used``), or None when it has a problem.

    ``query.whoami`` asks every site for its counts in every run: reading and windowing every volume
    each time would take minutes at a site with many CTs, so the answer is kept in
    ``<work_dir>/seg-volume-counts.json`` keyed by the settings and every file's size and mtime
    (any change under ``root`` reads the folder again)."""
    import json
    import os

    key = _fingerprint(root, settings)
    path = work_dir / COUNTS_CACHE
    try:
        kept = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(kept, dict) and kept.get("key") == key:
            used = kept.get("used")
            return dict(used) if isinstance(used, dict) else None
    except (OSError, ValueError):
        pass
    check = scan(root, settings).check
    used = None if check.problems else dict(check.used)
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{COUNTS_CACHE}.{os.getpid()}")
        tmp.write_text(json.dumps({"key": key, "used": used}), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only work dir: counted again next time
    return used
