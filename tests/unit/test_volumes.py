"""Issue 27 item 5 (images): a hospital's own NIfTI volumes and DICOM series, in and out.

A ``.nii.gz`` gave "cannot identify image file"; there was no DICOM in, no NIfTI or DICOM-SEG out,
and ``rpe segment --masks`` on the prostate slices (0 = prostate on disk) reported DICE 0.0063 with
no warning. These tests use the real TotalSegmentator volumes (CT in RAS, MR in LPS order) and the
tiny random SAM (fast); ``tests/integration/test_seg_volumes.py`` does the same with LiteMedSAM
after a federation enrolment. The DICOM series are written by the tests themselves with pydicom.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from support import make_tiny_sam
from support.seg import write_dicom_series

from common.adapters import LoraAdapter, LoraModule, load_peft_adapter, save_peft_adapter
from common.dataroot import dataset_dir
from common.families.base import CommandError
from common.families.segmentation import commands as seg_commands
from common.families.segmentation import volumes as V
from common.families.segmentation.dicomio import read_dicom_series
from common.families.segmentation.readers import read_volume

TS = dataset_dir("totalsegmentator-test")
LIVER = "5"  # TotalSegmentator's label of the liver, in both label maps
#: 64 x 64 x 6 crops around the liver (nibabel's slicer keeps the geometry): the fast loop's volumes
CROPS = {"ct": (slice(40, 104), slice(24, 88), slice(10, 16)), "mr": (slice(8, 72), slice(12, 76), slice(8, 14))}


def _crop(src: Path, dst: Path, key: str) -> Path:
    nib.save(nib.load(str(src)).slicer[CROPS[key]], str(dst))
    return dst


N_SLICES = 6


@pytest.fixture(scope="module")
def crops(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("crops")
    return {
        "ct": _crop(TS / "example_ct_sm.nii.gz", tmp / "ct.nii.gz", "ct"),
        "ct_seg": _crop(TS / "example_seg.nii.gz", tmp / "ct_seg.nii.gz", "ct"),
        "mr": _crop(TS / "example_mr_sm.nii.gz", tmp / "mr.nii.gz", "mr"),
    }


def _run(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="rpe")
    seg_commands.register(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    args.func(args)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
    """A random LoRA on the tiny SAM's decoder (strong enough to change masks)."""
    from common.families.segmentation import sam
    from common.families.segmentation.task import target_modules

    tmp = tmp_path_factory.mktemp("vol-adapter")
    base_dir = make_tiny_sam(tmp / "sam", seed=0)
    net = sam.load_sam(base_dir)
    g = torch.Generator().manual_seed(5)
    mods = {}
    for name in target_modules(net, ("decoder",))[:4]:
        lin = dict(net.named_modules())[name]
        mods[name] = LoraModule(
            0.5 * torch.randn(2, lin.in_features, generator=g), 0.5 * torch.randn(lin.out_features, 2, generator=g), 2.0
        )
    return save_peft_adapter(LoraAdapter(mods, base_model=str(base_dir)), tmp / "adapters" / "composed", str(base_dir))


# -- geometry --------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [TS / "example_ct_sm.nii.gz", TS / "example_mr_sm.nii.gz"])
def test_slice_views_are_exact_inverses_on_every_axis(path):
    vol = read_volume(path)
    ras = V.to_ras(vol.data, vol.affine)
    assert (V.from_ras(ras, vol.affine) == vol.data).all()
    assert np.allclose(V.ras_affine(vol.data.shape, vol.affine)[:3, :3], np.diag([3.0, 3.0, 3.0]))
    for axis in V.AXES:
        back = np.zeros_like(ras)
        for k in range(V.n_slices(ras, axis)):
            V.put_slice(back, axis, k, V.slice_view(ras, axis, k))
        assert (back == ras).all()
    # axial view of an RAS volume: anterior at the top, the patient's right on the image's left
    probe = np.zeros_like(ras)
    probe[-1, -1, 0] = 1  # most right, most anterior voxel
    assert V.slice_view(probe, "axial", 0)[0, 0] == 1


def test_windowing_presets_level_width_and_auto():
    hu = np.array([-1000.0, -160.0, 40.0, 240.0, 3000.0])
    assert V.window(hu, "ct-soft-tissue").tolist() == [0, 0, 128, 255, 255]
    assert V.window(hu, "40,400").tolist() == V.window(hu, "ct-soft-tissue").tolist()
    auto = V.window(np.arange(1000.0), "auto")
    assert auto.min() == 0 and auto.max() == 255
    for bad in ("40", "40,0", "lung", "a,b"):
        with pytest.raises(V.VolumeError, match="level,width"):
            V.parse_window(bad)


