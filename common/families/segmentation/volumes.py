"""A hospital's own volumes: NIfTI files and DICOM series in, slices for the 2-D model, masks back in
the volume's own geometry.

Read with nibabel (NIfTI) and pydicom (DICOM series, ``dicomio``); written with nibabel (NIfTI) and
highdicom (DICOM-SEG, ``dicomio``). Not MONAI's ``LoadImage``: it would add MONAI and its torch
coupling for two readers that are nibabel and pydicom underneath, and writing a mask back
voxel-for-voxel needs the file's own voxel order and affine (and, for DICOM-SEG, the source
instances themselves), which ``LoadImage`` reorients and resamples behind options.

- A **volume** (:class:`Volume`) is a 3-D array in the file's voxel order with its affine (voxel ->
  RAS+ millimetres, the NIfTI convention; DICOM's LPS is converted).
- A **slice** is cut along ``axial`` / ``coronal`` / ``sagittal`` (the voxel axis closest to S / A
  / R) and shown as a radiologist reads it (patient's right on the image's left, anterior or
  superior at the top); :func:`slice_view` and :func:`put_slice` are exact inverses, so a mask
  predicted on a view lands on the voxels it was predicted for.
- **Windowing** (:func:`window`) maps intensities to uint8: a preset (``ct-soft-tissue`` ...), a
  ``level,width`` pair, or ``auto`` (the volume's 0.5-99.5 percentiles, for MR).
- **Mask convention** (:class:`Foreground`): which value(s) of a label map or reference mask are the
  object: ``nonzero`` (default), one value (``0`` for masks stored inverted, ``5`` for one organ of
  a multi-organ map) or several (``5,6``). :data:`MOSTLY_FOREGROUND` is where a mask is suspicious.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: the largest volume file read and the most voxels decoded (a crafted header cannot claim more)
MAX_VOLUME_FILE_BYTES = 2 << 30
MAX_VOXELS = 1 << 28
#: a reference mask whose object covers more than this fraction of its pixels is warned about: the
#: convention is probably the other way round (e.g. 0 = object)
MOSTLY_FOREGROUND = 0.5
AXES = ("axial", "coronal", "sagittal")
_AXIS_IN_RAS = {"sagittal": 0, "coronal": 1, "axial": 2}
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "ct-soft-tissue": (40.0, 400.0),
    "ct-abdomen": (60.0, 400.0),
    "ct-liver": (80.0, 150.0),
    "ct-lung": (-600.0, 1500.0),
    "ct-bone": (400.0, 1800.0),
    "ct-brain": (40.0, 80.0),
}


class VolumeError(ValueError):
    """A volume, series or label map that cannot be used; the message names the file and what to do."""


# --------------------------------------------------------------------------------------------
# Volumes
# --------------------------------------------------------------------------------------------


@dataclass
class Volume:
    """A 3-D array in the file's voxel order, its affine (voxel -> RAS+ mm) and where it came from.

    ``kind`` is ``nifti`` or ``dicom``; ``datasets`` the DICOM instances in slice order (for a
    DICOM-SEG that references them); ``header`` the NIfTI header (copied into a written mask)."""

    data: np.ndarray
    affine: np.ndarray
    path: Path
    kind: str
    datasets: list[Any] = field(default_factory=list)
    header: Any = None
    modality: str = ""

    @property
    def name(self) -> str:
        return volume_stem(self.path)


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def volume_stem(path: Path) -> str:
    """``case1`` for ``case1.nii.gz``, ``case1.nii`` or a series folder ``case1/``."""
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_nifti(path: Path, what: str = "volume") -> Volume:
    """A NIfTI-1/2 file (gzipped or not) read in bounded memory: the file size, the decompressed size
    and the voxel count the header claims are checked before any voxel is decoded."""
    import nibabel as nib

    from common.files.safeio import UnsafeInputError, read_regular_file

    try:
        raw = read_regular_file(path, MAX_VOLUME_FILE_BYTES, what)
    except UnsafeInputError as exc:
        raise VolumeError(str(exc)) from None
    if raw[:2] == b"\x1f\x8b":
        dec = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            raw = dec.decompress(raw, MAX_VOLUME_FILE_BYTES)
        except zlib.error as exc:
            raise VolumeError(f"{what} {path}: not a readable gzip file ({exc})") from None
        if dec.unconsumed_tail:
            raise VolumeError(f"{what} {path}: decompresses to more than {MAX_VOLUME_FILE_BYTES} bytes; refused")
    img = None
    for cls in (nib.Nifti1Image, nib.Nifti2Image):
        try:
            img = cls.from_bytes(raw)
            break
        except Exception:  # noqa: BLE001 - nibabel raises several types for a foreign header
            continue
    if img is None:
        raise VolumeError(f"{what} {path}: not a readable NIfTI file")
    shape = tuple(int(s) for s in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3 or min(shape) < 1:
        raise VolumeError(f"{what} {path}: a {len(img.shape)}-D image of shape {img.shape}; expected one 3-D volume")
    if int(np.prod(shape, dtype=np.int64)) > MAX_VOXELS:
        raise VolumeError(f"{what} {path}: {shape} is more than {MAX_VOXELS} voxels; refused")
    try:
        data = np.asanyarray(img.dataobj).reshape(shape)
    except (ValueError, OSError, EOFError) as exc:
        raise VolumeError(f"{what} {path}: voxel data cannot be read ({exc})") from None
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise VolumeError(f"{what} {path}: its affine is singular or not finite; the file has no usable geometry")
    return Volume(np.asarray(data), affine, path, "nifti", header=img.header)


# --------------------------------------------------------------------------------------------
# Orientation: file voxel order <-> radiological slice views
# --------------------------------------------------------------------------------------------


def _ornt(affine: np.ndarray) -> np.ndarray:
    from nibabel.orientations import io_orientation

    return io_orientation(affine)


def to_ras(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """``data`` with its axes permuted and flipped to the closest RAS+ order (no resampling)."""
    from nibabel.orientations import apply_orientation

    return apply_orientation(data, _ornt(affine))


def from_ras(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The inverse of :func:`to_ras` for a volume of the file's geometry ``affine``."""
    from nibabel.orientations import apply_orientation, axcodes2ornt, ornt_transform

    return apply_orientation(data, ornt_transform(axcodes2ornt(("R", "A", "S")), _ornt(affine)))


