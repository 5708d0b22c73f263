"""DICOM in and out for the segmentation family: a series folder read with pydicom into a
:class:`~common.families.segmentation.volumes.Volume`, a mask written back as a DICOM-SEG with
highdicom that references the source instances, one frame per instance at its position.

A series is one folder of single-frame instances of one ``SeriesInstanceUID`` (files that are not
DICOM are skipped, named in the error if nothing is left). Instances are ordered by their position
along the slice normal, whatever their file names; the volume's voxel order is (column, row,
instance), its affine the DICOM geometry (LPS) turned into RAS+. Refused with the reason: several
series in one folder, enhanced multi-frame objects, mixed orientations or sizes, two instances at
one position, uneven slice spacing (the volume would be distorted).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from common.families.segmentation.volumes import MAX_VOXELS, Volume, VolumeError

MAX_INSTANCE_BYTES = 256 << 20
MAX_INSTANCES = 4096
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _looks_dicom(path: Path) -> bool:
    """A file with the DICOM preamble's ``DICM`` marker at byte 128."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def is_dicom_dir(path: Path) -> bool:
    """A folder holding at least one DICOM file directly in it."""
    try:
        return any(p.is_file() and _looks_dicom(p) for p in Path(path).iterdir())
    except OSError:
        return False


def _read_instance(path: Path, what: str) -> Any:
    import pydicom
    from pydicom.errors import InvalidDicomError

    from common.files.safeio import UnsafeInputError, read_regular_file

    try:
        raw = read_regular_file(path, MAX_INSTANCE_BYTES, what)
        return pydicom.dcmread(io.BytesIO(raw))
    except UnsafeInputError as exc:
        raise VolumeError(str(exc)) from None
    except (InvalidDicomError, ValueError, EOFError, OSError) as exc:
        raise VolumeError(f"{what} {path}: not a readable DICOM file ({exc})") from None


def _floats(ds: Any, key: str, n: int, path: Path) -> np.ndarray:
    value = getattr(ds, key, None)
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64) if value is not None else None
    except (TypeError, ValueError):
        arr = None
    if arr is None or arr.shape != (n,) or not np.isfinite(arr).all():
        raise VolumeError(f"DICOM {path}: {key} is missing or malformed; a series needs its geometry to be used")
    return arr


