"""Recipe: the library-level leave-one-group-out experiment on real reports and the real model.

Each report group (chest X-ray, CT abdomen, CT head, MR head, …) plays a hospital site. For each
site a LoRA is trained on its reports and its mean embedding z is stored in a real registry
(embedded Chroma + blob store). Then every site in turn is the *target*: its own adapter is left
out, the other sites' adapters are retrieved by z, weighted with every strategy and composed
(θ = θ0 + Σ w_i δθ_i), and the result is scored by ROUGE-L on the target's held-out reports,
next to the base model (no adapter) and the target's own LoRA (the supervised "SFT" oracle).

This is a recipe (an end-to-end script), not a component: the federation's ``evaluate`` mode runs
the same comparison with training and scoring done at the sites.
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

STRATEGY_ARMS = ("sim", "lin", "lin-l1", "avg", "nearest")
DEFAULT_GROUPS = ("xray-chest", "ct-thorax", "ct-abdomen", "mr-head", "ct-head", "mr-spine")


@dataclass(frozen=True)
class Profile:
    """How much data and compute an experiment uses."""

    n_train: int  # training examples per site (cap)
    n_eval: int  # held-out examples per site
    steps: int  # optimizer steps per site LoRA
    batch_size: int
    max_length: int
    r: int = 8
    alpha: int = 16
    lr: float = 1e-3


PROFILES = {
    # Fits a 2-core CPU: about 10-15 minutes for six sites (measured speeds: training ~340 tok/s,
    # generation ~2.4-3.4 prompts/s on SmolLM2-135M fp32).
    "quick": Profile(n_train=64, n_eval=20, steps=40, batch_size=4, max_length=192, lr=2e-3),
    # For a GPU: more data, more steps, more held-out reports.
    "full": Profile(n_train=400, n_eval=50, steps=300, batch_size=8, max_length=256, lr=2e-3),
}


def _log(msg: str) -> None:
    print(f"[experiment] {msg}", file=sys.stderr, flush=True)


def run(
    profile: Profile,
    out_dir: Path,
    groups: list[str] | None = None,
    model_spec: str = "smollm2-135m-instruct",
    seed: int = 0,
) -> dict[str, Any]:
    """Run the experiment; returns ``{"scores": {target: {arm: rouge_l}}, "weights": ..., ...}``."""
    from common.embedding import mean_embedding
    from common.families.report.data import report_groups, split
    from common.families.report.evaluation import evaluate_task_arms
    from common.families.report.task import TextReportTask
    from common.families.report.training import LoraSpec, train_lora
    from common.models import fingerprint, linear_module_shapes, load_base_model, resolve_model_dir
    from server.composer import compose_for_target
    from server.registry import AdapterMeta, Registry

    t_start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model_dir(model_spec)
    model, tok = load_base_model(model_dir)
    base_fp = fingerprint(model_dir)
    task = TextReportTask()
    all_groups = report_groups()
    names = list(groups or DEFAULT_GROUPS)
    missing = [g for g in names if g not in all_groups]
    if missing:
        raise ValueError(f"unknown report group(s) {missing}; available: {sorted(all_groups)}")
    if len(names) < 2:
        raise ValueError("leave-one-out needs at least two groups")

    data: dict[str, tuple[list, list]] = {}
    for g in names:
        train, held_out = split(all_groups[g], profile.n_eval, seed=seed)
        data[g] = (train[: profile.n_train], held_out)

    reg_dir = out_dir / "registry"
    if reg_dir.exists():  # a fresh registry per run: the experiment must not mix old adapters in
        shutil.rmtree(reg_dir)
    reg = Registry.init(
        reg_dir,
        base_fingerprint=base_fp,
        module_shapes=linear_module_shapes(model),
        embedding_dim=int(model.config.hidden_size),
        representation="hidden-mean:layer=-1",
        base_name=str(model_spec),
    )
    spec = LoraSpec(r=profile.r, alpha=profile.alpha)
    own: dict[str, Any] = {}
    z_of: dict[str, np.ndarray] = {}
    timings: dict[str, float] = {}
    try:
        t0 = time.perf_counter()
        for i, g in enumerate(names):
            train, _ = data[g]
            _log(f"site {i + 1}/{len(names)} {g}: training a rank-{spec.r} LoRA on {len(train)} reports")
            adapter, stats = train_lora(
                model,
                tok,
                train,
                task,
                spec,
                steps=profile.steps,
                lr=profile.lr,
                batch_size=profile.batch_size,
                max_length=profile.max_length,
                seed=seed,
                base_model=str(model_spec),
            )
            emb = mean_embedding(model, tok, task.embedding_texts(train), progress=False)
            z_of[g] = emb.z
            own[g] = adapter
            reg.add(
                adapter,
                emb.z,
                AdapterMeta(
                    site=g,
                    task=task.name,
                    modality="text",
                    base_fingerprint=base_fp,
                    sample_count=len(train),
                    token_count=emb.n_tokens,
                    extra={"train": {k: v for k, v in stats.items() if isinstance(v, (int, float, str))}},
                ),
            )
            _log(f"  loss {stats.get('final_loss', float('nan')):.3f}, {stats.get('tokens_per_s', 0):.0f} tok/s")
        timings["train_and_embed_s"] = time.perf_counter() - t0

        scores: dict[str, dict[str, float]] = {}
        weights: dict[str, dict[str, dict[str, float]]] = {}
        distances: dict[str, dict[str, float]] = {}
        t0 = time.perf_counter()
        k = len(names) - 1
        for g in names:
            _, held_out = data[g]
            _log(
                f"target {g}: scoring base, own LoRA and {len(STRATEGY_ARMS)} compositions "
                f"on {len(held_out)} held-out reports"
            )
            arms: dict[str, Any] = {"base": None, "sft (own LoRA)": own[g]}
            weights[g] = {}
            for strategy in STRATEGY_ARMS:
                res = compose_for_target(reg, z_of[g], strategy=strategy, k=k, exclude_site=g, target=g)
                arms[strategy] = res.adapter
                weights[g][strategy] = {reg.get(i).meta.site: float(w) for i, w in zip(res.ids, res.weights)}
                distances[g] = {reg.get(i).meta.site: float(d) for i, d in zip(res.ids, res.distances)}
            results = evaluate_task_arms(model, tok, task, held_out, list(arms.values()))  # one pass, all arms
            row = {name: r["rouge_l"] for name, r in zip(arms, results, strict=True)}
            scores[g] = row
            _log("  " + ", ".join(f"{a} {v:.3f}" for a, v in row.items()))
        timings["compose_and_eval_s"] = time.perf_counter() - t0
    finally:
        reg.close()
    timings["total_s"] = time.perf_counter() - t_start
    result = {
        "profile": profile.__dict__,
        "groups": names,
        "scores": scores,
        "weights": weights,
        "distances": distances,
        "timings": timings,
        "model": str(model_spec),
        "base_fingerprint": base_fp,
        "n_train": {g: len(data[g][0]) for g in names},
        "n_eval": {g: len(data[g][1]) for g in names},
    }
    write_outputs(result, out_dir)
    return result


def markdown_table(result: dict[str, Any]) -> str:
    """ROUGE-L per target (rows) and arm (columns), with the mean and how often each arm beat base."""
    scores = result["scores"]
    arms = list(next(iter(scores.values())))
    lines = ["| target | " + " | ".join(arms) + " |", "|---" * (len(arms) + 1) + "|"]
    for g, row in scores.items():
        best = max(v for a, v in row.items() if a != "sft (own LoRA)")
        cells = [f"**{row[a]:.3f}**" if row[a] == best and a != "sft (own LoRA)" else f"{row[a]:.3f}" for a in arms]
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    means = [np.mean([row[a] for row in scores.values()]) for a in arms]
    lines.append("| **mean** | " + " | ".join(f"{m:.3f}" for m in means) + " |")
    wins = [sum(row[a] > row["base"] for row in scores.values()) for a in arms]
    lines.append("| beats base | " + " | ".join(f"{w}/{len(scores)}" for w in wins) + " |")
    return "\n".join(lines)


def _counts(per_group: dict[str, int]) -> str:
    values = sorted(set(per_group.values()))
    return str(values[0]) if len(values) == 1 else ", ".join(f"{g} {n}" for g, n in per_group.items())


def write_outputs(result: dict[str, Any], out_dir: Path) -> None:
    """results.json, results.csv and results.md under ``out_dir``."""
    (out_dir / "results.json").write_text(json.dumps(result, indent=2))
    scores = result["scores"]
    arms = list(next(iter(scores.values())))
    with open(out_dir / "results.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["target", *arms])
        for g, row in scores.items():
            w.writerow([g, *(f"{row[a]:.4f}" for a in arms)])
    t = result["timings"]
    md = [
        markdown_table(result),
        "",
        f"ROUGE-L F1 on held-out reports ({_counts(result['n_eval'])} per target); "
        f"{_counts(result['n_train'])} training reports per site; total {t['total_s'] / 60:.1f} min "
        f"(training + embedding {t['train_and_embed_s'] / 60:.1f} min, "
        f"composition + evaluation {t['compose_and_eval_s'] / 60:.1f} min).",
        "",
        "Weights (target ← source: weight per strategy):",
        "",
    ]
    for g, per in result["weights"].items():
        md.append(
            f"- {g}: "
            + "; ".join(f"{s}: " + ", ".join(f"{src} {w:+.2f}" for src, w in ws.items()) for s, ws in per.items())
        )
    (out_dir / "results.md").write_text("\n".join(md) + "\n")


def main(profile: str = "quick", out_dir: str | Path = "runs/experiment", groups: list[str] | None = None) -> None:
    """CLI entry (``rpe experiment``): run and print the Markdown table."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {sorted(PROFILES)}")
    result = run(PROFILES[profile], Path(out_dir), groups=groups)
    print((Path(out_dir) / "results.md").read_text())
    _ = result