def ras_affine(data_shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """The affine of ``to_ras(data)``."""
    from nibabel.orientations import inv_ornt_aff

    return affine @ inv_ornt_aff(_ornt(affine), data_shape)


def check_axis(axis: str) -> int:
    if axis not in _AXIS_IN_RAS:
        raise VolumeError(f"axis {axis!r}: use one of {', '.join(AXES)}")
    return _AXIS_IN_RAS[axis]


def n_slices(ras: np.ndarray, axis: str) -> int:
    return int(ras.shape[check_axis(axis)])


def slice_view(ras: np.ndarray, axis: str, k: int) -> np.ndarray:
    """Slice ``k`` of a RAS-ordered volume as a radiologist views it: rows anterior (or superior)
    first, columns from the patient's right (anterior for sagittal)."""
    s = np.take(ras, k, axis=check_axis(axis))
    return s.T[::-1, ::-1]


def put_slice(ras: np.ndarray, axis: str, k: int, view: np.ndarray) -> None:
    """Write ``view`` (a :func:`slice_view` of slice ``k``) back into ``ras`` in place."""
    idx: list[Any] = [slice(None)] * 3
    idx[check_axis(axis)] = k
    ras[tuple(idx)] = view[::-1, ::-1].T


# --------------------------------------------------------------------------------------------
# Windowing
# --------------------------------------------------------------------------------------------


def parse_window(spec: str) -> tuple[float, float] | None:
    """``(level, width)`` of a preset or ``"level,width"``; None for ``auto``."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return None
    if spec in WINDOW_PRESETS:
        return WINDOW_PRESETS[spec]
    parts = spec.split(",")
    try:
        level, width = (float(p) for p in parts) if len(parts) == 2 else (0.0, -1.0)
    except ValueError:
        level, width = 0.0, -1.0
    if not width > 0 or not np.isfinite(level):
        raise VolumeError(
            f"window {spec!r}: use 'auto', a preset ({', '.join(WINDOW_PRESETS)}) or 'level,width' "
            "with width > 0 (e.g. 40,400)"
        )
    return level, width


def window(data: np.ndarray, spec: str | tuple[float, float] | None) -> np.ndarray:
    """uint8 grey values: ``(value - (level - width/2)) / width`` clipped to [0, 1], times 255.
    ``auto`` (None) uses the volume's 0.5 and 99.5 percentiles as the window's ends."""
    lw = parse_window(spec) if isinstance(spec, str) or spec is None else spec
    arr = np.asarray(data, dtype=np.float32)
    if lw is None:
        finite = arr[np.isfinite(arr)]
        lo, hi = np.percentile(finite, [0.5, 99.5]) if finite.size else (0.0, 1.0)
        if hi <= lo:
            hi = lo + 1.0
    else:
        lo, hi = lw[0] - lw[1] / 2.0, lw[0] + lw[1] / 2.0
    out = np.clip((np.nan_to_num(arr, nan=lo) - lo) / (hi - lo), 0.0, 1.0)
    return np.round(out * 255.0).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Mask convention
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Foreground:
    """Which value(s) of a label map or reference mask are the object: ``nonzero`` or values."""

    values: tuple[float, ...] = ()

    @classmethod
    def parse(cls, spec: str | None) -> Foreground:
        spec = (spec or "nonzero").strip().lower()
        if spec == "nonzero":
            return cls(())
        try:
            values = tuple(float(v) for v in spec.split(",") if v.strip())
        except ValueError:
            values = ()
        if not values:
            raise VolumeError(
                f"mask foreground {spec!r}: use 'nonzero' or the value(s) that mark the object, "
                "e.g. 255, 0 (masks stored inverted) or 5,6 (labels of a label map)"
            )
        return cls(values)

    def __call__(self, mask: np.ndarray) -> np.ndarray:
        m = np.asarray(mask)
        if not self.values:
            return m != 0
        values = list(self.values)
        if m.dtype.kind in "iu":  # only values the mask's integer type can hold (300 in a uint8 mask: none)
            info = np.iinfo(m.dtype)
            values = [v for v in values if float(v).is_integer() and info.min <= v <= info.max]
            return np.isin(m, np.asarray(values, dtype=m.dtype))
        return np.isin(m, np.asarray(values, dtype=np.float64))

    def describe(self) -> str:
        if not self.values:
            return "object = every non-zero value"
        vals = ", ".join(f"{v:g}" for v in self.values)
        return f"object = value{'s' if len(self.values) > 1 else ''} {vals}, everything else background"


def mostly_foreground(fraction: float, where: str, fg: Foreground) -> str | None:
    """A warning when a reference mask is mostly object (likely an inverted convention), else None."""
    if fraction <= MOSTLY_FOREGROUND:
        return None
    if fg.values == (0.0,):
        fix = "--mask-foreground 255 (or nonzero)"
    else:
        fix = "--mask-foreground 0 for masks stored inverted, or the object's label value(s) (e.g. 5) of a label map"
    return (
        f"{where}: {100 * fraction:.1f} % of its pixels are the object ({fg.describe()}); a reference that is "
        f"mostly object usually means another convention: pass {fix} (node config seg-mask-foreground)"
    )


# --------------------------------------------------------------------------------------------
# Slices for the model
# --------------------------------------------------------------------------------------------


def select_slices(label_ras: np.ndarray | None, axis: str, mode: str, cap: int, n: int) -> list[int]:
    """Slice indices to use: ``label`` (where the label map's object is present) or ``all``,
    thinned to at most ``cap`` evenly spaced ones (``cap`` <= 0: no cap)."""
    if mode not in ("label", "all"):
        raise VolumeError(f"slice selection {mode!r}: use 'label' or 'all'")
    if mode == "all" or label_ras is None:
        idx = list(range(n))
    else:
        ax = check_axis(axis)
        present = label_ras.any(axis=tuple(a for a in range(3) if a != ax))
        idx = [int(i) for i in np.nonzero(present)[0]]
    if cap > 0 and len(idx) > cap:
        picks = np.unique(np.round(np.linspace(0, len(idx) - 1, cap)).astype(int))
        idx = [idx[i] for i in picks]
    return idx


@dataclass
class VolumeSlices:
    """The windowed slices of one volume (uint8 views), their indices, and the masks (bool views)
    when a label map was given."""

    name: str
    indices: list[int]
    images: list[np.ndarray]
    masks: list[np.ndarray]
    fraction: float = 0.0  # object fraction over the selected slices' pixels


def same_grid(a: Volume, b: Volume) -> str | None:
    """None when ``b`` lies voxel-for-voxel on ``a``'s grid (after reordering both to RAS), else why not."""
    sa, sb = to_ras(a.data, a.affine).shape, to_ras(b.data, b.affine).shape
    if sa != sb:
        return f"shape {sb} (RAS order) differs from the image's {sa}"
    aa, ab = ras_affine(a.data.shape, a.affine), ras_affine(b.data.shape, b.affine)
    if not np.allclose(aa, ab, atol=1e-2, rtol=1e-4):
        worst = float(np.abs(aa - ab).max())
        return f"affine differs from the image's by up to {worst:.3g} mm (another grid or a shifted origin)"
    return None


def volume_slices(
    image: Volume,
    label: Volume | None,
    fg: Foreground,
    axis: str = "axial",
    win: str = "auto",
    mode: str = "label",
    cap: int = 32,
) -> VolumeSlices:
    """The slices of ``image`` the model sees (and the label map's masks on them)."""
    ras = to_ras(image.data, image.affine)
    label_ras = None
    if label is not None:
        why = same_grid(image, label)
        if why:
            raise VolumeError(f"label map {label.path} does not fit image {image.path}: {why}")
        label_ras = fg(to_ras(label.data, label.affine))
    idx = select_slices(label_ras, axis, mode if label is not None else "all", cap, n_slices(ras, axis))
    windowed = window(ras, win)
    images = [np.ascontiguousarray(slice_view(windowed, axis, k)) for k in idx]
    masks = [np.ascontiguousarray(slice_view(label_ras, axis, k)) for k in idx] if label_ras is not None else []
    frac = float(np.mean([m.mean() for m in masks])) if masks else 0.0
    return VolumeSlices(image.name, idx, images, masks, frac)


def masks_to_volume(image: Volume, axis: str, indices: list[int], masks: list[np.ndarray]) -> np.ndarray:
    """uint8 0/1 in the image file's voxel order from masks predicted on :func:`slice_view` views."""
    ras = np.zeros(to_ras(image.data, image.affine).shape, dtype=np.uint8)
    for k, m in zip(indices, masks, strict=True):
        put_slice(ras, axis, k, np.asarray(m, dtype=np.uint8))
    return np.ascontiguousarray(from_ras(ras, image.affine))


def write_nifti_mask(image: Volume, mask: np.ndarray, out: Path) -> Path:
    """``mask`` (file voxel order) as a uint8 NIfTI with the image's affine and header geometry."""
    import nibabel as nib

    if mask.shape != image.data.shape:
        raise VolumeError(f"mask shape {mask.shape} differs from the volume's {image.data.shape}")
    header = image.header.copy() if type(image.header) is nib.Nifti1Header else None
    img = nib.Nifti1Image(np.asarray(mask, dtype=np.uint8), image.affine, header=header)
    img.set_data_dtype(np.uint8)
    img.header["scl_slope"], img.header["scl_inter"] = 1.0, 0.0
    if header is None:
        img.set_qform(image.affine, code=1)
        img.set_sform(image.affine, code=1)
    nib.save(img, str(out))
    return out
