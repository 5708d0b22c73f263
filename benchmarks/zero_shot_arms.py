"""Do the arms of a leave-one-site-out evaluation say different things? (issue 28, item 5)

Re-creates, from a registry and its evaluation's ``results.csv``, every arm a target was sent
(each composed arm from its sources and weights, the target's own LoRA, the base model), generates
the target's held-out reports under each arm twice - once in the site's one-pass path
(``generate_arms``: per-row LoRA hooks, as ``client/arms.py`` runs it) and once arm by arm with the
update merged into the weights (``evaluate_task``) - and reports:

- the share of held-out reports on which two arms produce identical text (pairwise);
- whether the one-pass path and the arm-by-arm path agree (if they do, nothing in the batching
  collapses the arms);
- how far the composed updates ΔW = Σ w_i s_i B_i A_i of two arms are apart, relative to their size,
  and how large they are relative to the base weights W (why greedy decoding can ignore them).

    python -m benchmarks.zero_shot_arms --registry runs/demo/registry --data runs/demo/data/report-text

Writes ``arm_agreement.json`` beside the evaluation's ``results.csv`` unless ``--out`` says where.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any


def read_arms(csv_path: Path) -> dict[str, list[dict[str, Any]]]:
    """``{target: [{"method", "sources", "weights", "score"}, ...]}`` from an evaluation's results.csv."""
    out: dict[str, list[dict[str, Any]]] = {}
    with open(csv_path, newline="") as fh:
        for row in csv.DictReader(fh):
            sources = [s for s in row["sources"].split(";") if s]
            weights = [float(w) for w in row["weights"].split(";") if w]
            score = next(v for k, v in row.items() if k not in ("target", "method", "n", "sources", "weights"))
            out.setdefault(row["target"], []).append(
                {"method": row["method"], "sources": sources, "weights": weights, "score": float(score or "nan")}
            )
    return out


def identical_shares(outputs: dict[str, list[str]]) -> dict[str, float]:
    """``{"a|b": share of items on which arms a and b produced the same output}`` for every pair."""
    names = list(outputs)
    return {
        f"{a}|{b}": sum(x == y for x, y in zip(outputs[a], outputs[b], strict=True)) / max(1, len(outputs[a]))
        for a, b in itertools.combinations(names, 2)
    }


