"""Privacy cost on real data: ROUGE-L of a DP-SGD LoRA vs a non-private one, with the ε spent.

``python -m benchmarks.dp_cost [--groups ct-head] [--noise 1.0]``: same data, steps and seed for
both; ε from Opacus' RDP accountant (δ = 1e-5). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import time

from common.data import report_groups, split
from common.evaluation import evaluate_task
from common.models import load_base_model
from common.tasks import TextReportTask
from common.training import DPConfig, LoraSpec, train_lora


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--groups", nargs="+", default=["ct-head"])
    p.add_argument("--noise", type=float, default=1.0, help="DP-SGD noise multiplier")
    p.add_argument("--clip", type=float, default=1.0, help="per-example gradient clipping norm")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--n-eval", type=int, default=20)
    args = p.parse_args()
    model, tok = load_base_model("smollm2-135m-instruct")
    task = TextReportTask()
    groups = report_groups()
    rows = []
    for g in args.groups:
        train, held = split(groups[g], args.n_eval, seed=0)
        train = train[:64]
        base = evaluate_task(model, tok, task, held)["rouge_l"]
        out = {"group": g, "base": base}
        for name, dp in (("non-private", None), ("dp", DPConfig(args.noise, args.clip))):
            t0 = time.perf_counter()
            adapter, stats = train_lora(model, tok, train, task, LoraSpec(), steps=args.steps, lr=2e-3,
                                        batch_size=4, max_length=192, seed=0, dp=dp, progress=False)
            out[name] = evaluate_task(model, tok, task, held, adapter=adapter)["rouge_l"]
            out[f"{name}_s"] = time.perf_counter() - t0
            if dp is not None:
                out["epsilon"] = stats["dp_epsilon"]
        rows.append(out)
    print(f"| group | base | non-private LoRA | DP-SGD LoRA (σ={args.noise}, C={args.clip}) | ε (δ=1e-5) |"
          " ROUGE-L cost | train s (non-private / DP) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['group']} | {r['base']:.3f} | {r['non-private']:.3f} | {r['dp']:.3f} | {r['epsilon']:.2f} | "
              f"{r['non-private'] - r['dp']:+.3f} | {r['non-private_s']:.0f} / {r['dp_s']:.0f} |")


if __name__ == "__main__":
    main()
