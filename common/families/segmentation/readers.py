"""One entry point for a volume on disk: a NIfTI file (``volumes.read_nifti``) or a DICOM series
folder (``dicomio.read_dicom_series``); kept apart so that neither module imports the other."""

from __future__ import annotations

from pathlib import Path

from common.families.segmentation.dicomio import is_dicom_dir, read_dicom_series
from common.families.segmentation.volumes import Volume, VolumeError, is_nifti, read_nifti


def is_volume(path: Path) -> bool:
    """A NIfTI file or a folder holding a DICOM series."""
    return (path.is_file() and is_nifti(path)) or (path.is_dir() and is_dicom_dir(path))


def read_volume(path: Path, what: str = "volume") -> Volume:
    """The NIfTI file or DICOM series folder ``path``; ``VolumeError`` names what is wrong."""
    path = Path(path)
    if path.is_dir():
        if not is_dicom_dir(path):
            raise VolumeError(f"{what} {path}: a folder without DICOM files; expected one DICOM series per folder")
        return read_dicom_series(path, what)
    if not is_nifti(path):
        raise VolumeError(f"{what} {path}: not a volume; expected a .nii or .nii.gz file or a DICOM series folder")
    return read_nifti(path, what)
