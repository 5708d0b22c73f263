"""Evaluation: in-place ΔW equals PEFT's merged model, weights come back bit-exactly, greedy generation."""

from __future__ import annotations

import pytest
import torch

from common.adapters import LoraAdapter, LoraModule, save_peft_adapter
from common.families.report.data import Example
from common.families.report.evaluation import applied_delta, evaluate_task, generate
from common.families.report.task import TextReportTask
from common.models import load_base_model

PROMPTS = ["Findings: normal heart.", "Findings: a large mass in the right upper lobe with effusion.", "Hi"]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_base_model(tiny_model_dir)


def random_adapter(model, seed=0, names=("q_proj", "v_proj"), r=4, scale=2.0) -> LoraAdapter:
    gen = torch.Generator().manual_seed(seed)
    modules = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in names:
            a = torch.randn(r, mod.in_features, generator=gen) * 0.3
            b = torch.randn(mod.out_features, r, generator=gen) * 0.3
            modules[name] = LoraModule(A=a, B=b, scale=scale)
    return LoraAdapter(modules=modules)


def logits(model) -> torch.Tensor:
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 100, 200, 300]])
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft calls a transformers API deprecated in v5
def test_applied_delta_matches_peft_merged(tiny, tiny_model_dir, tmp_path) -> None:
    from peft import PeftModel

    model, _ = tiny
    adapter = random_adapter(model)
    save_peft_adapter(adapter, tmp_path / "adapter", str(tiny_model_dir))
    reference_base, _ = load_base_model(tiny_model_dir)
    peft_model = PeftModel.from_pretrained(reference_base, str(tmp_path / "adapter"))
    unmerged = logits(peft_model)
    merged = logits(peft_model.merge_and_unload())
    base = logits(model)
    with applied_delta(model, adapter):
        ours = logits(model)
    assert not torch.allclose(base, ours, atol=1e-3)  # the adapter does something
    torch.testing.assert_close(ours, merged, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours, unmerged, atol=1e-4, rtol=1e-4)


def test_weights_restored_bit_exactly_even_on_error(tiny) -> None:
    model, _ = tiny
    state = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = random_adapter(model, seed=1)
    with applied_delta(model, adapter, weight=0.7):
        name = "model.layers.0.self_attn.q_proj.weight"
        assert not torch.equal(model.get_parameter(name), state[name])
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with pytest.raises(RuntimeError, match="boom"), applied_delta(model, adapter):
        raise RuntimeError("boom")
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_weight_scales_the_delta(tiny) -> None:
    model, _ = tiny
    adapter = random_adapter(model, seed=2)
    base = logits(model)
    with applied_delta(model, adapter, weight=0.0):
        assert torch.equal(logits(model), base)
    with applied_delta(model, None):
        assert torch.equal(logits(model), base)
    half = LoraAdapter({k: LoraModule(m.A, m.B, m.scale * 0.5) for k, m in adapter.modules.items()})
    with applied_delta(model, adapter, weight=0.5):
        a = logits(model)
    with applied_delta(model, half):
        b = logits(model)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_mismatched_adapter_rejected_before_any_change(tiny) -> None:
    model, _ = tiny
    state = {k: v.clone() for k, v in model.state_dict().items()}
    good = random_adapter(model, seed=3)
    wrong_shape = dict(good.modules)
    wrong_shape["model.layers.1.self_attn.v_proj"] = LoraModule(torch.zeros(2, 64), torch.zeros(99, 2), 1.0)
    with pytest.raises(ValueError, match="another base"), applied_delta(model, LoraAdapter(wrong_shape)):
        pass
    missing = dict(good.modules)
    missing["model.layers.9.self_attn.q_proj"] = good.modules["model.layers.0.self_attn.q_proj"]
    with pytest.raises(KeyError, match="layers.9"), applied_delta(model, LoraAdapter(missing)):
        pass
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_generate_greedy_deterministic_and_ordered(tiny) -> None:
    model, tok = tiny
    first = generate(model, tok, PROMPTS, max_new_tokens=4, batch_size=2)
    assert first == generate(model, tok, PROMPTS, max_new_tokens=4, batch_size=2)
    single = generate(model, tok, PROMPTS, max_new_tokens=4, batch_size=1)
    assert generate(model, tok, PROMPTS[::-1], max_new_tokens=4, batch_size=1) == single[::-1]
    assert all(len(tok(o, add_special_tokens=False)["input_ids"]) <= 6 for o in first)
    assert all("<|im_end|>" not in o for o in first)
    assert generate(model, tok, [], max_new_tokens=4) == []


