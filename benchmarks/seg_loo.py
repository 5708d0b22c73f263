"""Leave-one-site-out segmentation experiment (the paper's Table 4), as a library-level recipe.

For every site: train one LoRA on its training slices (plus augmented copies) and compute z from
all its images (no labels needed). For every target site, the OTHER sites' LoRAs are composed
exactly (``common.lora.compose``) with weights from ``common.strategies.compute_weights`` (avg,
nearest, sim, lin, lin-l1) on the z's, and scored by DICE on the target's test slices, next to the
pretrained model without a LoRA and the target's own LoRA (a supervised reference the ensemble does
not see). Each cell also gets a bootstrap 95 % interval over the target's test slices, and each
strategy a paired test (difference, interval, sign-flip p) against the pretrained model and
against ``avg`` (``benchmarks.zero_shot.bootstrap_ci`` / ``paired_test``).

    python -m benchmarks.seg_loo --dataset prostate-multisite --steps 20
    python -m benchmarks.seg_loo --dataset fundus-multidomain:disc
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.zero_shot import bootstrap_ci, diff_cell, paired_test
from common import sam
from common.lora import compose, load_peft_adapter, save_peft_adapter
from common.seg_data import load_sites
from common.segmentation import PromptSpec, SegLoraSpec, SegmentationTask
from common.strategies import compute_weights

STRATEGIES = ("avg", "nearest", "sim", "lin", "lin-l1")
N_BOOT = 2000
COLUMNS = ("pretrained", "own", *STRATEGIES)
OUT_DIR = Path(__file__).resolve().parent


def _log(msg: str, t0: float) -> None:
    print(f"[seg-loo {time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def run(dataset: str, model_spec: str = sam.LITEMEDSAM, steps: int = 20, lr: float = 2e-3, copies: int = 1,
        prompt: PromptSpec | None = None, rank: int = 4, seed: int = 0, cache: Path | None = None,
        model: Any = None, workdir: Path | None = None, only: str | None = None) -> dict[str, Any]:
    """Run the experiment; returns ``{"dice": {target: {column: DICE}}, "weights": ..., ...}``.

    With ``workdir`` each site's adapter (PEFT directory), z and training stats are stored there and
    reused, so sites can be prepared by separate processes (``only=SITE`` prepares one and returns).
    """
    t0 = time.perf_counter()
    model = model if model is not None else sam.load_sam(model_spec)
    task = SegmentationTask(spec=SegLoraSpec(rank=rank, prompt=prompt or PromptSpec()), augment_copies=copies,
                            cache=cache)
    sites = load_sites(dataset)
    adapters, zs, train_stats = {}, {}, {}
    for s in sites:
        if only is not None and s.name != only:
            continue
        done = workdir / s.name if workdir is not None else None
        if done is not None and (done / "stats.json").is_file():
            zs[s.name] = np.load(done / "z.npy")
            adapters[s.name] = load_peft_adapter(done / "adapter")
            train_stats[s.name] = json.loads((done / "stats.json").read_text())
            continue
        zs[s.name] = task.site_embedding(model, s.all_images, site=s.name).z.astype(np.float64)
        adapters[s.name], train_stats[s.name] = task.train_adapter(model, s, steps=steps, lr=lr, seed=seed)
        if done is not None:
            save_peft_adapter(adapters[s.name], done / "adapter", base_model_name_or_path=adapters[s.name].base_model)
            np.save(done / "z.npy", zs[s.name])
            (done / "stats.json").write_text(json.dumps(train_stats[s.name]))
        _log(f"{s.name}: LoRA trained ({train_stats[s.name]['loss_first']:.3f} -> "
             f"{train_stats[s.name]['loss_last']:.3f}), z computed", t0)
    if only is not None:
        return {"prepared": only, "wall_s": time.perf_counter() - t0}
    table: dict[str, dict[str, float]] = {}
    weights: dict[str, dict[str, dict[str, float]]] = {}
    per_image: dict[str, dict[str, list[float]]] = {}
    ci: dict[str, dict[str, list[float]]] = {}
    tests: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for target in sites:
        others = [s.name for s in sites if s.name != target.name]
        Z = np.stack([zs[n] for n in others])
        per = {"pretrained": task.evaluate(model, None, target)["dice_per_image"],
               "own": task.evaluate(model, adapters[target.name], target)["dice_per_image"]}
        weights[target.name] = {}
        for strategy in STRATEGIES:
            w = compute_weights(strategy, zs[target.name], Z)
            weights[target.name][strategy] = {n: float(x) for n, x in zip(others, w, strict=True)}
            per[strategy] = task.evaluate(model, compose([adapters[n] for n in others], w), target)["dice_per_image"]
        row = {c: float(np.mean(v)) for c, v in per.items()}
        per_image[target.name] = per
        ci[target.name] = {c: list(bootstrap_ci(v, N_BOOT)) for c, v in per.items()}
        tests[target.name] = {s: {"vs_pretrained": paired_test(per[s], per["pretrained"], N_BOOT),
                                  "vs_avg": paired_test(per[s], per["avg"], N_BOOT)} for s in STRATEGIES}
        table[target.name] = row
        _log(f"{target.name}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()), t0)
    mean = {c: float(np.mean([table[t][c] for t in table])) for c in COLUMNS}
    return {"dataset": dataset, "model": model_spec, "fingerprint": sam.model_fingerprint(model), "steps": steps,
            "lr": lr, "augment_copies": copies, "rank": rank, "prompt": task.spec.prompt.__dict__, "seed": seed,
            "dice": table, "mean": mean, "dice_ci": ci, "tests": tests, "dice_per_image": per_image,
            "weights": weights, "train": train_stats,
            "simulated_sites": [s.name for s in sites if s.simulated], "wall_s": time.perf_counter() - t0}


def markdown(result: dict[str, Any]) -> str:
    """The DICE table (targets x columns, mean last) and the weights each target received."""
    sim = set(result["simulated_sites"])
    lines = [f"### Leave-one-site-out DICE: {result['dataset']} ({result['model']}, prompt "
             f"{result['prompt']['mode']}, {result['steps']} steps, wall {result['wall_s']:.0f} s)", "",
             "| target | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for t, row in result["dice"].items():
        name = f"{t} (simulated)" if t in sim else t
        best = max(row[c] for c in STRATEGIES)
        cells = [f"**{row[c]:.3f}**" if c in STRATEGIES and row[c] == best else f"{row[c]:.3f}" for c in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| mean | " + " | ".join(f"{result['mean'][c]:.3f}" for c in COLUMNS) + " |")
    if result.get("dice_ci"):
        lines += ["", "With uncertainty: mean DICE [bootstrap 95 % interval over the target's test slices]; "
                  "each strategy's paired difference to the pretrained model and to `avg` over the same "
                  "slices, * = sign-flip permutation p < 0.05.", "",
                  "| target | column | DICE | vs pretrained | vs avg |", "|---|---|---|---|---|"]
        for t, row in result["dice"].items():
            n = len(result["dice_per_image"][t]["pretrained"])
            for c in COLUMNS:
                lo, hi = result["dice_ci"][t][c]
                test = result["tests"][t].get(c, {})
                cells = [diff_cell(test.get("vs_pretrained")), diff_cell(test.get("vs_avg")) if c != "avg" else "–"]
                lines.append(f"| {t} ({n} slices) | {c} | {row[c]:.3f} [{lo:.3f}, {hi:.3f}] | "
                             + " | ".join(cells) + " |")
    lines += ["", "Weights per target (rows: strategy; columns: source site):", ""]
    for t, per in result["weights"].items():
        sources = list(next(iter(per.values())))
        lines += [f"**{t}**", "", "| strategy | " + " | ".join(sources) + " |", "|---" * (len(sources) + 1) + "|"]
        lines += [f"| {s} | " + " | ".join(f"{w[n]:+.2f}" for n in sources) + " |" for s, w in per.items()]
        lines.append("")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> Path:
    """Grouped bars: DICE per target for each column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = list(result["dice"])
    x = np.arange(len(targets))
    width = 0.8 / len(COLUMNS)
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(targets)), 3.6))
    for i, c in enumerate(COLUMNS):
        ax.bar(x + i * width, [result["dice"][t][c] for t in targets], width, label=c)
    ax.set_xticks(x + width * (len(COLUMNS) - 1) / 2, targets)
    ax.set_ylabel("DICE")
    ax.set_ylim(0, 1)
    ax.set_title(f"Leave-one-site-out: {result['dataset']}")
    ax.legend(ncol=4, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="prostate-multisite")
    p.add_argument("--model", default=sam.LITEMEDSAM)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--copies", type=int, default=1, help="augmented copies per training slice")
    p.add_argument("--prompt", default="center", choices=["none", "center", "jitter"])
    p.add_argument("--jitter", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None, help="store/reuse per-site adapters, z and stats here")
    p.add_argument("--only", default=None, help="with --workdir: prepare this one site and stop")
    p.add_argument("--out", type=Path, default=None, help="output stem (default benchmarks/SEG_LOO_<dataset>)")
    a = p.parse_args(argv)
    result = run(a.dataset, a.model, a.steps, a.lr, a.copies, PromptSpec(a.prompt, jitter=a.jitter), seed=a.seed,
                 workdir=a.workdir, only=a.only)
    if a.only is not None:
        return 0
    stem = a.out or OUT_DIR / f"SEG_LOO_{a.dataset.replace(':', '_').replace('-', '_')}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    stem.with_suffix(".md").write_text(md + f"\n![DICE per target]({stem.name}.png)\n")
    plot(result, stem.with_suffix(".png"))
    sys.stdout.write(md + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