def test_mask_convention_and_the_mostly_foreground_warning():
    m = np.array([[0, 255], [255, 255]], np.uint8)
    assert V.Foreground.parse("nonzero")(m).sum() == 3
    assert V.Foreground.parse("0")(m).tolist() == [[True, False], [False, False]]
    assert V.Foreground.parse("5,6")(np.array([5, 6, 7])).tolist() == [True, True, False]
    assert not V.Foreground.parse("300,-1,2.5")(m).any()  # values a uint8 mask cannot hold match nothing
    assert V.Foreground.parse("2.5")(np.array([2.5, 2.0])).tolist() == [True, False]
    assert "--mask-foreground 0" in V.mostly_foreground(0.75, "m.png", V.Foreground.parse("nonzero"))
    assert V.mostly_foreground(0.3, "m.png", V.Foreground()) is None
    with pytest.raises(V.VolumeError, match="nonzero"):
        V.Foreground.parse("prostate")


# -- rpe segment: NIfTI in, NIfTI out, equal to the PNG path --------------------------------------


def test_rpe_segment_writes_a_nifti_in_the_volume_geometry_equal_to_the_png_path(crops, tmp_path, adapter_dir, capsys):
    MR = crops["mr"]
    vol_dir, png_dir = tmp_path / "vols", tmp_path / "pngs"
    vol_dir.mkdir()
    png_dir.mkdir()
    src = vol_dir / "mr1.nii.gz"
    src.write_bytes(MR.read_bytes())  # LPS-ordered: the mask must come back in the file's order
    _run(
        [
            "segment",
            "--adapter",
            str(adapter_dir),
            "--images",
            str(vol_dir),
            "--out",
            str(tmp_path / "o1"),
            "--quiet",
            "--png",
        ]
    )
    assert "wrote 1 masks" in capsys.readouterr().out
    out = nib.load(str(tmp_path / "o1" / "mr1_mask.nii.gz"))
    ref = nib.load(str(src))
    assert out.shape == ref.shape and np.array_equal(out.affine, ref.affine) and out.get_data_dtype() == np.uint8
    assert nib.aff2axcodes(out.affine) == ("L", "P", "S")
    got = np.asarray(out.dataobj)
    assert set(np.unique(got)) <= {0, 1} and got.any()
    row = json.loads((tmp_path / "o1" / "masks.jsonl").read_text())
    assert row["format"] == "nifti" and row["slices"] == N_SLICES

    # the PNG path: the same windowed axial views as PNG files, segmented one by one
    vol = read_volume(src)
    ras = V.window(V.to_ras(vol.data, vol.affine), "auto")
    for k in range(ras.shape[2]):
        Image.fromarray(np.ascontiguousarray(V.slice_view(ras, "axial", k))).save(png_dir / f"s{k:02d}.png")
    _run(["segment", "--adapter", str(adapter_dir), "--images", str(png_dir), "--out", str(tmp_path / "o2"), "--quiet"])
    got_ras = V.to_ras(got, vol.affine)
    for k in range(ras.shape[2]):
        png_mask = np.array(Image.open(tmp_path / "o2" / f"s{k:02d}_mask.png")) > 0
        assert (V.slice_view(got_ras, "axial", k).astype(bool) == png_mask).all(), k
        # --png: the volume's own slice masks, as the model saw them, are the same pixels
        slice_png = np.array(Image.open(tmp_path / "o1" / "mr1_slices" / f"axial-{k:04d}.png")) > 0
        assert (slice_png == png_mask).all(), k
    assert row["png"] == "mr1_slices"


def test_volume_dice_against_a_label_map_with_the_label_value(crops, tmp_path, adapter_dir):
    CT, CT_SEG = crops["ct"], crops["ct_seg"]
    vols, truth = tmp_path / "v", tmp_path / "t"
    vols.mkdir()
    truth.mkdir()
    (vols / "ct.nii.gz").write_bytes(CT.read_bytes())
    (truth / "ct.nii.gz").write_bytes(CT_SEG.read_bytes())
    s = seg_commands.segment_files(
        adapter_dir, [str(vols)], tmp_path / "o", truth=str(truth), mask_foreground=LIVER, window="ct-soft-tissue"
    )
    mask = np.asarray(nib.load(str(tmp_path / "o" / "ct_mask.nii.gz")).dataobj).astype(bool)
    liver = np.asarray(nib.load(str(CT_SEG)).dataobj) == 5
    expected = 2 * (mask & liver).sum() / (mask.sum() + liver.sum())
    assert s["dice"] == pytest.approx(expected, abs=1e-6) and s["warnings"] == []
    # the default (every non-zero label) on this crop is 54 % object: warned about, naming the file
    s = seg_commands.segment_files(adapter_dir, [str(vols)], tmp_path / "o", truth=str(truth), force=True)
    assert len(s["warnings"]) == 1 and "ct.nii.gz" in s["warnings"][0] and "53.6 %" in s["warnings"][0]


