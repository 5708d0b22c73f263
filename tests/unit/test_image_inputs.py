"""Issue 26 class 9 (image parts): images, masks and adapter configs a site reads come from outside.

A PNG decompression bomb (a few bytes that claim 10^10 pixels) was a traceback in ``rpe segment``;
the site's loader accepted a 20x20 mask for a 384x384 image; the segmentation commands and
``client/export.py`` parsed JSON with plain ``json.loads`` (a deep file: RecursionError)."""

from __future__ import annotations

import os
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from support import make_tiny_sam

from client import export as export_mod
from common.adapters import LoraAdapter, LoraModule, save_peft_adapter
from common.families.base import CommandError
from common.families.segmentation import commands as seg_commands
from common.families.segmentation import data as seg_data


def _png_header_only(path, width: int, height: int) -> None:
    """A tiny PNG whose header claims ``width`` x ``height`` grey pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


@pytest.fixture()
def adapter_dir(tmp_path):
    from common.families.segmentation import sam
    from common.families.segmentation.task import target_modules

    base_dir = make_tiny_sam(tmp_path / "sam", seed=0)
    net = sam.load_sam(base_dir)
    g = torch.Generator().manual_seed(5)
    mods = {}
    for name in target_modules(net, ("decoder",))[:2]:
        lin = dict(net.named_modules())[name]
        mods[name] = LoraModule(
            0.5 * torch.randn(2, lin.in_features, generator=g), 0.5 * torch.randn(lin.out_features, 2, generator=g), 2.0
        )
    return save_peft_adapter(LoraAdapter(mods, base_model=str(base_dir)), tmp_path / "adapters" / "a", str(base_dir))


def test_a_decompression_bomb_is_a_clear_error_in_rpe_segment_and_the_loaders(tmp_path, adapter_dir):
    bomb, big = tmp_path / "bomb.png", tmp_path / "big.png"
    _png_header_only(bomb, 100_000, 100_000)  # past Pillow's own guard: DecompressionBombError
    _png_header_only(big, 9_000, 9_000)  # under Pillow's guard, over ours
    for path in (bomb, big):
        with pytest.raises(CommandError, match=f"{path.name}.*(decompression bomb|more than the limit)"):
            seg_commands.segment_files(adapter_dir, [str(path)], tmp_path / "out")
        with pytest.raises(seg_data.ImageError, match=path.name):
            seg_data.read_images(path)
    assert not (tmp_path / "out" / "masks.jsonl").exists()
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    with pytest.raises(seg_data.ImageError, match="FIFO"):
        seg_data.open_image(fifo)


def _site_tree(root, image_size: int, mask_size: int, fundus: bool = False):
    for split in ("train", "test"):
        if fundus:
            base = root / seg_data.FUNDUS / "Domain1" / split / "ROIs"
        else:
            base = root / seg_data.PROSTATE / "RUNMC" / split
        (base / "image").mkdir(parents=True)
        (base / "mask").mkdir(parents=True)
        shape = (image_size, image_size, 3) if fundus else (image_size, image_size)
        Image.fromarray(np.full(shape, 90, np.uint8)).save(base / "image" / "a.png")
        Image.fromarray(np.full((mask_size, mask_size), 255, np.uint8)).save(base / "mask" / "a.png")


def test_a_mask_of_another_size_than_its_image_is_refused_naming_both(tmp_path):
    _site_tree(tmp_path / "ok", 48, 48)
    site = seg_data.load_prostate_site("RUNMC", tmp_path / "ok")
    assert site.train_images[0].shape == site.train_masks[0].shape == (48, 48)
    _site_tree(tmp_path / "bad", 384, 20)
    with pytest.raises(
        seg_data.ImageError, match=r"mask .*mask/a\.png is 20x20 but its image .*image/a\.png is 384x384"
    ):
        seg_data.load_prostate_site("RUNMC", tmp_path / "bad")
    _site_tree(tmp_path / "badf", 64, 20, fundus=True)
    with pytest.raises(seg_data.ImageError, match="20x20 but its image .* is 64x64"):
        seg_data.load_fundus_site("Domain1", "disc", tmp_path / "badf")


def test_the_site_family_names_the_bad_mask_instead_of_a_traceback(tmp_path):
    from common.families import get_family
    from common.families.base import FamilyError, SiteInputs

    _site_tree(tmp_path, 384, 20)
    inputs = SiteInputs(site="a", data_path=tmp_path, model_path="", work_dir=tmp_path, options={"seg-site": "RUNMC"})
    with pytest.raises(FamilyError, match="site 'a': mask .* is 20x20"):
        get_family("segmentation").load_data(inputs)


def test_segment_and_export_read_adapter_configs_through_the_bounded_reader(tmp_path, adapter_dir):
    deep = b"[" * 200_000 + b"]" * 200_000
    bad = tmp_path / "deep"
    bad.mkdir()
    (bad / "adapter_config.json").write_bytes(deep)
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "x.png")
    with pytest.raises(CommandError, match="nested deeper"):
        seg_commands.segment_files(bad, [str(tmp_path / "x.png")], tmp_path / "out")
    with pytest.raises(export_mod.ExportError, match="nested deeper"):
        export_mod.export_vllm(bad, tmp_path / "exported")
    with pytest.raises(export_mod.ExportError, match="nested deeper"):
        export_mod.check_dir(bad)
