"""Area 3: a site's compute with the real SmolLM2-135M-Instruct on CPU.

* Embedding: ``common.embedding.mean_embedding`` (length-bucketed batches under a token budget)
  vs a bare forward loop over the same texts, tokenised the same way, in input order, with a
  fixed batch size chosen so it makes the same number of forward calls, each batch padded to its
  longest text. Both run the backbone without the LM head; the baseline does not even pool.
* Training: ``common.families.report.training.train_lora`` vs a plain ``transformers.Trainer`` on a PEFT model with
  the same LoRA (r, alpha, targets, dropout), batch size, max length, steps, learning rate,
  warm-up and clipping, no evaluation, no saving, ``report_to="none"``, on the same tokenised
  examples (``TextReportTask.training_features``).

Tokens are counted the same way everywhere: non-padding tokens fed to the model. Timings include
tokenisation / feature building and (for training) LoRA injection, but not loading the base model.
"""

from __future__ import annotations

import math
import random
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from benchmarks.util import Goal, Section, fmt, log, median, now, ratio, table

# repetitions alternate the order (A B, B A, ...) so a drift in machine load hits both sides alike
QUICK = {"embed_examples": 96, "embed_reps": 2, "train_examples": 64, "train_steps": 8, "train_reps": 2}
FULL = {"embed_examples": 192, "embed_reps": 2, "train_examples": 160, "train_steps": 16, "train_reps": 2}
EMBED_MAX_LENGTH, EMBED_BATCH_TOKENS = 256, 4096
TRAIN = {
    "r": 8,
    "alpha": 16.0,
    "targets": ("q_proj", "v_proj"),
    "dropout": 0.0,
    "batch_size": 4,
    "max_length": 192,
    "lr": 1e-3,
    "max_grad_norm": 1.0,
}