# -- DICOM in, DICOM-SEG out -------------------------------------------------------------------------


def test_a_dicom_series_reads_back_as_its_nifti_volume_and_segments_to_a_dicom_seg(crops, tmp_path, adapter_dir):
    CT = crops["ct"]
    series = tmp_path / "series" / "ct-abdomen"
    write_dicom_series(CT, series)
    vol, nii = read_dicom_series(series), read_volume(CT)
    assert vol.kind == "dicom" and vol.modality == "CT" and len(vol.datasets) == N_SLICES
    assert np.array_equal(vol.data, nii.data.astype(np.float32)) and np.allclose(vol.affine, nii.affine)

    out = tmp_path / "out"
    s = seg_commands.segment_files(adapter_dir, [str(series)], out, window="ct-soft-tissue")
    assert s["n"] == 1
    seg = pydicom.dcmread(out / "ct-abdomen_seg.dcm")
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY" and int(seg.NumberOfFrames) == N_SLICES
    assert seg.FrameOfReferenceUID == vol.datasets[0].FrameOfReferenceUID
    referenced = {r.ReferencedSOPInstanceUID for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {ds.SOPInstanceUID for ds in vol.datasets}
    frames = seg.pixel_array  # (frame, row, col)
    # the same volume as NIfTI: its mask, in the series' voxel order, frame by frame
    (tmp_path / "nii").mkdir()
    (tmp_path / "nii" / "ct.nii.gz").write_bytes(CT.read_bytes())
    seg_commands.segment_files(adapter_dir, [str(tmp_path / "nii")], tmp_path / "out2", window="ct-soft-tissue")
    nii_mask = np.asarray(nib.load(str(tmp_path / "out2" / "ct_mask.nii.gz")).dataobj)
    assert nii_mask.any()
    by_uid = {ds.SOPInstanceUID: (k, ds) for k, ds in enumerate(vol.datasets)}
    for i, fg in enumerate(seg.PerFrameFunctionalGroupsSequence):
        uid = fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k, ds = by_uid[uid]
        assert np.allclose(fg.PlanePositionSequence[0].ImagePositionPatient, ds.ImagePositionPatient)
        assert (frames[i] == nii_mask[:, :, k].T).all(), k


def _copy_series(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> Path:
    dst.mkdir(parents=True)
    for p in sorted(src.iterdir()):
        if p.name not in skip:
            (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_damaged_dicom_series_are_refused_with_the_reason(crops, tmp_path):
    MR = crops["mr"]
    good = tmp_path / "good"
    write_dicom_series(MR, good, modality="MR")
    by_pos = sorted(good.iterdir(), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    gap = _copy_series(good, tmp_path / "gap", skip=(by_pos[2].name,))
    with pytest.raises(V.VolumeError, match="uneven slice spacing"):
        read_dicom_series(gap)
    two = _copy_series(good, tmp_path / "two")
    write_dicom_series(MR, tmp_path / "other", modality="MR", seed=1)
    for p in (tmp_path / "other").iterdir():
        (two / f"x{p.name}").write_bytes(p.read_bytes())
    with pytest.raises(V.VolumeError, match="2 series in one folder"):
        read_dicom_series(two)
    dup = _copy_series(good, tmp_path / "dup")
    ds = pydicom.dcmread(by_pos[3])
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(dup / "copy.dcm")
    with pytest.raises(V.VolumeError, match="same position"):
        read_dicom_series(dup)
    nogeo = _copy_series(good, tmp_path / "nogeo")
    ds = pydicom.dcmread(nogeo / by_pos[0].name)
    del ds.ImagePositionPatient
    ds.save_as(nogeo / by_pos[0].name)
    with pytest.raises(V.VolumeError, match="ImagePositionPatient is missing"):
        read_dicom_series(nogeo)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images")
    with pytest.raises(V.VolumeError, match="without DICOM files"):
        read_volume(tmp_path / "empty")


def test_unreadable_and_oversized_nifti_files_are_named(crops, tmp_path, monkeypatch):
    CT = crops["ct"]
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(V.VolumeError, match="bad.nii.gz"):
        read_volume(bad)
    (tmp_path / "junk.nii").write_bytes(b"\0" * 400)
    with pytest.raises(V.VolumeError, match="not a readable NIfTI"):
        read_volume(tmp_path / "junk.nii")
    monkeypatch.setattr(V, "MAX_VOXELS", 1000)
    with pytest.raises(V.VolumeError, match="more than 1000 voxels"):
        read_volume(CT)


# -- the mask convention on the project's own prostate slices -------------------------------------


def test_mask_foreground_0_gives_the_true_dice_on_inverted_prostate_masks_and_the_default_warns(
    tmp_path, adapter_dir, capsys
):
    from common.families.segmentation.data import load_prostate_site
    from common.families.segmentation.task import dice

    site_dir = dataset_dir("prostate-multisite") / "RUNMC" / "test"
    name = sorted(p.name for p in (site_dir / "image").iterdir())[0]
    images = tmp_path / "img"
    images.mkdir()
    (images / name).write_bytes((site_dir / "image" / name).read_bytes())
    truth = site_dir / "mask"  # as on disk: 0 = prostate, 255 = background
    true_mask = load_prostate_site("RUNMC").test_masks[0]

    _run(["segment", "--adapter", str(adapter_dir), "--images", str(images), "--out", str(tmp_path / "a"),
          "--masks", str(truth), "--json", "--quiet"])  # fmt: skip
    default = json.loads(capsys.readouterr().out)
    pred = np.array(Image.open(tmp_path / "a" / name.replace(".png", "_mask.png"))) > 0
    assert default["dice"] == pytest.approx(dice(pred, ~true_mask), abs=1e-6)
    assert len(default["warnings"]) == 1 and "--mask-foreground 0" in default["warnings"][0]

    _run(["segment", "--adapter", str(adapter_dir), "--images", str(images), "--out", str(tmp_path / "b"),
          "--masks", str(truth), "--mask-foreground", "0"])  # fmt: skip
    text = capsys.readouterr()
    assert "warning" not in text.out + text.err
    row = json.loads((tmp_path / "b" / "masks.jsonl").read_text())
    assert row["dice"] == pytest.approx(dice(pred, true_mask), abs=1e-6) and row["dice"] != default["dice"]
    assert row["reference_foreground"] < 0.5


# -- outputs are never overwritten silently; the other family's adapter is named ------------------


def test_existing_outputs_are_refused_without_force_and_nothing_changes(crops, tmp_path, adapter_dir):
    MR = crops["mr"]
    vols = tmp_path / "v"
    vols.mkdir()
    (vols / "mr.nii.gz").write_bytes(MR.read_bytes())
    out = tmp_path / "o"
    seg_commands.segment_files(adapter_dir, [str(vols)], out, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / "mr_mask.nii.gz").write_bytes(b"a mask made elsewhere")
    with pytest.raises(CommandError, match=r"already holds mr_mask\.nii\.gz and 1 more.*--force"):
        seg_commands.segment_files(adapter_dir, [str(vols)], out, progress=False)
    assert (out / "mr_mask.nii.gz").read_bytes() == b"a mask made elsewhere"
    assert (out / "masks.jsonl").read_bytes() == before["masks.jsonl"]
    seg_commands.segment_files(adapter_dir, [str(vols)], out, progress=False, force=True)
    assert (out / "mr_mask.nii.gz").read_bytes() == before["mr_mask.nii.gz"]
    # two inputs that would write one file
    (vols / "mr.nii").write_bytes(nib.load(str(MR)).to_bytes())
    with pytest.raises(CommandError, match="would both be written as mr_mask.nii.gz"):
        seg_commands.segment_files(adapter_dir, [str(vols)], tmp_path / "o2", progress=False)
    assert not (tmp_path / "o2").exists()


def test_a_report_adapter_is_refused_naming_rpe_generate(tmp_path):
    g = torch.Generator().manual_seed(1)
    mods = {
        "model.layers.0.self_attn.q_proj": LoraModule(
            torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g), 1.0
        )
    }
    adir = save_peft_adapter(LoraAdapter(mods), tmp_path / "report-adapter", "/models/some-llm")
    assert load_peft_adapter(adir).modules
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "x.png")
    with pytest.raises(CommandError, match=r"report adapter; use `rpe generate --adapter"):
        seg_commands.segment_files(adir, [str(tmp_path / "x.png")], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_references_that_are_missing_are_named_not_silently_left_out(tmp_path, adapter_dir):
    images, truth = tmp_path / "img", tmp_path / "truth"
    images.mkdir()
    truth.mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(np.full((32, 32), 90, np.uint8)).save(images / name)
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(truth / "a.png")
    s = seg_commands.segment_files(adapter_dir, [str(images)], tmp_path / "o", truth=str(truth), progress=False)
    assert s["warnings"] == [f"no reference mask b.png in {truth}: b.png is not scored"]
    with pytest.raises(CommandError, match="--masks .*nowhere is not a folder"):
        seg_commands.segment_files(adapter_dir, [str(images)], tmp_path / "o2", truth=str(tmp_path / "nowhere"))
    assert not (tmp_path / "o2").exists()