def test_generate_stops_at_eos(tiny) -> None:
    model, tok = tiny
    calls = {"n": 0}

    def force_eos_from_third_step(module, inputs, output):
        calls["n"] += 1
        if calls["n"] >= 3:  # one LM-head call per decoding step: two free tokens, then eos
            output = output.clone()
            output[..., tok.eos_token_id] = 1e4
        return output

    free = generate(model, tok, PROMPTS, max_new_tokens=2, batch_size=3)
    handle = model.get_output_embeddings().register_forward_hook(force_eos_from_third_step)
    try:
        stopped = generate(model, tok, PROMPTS, max_new_tokens=10, batch_size=3)
    finally:
        handle.remove()
    assert stopped == free  # everything after the eos is cut, and the eos itself is not shown
    assert calls["n"] == 3  # generation stopped once every row had produced eos


def test_evaluate_task(tiny) -> None:
    model, tok = tiny
    task = TextReportTask(max_new_tokens=4)
    examples = [
        Example("Normal heart.", "No acute disease", "xray-chest", "1"),
        Example("Ring lesion.", "Abscess", "mr-head", "2"),
        Example("Unlabeled.", None, "mr-head", "3"),
    ]
    result = evaluate_task(model, tok, task, examples)
    assert result["n"] == 2 and len(result["predictions"]) == 2 and result["uids"] == ["1", "2"]
    assert 0.0 <= result["rouge_l"] <= 1.0 and result["seconds"] > 0
    with_adapter = evaluate_task(model, tok, task, examples, adapter=random_adapter(model, seed=4))
    assert with_adapter["n"] == 2
    with pytest.raises(ValueError, match="no labeled"):
        evaluate_task(model, tok, task, examples[2:])


def test_applied_delta_on_bf16_base(tiny_model_dir) -> None:
    model, _ = load_base_model(tiny_model_dir, dtype=torch.bfloat16)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = random_adapter(model, seed=5)
    name = "model.layers.1.self_attn.v_proj"
    with applied_delta(model, adapter):
        w = model.get_submodule(name).weight
        assert w.dtype == torch.bfloat16
        expected = (state[name + ".weight"].float() + adapter.modules[name].delta()).to(torch.bfloat16)
        assert torch.equal(w, expected)  # summed in float32, rounded once
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_evaluate_task_arms_equals_one_arm_at_a_time(tiny) -> None:
    """Several adapters (and the base) generated in one pass with per-row updates give each arm
    the predictions it gets alone with its update merged; the weights are never touched, and the
    hooks are gone afterwards."""
    from common.families.report.evaluation import evaluate_task_arms

    model, tok = tiny
    task = TextReportTask(max_new_tokens=6)
    examples = [
        Example(f"Finding number {i} " * (1 + i % 3), f"Impression {i}", "xray-chest", str(i)) for i in range(7)
    ]
    arms = [random_adapter(model, seed=5, scale=0.5), None, random_adapter(model, seed=6, names=("o_proj",), r=2)]
    before = logits(model)
    together = evaluate_task_arms(model, tok, task, examples, arms, batch_size=5)
    assert torch.equal(logits(model), before)
    assert not any(m._forward_hooks for m in model.modules())
    for arm, got in zip(arms, together, strict=True):
        alone = evaluate_task(model, tok, task, examples, adapter=arm)
        assert got["predictions"] == alone["predictions"] and got["rouge_l"] == alone["rouge_l"]
        assert got["uids"] == alone["uids"] and got["n"] == 7
    assert together[0]["predictions"] != together[1]["predictions"]  # the updates did act


def test_evaluate_task_arms_checks_every_adapter_first(tiny) -> None:
    from common.families.report.evaluation import evaluate_task_arms

    model, tok = tiny
    bad = LoraAdapter(modules={"model.layers.0.self_attn.q_proj": LoraModule(A=torch.zeros(2, 3), B=torch.zeros(3, 2))})
    examples = [Example("Normal heart.", "No acute disease", "xray-chest", "1")]
    with pytest.raises(ValueError, match="arm 1: adapter module 'model.layers.0.self_attn.q_proj'"):
        evaluate_task_arms(model, tok, TextReportTask(max_new_tokens=2), examples, [None, bad])
    nowhere = LoraAdapter(modules={"no.such": LoraModule(A=torch.zeros(2, 3), B=torch.zeros(3, 2))})
    with pytest.raises(KeyError, match="arm 0: adapter module 'no.such' is not a module"):
        evaluate_task_arms(model, tok, TextReportTask(max_new_tokens=2), examples, [nowhere])
    assert not any(m._forward_hooks for m in model.modules())