def read_dicom_series(folder: Path, what: str = "DICOM series") -> Volume:
    """The series in ``folder`` as a volume (Hounsfield units for CT: rescale slope and intercept applied)."""
    from pydicom.pixels import apply_rescale

    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and _looks_dicom(p))
    if not files:
        raise VolumeError(f"{what} {folder}: no DICOM files (with the DICM marker) in it")
    if len(files) > MAX_INSTANCES:
        raise VolumeError(f"{what} {folder}: {len(files)} files, more than {MAX_INSTANCES} instances; refused")
    items = [(p, _read_instance(p, "DICOM file")) for p in files]
    series = sorted({str(getattr(ds, "SeriesInstanceUID", "")) for _, ds in items})
    if len(series) > 1:
        raise VolumeError(
            f"{what} {folder}: {len(series)} series in one folder ({', '.join(series[:3])}...); "
            "put each series in its own folder"
        )
    for p, ds in items:
        if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
            raise VolumeError(f"{what} {folder}: {p.name} is a multi-frame object; only single-frame series are read")
        if "PixelData" not in ds:
            raise VolumeError(f"{what} {folder}: {p.name} has no pixel data")
    first_path, first = items[0]
    iop = _floats(first, "ImageOrientationPatient", 6, first_path)
    spacing = _floats(first, "PixelSpacing", 2, first_path)
    shape2 = (int(first.Rows), int(first.Columns))
    for p, ds in items:
        if not np.allclose(_floats(ds, "ImageOrientationPatient", 6, p), iop, atol=1e-4):
            raise VolumeError(f"{what} {folder}: {p.name} has another orientation than {first_path.name}")
        if (int(ds.Rows), int(ds.Columns)) != shape2 or not np.allclose(_floats(ds, "PixelSpacing", 2, p), spacing):
            raise VolumeError(f"{what} {folder}: {p.name} has another size or pixel spacing than {first_path.name}")
    row_cos, col_cos = iop[:3], iop[3:]
    normal = np.cross(row_cos, col_cos)
    positions = np.array([_floats(ds, "ImagePositionPatient", 3, p) for p, ds in items])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    items = [items[i] for i in order]
    positions, along = positions[order], along[order]
    if len(items) > 1:
        gaps = np.diff(along)
        if (gaps < 1e-3).any():
            i = int(np.argmin(gaps))
            raise VolumeError(
                f"{what} {folder}: {items[i][0].name} and {items[i + 1][0].name} lie at the same position; "
                "a folder must hold one series with one instance per slice"
            )
        if gaps.max() - gaps.min() > 0.01 * gaps.mean() + 1e-3:
            raise VolumeError(
                f"{what} {folder}: uneven slice spacing ({gaps.min():.3g} to {gaps.max():.3g} mm; a missing "
                "instance?); the series cannot be used as one volume"
            )
        step = (positions[-1] - positions[0]) / (len(items) - 1)
    else:
        step = normal * float(getattr(first, "SliceThickness", 1.0) or 1.0)
    if shape2[0] * shape2[1] * len(items) > MAX_VOXELS:
        raise VolumeError(f"{what} {folder}: more than {MAX_VOXELS} voxels; refused")
    planes = []
    for p, ds in items:
        try:
            px = apply_rescale(ds.pixel_array, ds).astype(np.float32)
        except Exception as exc:  # noqa: BLE001 - pixel decoders raise many types
            raise VolumeError(f"{what} {folder}: {p.name}: pixel data cannot be decoded ({exc})") from None
        planes.append(px.T)  # (column, row)
    data = np.stack(planes, axis=2)
    lps = np.eye(4)
    lps[:3, 0] = row_cos * spacing[1]  # along a row: the column index grows, by the column spacing
    lps[:3, 1] = col_cos * spacing[0]  # down a column: the row index grows, by the row spacing
    lps[:3, 2] = step
    lps[:3, 3] = positions[0]
    return Volume(
        data,
        _LPS_TO_RAS @ lps,
        Path(folder),
        "dicom",
        datasets=[ds for _, ds in items],
        modality=str(getattr(first, "Modality", "") or ""),
    )


def write_dicom_seg(image: Volume, mask: np.ndarray, out: Path, label: str = "object", version: str = "") -> Path:
    """A binary DICOM-SEG of ``mask`` (the volume's voxel order) over ``image``'s source instances:
    one frame per instance (empty ones kept), each referencing its instance, at its position."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    if image.kind != "dicom" or not image.datasets:
        raise VolumeError(f"{image.path}: a DICOM-SEG needs a DICOM series as its source")
    if mask.shape != image.data.shape:
        raise VolumeError(f"mask shape {mask.shape} differs from the series' {image.data.shape}")
    frames = np.ascontiguousarray(np.transpose(np.asarray(mask, dtype=np.uint8), (2, 1, 0)))  # (instance, row, col)
    algorithm = hd.AlgorithmIdentificationSequence(
        name="rpe segment", family=codes.cid7162.ArtificialIntelligence, version=version or "1"
    )
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=label[:64] or "object",
        segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Organ,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )
    seg = hd.seg.Segmentation(
        source_images=image.datasets,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=hd.UID(),
        series_number=int(getattr(image.datasets[0], "SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="rpe",
        manufacturer_model_name="rpe segment (LoRA on a SAM base)",
        software_versions=version or "1",
        device_serial_number="none",
        omit_empty_frames=False,
    )
    seg.save_as(str(out))
    return out
