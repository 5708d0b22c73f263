"""Issue 27 item 5: a volume site's folder (NIfTI / DICOM images, NIfTI label maps) as the
segmentation family reads it, and ``check_data`` (what ``rpe data check`` prints) on a clean folder
and on each kind of damage. No model is loaded: these read files only."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from support.seg import write_dicom_series

from common.dataroot import dataset_dir
from common.families import get_family
from common.families.base import FamilyError, SiteInputs

TS = dataset_dir("totalsegmentator-test")
CT, CT_SEG = TS / "example_ct_sm.nii.gz", TS / "example_seg.nii.gz"
MR, MR_SEG = TS / "example_mr_sm.nii.gz", TS / "example_seg_mr.nii.gz"
FAMILY = get_family("segmentation")


def _site(root: Path, **options: str) -> SiteInputs:
    opts = {"seg-dataset": "volumes", "seg-mask-foreground": "5", "seg-max-slices": "8", **options}
    return SiteInputs(site="h1", data_path=root, model_path="litemedsam", work_dir=root / "work", options=opts)


def _flat(root: Path, image: Path = CT, label: Path = CT_SEG, name: str = "ct") -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    (root / "images" / f"{name}.nii.gz").write_bytes(image.read_bytes())
    (root / "labels" / f"{name}.nii.gz").write_bytes(label.read_bytes())
    return root


def test_a_clean_flat_site_says_what_it_uses_and_loads_exactly_that(tmp_path):
    site = _site(_flat(tmp_path / "s"), **{"seg-window": "ct-soft-tissue"})
    check = FAMILY.check_data(site)
    assert check.ok and not check.warnings, (check.problems, check.warnings)
    assert check.used == {"train": 6, "eval": 2, "unlabeled": 0}
    text = "\n".join(check.lines)
    assert "object = value 5" in text and "ct-soft-tissue (level 40, width 400)" in text
    assert "images/ct.nii.gz (NIfTI, 122x101x30 voxels of 3x3x3 mm)" in text and "6 train, 2 eval" in text
    data = FAMILY.load_data(site)
    assert (len(data.train), len(data.eval), len(data.unlabeled)) == (6, 2, 0)
    image, mask = data.train[0]
    assert image.dtype == np.uint8 and mask.dtype == bool and image.shape == mask.shape == (101, 122)
    assert 0 < mask.mean() < 0.5
    counts = FAMILY.counts(site)
    assert counts.ok and (counts.n_labeled, counts.n_eval, counts.n_unlabeled) == (6, 2, 0)
    assert FAMILY.describe(data)["group"] == "volumes-h1"


def test_a_split_site_with_a_dicom_series_and_an_unlabeled_volume(tmp_path):
    root = tmp_path / "s"
    write_dicom_series(CT, root / "train" / "images" / "ct")  # a DICOM series with a NIfTI label map
    (root / "train" / "labels").mkdir(parents=True)
    (root / "train" / "labels" / "ct.nii.gz").write_bytes(CT_SEG.read_bytes())
    _flat(root / "test", MR, MR_SEG, "mr")
    (root / "train" / "images" / "extra.nii.gz").write_bytes(MR.read_bytes())  # no label map: z only
    site = _site(root, **{"seg-max-slices": "4"})
    check = FAMILY.check_data(site)
    assert check.ok, check.problems
    assert check.used == {"train": 4, "eval": 4, "unlabeled": 4}
    assert any("DICOM series of 30 instances" in line for line in check.lines)
    assert len(check.warnings) == 1 and "extra.nii.gz: no label map" in check.warnings[0]
    data = FAMILY.load_data(site)
    assert (len(data.train), len(data.eval), len(data.unlabeled)) == (4, 4, 4)
    assert FAMILY.describe(data)["modality"] == "ct"
    assert len(FAMILY.examples_from(root / "train" / "images")) == 30 + 20  # every slice of both


def _shifted(src: Path, dst: Path, shift: float = 9.0) -> Path:
    img = nib.load(str(src))
    aff = img.affine.copy()
    aff[0, 3] += shift
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), aff, img.header), str(dst))
    return dst


DAMAGE = {
    "label of another shape": (lambda r: nib.save(nib.load(str(CT_SEG)).slicer[:, :, :20], str(r / "labels" / "ct.nii.gz")), {}, r"labels/ct\.nii\.gz does not fit image .*images/ct\.nii\.gz: shape"),
    "label on a shifted grid": (lambda r: _shifted(CT_SEG, r / "labels" / "ct.nii.gz"), {}, "affine differs from the image's by up to 9 mm"),
    "label without an image": (lambda r: (r / "labels" / "liver2.nii.gz").write_bytes(CT_SEG.read_bytes()), {}, r"label map .*liver2\.nii\.gz has no image"),
    "object value absent": (lambda r: None, {"seg-mask-foreground": "200"}, r"no axial slice holds the object .*its values are 0, 1, 2"),
    "unreadable image": (lambda r: (r / "images" / "ct.nii.gz").write_bytes(b"\x1f\x8bjunk"), {}, r"image .*images/ct\.nii\.gz: not a readable gzip"),
    "bad axis key": (lambda r: None, {"seg-axis": "diagonal"}, "seg-axis='diagonal': use one of axial, coronal, sagittal"),
    "bad window key": (lambda r: None, {"seg-window": "lungs"}, "window 'lungs'"),
    "no images folder": (lambda r: __import__("shutil").rmtree(r / "images"), {}, "no images/ folder"),
}  # fmt: skip


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_each_kind_of_damage_is_a_problem_naming_the_file_and_the_loader_refuses(tmp_path, kind):
    damage, options, pattern = DAMAGE[kind]
    root = _flat(tmp_path / "s")
    damage(root)
    check = FAMILY.check_data(_site(root, **options))
    assert not check.ok
    assert any(__import__("re").search(pattern, p) for p in check.problems), check.problems
    with pytest.raises(FamilyError, match="site 'h1': "):
        FAMILY.load_data(_site(root, **options))
    assert not FAMILY.counts(_site(root, **options)).ok


def test_a_label_map_read_mostly_as_object_is_a_warning_not_a_problem(tmp_path):
    check = FAMILY.check_data(_site(_flat(tmp_path / "s"), **{"seg-mask-foreground": "0"}))
    assert check.ok
    assert len(check.warnings) == 1 and "labels/ct.nii.gz" in check.warnings[0]
    assert "% of its pixels are the object (object = value 0" in check.warnings[0]


def test_the_shared_prostate_site_checks_clean_with_its_inverted_convention_stated(tmp_path):
    from common.families.segmentation.data import data_root

    site = SiteInputs("RUNMC", data_root(), "litemedsam", tmp_path, {"seg-site": "RUNMC"})
    check = FAMILY.check_data(site)
    assert check.ok and not check.warnings
    assert check.used == {"train": 3, "eval": 3, "unlabeled": 0}
    assert "0 = prostate, 255 = background" in check.lines[0]
    bad = FAMILY.check_data(SiteInputs("X", data_root(), "litemedsam", tmp_path, {"seg-site": "NOPE"}))
    assert not bad.ok and "unknown prostate site 'NOPE'" in bad.problems[0]


def test_whoami_counts_are_kept_until_a_file_changes(tmp_path, monkeypatch):
    """``query.whoami`` asks for counts in every run: a site with many CTs must not re-read them each time."""
    from common.families.segmentation import volsite

    root = _flat(tmp_path / "s")
    site = _site(root)
    first = FAMILY.counts(site)
    assert first.ok and (first.n_labeled, first.n_eval) == (6, 2)
    assert (site.work_dir / volsite.COUNTS_CACHE).is_file()

    def no_reading(*args, **kwargs):
        raise AssertionError("read again")

    monkeypatch.setattr(volsite, "read_volume", no_reading)
    assert FAMILY.counts(site) == first
    (root / "images" / "more.nii.gz").write_bytes(MR.read_bytes())  # a change: counted again
    with pytest.raises(AssertionError, match="read again"):
        FAMILY.counts(site)
    monkeypatch.undo()
    again = FAMILY.counts(site)
    assert again.ok and again.n_unlabeled == 8 and again.n_labeled == 6
    assert FAMILY.counts(_site(root, **{"seg-max-slices": "4"})).n_labeled == 3  # other settings: other key
