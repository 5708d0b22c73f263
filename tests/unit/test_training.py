"""LoRA training on the tiny model: learns, masks the prompt, leaves the base model untouched."""

from __future__ import annotations

import random

import pytest
import torch

from common.adapters import LoraAdapter
from common.families.report.data import Example
from common.families.report.evaluation import applied_delta
from common.families.report.task import IGNORE_INDEX, TextReportTask
from common.families.report.training import (
    DPConfig,
    LoraSpec,
    _batches,
    causal_lm_target_loss,
    collate,
    train_lora,
)
from common.models import load_base_model

TARGETS = ["Acute stroke", "Glioblastoma", "Normal brain", "Subdural hematoma"]
EXAMPLES = [Example(f"Finding {i}: lesion {i}.", t, "ct-head", f"u{i}") for i, t in enumerate(TARGETS)] * 2
TASK = TextReportTask()


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_base_model(tiny_model_dir)


def data_loss(model, tok, examples=EXAMPLES) -> float:
    feats = TASK.training_features(tok, examples, 192)
    ids, labels, mask = collate(feats, tok.pad_token_id)
    with torch.no_grad():
        loss, _ = causal_lm_target_loss(model, ids, labels, mask)
    return float(loss)


def test_target_loss_equals_transformers_loss(tiny) -> None:
    model, tok = tiny
    feats = TASK.training_features(tok, EXAMPLES[:3], 192)
    ids, labels, mask = collate(feats, tok.pad_token_id)
    assert (labels[mask == 0] == IGNORE_INDEX).all()
    with torch.no_grad():
        ours, n = causal_lm_target_loss(model, ids, labels, mask)
        reference = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert n == int((labels[:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_loss_decreases_and_adapter_learns(tiny) -> None:
    model, tok = tiny
    before = data_loss(model, tok)
    adapter, stats = train_lora(model, tok, EXAMPLES, TASK, steps=20, lr=3e-2, progress=False)
    assert isinstance(adapter, LoraAdapter)
    names = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert sorted(adapter.modules) == names
    module = adapter.modules["model.layers.0.self_attn.q_proj"]
    assert module.A.shape == (8, 64) and module.B.shape == (64, 8) and module.scale == pytest.approx(2.0)
    assert stats["steps"] == 20 and len(stats["losses"]) == 20
    assert stats["final_loss"] < stats["first_loss"] - 0.1
    assert stats["tokens_seen"] > stats["target_tokens"] > 0 and stats["tokens_per_s"] > 0
    with applied_delta(model, adapter):
        after = data_loss(model, tok)
    assert after < before - 0.1


def test_base_model_unchanged(tiny) -> None:
    model, tok = tiny
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    modules = {k: type(m) for k, m in model.named_modules()}
    train_lora(model, tok, EXAMPLES, TASK, steps=3, lr=1e-2, progress=False)
    assert {k: type(m) for k, m in model.named_modules()} == modules  # LoRA layers unloaded
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
    assert not hasattr(model, "peft_config") and not model.training
    assert all(p.grad is None for p in model.parameters())


def test_cpu_training_runs_eager_attention_and_gives_the_model_back_as_it_was(tiny, monkeypatch) -> None:
    """On a CPU the LoRA steps run eager attention (PyTorch's CPU flash-attention backward was a
    third of a step) and the model's own implementation is back afterwards, also after a failure;
    the loss is the same function either way."""
    model, tok = tiny
    assert model.config._attn_implementation == "sdpa"
    seen = []
    real = causal_lm_target_loss

    def spy(m, *args):
        seen.append(m.config._attn_implementation)
        return real(m, *args)

    monkeypatch.setattr("common.families.report.training.causal_lm_target_loss", spy)
    train_lora(model, tok, EXAMPLES, TASK, steps=2, lr=1e-2, progress=False)
    assert seen == ["eager", "eager"] and model.config._attn_implementation == "sdpa"

    def boom(*args):
        raise RuntimeError("step failed")

    monkeypatch.setattr("common.families.report.training.causal_lm_target_loss", boom)
    with pytest.raises(RuntimeError, match="step failed"):
        train_lora(model, tok, EXAMPLES, TASK, steps=2, lr=1e-2, progress=False)
    assert model.config._attn_implementation == "sdpa"
    feats = TASK.training_features(tok, EXAMPLES[:3], 192)
    ids, labels, mask = collate(feats, tok.pad_token_id)
    with torch.no_grad():
        sdpa, _ = real(model, ids, labels, mask)
        model.set_attn_implementation("eager")
        try:
            eager, _ = real(model, ids, labels, mask)
        finally:
            model.set_attn_implementation("sdpa")
    torch.testing.assert_close(eager, sdpa, atol=1e-5, rtol=1e-5)


def test_deterministic_for_a_seed(tiny) -> None:
    model, tok = tiny
    torch.manual_seed(123)
    marker = torch.rand(1)
    torch.manual_seed(123)
    a, sa = train_lora(model, tok, EXAMPLES, TASK, steps=5, lr=1e-2, seed=7, progress=False)
    assert torch.equal(torch.rand(1), marker)  # the caller's RNG stream is not consumed
    b, sb = train_lora(model, tok, EXAMPLES, TASK, steps=5, lr=1e-2, seed=7, progress=False)
    c, _ = train_lora(model, tok, EXAMPLES, TASK, steps=5, lr=1e-2, seed=8, progress=False)
    assert sa["losses"] == sb["losses"]
    for name in a.modules:
        assert torch.equal(a.modules[name].A, b.modules[name].A)
        assert torch.equal(a.modules[name].B, b.modules[name].B)
    assert not torch.equal(a.modules[name].A, c.modules[name].A)


def test_spec_and_errors(tiny) -> None:
    model, tok = tiny
    spec = LoraSpec(r=4, alpha=4, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
    adapter, stats = train_lora(model, tok, EXAMPLES[:4], TASK, spec=spec, steps=2, progress=False)
    assert len(adapter.modules) == 8 and all(m.rank == 4 and m.scale == 1.0 for m in adapter.modules.values())
    assert stats["lora"]["target_modules"] == list(spec.target_modules)
    with pytest.raises(ValueError, match="no labeled examples"):
        train_lora(model, tok, [Example("x", None, "ct-head", "u")], TASK, steps=1, progress=False)
    with pytest.raises(ValueError):
        train_lora(model, tok, EXAMPLES, TASK, spec=LoraSpec(target_modules=("nope",)), steps=1, progress=False)
    assert not hasattr(model, "peft_config")  # unloaded even after a failure


def test_length_bucketing_covers_every_example_once() -> None:
    lengths = [random.Random(i).randint(5, 200) for i in range(37)]
    batches = _batches(lengths, 4, random.Random(0), chunk_batches=3)
    assert sorted(i for b in batches for i in b) == list(range(37))
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    shuffled = list(range(37))
    random.Random(0).shuffle(shuffled)
    naive = sum(4 * max(lengths[i] for i in shuffled[j : j + 4]) for j in range(0, 37, 4))
    assert padded < naive


def test_dp_sgd_reports_epsilon(tiny) -> None:
    model, tok = tiny
    dp = DPConfig(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, reproducible=True)
    adapter, stats = train_lora(model, tok, EXAMPLES, TASK, steps=4, lr=1e-2, dp=dp, progress=False)
    assert 0 < stats["dp_epsilon"] < float("inf") and stats["dp_sample_rate"] == pytest.approx(0.5)
    assert stats["dp_steps"] == 4 and stats["dp_secure_rng"] is False
    again, _ = train_lora(model, tok, EXAMPLES, TASK, steps=4, lr=1e-2, dp=dp, progress=False)
    name = next(iter(adapter.modules))
    assert torch.equal(adapter.modules[name].B, again.modules[name].B)  # reproducible=True: seeded noise


def test_dp_sgd_noise_is_not_derived_from_the_seed(tiny) -> None:
    """The seed travels with the adapter (train_stats); private noise must not be recomputable from it."""
    model, tok = tiny
    dp = DPConfig(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5)
    one, stats = train_lora(model, tok, EXAMPLES, TASK, steps=2, lr=1e-2, dp=dp, progress=False, seed=7)
    two, _ = train_lora(model, tok, EXAMPLES, TASK, steps=2, lr=1e-2, dp=dp, progress=False, seed=7)
    name = next(iter(one.modules))
    assert stats["dp_secure_rng"] is True
    assert not torch.equal(one.modules[name].B, two.modules[name].B)


def test_pick_device_and_inputs_follow_the_model(monkeypatch: pytest.MonkeyPatch, tiny_model_dir) -> None:
    """``pick_device``: explicit name, else $RPE_DEVICE, else the CPU; ``auto`` is CUDA only where
    torch sees one; a CUDA request without CUDA is a clear error. The loops read the device from
    the model (``model_device``), so a model moved there is trained and read with its inputs."""
    import torch

    from common.models import load_base_model, model_device, pick_device

    monkeypatch.delenv("RPE_DEVICE", raising=False)
    assert pick_device() == torch.device("cpu")
    monkeypatch.setenv("RPE_DEVICE", "cpu")
    assert pick_device() == torch.device("cpu")
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="not a torch device"):
        pick_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            pick_device("cuda")
    model, _ = load_base_model(tiny_model_dir)
    assert model_device(model) == torch.device("cpu")
    assert model_device(torch.nn.Module()) == torch.device("cpu")
