"""Segmentation family, the one test on the real LiteMedSAM (moved from ``tests/unit/test_segmentation.py``,
which keeps the tiny random SAM-shaped tests): ~30 s of CPU on two cores, so out of the fast loop."""

from __future__ import annotations

import pytest
import torch

from common.adapters import compose, save_peft_adapter
from common.families.segmentation import data as seg_data
from common.families.segmentation import sam
from common.families.segmentation import task as S

pytestmark = pytest.mark.integration


def _real_data_or_skip() -> None:
    try:
        root = seg_data.data_root()
    except seg_data.DataRootError:
        pytest.skip("no data root (set RPE_DATA_DIR)")
    if not (root / seg_data.PROSTATE).is_dir():
        pytest.skip("prostate-multisite not in the data root")


def test_real_litemedsam_lora_composed_from_three_sites_loads_in_stock_peft(tmp_path) -> None:
    from peft import PeftModel

    _real_data_or_skip()
    model = sam.load_sam(sam.LITEMEDSAM)
    assert model.rpe_fingerprint == sam.fingerprint(sam.LITEMEDSAM)
    sites = [seg_data.load_prostate_site(n) for n in ("RUNMC", "BIDMC", "HK")]
    adapters = []
    for s in sites:
        a, stats = S.train_adapter(
            model,
            s.train_images[:1],
            s.train_masks[:1],
            S.SegLoraSpec(batch_size=1),
            steps=2,
            lr=5e-3,
            site=s.name,
            cache=tmp_path,
        )
        adapters.append(a)
    composed = compose(adapters, [0.6, 0.8, -0.4])
    out = save_peft_adapter(composed, tmp_path / "composed", base_model_name_or_path=model.rpe_fingerprint)
    target = sites[0]
    emb = S.embeddings(model, target.test_images[:1], target.name, tmp_path)
    assert emb.shape == (1, 256, 64, 64)
    boxes = S.make_boxes(target.test_masks[:1], S.PromptSpec("center"))
    peft_model = PeftModel.from_pretrained(sam.load_sam(sam.LITEMEDSAM), str(out)).eval()
    with torch.no_grad():
        base = sam.decode(model, emb, boxes)
        got = sam.decode(peft_model.base_model.model, emb, boxes)
        want = sam.decode(S.with_adapter(model, composed), emb, boxes)
    assert (got - base).abs().max() > 1e-4  # the composed LoRA changes the logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
