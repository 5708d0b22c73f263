"""Issue 27 item 5 acceptance: "A site enrols from the NIfTI volumes of the shared TotalSegmentator
set, and ``rpe segment`` writes a NIfTI mask in the input's geometry", compared voxel by voxel with
the PNG path; and docs/DATA_IMAGES.md's commands, run as the guide writes them.

1. Two volume sites (the CT and the MR volume with their liver labels, ``seg-dataset = "volumes"``)
   enrol through the real ServerApp on the in-process grid with the real LiteMedSAM base (two
   training steps); the registry composes their adapters for the CT's z; ``rpe segment`` with the
   composition writes a NIfTI of the CT volume that equals, slice by slice, what ``rpe segment``
   writes for the same windowed slices given as PNG files.
2. The guide's ``rpe data check`` and ``rpe segment`` commands (``/srv/rpe`` mapped to a temporary
   folder; the adapter is a tiny random one) exit 0 and write what the guide says; run again, a
   segment command refuses to overwrite.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from support import make_tiny_sam
from support.doc_commands import section_commands
from support.grid import enrol_keys, flower_task_identity, run_server_app, site_context
from support.seg import SEG_RELEASE, seg_config, write_dicom_series

from common.dataroot import dataset_dir
from common.families.segmentation import commands as seg_commands
from common.families.segmentation import volumes as V
from common.families.segmentation.readers import read_volume

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "DATA_IMAGES.md"
TS = dataset_dir("totalsegmentator-test")
SITES = {
    "ct": ("example_ct_sm.nii.gz", "example_seg.nii.gz", "ct-soft-tissue"),
    "mr": ("example_mr_sm.nii.gz", "example_seg_mr.nii.gz", "auto"),
}


def _volume_site(root: Path, image: str, label: str) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "images" / image.replace("example_", "")).write_bytes((TS / image).read_bytes())
    (root / "labels" / image.replace("example_", "")).write_bytes((TS / label).read_bytes())
    return root


def test_volume_sites_enrol_on_litemedsam_and_a_composition_segments_a_volume_as_the_png_path(tmp_path):
    from server.allowlist import AllowList
    from server.composer import compose_for_target
    from server.registry import Registry

    registry = tmp_path / "registry"
    allow = AllowList(tmp_path / "allowlist.json")
    nodes = {}
    threads = torch.get_num_threads()
    with flower_task_identity():
        for i, (site, (image, label, window)) in enumerate(SITES.items(), start=301):
            nc = {
                "site-id": site,
                "model-path": "litemedsam",
                "site-dir": str(tmp_path / "sites" / site),
                "threads": 1,
                "task": "segmentation",
                "data-path": str(_volume_site(tmp_path / "data" / site, image, label)),
                "seg-dataset": "volumes",
                "seg-mask-foreground": "5",  # the liver in both TotalSegmentator label maps
                "seg-window": window,
                "seg-max-slices": "8",
                **SEG_RELEASE,
            }
            nodes[i] = site_context(i, enrol_keys(tmp_path, allow, registry, site, nc))
        rc = seg_config(
            registry, "litemedsam", mode="enroll", sites="ct,mr", steps=2, **{"lora-r": 4, "lora-alpha": 8.0}
        )
        report, _ = run_server_app(nodes, 41, {"allowlist": str(allow.path), **rc})
    torch.set_num_threads(threads)
    assert {s: r["status"] for s, r in report["enroll"].items()} == {"ct": "accepted", "mr": "accepted"}, report

    with Registry(registry / "segmentation", chroma="off") as reg:
        records = {r.meta.site: r for r in reg.list()}
        assert set(records) == {"ct", "mr"} and records["ct"].meta.modality == "image"
        z = reg.embeddings([records["ct"].id])[0]
        res = compose_for_target(reg, np.asarray(z, np.float32), strategy="avg", k=2, out_dir=tmp_path / "composed")
    assert len(res.ids) == 2

    # the NIfTI path
    vols = tmp_path / "new"
    vols.mkdir()
    (vols / "ct1.nii.gz").write_bytes((TS / "example_ct_sm.nii.gz").read_bytes())
    truth = tmp_path / "truth"
    truth.mkdir()
    (truth / "ct1.nii.gz").write_bytes((TS / "example_seg.nii.gz").read_bytes())
    s = seg_commands.segment_files(
        res.out_dir, [str(vols)], tmp_path / "out-nifti", truth=str(truth), mask_foreground="5", window="ct-soft-tissue"
    )
    assert s["warnings"] == [] and 0.0 <= s["dice"] <= 1.0
    out = nib.load(str(tmp_path / "out-nifti" / "ct1_mask.nii.gz"))
    src = nib.load(str(vols / "ct1.nii.gz"))
    assert out.shape == src.shape and np.array_equal(out.affine, src.affine)
    mask = np.asarray(out.dataobj)
    assert mask.any()

    # the PNG path: the same windowed axial slices as PNG files
    vol = read_volume(vols / "ct1.nii.gz")
    ras = V.window(V.to_ras(vol.data, vol.affine), "ct-soft-tissue")
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    for k in range(ras.shape[2]):
        Image.fromarray(np.ascontiguousarray(V.slice_view(ras, "axial", k))).save(pngs / f"k{k:02d}.png")
    seg_commands.segment_files(res.out_dir, [str(pngs)], tmp_path / "out-png", progress=False)
    mask_ras = V.to_ras(mask, vol.affine)
    for k in range(ras.shape[2]):
        png = np.array(Image.open(tmp_path / "out-png" / f"k{k:02d}_mask.png")) > 0
        assert (V.slice_view(mask_ras, "axial", k).astype(bool) == png).all(), k


def test_the_image_guides_commands_run_as_written(tmp_path, capsys):
    from common.adapters import LoraAdapter, LoraModule, save_peft_adapter
    from common.families.segmentation import sam
    from common.families.segmentation.task import target_modules
    from deploy.cli import main as rpe_main

    srv = tmp_path / "srv"
    _volume_site(srv / "volumes", "example_ct_sm.nii.gz", "example_seg.nii.gz")
    (srv / "new").mkdir()
    (srv / "new" / "ct1.nii.gz").write_bytes((TS / "example_ct_sm.nii.gz").read_bytes())
    write_dicom_series(TS / "example_ct_sm.nii.gz", srv / "new" / "series-ct1")
    base_dir = make_tiny_sam(tmp_path / "sam", seed=0)
    net = sam.load_sam(base_dir)
    g = torch.Generator().manual_seed(5)
    mods = {}
    for name in target_modules(net, ("decoder",))[:4]:
        lin = dict(net.named_modules())[name]
        mods[name] = LoraModule(
            0.5 * torch.randn(2, lin.in_features, generator=g), 0.5 * torch.randn(lin.out_features, 2, generator=g), 2.0
        )
    save_peft_adapter(LoraAdapter(mods), srv / "site" / "adapters" / "compose-7", str(base_dir))

    def rpe(cmd: str) -> tuple[int, str, str]:
        argv = shlex.split(cmd.replace("/srv/rpe", str(srv)))
        assert argv[0] == "rpe"
        try:
            rpe_main(argv[1:])
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        got = capsys.readouterr()
        return code, got.out, got.err

    checks = section_commands(GUIDE, "Check the folder")
    segments = section_commands(GUIDE, "Segment new images")
    assert len(checks) == 2 and len(segments) == 3
    code, out, err = rpe(checks[0])
    assert code == 0, out + err
    assert "object = value 5" in out and "images/ct_sm.nii.gz (NIfTI, 122x101x30 voxels of 3x3x3 mm)" in out
    code, out, err = rpe(checks[1])
    assert code == 0 and json.loads(out)["checks"][0]["used"]["train"] > 0, out + err
    for cmd in segments:
        code, out, err = rpe(cmd)
        assert code == 0, f"{cmd}\n{out}{err}"
    nii = nib.load(str(srv / "masks" / "ct1_mask.nii.gz"))
    assert np.array_equal(nii.affine, nib.load(str(srv / "new" / "ct1.nii.gz")).affine)
    import pydicom

    seg = pydicom.dcmread(srv / "masks-dicom" / "series-ct1_seg.dcm")
    assert seg.Modality == "SEG" and int(seg.NumberOfFrames) == 30
    row = json.loads((srv / "scored" / "masks.jsonl").read_text())
    assert row["mask"] == "ct_sm_mask.nii.gz" and "dice" in row and "warning" not in row
    # "Outputs that already exist in --out are refused before anything is loaded"
    code, out, err = rpe(segments[0])
    assert code != 0 and "refusing to overwrite" in out + err
