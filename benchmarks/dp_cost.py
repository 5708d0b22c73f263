"""Privacy cost on real data: ROUGE-L of DP-SGD LoRAs vs a non-private one, with the ε spent.

``python -m benchmarks.dp_cost [--groups ct-head mr-head] [--noise 1.0 0.5] [--out dp.json]``: the
same data, steps and seed for every arm of a group; ε from Opacus' RDP accountant (δ = 1e-5).
DP noise comes from OS entropy (as at a real site), so DP scores vary from run to run. Prints a
Markdown table; ``--out`` also writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common.families.report.data import report_groups, split
from common.families.report.evaluation import evaluate_task
from common.families.report.task import TextReportTask
from common.families.report.training import DPConfig, LoraSpec, train_lora
from common.models import load_base_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--groups", nargs="+", default=["ct-head"])
    p.add_argument("--noise", type=float, nargs="+", default=[1.0], help="DP-SGD noise multiplier(s)")
    p.add_argument("--clip", type=float, default=1.0, help="per-example gradient clipping norm")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--n-train", type=int, default=64, help="at most this many training reports per group")
    p.add_argument("--n-eval", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4, help="expected batch size (DP: Poisson rate = this / n)")
    p.add_argument("--lr", type=float, default=2e-3, help="learning rate of the non-private arm (and DP, by default)")
    p.add_argument("--dp-lr", type=float, default=None, help="learning rate of the DP arms (default: --lr)")
    p.add_argument("--no-non-private", action="store_true", help="skip the non-private arm (already measured)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    model, tok = load_base_model("smollm2-135m-instruct")
    task = TextReportTask()
    groups = report_groups()
    rows = []
    for g in args.groups:
        train, held = split(groups[g], args.n_eval, seed=0)
        train = train[: args.n_train]
        base = evaluate_task(model, tok, task, held)["rouge_l"]
        out = {"group": g, "n_train": len(train), "batch_size": args.batch_size, "base": base, "dp": []}
        arms: list[DPConfig | None] = [] if args.no_non_private else [None]
        arms += [DPConfig(s, args.clip) for s in args.noise]
        out.update(
            {"non_private": float("nan"), "non_private_s": float("nan"), "lr": args.lr, "dp_lr": args.dp_lr or args.lr}
        )
        for dp in arms:
            t0 = time.perf_counter()
            lr = args.lr if dp is None else (args.dp_lr or args.lr)
            adapter, stats = train_lora(
                model,
                tok,
                train,
                task,
                LoraSpec(),
                steps=args.steps,
                lr=lr,
                batch_size=args.batch_size,
                max_length=192,
                seed=0,
                dp=dp,
                progress=False,
            )
            score = evaluate_task(model, tok, task, held, adapter=adapter)["rouge_l"]
            seconds = time.perf_counter() - t0
            if dp is None:
                out.update({"non_private": score, "non_private_s": seconds})
            else:
                out["dp"].append(
                    {
                        "noise": dp.noise_multiplier,
                        "rouge_l": score,
                        "epsilon": stats["dp_epsilon"],
                        "sample_rate": stats["dp_sample_rate"],
                        "seconds": seconds,
                    }
                )
        rows.append(out)
        print(json.dumps(out), flush=True)
    print(
        f"\n| group | reports | batch | base | non-private LoRA | DP-SGD LoRA (C={args.clip:g}): ROUGE-L at ε "
        "(δ=1e-5) | ROUGE-L cost | train+eval s (non-private / DP) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        dp = "; ".join(f"{d['rouge_l']:.3f} at ε={d['epsilon']:.2f} (σ={d['noise']:g})" for d in r["dp"])
        cost = "; ".join(f"{r['non_private'] - d['rouge_l']:+.3f}" for d in r["dp"])
        secs = " / ".join(f"{d['seconds']:.0f}" for d in r["dp"])
        print(
            f"| {r['group']} | {r['n_train']} | {r['batch_size']} | {r['base']:.3f} | {r['non_private']:.3f} | "
            f"{dp} | {cost} | {r['non_private_s']:.0f} / {secs} |"
        )
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "clip": args.clip, "steps": args.steps}, indent=1))


if __name__ == "__main__":
    main()