def examples(n: int, seed: int = 0) -> list[Any]:
    """A deterministic mix of real reports: half IU X-ray (short), half MedPix groups (longer)."""
    from common.families.report.data import report_groups

    groups = report_groups()
    rng = random.Random(seed)
    xray = list(groups["xray-chest"])
    rng.shuffle(xray)
    other = [e for g, exs in groups.items() if g != "xray-chest" for e in exs]
    rng.shuffle(other)
    mix = xray[: n - min(len(other), n // 2)] + other[: n // 2]
    rng.shuffle(mix)
    return mix[:n]


# --------------------------------------------------------------------------------------------
# embedding
# --------------------------------------------------------------------------------------------


def bare_forward(model: Any, tok: Any, texts: list[str], batch_size: int, max_length: int) -> int:
    """Forward every text through the backbone, in order, fixed batch size, padded per batch."""
    encoded = tok(list(texts), add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]
    keep = [ids for ids in encoded if ids]
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    n_tokens = 0
    with torch.inference_mode():
        for s in range(0, len(keep), batch_size):
            batch = keep[s : s + batch_size]
            width = max(len(x) for x in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, x in enumerate(batch):
                ids[row, : len(x)] = torch.tensor(x)
                mask[row, : len(x)] = 1
            model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
            n_tokens += int(mask.sum())
    return n_tokens


def bench_embedding(model: Any, tok: Any, texts: list[str], reps: int) -> dict[str, Any]:
    from common.embedding import _token_batches, mean_embedding

    ids = tok(list(texts), add_special_tokens=False, truncation=True, max_length=EMBED_MAX_LENGTH)["input_ids"]
    lengths = [len(x) for x in ids if x]
    n_batches = len(_token_batches(lengths, EMBED_BATCH_TOKENS))
    batch_size = max(1, math.ceil(len(lengths) / n_batches))
    padded_ours = sum(len(b) * max(lengths[i] for i in b) for b in _token_batches(lengths, EMBED_BATCH_TOKENS))
    padded_base = sum(
        len(lengths[s : s + batch_size]) * max(lengths[s : s + batch_size]) for s in range(0, len(lengths), batch_size)
    )
    # warm-up (allocator, kernels) for both
    mean_embedding(model, tok, texts[:8], max_length=EMBED_MAX_LENGTH, progress=False)
    bare_forward(model, tok, texts[:8], 8, EMBED_MAX_LENGTH)
    ours, base = [], []
    n_ours = n_base = 0
    for rep in range(reps):
        for which in ("ours", "base") if rep % 2 == 0 else ("base", "ours"):
            t = now()
            if which == "ours":
                r = mean_embedding(
                    model, tok, texts, max_length=EMBED_MAX_LENGTH, batch_tokens=EMBED_BATCH_TOKENS, progress=False
                )
                ours.append(now() - t)
                n_ours = r.n_tokens
            else:
                n_base = bare_forward(model, tok, texts, batch_size, EMBED_MAX_LENGTH)
                base.append(now() - t)
    out = {
        "n_texts": len(texts),
        "n_tokens": n_ours,
        "n_tokens_baseline": n_base,
        "batches": n_batches,
        "baseline_batch_size": batch_size,
        "padded_tokens_ours": padded_ours,
        "padded_tokens_baseline": padded_base,
        "ours_s": median(ours),
        "baseline_s": median(base),
    }
    out["ours_tok_s"] = n_ours / out["ours_s"]
    out["baseline_tok_s"] = n_base / out["baseline_s"]
    out["ratio"] = out["ours_tok_s"] / out["baseline_tok_s"]
    return out


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------


def run_ours_training(model: Any, tok: Any, exs: list[Any], steps: int) -> dict[str, Any]:
    from common.families.report.task import TextReportTask
    from common.families.report.training import LoraSpec, train_lora

    spec = LoraSpec(r=TRAIN["r"], alpha=TRAIN["alpha"], target_modules=TRAIN["targets"], dropout=TRAIN["dropout"])
    t = now()
    _, stats = train_lora(
        model,
        tok,
        exs,
        TextReportTask(),
        spec,
        steps=steps,
        lr=TRAIN["lr"],
        batch_size=TRAIN["batch_size"],
        max_length=TRAIN["max_length"],
        seed=0,
        progress=False,
        max_grad_norm=TRAIN["max_grad_norm"],
    )
    wall = now() - t
    return {
        "wall_s": wall,
        "loop_s": stats["seconds"],
        "tokens": stats["tokens_seen"],
        "first_loss": stats["first_loss"],
        "final_loss": stats["final_loss"],
    }


def run_trainer(model: Any, tok: Any, exs: list[Any], steps: int) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    from common.families.report.task import TextReportTask
    from common.families.report.training import collate as collate_features

    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    batch_tokens: list[int] = []  # the dataloader may collate one batch ahead: count only trained ones

    def collate(features: list[dict]) -> dict[str, torch.Tensor]:
        ids, labels, mask = collate_features(features, pad_id)
        batch_tokens.append(int(mask.sum()))
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    t = now()
    features = TextReportTask().training_features(tok, exs, TRAIN["max_length"])
    config = LoraConfig(
        r=TRAIN["r"],
        lora_alpha=TRAIN["alpha"],
        target_modules=list(TRAIN["targets"]),
        lora_dropout=TRAIN["dropout"],
        bias="none",
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, config)
        with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
            args = TrainingArguments(
                output_dir=tmp,
                per_device_train_batch_size=TRAIN["batch_size"],
                max_steps=steps,
                learning_rate=TRAIN["lr"],
                lr_scheduler_type="linear",
                warmup_steps=max(1, steps // 10),
                weight_decay=0.0,
                max_grad_norm=TRAIN["max_grad_norm"],
                logging_strategy="no",
                save_strategy="no",
                eval_strategy="no",
                report_to="none",
                use_cpu=True,
                seed=0,
                data_seed=0,
                dataloader_num_workers=0,
                remove_unused_columns=False,
                disable_tqdm=True,
                optim="adamw_torch",
            )
            trainer = Trainer(model=peft_model, args=args, train_dataset=features, data_collator=collate)
            out = trainer.train()
    wall = now() - t
    peft_model.unload()
    return {
        "wall_s": wall,
        "loop_s": float(out.metrics.get("train_runtime", float("nan"))),
        "tokens": sum(batch_tokens[:steps]),
        "batches_collated": len(batch_tokens),
        "final_loss": float(out.training_loss),
    }


def bench_training(exs: list[Any], steps: int, reps: int) -> dict[str, Any]:
    from common.models import load_base_model

    model_a, tok = load_base_model("smollm2-135m-instruct")
    model_b, _ = load_base_model("smollm2-135m-instruct")
    ours, base = [], []
    for rep in range(reps):
        for which in ("ours", "base") if rep % 2 == 0 else ("base", "ours"):
            if which == "ours":
                log(f"site: train_lora ({steps} steps), rep {rep + 1}/{reps}")
                ours.append(run_ours_training(model_a, tok, exs, steps))
            else:
                log(f"site: transformers Trainer + PEFT ({steps} steps), rep {rep + 1}/{reps}")
                base.append(run_trainer(model_b, tok, exs, steps))
    res: dict[str, Any] = {"steps": steps, "n_examples": len(exs), **{f"cfg_{k}": v for k, v in TRAIN.items()}}
    for label, runs in (("ours", ours), ("trainer", base)):
        res[f"{label}_tokens"] = runs[0]["tokens"]
        res[f"{label}_wall_s"] = median(r["wall_s"] for r in runs)
        res[f"{label}_loop_s"] = median(r["loop_s"] for r in runs)
        res[f"{label}_tok_s"] = median(r["tokens"] / r["wall_s"] for r in runs)
        res[f"{label}_loop_tok_s"] = median(r["tokens"] / r["loop_s"] for r in runs)
        res[f"{label}_final_loss"] = runs[0]["final_loss"]
    res["ratio"] = res["ours_tok_s"] / res["trainer_tok_s"]
    res["ratio_loop"] = res["ours_loop_tok_s"] / res["trainer_loop_tok_s"]
    res["ratio_wall_time"] = res["trainer_wall_s"] / res["ours_wall_s"]
    del model_a, model_b
    return res


def run(quick: bool, workdir: Path) -> Section:
    from common.models import load_base_model

    cfg = QUICK if quick else FULL
    sec = Section("site", "3. Site compute with SmolLM2-135M-Instruct on CPU")
    t = now()
    model, tok = load_base_model("smollm2-135m-instruct")
    load_s = now() - t
    log(f"site: model loaded in {load_s:.2f} s; embedding {cfg['embed_examples']} reports")
    exs = examples(cfg["embed_examples"])
    emb = bench_embedding(model, tok, [e.prompt for e in exs], cfg["embed_reps"])
    log(
        f"site: embedding {emb['ours_tok_s']:.0f} tok/s vs bare loop {emb['baseline_tok_s']:.0f} tok/s "
        f"({emb['ratio']:.2f}×)"
    )
    del model
    tr = bench_training(examples(cfg["train_examples"], seed=1), cfg["train_steps"], cfg["train_reps"])
    log(f"site: training {tr['ours_tok_s']:.0f} tok/s vs Trainer {tr['trainer_tok_s']:.0f} tok/s ({tr['ratio']:.2f}×)")
    sec.data = {"model_load_s": load_s, "embedding": emb, "training": tr}

    sec.add(
        f"Base model load (cached fp32 safetensors): {load_s:.2f} s. Data: real reports from `common.families.report.data` "
        "(half IU X-ray, half MedPix), deterministic selection.",
        "",
        f"**Mean embedding** over {emb['n_texts']} findings texts ({emb['n_tokens']:,} tokens, max_length "
        f"{EMBED_MAX_LENGTH}); ours: `mean_embedding(batch_tokens={EMBED_BATCH_TOKENS})` = {emb['batches']} "
        f"length-bucketed batches; baseline: bare `model.model(...)` loop in input order with batch size "
        f"{emb['baseline_batch_size']} (same number of forward calls), padded to each batch's longest. Median of "
        f"{cfg['embed_reps']} runs, alternating order (AB, BA, ...).",
        "",
    )
    sec.add(
        *table(
            ["", "tokens", "padded tokens computed", "seconds", "tokens/s"],
            [
                [
                    "mean_embedding (ours)",
                    emb["n_tokens"],
                    emb["padded_tokens_ours"],
                    fmt(emb["ours_s"]),
                    fmt(emb["ours_tok_s"]),
                ],
                [
                    "bare forward loop",
                    emb["n_tokens_baseline"],
                    emb["padded_tokens_baseline"],
                    fmt(emb["baseline_s"]),
                    fmt(emb["baseline_tok_s"]),
                ],
                ["**ratio ours / baseline**", "", "", "", ratio(emb["ratio"])],
            ],
        )
    )
    sec.add(
        f"**LoRA training**: r={TRAIN['r']}, α={TRAIN['alpha']:g}, targets {', '.join(TRAIN['targets'])}, batch "
        f"{TRAIN['batch_size']}, max_length {TRAIN['max_length']}, lr {TRAIN['lr']:g} (linear warm-up 10 % + decay), "
        f"clip {TRAIN['max_grad_norm']:g}, {tr['steps']} steps on {tr['n_examples']} labelled reports; medians "
        f"of {cfg['train_reps']} run(s) each, alternating order. End to end = feature building + LoRA injection + "
        "loop (+ Trainer construction); loop = `stats['seconds']` / `train_runtime`.",
        "",
    )
    sec.add(
        *table(
            ["", "tokens (non-pad)", "end-to-end s", "tokens/s end to end", "loop s", "tokens/s loop", "final loss"],
            [
                [
                    "train_lora (ours)",
                    tr["ours_tokens"],
                    fmt(tr["ours_wall_s"]),
                    fmt(tr["ours_tok_s"]),
                    fmt(tr["ours_loop_s"]),
                    fmt(tr["ours_loop_tok_s"]),
                    fmt(tr["ours_final_loss"]),
                ],
                [
                    "Trainer + PEFT",
                    tr["trainer_tokens"],
                    fmt(tr["trainer_wall_s"]),
                    fmt(tr["trainer_tok_s"]),
                    fmt(tr["trainer_loop_s"]),
                    fmt(tr["trainer_loop_tok_s"]),
                    fmt(tr["trainer_final_loss"]),
                ],
                ["**ratio ours / Trainer**", "", "", ratio(tr["ratio"]), "", ratio(tr["ratio_loop"]), ""],
            ],
        )
    )
    sec.goals.append(
        Goal("mean_embedding tokens/s ≥ bare forward loop", "≥ 1.0×", ratio(emb["ratio"]), emb["ratio"] >= 1.0)
    )
    sec.goals.append(
        Goal(
            "train_lora tokens/s ≥ Trainer + PEFT",
            "≥ 1.0×",
            f"{ratio(tr['ratio'])} end to end, {ratio(tr['ratio_loop'])} loop only",
            tr["ratio"] >= 1.0,
        )
    )
    return sec
