"""``update-norm`` in the streamed composition (``compose_peft_dirs``, issue 28 item 2, H2 item 1).

The in-memory composition (``tests/unit/test_update_norm.py``) rescales each retrieved update
``δ_i = s·B·A`` (all modules together) to the median total Frobenius norm before weighting. The
streamed path must do the same, exactly: on both families' real models with stock-PEFT inputs that
differ in rank, alpha, rsLoRA, targets and dtype,

- the scales measured from the files (``peft_dirs_scaling``) are the in-memory ``norm_scaling`` of the
  loaded adapters, record for record (the same floats);
- ``compose_peft_dirs(..., update_norm="frobenius")`` writes the same bytes as
  ``save_peft_adapter(compose(loaded, scaling.apply(w)))``, and stock PEFT's merge of it is the hand
  merge ``θ0 + Σ w_i c_i s_i B_i A_i``; likewise with ``max_rank`` (the in-memory branch);
- ``none`` is today's composition; unknown values are refused before anything is written.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.adapters import (
    compose,
    compose_peft_dirs,
    delta_dict,
    load_peft_adapters,
    peft_dirs_scaling,
    save_peft_adapter,
)
from common.adapters.normalise import NormScaling, UpdateNormError, norm_scaling, update_norm

FILES = ("adapter_model.safetensors", "adapter_config.json")
WEIGHTS = (0.6, -0.25, 0.65)


def _fresh(family: str, tiny_model_dir: Path):
    if family == "report-text":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    from support import make_tiny_sam

    return make_tiny_sam(seed=0)


def _targets(family: str, model) -> tuple[list[str], list[str]]:
    """Two overlapping target lists of the family's real modules."""
    if family == "report-text":
        return ["q_proj", "v_proj"], ["q_proj", "k_proj", "o_proj"]
    from common.families.segmentation.task import target_modules

    names = target_modules(model, ("decoder",))
    return names[:4], names[2:7]


@pytest.fixture(scope="module", params=["report-text", "segmentation"])
def family_dirs(request, tiny_model_dir, tmp_path_factory):
    """(family, three stock-PEFT adapter dirs of the family's model, trained sizes 100x apart)."""
    from peft import LoraConfig, get_peft_model

    family = request.param
    root = tmp_path_factory.mktemp(f"stream-norm-{family}")
    first, second = _targets(family, _fresh(family, tiny_model_dir))
    specs = [
        (dict(r=2, lora_alpha=4, target_modules=first), torch.float32, 0.05),
        (dict(r=5, lora_alpha=3, use_rslora=True, target_modules=second), torch.bfloat16, 1.0),
        (dict(r=3, lora_alpha=12, target_modules=first), torch.float32, 4.0),
    ]
    dirs = []
    for i, (kw, dtype, size) in enumerate(specs):
        torch.manual_seed(100 + i)
        model = get_peft_model(
            _fresh(family, tiny_model_dir), LoraConfig(init_lora_weights=False, lora_dropout=0.0, **kw)
        )
        with torch.no_grad():  # heterogeneous update sizes, as sites trained with different steps / lr
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.mul_(size)
        model.to(dtype).save_pretrained(str(root / f"a{i}"))
        dirs.append(root / f"a{i}")
    return family, dirs


def _same_files(a: Path, b: Path) -> bool:
    return all((a / f).read_bytes() == (b / f).read_bytes() for f in FILES)


def test_streamed_scales_are_the_in_memory_scales(family_dirs):
    _, dirs = family_dirs
    loaded = load_peft_adapters(dirs)
    want = norm_scaling(loaded, "frobenius")
    got = peft_dirs_scaling(dirs, "frobenius")
    assert got.record() == want.record()  # the same floats, not merely close
    assert max(got.norms) / min(got.norms) > 20  # really heterogeneous
    assert [n * c for n, c in zip(got.norms, got.scales, strict=True)] == pytest.approx([got.reference] * 3)
    assert got.norms == [update_norm(a) for a in loaded]
    assert peft_dirs_scaling(dirs, " None").record() == {"mode": "none"}


@pytest.mark.parametrize("max_rank", [None, 3])
def test_streamed_normalised_composition_is_the_in_memory_one_and_the_hand_merge(
    family_dirs, tiny_model_dir, tmp_path, max_rank
):
    from peft import PeftModel

    family, dirs = family_dirs
    loaded = load_peft_adapters(dirs)
    scaling = norm_scaling(loaded, "frobenius")
    ref = save_peft_adapter(compose(loaded, scaling.apply(WEIGHTS), max_rank=max_rank), tmp_path / "ref", "tiny/base")
    kw = dict(max_rank=max_rank, base_model_name_or_path="tiny/base")
    got = compose_peft_dirs(dirs, WEIGHTS, tmp_path / "got", update_norm="frobenius", **kw)
    assert got == tmp_path / "got" and _same_files(ref, got)
    # a scaling measured beforehand (how a caller keeps it for its record) gives the same bytes
    again = compose_peft_dirs(dirs, WEIGHTS, tmp_path / "again", update_norm=peft_dirs_scaling(dirs), **kw)
    assert _same_files(ref, again)
    # none is the composition without scales, and differs from the normalised one
    plain = compose_peft_dirs(dirs, WEIGHTS, tmp_path / "plain", update_norm="none", **kw)
    default = compose_peft_dirs(dirs, WEIGHTS, tmp_path / "default", **kw)
    assert _same_files(plain, default) and not _same_files(plain, got)
    assert _same_files(
        plain, save_peft_adapter(compose(loaded, WEIGHTS, max_rank=max_rank), tmp_path / "r0", "tiny/base")
    )
    if max_rank is not None:
        return
    # stock PEFT's merge of the streamed output is θ0 + Σ w_i c_i s_i B_i A_i, computed by hand
    base = _fresh(family, tiny_model_dir)
    deltas = [delta_dict(a, torch.float64) for a in loaded]
    names = sorted({n for d in deltas for n in d})
    theta0 = {n: base.get_submodule(n).weight.detach().double().clone() for n in names}
    merged = PeftModel.from_pretrained(base, str(got)).merge_and_unload()
    for n in names:
        want = theta0[n] + sum(w * c * d[n] for w, c, d in zip(WEIGHTS, scaling.scales, deltas, strict=True) if n in d)
        torch.testing.assert_close(merged.get_submodule(n).weight.detach().double(), want, atol=2e-5, rtol=1e-5)


def test_unknown_values_are_refused_before_anything_is_written(family_dirs, tmp_path):
    _, dirs = family_dirs
    for bad in ("l2", "", "frobenius-module", None, 1):
        with pytest.raises(UpdateNormError, match="expected one of: none, frobenius"):
            compose_peft_dirs(dirs, WEIGHTS, tmp_path / "out", update_norm=bad)  # type: ignore[arg-type]
        with pytest.raises(UpdateNormError, match="expected one of: none, frobenius"):
            peft_dirs_scaling(dirs, bad)  # type: ignore[arg-type]
    with pytest.raises(UpdateNormError):
        compose_peft_dirs(dirs, WEIGHTS, tmp_path / "out", update_norm=NormScaling("l2", [1.0] * 3))
    with pytest.raises(ValueError, match="a scaling of 2 adapters given for 3 directories"):
        compose_peft_dirs(dirs, WEIGHTS, tmp_path / "out", update_norm=peft_dirs_scaling(dirs[:2]))
    with pytest.raises(UpdateNormError):
        compose_peft_dirs(dirs, WEIGHTS, tmp_path / "out", update_norm="l2", max_rank=3)
    assert list(tmp_path.iterdir()) == []