def delta_norms(adapter: Any) -> tuple[dict[str, Any], float]:
    """The dense ΔW per module (float64) and the Frobenius norm of all of them together."""
    import torch

    deltas = {name: (float(m.scale) * (m.B.double() @ m.A.double())) for name, m in adapter.modules.items()}
    total = float(torch.sqrt(sum((d**2).sum() for d in deltas.values())))
    return deltas, total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--registry", type=Path, required=True, help="the registry the evaluation ran on")
    ap.add_argument("--data", type=Path, required=True, help="folder with one data folder per site (eval.jsonl)")
    ap.add_argument("--evaluation", type=Path, default=None, help="results.csv (default: the newest evaluation)")
    ap.add_argument("--model", default=str(Path.home() / ".cache" / "rpe" / "smollm2-135m-instruct"))
    ap.add_argument("--task", default="report-text")
    ap.add_argument("--max-eval", type=int, default=10, help="held-out reports per target (the run's max-eval)")
    ap.add_argument("--targets", default="", help="comma-separated targets (default: every target)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--no-generate", action="store_true", help="only the updates' sizes and distances (seconds)")
    args = ap.parse_args(argv)

    import torch

    from common.adapters import compose
    from common.families.report.evaluation import evaluate_task, generate_arms
    from common.families.report.family import load_site_examples
    from common.families.report.task import TextReportTask, rouge_l
    from common.models import load_base_model
    from server.registry import Registry

    csv_path = args.evaluation or max(args.registry.glob("evaluations/*/results.csv"), key=lambda p: p.stat().st_mtime)
    arms_of = read_arms(csv_path)
    wanted = [t for t in args.targets.split(",") if t] or sorted(arms_of)
    registry = Registry(args.registry, read_only=True)
    own = {r.meta.site: r.id for r in registry.list(task=args.task)}
    adapters = {site: registry.load_adapter(rid) for site, rid in own.items()}
    model, tok = load_base_model(args.model)
    task = TextReportTask()
    report: dict[str, Any] = {"evaluation": str(csv_path), "model": args.model, "targets": {}}
    for t in wanted:
        t0 = time.perf_counter()
        held = [ex for ex in load_site_examples(args.data / t).eval if ex.target is not None][: args.max_eval]
        prompts = [task.build_prompt(ex, tok) for ex in held]
        refs = [ex.target for ex in held]
        names, arm_adapters = [], []
        for arm in arms_of[t]:
            names.append(arm["method"])
            if arm["method"] == "base":
                arm_adapters.append(None)
            else:
                used = [(adapters[s], w) for s, w in zip(arm["sources"], arm["weights"], strict=True) if w != 0.0]
                arm_adapters.append(compose([a for a, _ in used], [w for _, w in used]))
        if args.no_generate:
            one_pass = by_arm = [[""] * len(held) for _ in arm_adapters]
        else:
            one_pass = generate_arms(model, tok, prompts, arm_adapters, task.max_new_tokens)
            by_arm = [evaluate_task(model, tok, task, held, a)["predictions"] for a in arm_adapters]
        outputs = dict(zip(names, one_pass, strict=True))
        norms: dict[str, float] = {}
        deltas: dict[str, Any] = {}
        for n, a in zip(names, arm_adapters, strict=True):
            if a is not None:
                deltas[n], norms[n] = delta_norms(a)
        w_norm = float(
            torch.sqrt(
                sum(
                    (dict(model.named_modules())[m].weight.detach().double() ** 2).sum()
                    for m in next(iter(deltas.values())).keys()
                )
            )
        )
        rel_apart = {}
        for a, b in itertools.combinations(deltas, 2):
            diff = float(torch.sqrt(sum(((deltas[a][m] - deltas[b][m]) ** 2).sum() for m in deltas[a])))
            rel_apart[f"{a}|{b}"] = diff / max(norms[a], norms[b])
        report["targets"][t] = {
            "n": len(held),
            "arms": names,
            "scores_in_run": {a["method"]: a["score"] for a in arms_of[t]},
            "scores_here": {n: task.score(o, refs)["rouge_l"] for n, o in outputs.items()},
            "identical_share": identical_shares(outputs),
            "identical_to_base_share": {
                n: sum(x == y for x, y in zip(o, outputs["base"], strict=True)) / len(held)
                for n, o in outputs.items()
                if "base" in outputs
            },
            "one_pass_equals_arm_by_arm": {
                n: sum(x == y for x, y in zip(o, b, strict=True)) / len(held)
                for n, o, b in zip(names, one_pass, by_arm, strict=True)
            },
            "delta_norm": norms,
            "base_weight_norm": w_norm,
            "delta_relative_distance": rel_apart,
            "outputs": outputs,
            "references": refs,
            "per_report_rouge_l": {
                n: [rouge_l([p], [r]) for p, r in zip(o, refs, strict=True)] for n, o in outputs.items()
            },
            "seconds": time.perf_counter() - t0,
        }
        print(f"{t}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        out = args.out or csv_path.parent / "arm_agreement.json"
        out.write_text(json.dumps(report, indent=1, default=float) + "\n")  # after each target
    for t, r in report["targets"].items():
        print(f"\n## {t} (n = {r['n']})")
        print("scores in run:", {k: round(v, 4) for k, v in r["scores_in_run"].items()})
        print("scores here:  ", {k: round(v, 4) for k, v in r["scores_here"].items()})
        print("one-pass == arm-by-arm:", r["one_pass_equals_arm_by_arm"])
        print("identical pairs:", {k: round(v, 2) for k, v in r["identical_share"].items() if v > 0})
        print("ΔW norms:", {k: round(v, 3) for k, v in r["delta_norm"].items()}, "‖W‖", round(r["base_weight_norm"], 1))
        print("ΔW apart (rel):", {k: round(v, 2) for k, v in r["delta_relative_distance"].items()})
    print(f"\nwritten {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
