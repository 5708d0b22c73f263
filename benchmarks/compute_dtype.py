"""bfloat16 versus float32 at a report site: speed and quality (why ``compute-dtype = auto``).

``python -m benchmarks.compute_dtype`` (one torch thread, the real SmolLM2-135M and real reports):

- **speed**: ``train_lora`` (30 steps, batch 4, max_length 160, r = 8 on q/v: the main job's quick
  profile) and ``evaluate_task_arms`` (8 arms x 12 held-out reports, 32 new tokens) on one site,
  float32 and bfloat16 weights alternating, medians of ``--repeat`` runs;
- **quality**: for every report group, ROUGE-L on ``--held`` held-out reports of (a) the base model,
  generated in float32 and in bfloat16, and (b) the group's own LoRA trained in float32 and in
  bfloat16 (the same seed and data), both generated in float32 - so (a) isolates generation and (b)
  training.

Writes ``benchmarks/COMPUTE_DTYPE.md`` and ``.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from benchmarks.util import ROOT, apply_threads, load_average, log, machine_info, median, now, table, write_json

GROUPS = ("xray-chest", "ct-abdomen", "ct-head", "mr-head")


def run(held: int = 48, repeat: int = 2, train_n: int = 48) -> dict[str, Any]:
    import torch

    from common.families.report.data import report_groups, split
    from common.families.report.evaluation import evaluate_task, evaluate_task_arms
    from common.families.report.task import TextReportTask
    from common.families.report.training import LoraSpec, train_lora
    from common.models import cast_parameters, load_base_model

    task = TextReportTask()
    groups = report_groups()
    models = {"float32": load_base_model("smollm2-135m-instruct")[0]}
    m16, tok = load_base_model("smollm2-135m-instruct")
    models["bfloat16"] = cast_parameters(m16, torch.bfloat16)
    data = {}
    for g in GROUPS:
        train, test = split(groups[g], held, seed=0)
        data[g] = (train[:train_n], test[:held])
    out: dict[str, Any] = {"speed": {}, "quality": {}}

    train, test = data["xray-chest"]
    speed: dict[str, dict[str, list[float]]] = {d: {"train": [], "generate": []} for d in models}
    for i in range(repeat):
        for dt in ("float32", "bfloat16") if i % 2 == 0 else ("bfloat16", "float32"):
            t = now()
            adapter, _ = train_lora(
                models[dt], tok, train, task, LoraSpec(), steps=30, batch_size=4, max_length=160, progress=False
            )
            speed[dt]["train"].append(now() - t)
            t = now()
            evaluate_task_arms(models[dt], tok, task, test[:12], [adapter, None] * 4)
            speed[dt]["generate"].append(now() - t)
            log(f"speed {dt}: train {speed[dt]['train'][-1]:.1f} s, 8-arm generation {speed[dt]['generate'][-1]:.1f} s")
    out["speed"] = speed

    for g in GROUPS:
        train, test = data[g]
        row: dict[str, float] = {}
        for dt in models:
            row[f"base_{dt}"] = evaluate_task(models[dt], tok, task, test, batch_size=16)["rouge_l"]
        for dt in models:
            adapter, _ = train_lora(
                models[dt], tok, train, task, LoraSpec(), steps=30, batch_size=4, max_length=160, progress=False
            )
            row[f"own_{dt}"] = evaluate_task(models["float32"], tok, task, test, adapter=adapter, batch_size=16)[
                "rouge_l"
            ]
        out["quality"][g] = row
        log(f"quality {g}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()))
    return out


def render(res: dict[str, Any], info: dict[str, Any], args: argparse.Namespace) -> str:
    sp = res["speed"]
    lines = [
        "# bfloat16 vs float32 at a report site (`compute-dtype`)",
        "",
        f"`python -m benchmarks.compute_dtype --held {args.held} --repeat {args.repeat}` on {info['date_utc']} "
        f"({info['cpu_model']}, CPU flags {info.get('cpu_flags') or 'n/a'}, one torch thread; load "
        f"{res['load'][0]:.2f} -> {res['load'][1]:.2f}). SmolLM2-135M-Instruct, real reports.",
        "",
        "## Speed (one site: 48 training reports, 12 held-out; medians, float32 and bf16 alternating)",
        "",
    ]
    rows = []
    for what, label in (
        ("train", "LoRA training, 30 steps x 4 x <=160 tokens"),
        ("generate", "generation, 8 arms x 12 reports, 32 new tokens"),
    ):
        f, b = median(sp["float32"][what]), median(sp["bfloat16"][what])
        rows.append([label, f"{f:.1f} s", f"{b:.1f} s", f"{f / b:.2f}x"])
    lines += table(["", "float32", "bfloat16", "speed-up"], rows) + [""]
    lines += [
        f"## Quality (ROUGE-L F1 on {args.held} held-out reports per group)",
        "",
        "`base`: the base model generating in each dtype. `own`: the group's own LoRA (48 reports, 30 steps, "
        "same seed) trained in each dtype, both generating in float32.",
        "",
    ]
    q = res["quality"]
    keys = ("base_float32", "base_bfloat16", "own_float32", "own_bfloat16")
    rows = [[g, *[f"{q[g][k]:.4f}" for k in keys]] for g in q]
    rows.append(["**mean**", *[f"{sum(q[g][k] for g in q) / len(q):.4f}" for k in keys]])
    lines += table(["group", "base fp32", "base bf16", "own fp32-trained", "own bf16-trained"], rows) + [""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.compute_dtype",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--held", type=int, default=48, help="held-out reports per group for the quality table")
    ap.add_argument("--repeat", type=int, default=2, help="speed runs per dtype")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "COMPUTE_DTYPE.md")
    args = ap.parse_args(argv)
    apply_threads(1)
    info = machine_info()
    before = load_average()[0]
    res = run(args.held, args.repeat)
    res["load"] = [before, load_average()[0]]
    res["machine"] = info
    write_json(args.out.with_suffix(".json"), res)
    args.out.write_text(render(res, info, args))
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
