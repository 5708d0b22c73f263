"""The data root every task family reads its data sets from, and the error that names a missing set.

Third-party data sets may not be committed to this repository, so they are read at run time from a
*data root* outside the checkout: ``$RPE_DATA_DIR``, else ``../shared/data`` beside the checkout.
It lives here, not in one family, so that families stay independent of each other (the report
family and the segmentation family both read it; neither imports the other).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

DATA_DIR_ENV = "RPE_DATA_DIR"
#: the checkout: the parent of the directory holding ``common/``
REPO_ROOT = Path(__file__).resolve().parents[1]
#: the data root when ``$RPE_DATA_DIR`` is not set: ``shared/data`` beside the checkout
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"

#: where each data set comes from (its SOURCE.md origin, shortened), quoted when the set is missing
DATASET_ORIGINS: dict[str, str] = {
    "iu-xray": "Indiana University chest X-ray reports (Open-i, U.S. National Library of Medicine), copied "
    "unmodified from GitHub SaadSubhaniTheProgrammerVersion/Textual-Report-Generation-from-Chest-"
    "X-rays-Indiana-Dataset (commit 6b316b7c); files indiana_reports.csv, indiana_projections.csv",
    "medpix2": "MedPix 2.0 case reports (Siragusa et al., arXiv 2407.02994), copied unmodified from GitHub "
    "CHILab1/MedPix-2.0 (commit d3bc4315, folder MedPix-2-0/); files Case_topic.json, Descriptions.json",
    "prostate-multisite": "multi-site prostate MRI (BIDMC, BMC, HK, I2CVB, RUNMC, UCL), copied unmodified from "
    "GitHub MQinghe/UST-RUN",
    "fundus-multidomain": "multi-domain fundus images (DoFE, Wang et al., IEEE TMI 2020; Domain1-4), copied "
    "unmodified from GitHub MQinghe/UST-RUN, folder data/Fundus",
    "totalsegmentator-test": "TotalSegmentator test volumes, GitHub wasserth/TotalSegmentator, folder "
    "tests/reference_files/ (commit 0e65a448)",
}


class DatasetMissingError(FileNotFoundError):
    """A data set (or one of its files) is not in the data root: says where it was expected and where to get it."""

    def __init__(self, name: str, expected: Path, origin: str | None = None) -> None:
        self.name, self.expected, self.origin = name, expected, origin
        source = origin or "see the SOURCE.md that comes with the set"
        env = os.environ.get(DATA_DIR_ENV)
        root = f"${DATA_DIR_ENV}={env}" if env else f"${DATA_DIR_ENV} is not set, so the default {DEFAULT_DATA_DIR}"
        super().__init__(
            f"data set {name!r} not found: expected {expected} (data root: {root}). Put the set's folder "
            f"there unmodified, or set {DATA_DIR_ENV} to a folder holding {name}/. Source: {source}"
        )


def data_root() -> Path:
    """The folder holding every data set: ``$RPE_DATA_DIR``, else ``../shared/data`` beside the checkout.

    Relative paths in ``$RPE_DATA_DIR`` are taken from the current directory; the default is resolved
    from the repository root (not the current directory), so every entry point finds the same data.
    """
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env).expanduser() if env else DEFAULT_DATA_DIR


def dataset_dir(name: str, files: Sequence[str] = (), data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder of data set ``name`` in the data root (or in ``data_dir``), checked to exist.

    ``files`` (relative to the set's folder) must exist too. Raises :class:`DatasetMissingError`
    naming the folder expected, ``$RPE_DATA_DIR`` and the set's origin; fails before any work starts.
    """
    root = resolve_data_dir(data_dir)
    folder = root / name
    origin = DATASET_ORIGINS.get(name)
    if not folder.is_dir():
        raise DatasetMissingError(name, folder, origin)
    for rel in files:
        if not (folder / rel).exists():
            raise DatasetMissingError(name, folder / rel, origin)
    return folder


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The data root to use: the argument if given, else :func:`data_root`."""
    return Path(data_dir).expanduser() if data_dir is not None else data_root()
