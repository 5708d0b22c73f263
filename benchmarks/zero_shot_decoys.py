"""A mixed-task library: does retrieval keep its score while "average everything" falls? (issue 28, item 1)

The library holds the impression adapters of the reduced zero-shot profile's first ``--library``
sites and ``M`` *decoy* adapters: other tasks trained on the same sites' text, round-robin over

- ``continuation``: findings continuation (first part of the findings -> the next words);
- ``imp2find``: impression -> findings (the task reversed);
- ``modality``: modality / body part as text (findings -> the report group's name, e.g. "ct head");
- ``nonmed``: a non-medical continuation task on the Python documentation that ships with Python
  (``pydoc_data.topics``).

All use the report family's prompt template (the instruction does not change with the decoy task:
only what the adapter learned to answer does). Every adapter's z is the base model's mean embedding of
its *inputs*, as a site's would be. For each target (the reduced profile's single-group and affine
targets, ``--eval`` held-out reports each) and each M, the arms are

- ``sim``, ``lin``, ``lin-l1`` over the k nearest adapters (k = 3);
- ``soup``: uniform average of the k retrieved adapters (the AdapterSoup baseline: retrieve, then
  average uniformly);
- ``avg-all``: uniform average of every adapter in the library (one-shot FedAvg of the deltas);
- ``nearest``; and, once per target, ``base`` and ``own`` (the target's supervised LoRA).

Scores are ROUGE-L per held-out report, mean with a bootstrap 95 % interval, and paired differences
against ``base`` (bootstrap interval, sign-flip p). Retrieval precision is the share of the k
retrieved adapters that are impression adapters. LoRAs, z and generations are cached in the zero-shot
cache (``$RPE_CACHE_DIR/zero_shot``), so a larger M only trains the new decoys.

    python -m benchmarks.zero_shot_decoys --decoys 0,8 --eval 20      # writes benchmarks/zero_shot/decoys/
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.zero_shot import (
    GROUPS,
    PROFILES,
    Lab,
    _compose,
    _retrieve,
    _weights,
    bootstrap_ci,
    build_library,
    build_targets,
    paired_test,
    per_report_rouge,
    split_pools,
)

HERE = Path(__file__).resolve().parent
DECOY_TASKS = ("continuation", "imp2find", "modality", "nonmed")
K = 3


def _words(text: str) -> list[str]:
    return re.sub(r"\s+", " ", text).strip().split(" ")


def decoy_examples(task: str, site_examples: Sequence[Any], index: int) -> list[Any]:
    """The decoy task's training examples made from one site's reports (``nonmed``: Python docs)."""
    from common.families.report.data import Example

    out = []
    if task == "nonmed":
        import pydoc_data.topics as topics

        names = sorted(topics.topics)
        picked = [names[(index * 7 + j) % len(names)] for j in range(24)]  # a different window per decoy
        for j, name in enumerate(picked):
            w = _words(topics.topics[name])
            if len(w) < 30:
                continue
            out.append(Example(" ".join(w[:60]), " ".join(w[60:75]) or name, "nonmed", f"nonmed:{name}:{j}"))
        return out
    for ex in site_examples:
        w = _words(ex.prompt)
        if task == "continuation" and len(w) >= 12:
            cut = max(6, len(w) // 2)
            out.append(Example(" ".join(w[:cut]), " ".join(w[cut : cut + 16]), ex.group, f"{ex.uid}:cont"))
        elif task == "imp2find" and ex.target:
            out.append(Example(ex.target, " ".join(w[:24]), ex.group, f"{ex.uid}:i2f"))
        elif task == "modality":
            out.append(Example(ex.prompt, ex.group.replace("-", " "), ex.group, f"{ex.uid}:mod"))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--decoys", default="0,8", help="library decoy counts M, comma-separated (default 0,8)")
    ap.add_argument("--library", type=int, default=8, help="impression sites (the reduced library's first)")
    ap.add_argument("--eval", type=int, default=20, help="held-out reports per target")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--out", type=Path, default=HERE / "zero_shot" / "decoys")
    ap.add_argument(
        "--retrieval-only",
        action="store_true",
        help="only z and retrieval precision vs M (no LoRA is trained, nothing generated): cheap",
    )
    ap.add_argument("--decoy-texts", type=int, default=0, help="cap each decoy's examples (0 = all)")
    args = ap.parse_args(argv)
    from common.families.report.data import report_groups

    t_start = time.perf_counter()
    ms = sorted({int(x) for x in args.decoys.split(",") if x.strip()})
    p = replace(PROFILES["reduced"], bertscore=False)
    cache = Path(os.environ.get("RPE_CACHE_DIR", Path.home() / ".cache" / "rpe")) / "zero_shot"
    lab = Lab(args.model, p, cache)
    all_groups = report_groups(min_size=1)
    groups = {g: all_groups[g] for g in GROUPS if g in all_groups}
    ref_pool, tgt_pool = split_pools(groups, p.target_fraction, args.seed, min_target=20)
    full_library = build_library(ref_pool, p, max(p.library_sizes), args.seed)
    targets = [t for t in build_targets(tgt_pool, full_library, p, args.seed) if t.kind != "far"]
    library = full_library[: args.library]
    for t in targets:
        t.eval = t.eval[: args.eval]
    # decoys: round-robin over tasks, each made from one site's text (the library's sites first)
    decoys: list[tuple[str, str, list[Any]]] = []
    for i in range(max(ms)):
        task = DECOY_TASKS[i % len(DECOY_TASKS)]
        src = full_library[(i // len(DECOY_TASKS)) % len(full_library)]  # the library's sites first, then others
        exs = decoy_examples(task, src.train, i)
        decoys.append(
            (f"decoy-{i:02d}-{task}-from-{src.name}", task, exs[: args.decoy_texts] if args.decoy_texts else exs)
        )
    if args.retrieval_only:
        return retrieval_only(args, lab, library, decoys, targets, ms, t_start)

    adapters: dict[str, Any] = {}
    Z: dict[str, np.ndarray] = {}
    kind: dict[str, str] = {}
    jobs = [(s.name, "impression", s.train) for s in library] + decoys + [(t.name, "own", t.train) for t in targets]
    t0 = time.perf_counter()
    for i, (name, task, exs) in enumerate(jobs):
        adapters[name] = lab.lora(exs)
        Z[name] = lab.z(exs if task != "own" else next(t for t in targets if t.name == name).query, "last")
        kind[name] = task
        print(
            f"[decoys] LoRA + z {i + 1}/{len(jobs)} {name} ({len(exs)} examples) {time.perf_counter() - t0:.0f} s",
            flush=True,
        )
    t_train = time.perf_counter() - t0

    rows: list[dict[str, Any]] = []
    retrieval: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for t in targets:
        refs = [e.target for e in t.eval]
        z_t = Z[t.name]
        arms: list[tuple[str, int | None, dict[str, float] | None]] = [
            ("base", None, None),
            ("own", None, {t.name: 1.0}),
        ]
        for m in ms:
            names = [s.name for s in library] + [d[0] for d in decoys[:m]]
            chosen = _retrieve(z_t, Z, names, K)
            retrieval.append(
                {
                    "target": t.name,
                    "m": m,
                    "retrieved": chosen,
                    "precision_same_task": sum(kind[c] == "impression" for c in chosen) / K,
                    "decoy_kinds_retrieved": [kind[c] for c in chosen if kind[c] != "impression"],
                }
            )
            arms.append(("avg-all", m, {s: 1.0 / len(names) for s in names}))
            arms.append(("soup", m, {s: 1.0 / K for s in chosen}))
            arms.append(("nearest", m, {chosen[0]: 1.0}))
            for st in ("sim", "lin", "lin-l1"):
                arms.append((st, m, _weights(st, z_t, Z, chosen)))
        scores: dict[tuple[str, int | None], list[float]] = {}
        for a0 in range(0, len(arms), 6):
            group = arms[a0 : a0 + 6]
            made = lab.generations(
                t,
                [
                    (_compose(adapters, w) if w else None, sorted((s, round(x, 8)) for s, x in (w or {}).items()))
                    for _, _, w in group
                ],
            )
            for (name, m, _), preds in zip(group, made, strict=True):
                scores[(name, m)] = per_report_rouge(preds, refs)
                print(
                    f"[decoys] {t.name} {name} M={m}: ROUGE-L {np.mean(scores[(name, m)]):.3f} "
                    f"({time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )
        base = scores[("base", None)]
        for name, m, w in arms:
            r = scores[(name, m)]
            avg = scores.get(("avg-all", m)) if m is not None else None
            rows.append(
                {
                    "target": t.name,
                    "arm": name,
                    "m": m,
                    "weights": w if name != "own" else None,
                    "decoy_weight": (
                        float(sum(abs(x) for s, x in w.items() if kind.get(s) not in ("impression", "own")))
                        if w and name != "own"
                        else 0.0
                    ),
                    "rouge_l": float(np.mean(r)),
                    "rouge_l_ci": bootstrap_ci(r, p.bootstrap),
                    "vs_base": paired_test(r, base, p.bootstrap),
                    "vs_avg_all": paired_test(r, avg, p.bootstrap) if avg is not None and name != "avg-all" else None,
                    "n_eval": len(r),
                }
            )
    out = {
        "command": "python -m benchmarks.zero_shot_decoys --decoys "
        + ",".join(map(str, ms))
        + f" --library {args.library} --eval {args.eval}",
        "model": str(lab.model_dir),
        "profile": "reduced (steps, lr, rank, lengths), bertscore off",
        "library": [s.name for s in library],
        "decoys": [{"name": n, "task": k, "n_train": len(e)} for n, k, e in decoys],
        "targets": [t.describe() for t in targets],
        "k": K,
        "results": rows,
        "retrieval": retrieval,
        "timings": {
            "train_and_embed_s": t_train,
            "evaluate_s": time.perf_counter() - t0,
            "total_s": time.perf_counter() - t_start,
        },
        "cache": lab.counts,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(out, indent=1) + "\n")
    (args.out / "DECOYS.md").write_text(markdown(out, ms))
    print(markdown(out, ms))
    return 0


def retrieval_only(
    args: Any,
    lab: Lab,
    library: Sequence[Any],
    decoys: Sequence[Any],
    targets: Sequence[Any],
    ms: Sequence[int],
    t0: float,
) -> int:
    """Does z separate tasks? precision@k of impression adapters among the k nearest, vs M."""
    Z = {s.name: lab.z(s.train, "last") for s in library}
    kind = {s.name: "impression" for s in library}
    for name, task, exs in decoys:
        Z[name], kind[name] = lab.z(exs, "last"), task
    lines = [
        f"Command: `python -m benchmarks.zero_shot_decoys --retrieval-only --decoys {','.join(map(str, ms))} "
        f"--library {args.library} --decoy-texts {args.decoy_texts}`; {time.perf_counter() - t0:.0f} s.",
        "",
        "| target | M | precision@3 (impression adapters) | retrieved decoys | nearest decoy d² / nearest impression d² |",
        "|---|---|---|---|---|",
    ]
    rows = []
    for t in targets:
        z_t = lab.z(t.query, "last")
        for m in ms:
            names = [s.name for s in library] + [d[0] for d in decoys[:m]]
            chosen = _retrieve(z_t, Z, names, K)
            d = {n: float(np.sum((Z[n] - z_t) ** 2)) for n in names}
            imp = min(v for n, v in d.items() if kind[n] == "impression")
            dec = min((v for n, v in d.items() if kind[n] != "impression"), default=float("nan"))
            prec = sum(kind[c] == "impression" for c in chosen) / K
            got = [kind[c] for c in chosen if kind[c] != "impression"]
            rows.append({"target": t.name, "m": m, "precision": prec, "retrieved_decoys": got, "ratio": dec / imp})
            lines.append(f"| {t.name} | {m} | {prec:.2f} | {', '.join(got) or '–'} | {dec / imp:.2f} |")
        per_task = {
            task: float(np.median([np.sum((Z[n] - z_t) ** 2) for n, k, _ in decoys if k == task]))
            for task in DECOY_TASKS
            if any(k == task for _, k, _ in decoys)
        }
        lines.append(
            f"| {t.name} | median d² by decoy task | | "
            + ", ".join(f"{k} {v:.1f}" for k, v in per_task.items())
            + f"; impression sites {np.median([np.sum((Z[s.name] - z_t) ** 2) for s in library]):.1f} | |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "retrieval.json").write_text(json.dumps({"rows": rows, "decoys": [d[:2] for d in decoys]}, indent=1))
    (args.out / "RETRIEVAL.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _cell(row: dict[str, Any]) -> str:
    lo, hi = row["rouge_l_ci"]
    return f"{row['rouge_l']:.3f} [{lo:.3f}, {hi:.3f}]"


def _diff(d: dict[str, float] | None) -> str:
    if not d:
        return "–"
    star = "*" if d["p"] < 0.05 else ""
    return f"{d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]{star}"


def markdown(out: dict[str, Any], ms: Sequence[int]) -> str:
    lines = [
        f"Command: `{out['command']}`; {len(out['library'])} impression sites, decoys "
        f"{', '.join(d['name'] for d in out['decoys'])}; k = {out['k']}; "
        f"{out['timings']['total_s'] / 60:.1f} min; cache {out['cache']}.",
        "",
        "ROUGE-L per held-out report, mean [bootstrap 95 %]; differences paired over the same reports, "
        "* = sign-flip p < 0.05. `soup` = uniform average of the k retrieved adapters (AdapterSoup); "
        "`avg-all` = uniform average of the whole library (one-shot FedAvg).",
        "",
        "| target | arm | " + " | ".join(f"M={m}" for m in ms) + " | vs base at M=" + str(max(ms)) + " |",
        "|---|---|" + "---|" * len(ms) + "---|",
    ]
    by = {(r["target"], r["arm"], r["m"]): r for r in out["results"]}
    for t in dict.fromkeys(r["target"] for r in out["results"]):
        for arm in ("base", "own"):
            r = by[(t, arm, None)]
            lines.append(f"| {t} | {arm} | " + " | ".join([_cell(r)] * len(ms)) + f" | {_diff(r['vs_base'])} |")
        for arm in ("sim", "lin", "lin-l1", "soup", "nearest", "avg-all"):
            cells = [_cell(by[(t, arm, m)]) for m in ms]
            lines.append(f"| {t} | {arm} | " + " | ".join(cells) + f" | {_diff(by[(t, arm, max(ms))]['vs_base'])} |")
    lines += ["", "Retrieval: share of the k retrieved adapters that are impression adapters (same task).", ""]
    lines += ["| target | M | precision (same task) | retrieved decoys |", "|---|---|---|---|"]
    for r in out["retrieval"]:
        lines.append(
            f"| {r['target']} | {r['m']} | {r['precision_same_task']:.2f} | {', '.join(r['decoy_kinds_retrieved']) or '–'} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
