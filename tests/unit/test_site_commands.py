"""Site commands: ``rpe export --for vllm`` (vLLM's LoRA rules, same ΔW under stock PEFT),
``rpe generate`` (same predictions as stock PEFT) and ``rpe site status`` (from the site's own files)."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch
from support import make_tiny_sam

from client import export as export_mod
from client import use as use_mod
from client.egress import EgressLog
from client.export import VLLM_RANKS, ExportError, check_dir, export_vllm, vllm_rank
from client.use import site_status
from common.adapters import LoraAdapter, LoraModule, adapter_to_arrays, delta_dict, load_peft_adapter, save_peft_adapter
from common.families.report import commands as report_commands
from common.families.report.data import Example, write_jsonl
from common.families.report.task import TextReportTask
from common.families.segmentation import commands as seg_commands
from common.privacy import spent_from_egress, with_total


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rpe")
    sub = p.add_subparsers(dest="command", required=True)
    use_mod.register(sub)
    export_mod.register(sub)
    return p


def _run(argv: list[str]) -> None:
    args = _parser().parse_args(argv)
    args.func(args)


def _mixed(tiny_model_dir, out, amp: float):
    g = torch.Generator().manual_seed(3)
    spec = {
        "model.layers.0.self_attn.q_proj": (64, 64, 3, 2.0),
        "model.layers.1.self_attn.v_proj": (32, 64, 5, 0.7),
        "model.layers.1.mlp.up_proj": (128, 64, 12, 1.3),
    }
    adapter = LoraAdapter(
        {
            n: LoraModule(amp * torch.randn(r, i, generator=g), amp * torch.randn(o, r, generator=g), s)
            for n, (o, i, r, s) in spec.items()
        },
        base_model=str(tiny_model_dir),
    )
    return save_peft_adapter(adapter, out, str(tiny_model_dir))


@pytest.fixture(scope="module")
def mixed_adapter_dir(tiny_model_dir, tmp_path_factory):
    """A composed-looking adapter: three modules, ranks 3/5/12, scales 2.0/0.7/1.3 (so rank and alpha patterns)."""
    return _mixed(tiny_model_dir, tmp_path_factory.mktemp("mixed") / "composed", 0.05)


def _logits(model_dir, adapter_dir, ids):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    model.eval()
    with torch.inference_mode():
        return model(input_ids=ids).logits


def test_vllm_export_meets_the_rules_and_keeps_delta_w(tiny_model_dir, mixed_adapter_dir, tmp_path):
    src_cfg = json.loads((mixed_adapter_dir / "adapter_config.json").read_text())
    assert src_cfg["rank_pattern"] and src_cfg["alpha_pattern"]  # the input breaks the rules...
    assert any("rank_pattern" in p for p in check_dir(mixed_adapter_dir))  # ...and the checker says so
    out = tmp_path / "vllm"
    _run(["export", "--for", "vllm", "--adapter", str(mixed_adapter_dir), "--out", str(out)])
    cfg = json.loads((out / "adapter_config.json").read_text())
    # vLLM's rules, checked here on the file itself
    assert cfg["r"] == 16 and cfg["r"] in VLLM_RANKS  # max source rank 12 -> 16
    assert cfg["lora_alpha"] == cfg["r"]
    assert "rank_pattern" not in cfg and "alpha_pattern" not in cfg
    assert cfg["use_rslora"] is False and cfg["use_dora"] is False and cfg["lora_bias"] is False
    assert cfg["modules_to_save"] is None and cfg["peft_type"] == "LORA"
    from safetensors.torch import load_file

    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert len(tensors) == 6
    for key, t in tensors.items():
        assert (t.shape[0] if ".lora_A." in key else t.shape[1]) == 16, key
    assert check_dir(out) == []
    # the same ΔW, factor by factor and through stock PEFT on the model
    want, got = (
        delta_dict(load_peft_adapter(mixed_adapter_dir), torch.float64),
        delta_dict(load_peft_adapter(out), torch.float64),
    )
    assert set(want) == set(got)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-6, atol=1e-7)
    ids = torch.tensor([[1, 450, 3120, 314, 260, 7224, 30, 2]])
    before, after = _logits(tiny_model_dir, mixed_adapter_dir, ids), _logits(tiny_model_dir, out, ids)
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)(input_ids=ids).logits
    assert (before - plain).abs().max() > 1e-3  # the adapter changes the output...
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)  # ...and the export changes it identically


def test_vllm_rank_rounding_and_limit():
    assert [vllm_rank(r) for r in (1, 8, 9, 300, 320, 321, 512)] == [8, 8, 16, 320, 320, 512, 512]
    with pytest.raises(ExportError, match="--max-rank 512"):
        vllm_rank(513)


def test_export_refuses_to_overwrite_its_input(mixed_adapter_dir):
    with pytest.raises(ExportError, match="must differ"):
        export_vllm(mixed_adapter_dir, mixed_adapter_dir)


def test_generate_matches_stock_peft(tiny_model_dir, tmp_path, capsys):
    adapter_dir = _mixed(tiny_model_dir, tmp_path / "strong", 1.0)  # large enough to change the greedy tokens
    examples = [
        Example(
            prompt=f"Heart size normal. Finding number {i}.",
            target="No acute disease." if i else None,
            group="xray-chest",
            uid=f"r{i}",
        )
        for i in range(3)
    ]
    data = write_jsonl(tmp_path / "new.jsonl", examples)
    out = tmp_path / "pred.jsonl"
    _run(
        [
            "generate",
            "--adapter",
            str(adapter_dir),
            "--data",
            str(data),
            "--out",
            str(out),
            "--model",
            str(tiny_model_dir),
            "--batch-size",
            "2",
            "--max-new-tokens",
            "6",
            "--quiet",
        ]
    )
    assert "wrote 3 predictions" in capsys.readouterr().out
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["uid"] for r in rows] == ["r0", "r1", "r2"] and "target" not in rows[0] and rows[1]["target"]
    # the reference: stock PEFT's model, the same prompts, greedy
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from common.families.report.evaluation import generate
    from common.models import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    prompts = [TextReportTask().build_prompt(ex, tok) for ex in examples]
    without = generate(base, tok, prompts, 6, batch_size=3)
    peft_model = PeftModel.from_pretrained(base, str(adapter_dir))
    assert all(r["prediction"] for r in rows)
    assert [r["prediction"] for r in rows] == generate(peft_model, tok, prompts, 6, batch_size=3)
    assert [r["prediction"] for r in rows] != without  # the adapter was applied


def test_generate_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(use_mod.SiteCommandError, match="does not exist"):
        report_commands.generate_file(tmp_path / "missing", tmp_path / "x.jsonl", tmp_path / "o.jsonl")


def test_site_status_from_the_sites_own_files(tiny_model_dir, mixed_adapter_dir, tmp_path, capsys):
    site = tmp_path / "site-a"
    log = EgressLog(site / "egress.jsonl", full_records=("meta",))
    private = with_total(
        {
            "dp_sgd": True,
            "epsilon": 2.0,
            "delta": 1e-5,
            "noise_multiplier": 1.2,
            "max_grad_norm": 1.0,
            "sample_rate": 0.2,
            "steps": 20,
            "z_mechanism": "gaussian",
            "z_clip": 1.0,
            "z_noise_multiplier": 5.0,
            "z_epsilon": 1.0,
            "z_delta": 1e-5,
        },
        True,
    )
    arrays, _ = adapter_to_arrays(load_peft_adapter(mixed_adapter_dir))
    log.record(
        "train",
        {
            "adapter": arrays,
            "embedding": {"z": np.ones(4, np.float32)},
            "meta": {"site": "a", "privacy": json.dumps(private)},
        },
        run_id="1",
        extra={"outcome": "ok"},
    )
    log.record(
        "query.embed",
        {"embedding": {"z": np.ones(4, np.float32)}, "meta": {"site": "a", "privacy": json.dumps({"dp_sgd": False})}},
        run_id="2",
        extra={"outcome": "ok"},
    )
    log.record("train", {}, run_id="3", extra={"outcome": "refused", "reason": "no data"})
    own = save_peft_adapter(load_peft_adapter(mixed_adapter_dir), site / "adapters" / "own-report-text")
    got = save_peft_adapter(load_peft_adapter(mixed_adapter_dir), site / "adapters" / "compose-7-sim")
    (got / "rpe-provenance.json").write_text(
        json.dumps(
            {
                "strategy": "sim",
                "sources": ["b:t:1", "c:t:2"],
                "weights": [0.7, 0.3],
                "blob_sha256": "ab" * 32,
                "task": "report-text",
                "received_at": 1.8e9,
            }
        )
    )
    assert own.is_dir()
    s = site_status(site)
    lines = [json.loads(x) for x in (site / "egress.jsonl").read_text().splitlines()]
    assert s["replies"] == 3 and s["by_message_type"] == {"train": 2, "query.embed": 1}
    assert s["by_outcome"] == {"ok": 2, "refused": 1}
    assert s["bytes_sent"] == sum(x["total_bytes"] for x in lines)
    assert s["epsilon"] == spent_from_egress(lines).epsilon and math.isinf(s["epsilon"])  # the z query was not private
    assert [(a["name"], a["kind"]) for a in s["adapters"]] == [
        ("compose-7-sim", "received"),
        ("own-report-text", "own (trained here)"),
    ]
    assert s["adapters"][0]["sources"] == ["b:t:1", "c:t:2"] and s["adapters"][0]["received_at"].startswith("2027")
    _run(["site", "status", "--site-dir", str(site)])
    text = capsys.readouterr().out
    assert "sent 3 replies" in text and "ε spent = ∞" in text and "compose-7-sim: received sim" in text
    assert "b:t:1 (+0.700)" in text
    with pytest.raises(use_mod.SiteCommandError, match="does not exist"):
        site_status(tmp_path / "nowhere")


def test_segment_writes_the_masks_the_sites_evaluation_scores(tmp_path, capsys):
    """``rpe segment``: one 0/255 mask per real prostate slice at the slice's own size, equal to
    ``common.families.segmentation.task.predict`` with the same adapter and prompt, an index, DICE against
    reference masks, and clear errors for bad input."""
    from PIL import Image

    from common.families.segmentation import sam
    from common.families.segmentation.data import load_prostate_site
    from common.families.segmentation.task import PromptSpec, predict, target_modules

    base_dir = make_tiny_sam(tmp_path / "sam", seed=0)
    net = sam.load_sam(base_dir)
    g = torch.Generator().manual_seed(5)
    mods = {}
    for name in target_modules(net, ("decoder",))[:4]:
        lin = dict(net.named_modules())[name]
        mods[name] = LoraModule(
            0.5 * torch.randn(2, lin.in_features, generator=g), 0.5 * torch.randn(lin.out_features, 2, generator=g), 2.0
        )
    adapter = LoraAdapter(mods, base_model=str(base_dir))
    adir = save_peft_adapter(adapter, tmp_path / "adapters" / "composed", str(base_dir))
    site = load_prostate_site("RUNMC")
    images_dir, masks_dir = tmp_path / "images", tmp_path / "truth"
    images_dir.mkdir()
    masks_dir.mkdir()
    for i, (im, m) in enumerate(zip(site.test_images[:2], site.test_masks[:2], strict=True)):
        Image.fromarray(im).save(images_dir / f"s{i}.png")
        Image.fromarray(m.astype(np.uint8) * 255).save(masks_dir / f"s{i}.png")
    out = tmp_path / "masks"
    _run(
        [
            "segment",
            "--adapter",
            str(adir),
            "--images",
            str(images_dir),
            "--out",
            str(out),
            "--masks",
            str(masks_dir),
            "--quiet",
        ]
    )
    assert "wrote 2 masks" in capsys.readouterr().out
    rows = [json.loads(x) for x in (out / "masks.jsonl").read_text().splitlines()]
    assert [r["mask"] for r in rows] == ["s0_mask.png", "s1_mask.png"] and all("dice" in r for r in rows)
    reloaded = load_peft_adapter(adir)
    changed = False
    for i, im in enumerate(site.test_images[:2]):
        got = np.array(Image.open(out / f"s{i}_mask.png")) > 0
        assert got.shape == im.shape[:2]
        assert (got == predict(net, reloaded, [im], None, PromptSpec())[0]).all()
        changed |= bool((got != predict(net, None, [im], None, PromptSpec())[0]).any())
    assert changed  # the adapter was applied
    with pytest.raises(use_mod.SiteCommandError, match="not a PEFT adapter directory"):
        seg_commands.segment_files(tmp_path / "nowhere", [str(images_dir)], tmp_path / "o")
    with pytest.raises(use_mod.SiteCommandError, match="does not exist"):
        seg_commands.segment_files(adir, [str(tmp_path / "no-such.png")], tmp_path / "o")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(use_mod.SiteCommandError, match="not a readable image"):
        seg_commands.segment_files(adir, [str(tmp_path / "bad.png")], tmp_path / "o")
