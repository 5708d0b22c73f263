"""The in-process two-family federation shared by several test files: two report sites (tiny
Llama) and two prostate sites (tiny random SAM, real slices) on the ONE in-process grid
(:mod:`support.grid`), enrolled into one registry directory.

Fixtures (``tests/conftest.py`` makes them visible to every test): ``tiny_sam_dir`` (module
scope) and ``local`` (module scope: the sites' Flower contexts, the registry and the allow-list).
``run_local(local, run_id, rc)`` runs the real ServerApp ``main`` once; its run report.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from server.allowlist import AllowList
from support import make_tiny_sam, write_site_data
from support.grid import enrol_keys, flower_task_identity, run_server_app, site_context

REPORT_SITES = {"a": "ct-head", "b": "mr-head"}
SEG_SITES = ("RUNMC", "BMC")
#: each prostate site holds 6 slices (3 train + 3 test): it loosens its release policy for them
SEG_RELEASE = {"z-min-examples": 5, "metrics-min-reports": 2}
REPORT_RELEASE = {"metrics-min-reports": 1}


def make_report_data(root: Path, n: int = 14, n_eval: int = 2) -> dict[str, Path]:
    return write_site_data(root, REPORT_SITES, n=n, n_eval=n_eval)


def seg_node_config(site: str) -> dict:
    from common.families.segmentation.data import PROSTATE, data_root

    return {"task": "segmentation", "seg-dataset": PROSTATE, "seg-site": site, "data-path": str(data_root())}


@pytest.fixture(scope="module")
def tiny_sam_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(make_tiny_sam(tmp_path_factory.mktemp("tiny-sam") / "sam", seed=0))


def seg_config(registry: Path, model: Path, **over) -> dict:
    cfg = {
        "registry-dir": str(registry),
        "base-model": str(model),
        "chroma": "off",
        "task": "segmentation",
        "steps": 3,
        "lora-r": 2,
        "lora-alpha": 4.0,
        "batch-size": 2,
        "lr": 2e-3,
    }
    cfg.update(over)
    return cfg


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tiny_sam_dir: Path):
    """Report sites a, b (nodes 101, 102) and prostate sites RUNMC, BMC (201, 202), keys enrolled.

    ``tests/integration/test_federation.py`` has its own ``local`` (three report sites), which
    overrides this one in that file."""
    import torch

    threads = torch.get_num_threads()
    tmp = tmp_path_factory.mktemp("seg-local")
    data = make_report_data(tmp / "data")
    nodes = {}
    registry = tmp / "registry"
    allow = AllowList(tmp / "allowlist.json")
    with flower_task_identity():
        for i, (site, path) in enumerate(sorted(data.items()), start=101):
            nc = {
                "site-id": site,
                "data-path": str(path),
                "model-path": str(tiny_model_dir),
                "site-dir": str(tmp / "sites" / site),
                "threads": 1,
                **REPORT_RELEASE,
            }
            nodes[i] = site_context(i, enrol_keys(tmp, allow, registry, site, nc))
        for i, site in enumerate(SEG_SITES, start=201):
            nc = {
                "site-id": site,
                "model-path": str(tiny_sam_dir),
                "site-dir": str(tmp / "sites" / site),
                "threads": 1,
                **seg_node_config(site),
                **SEG_RELEASE,
            }
            nodes[i] = site_context(i, enrol_keys(tmp, allow, registry, site, nc))
        yield {
            "tmp": tmp,
            "nodes": nodes,
            "registry": registry,
            "model": tiny_model_dir,
            "sam": tiny_sam_dir,
            "allowlist": allow.path,
        }
    torch.set_num_threads(threads)


def report_config(local: dict) -> dict:
    """The small report run config of the two-family federation (sites a and b, two training steps)."""
    return {
        "registry-dir": str(local["registry"]),
        "base-model": str(local["model"]),
        "chroma": "off",
        "steps": 2,
        "lora-r": 4,
        "lora-alpha": 8.0,
        "max-length": 128,
        "max-eval": 2,
        "sites": "a,b",
    }


def run_local(local: dict, run_id: int, rc: dict) -> dict:
    """One run of the real ServerApp over the sites of ``local`` (``rc`` names registry-dir and mode)."""
    report, _ = run_server_app(local["nodes"], run_id, {"allowlist": str(local["allowlist"]), **rc})
    return report


def write_dicom_series(volume_path: Path, out_dir: Path, modality: str = "CT", seed: int = 0) -> list[Path]:
    """A single-frame DICOM series of a NIfTI volume, written with pydicom: one instance per slice
    of the file's third axis, with the volume's geometry (LPS), int16 values stored with a rescale
    intercept of -1024, under shuffled file names (a reader must order instances by position)."""
    import nibabel as nib
    import numpy as np
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

    img = nib.load(str(volume_path))
    data = np.asarray(img.dataobj)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ img.affine
    col_step, row_step = lps[:3, 0], lps[:3, 1]
    row_cos, col_cos = col_step / np.linalg.norm(col_step), row_step / np.linalg.norm(row_step)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    out_dir.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(seed).permutation(data.shape[2])
    paths = []
    for k in range(data.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = out_dir / f"im{int(order[k]):04d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Volume", "rpe-test", "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", ""
        ds.ReferringPhysicianName, ds.SeriesNumber, ds.InstanceNumber = "", 3, k + 1
        ds.Modality, ds.Manufacturer, ds.PositionReferenceIndicator = modality, "rpe-tests", ""
        ds.ImageOrientationPatient = [float(v) for v in (*row_cos, *col_cos)]
        ds.ImagePositionPatient = [float(v) for v in (lps @ np.array([0.0, 0.0, k, 1.0]))[:3]]
        ds.PixelSpacing = [float(np.linalg.norm(row_step)), float(np.linalg.norm(col_step))]
        ds.SliceThickness = float(np.linalg.norm(lps[:3, 2]))
        ds.Rows, ds.Columns = data.shape[1], data.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.PixelData = (data[:, :, k].T.astype(np.int32) + 1024).astype(np.int16).tobytes()
        ds.save_as(str(path), enforce_file_format=True)
        paths.append(path)
    return paths
