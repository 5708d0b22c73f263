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

    python -m benchmarks.zero_shot_decoys --decoys 0,8 --library 4 --eval 12 --seeds 0,1,2
    # as in benchmarks/ZERO_SHOT.md; --out defaults to benchmarks/zero_shot/decoys/
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
    build_library,
    build_targets,
    paired_test,
    per_report_rouge,
    split_pools,
)

HERE = Path(__file__).resolve().parent
DECOY_TASKS = ("continuation", "imp2find", "modality", "nonmed")
K = 3
ARMS = ("sim", "lin", "lin-l1", "soup", "nearest", "avg-all")  # composed arms, per M


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


# ---------------------------------------------------------------------------------------------
# Pure parts: arms, retrieval precision, eval samples, intervals over seeds x reports
# ---------------------------------------------------------------------------------------------


def library_arms(
    z_t: np.ndarray, Z: dict[str, np.ndarray], names: Sequence[str], k: int = K
) -> tuple[list[str], list[tuple[str, dict[str, float]]]]:
    """(the k retrieved names, the composed arms over the library ``names`` for one target).

    ``avg-all`` weighs every adapter 1/len(names) (one-shot FedAvg of the deltas); ``soup`` the k
    retrieved 1/k each (AdapterSoup); ``nearest`` the closest alone; ``sim``/``lin``/``lin-l1`` are the
    coordinator's strategies (``server.strategies``) over the k retrieved."""
    chosen = _retrieve(z_t, Z, names, k)
    arms: list[tuple[str, dict[str, float]]] = [
        ("avg-all", {s: 1.0 / len(names) for s in names}),
        ("soup", {s: 1.0 / len(chosen) for s in chosen}),
        ("nearest", {chosen[0]: 1.0}),
    ]
    arms += [(st, _weights(st, z_t, Z, chosen)) for st in ("sim", "lin", "lin-l1")]
    return chosen, arms


def precision_same_task(chosen: Sequence[str], kind: dict[str, str], task: str = "impression") -> float:
    """Share of the retrieved adapters that were trained on the target's task."""
    return sum(kind[c] == task for c in chosen) / len(chosen) if chosen else float("nan")


def decoy_weight(weights: dict[str, float] | None, kind: dict[str, str], task: str = "impression") -> float:
    """Total |weight| a composition puts on adapters of another task than the target's (``task``)."""
    return float(sum(abs(x) for s, x in (weights or {}).items() if kind.get(s) not in (task, "own")))


def eval_sample(n_pool: int, n: int, seed: int) -> list[int]:
    """Indices of the held-out reports a seed scores: seed 0 the first ``n`` (the single-seed runs'
    reports), another seed ``n`` drawn without repeats from the target's held-out pool."""
    n = min(n, n_pool)
    if seed == 0:
        return list(range(n))
    return sorted(int(i) for i in np.random.default_rng(1000 + seed).choice(n_pool, size=n, replace=False))


def seeds_interval(
    per_seed: Sequence[Sequence[float]], n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """(mean, lo, hi): two-stage percentile bootstrap over seeds x reports.

    Each replicate draws the seeds with replacement, then, within each drawn seed, its reports with
    replacement, and takes the mean of everything drawn; so the interval holds both the variance
    between seeds (training seed + eval sample) and between reports. With one seed it is the plain
    bootstrap over reports."""
    groups = [np.asarray(g, dtype=np.float64) for g in per_seed if len(g)]
    if not groups:
        return (float("nan"), float("nan"), float("nan"))
    mean = float(np.mean(np.concatenate(groups)))
    rng = np.random.default_rng(seed)
    reps = np.empty(n_boot)
    for b in range(n_boot):
        picked = rng.integers(0, len(groups), size=len(groups))
        reps[b] = np.mean(
            np.concatenate([g[rng.integers(0, g.size, size=g.size)] for g in (groups[i] for i in picked)])
        )
    lo, hi = np.quantile(reps, [(1 - level) / 2, 1 - (1 - level) / 2])
    return mean, float(lo), float(hi)


def seed_spread(per_seed: Sequence[Sequence[float]]) -> dict[str, Any]:
    """Per-seed means, their mean and sample standard deviation (0 with one seed)."""
    means = [float(np.mean(g)) for g in per_seed if len(g)]
    return {
        "means": means,
        "mean": float(np.mean(means)) if means else float("nan"),
        "sd": float(np.std(means, ddof=1)) if len(means) > 1 else 0.0,
    }


# ---------------------------------------------------------------------------------------------
# Compute
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--decoys", default="0,8", help="library decoy counts M, comma-separated (default 0,8)")
    ap.add_argument("--library", type=int, default=8, help="impression sites (the reduced library's first)")
    ap.add_argument("--eval", type=int, default=20, help="held-out reports per target and seed")
    ap.add_argument(
        "--seeds",
        default="0",
        help="comma-separated seeds; each trains every LoRA with that seed and scores its own sample of "
        "held-out reports (seed 0: the first --eval); the tables pool them (default 0)",
    )
    ap.add_argument(
        "--eval-seeds-only",
        action="store_true",
        help="every seed uses the seed-0 LoRAs and only draws its own held-out reports (no training "
        "seed variance; costs generation only)",
    )
    ap.add_argument("--data-seed", type=int, default=0, help="the library / target split (fixed across --seeds)")
    ap.add_argument(
        "--max-length",
        type=int,
        default=96,
        help="training tokens per example (the reduced profile's 160 shortened: long findings are cut, "
        "the answer is kept; default 96)",
    )
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--out", type=Path, default=HERE / "zero_shot" / "decoys")
    ap.add_argument(
        "--retrieval-only",
        action="store_true",
        help="only z and retrieval precision vs M (no LoRA is trained, nothing generated): cheap",
    )
    ap.add_argument("--decoy-texts", type=int, default=0, help="cap each decoy's examples (0 = all)")
    ap.add_argument(
        "--train-shard",
        default="",
        metavar="K/N",
        help="only train (into the cache) every N-th LoRA starting at K, then exit: run N of these in "
        "parallel, then the plain command scores from the cache (default: train and score everything)",
    )
    args = ap.parse_args(argv)
    shard: tuple[int, int] | None = None
    if args.train_shard:
        try:
            k_s, n_s = (int(x) for x in args.train_shard.split("/"))
        except ValueError:
            ap.error(f"--train-shard {args.train_shard!r}: expected K/N with 0 <= K < N, e.g. 0/2")
        if not 0 <= k_s < n_s:
            ap.error(f"--train-shard {args.train_shard!r}: expected K/N with 0 <= K < N, e.g. 0/2")
        shard = (k_s, n_s)
    from common.families.report.data import report_groups

    t_start = time.perf_counter()
    ms = sorted({int(x) for x in args.decoys.split(",") if x.strip()})
    seeds = sorted({int(x) for x in args.seeds.split(",") if x.strip()})
    if not ms or not seeds or min(ms) < 0 or args.eval < 1:
        ap.error("--decoys and --seeds need at least one non-negative integer, --eval at least 1")
    p = replace(PROFILES["reduced"], bertscore=False, max_length=args.max_length)
    cache = Path(os.environ.get("RPE_CACHE_DIR", Path.home() / ".cache" / "rpe")) / "zero_shot"
    lab = Lab(args.model, p, cache)
    all_groups = report_groups(min_size=1)
    groups = {g: all_groups[g] for g in GROUPS if g in all_groups}
    ref_pool, tgt_pool = split_pools(groups, p.target_fraction, args.data_seed, min_target=20)
    full_library = build_library(ref_pool, p, max(p.library_sizes), args.data_seed)
    targets = [t for t in build_targets(tgt_pool, full_library, p, args.data_seed) if t.kind != "far"]
    library = full_library[: args.library]
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
        for t in targets:
            t.eval = t.eval[: args.eval]
        return retrieval_only(args, lab, library, decoys, targets, ms, t_start)

    Z: dict[str, np.ndarray] = {}
    kind: dict[str, str] = {}
    jobs = [(s.name, "impression", s.train) for s in library] + decoys + [(t.name, "own", t.train) for t in targets]
    for name, task, exs in jobs:
        Z[name] = lab.z(exs if task != "own" else next(t for t in targets if t.name == name).query, "last")
        kind[name] = task
    retrieval: list[dict[str, Any]] = []
    plans: dict[str, list[tuple[str, int | None, dict[str, float] | None]]] = {}
    for t in targets:
        plans[t.name] = [("base", None, None), ("own", None, {t.name: 1.0})]
        for m in ms:
            names = [s.name for s in library] + [d[0] for d in decoys[:m]]
            chosen, arms = library_arms(Z[t.name], Z, names, K)
            retrieval.append(
                {
                    "target": t.name,
                    "m": m,
                    "retrieved": chosen,
                    "precision_same_task": precision_same_task(chosen, kind),
                    "decoy_kinds_retrieved": [kind[c] for c in chosen if kind[c] != "impression"],
                }
            )
            plans[t.name] += [(a, m, w) for a, w in arms]

    # scores[target][(arm, m)][seed] = per-report ROUGE-L
    scores: dict[str, dict[tuple[str, int | None], dict[int, list[float]]]] = {t.name: {} for t in targets}
    timings: dict[str, float] = {}
    state = {"seeds_done": []}  # type: dict[str, Any]
    for seed in seeds:
        t0 = time.perf_counter()
        train_seed = 0 if args.eval_seeds_only else seed
        adapters: dict[str, Any] = {}
        for i, (name, _task, exs) in enumerate(jobs):
            if shard and i % shard[1] != shard[0]:
                continue
            adapters[name] = lab.lora(exs, train_seed)
            print(
                f"[decoys] seed {seed} LoRA {i + 1}/{len(jobs)} {name} ({len(exs)} examples) "
                f"{time.perf_counter() - t0:.0f} s",
                flush=True,
            )
        if shard:
            continue
        for t in targets:
            ts = replace(t, eval=[t.eval[i] for i in eval_sample(len(t.eval), args.eval, seed)])
            refs = [e.target for e in ts.eval]
            arms = plans[t.name]
            for a0 in range(0, len(arms), 6):
                group = arms[a0 : a0 + 6]
                keyed = [
                    (
                        _compose(adapters, w) if w else None,
                        _gen_key(w, train_seed),
                    )
                    for _, _, w in group
                ]
                made = lab.generations(ts, keyed)
                for (name, m, _), preds in zip(group, made, strict=True):
                    r = per_report_rouge(preds, refs)
                    scores[t.name].setdefault((name, m), {})[seed] = r
                    print(
                        f"[decoys] seed {seed} {t.name} {name} M={m}: ROUGE-L {np.mean(r):.3f} "
                        f"({time.perf_counter() - t0:.0f} s)",
                        flush=True,
                    )
        timings[f"seed_{seed}_s"] = time.perf_counter() - t0
        state["seeds_done"].append(seed)
        write_outputs(args, lab, library, decoys, targets, ms, plans, kind, scores, retrieval, timings, t_start, state)
    return 0


def _gen_key(w: dict[str, float] | None, seed: int) -> Any:
    key = sorted((s, round(x, 8)) for s, x in (w or {}).items())
    return key if seed == 0 or not w else [f"seed={seed}", key]  # seed 0: the zero-shot cache's key


def write_outputs(
    args: Any,
    lab: Lab,
    library: Sequence[Any],
    decoys: Sequence[Any],
    targets: Sequence[Any],
    ms: Sequence[int],
    plans: dict[str, list[tuple[str, int | None, dict[str, float] | None]]],
    kind: dict[str, str],
    scores: dict[str, dict[tuple[str, int | None], dict[int, list[float]]]],
    retrieval: list[dict[str, Any]],
    timings: dict[str, float],
    t_start: float,
    state: dict[str, Any],
) -> None:
    """results.json (every per-report score, per seed) and DECOYS.md, over the seeds done so far."""
    p = lab.p
    seeds = list(state["seeds_done"])
    rows: list[dict[str, Any]] = []
    for t in targets:
        sc = scores[t.name]
        base = [sc[("base", None)][s] for s in seeds]
        for name, m, w in plans[t.name]:
            per = [sc[(name, m)][s] for s in seeds]
            avg = [sc[("avg-all", m)][s] for s in seeds] if m is not None and name != "avg-all" else None
            mean, lo, hi = seeds_interval(per, p.bootstrap)
            rows.append(
                {
                    "target": t.name,
                    "arm": name,
                    "m": m,
                    "weights": w if name != "own" else None,
                    "decoy_weight": decoy_weight(w, kind) if name != "own" else 0.0,
                    "rouge_l": mean,
                    "rouge_l_ci": [lo, hi],
                    "per_seed": seed_spread(per),
                    "vs_base": _paired(per, base, p.bootstrap),
                    "vs_avg_all": _paired(per, avg, p.bootstrap) if avg is not None else None,
                    "n_eval": [len(x) for x in per],
                    "scores": {str(s): x for s, x in zip(seeds, per)},
                }
            )
    out = {
        "command": "python -m benchmarks.zero_shot_decoys --decoys "
        + ",".join(map(str, ms))
        + f" --library {args.library} --eval {args.eval} --max-length {args.max_length}"
        + f" --seeds {','.join(map(str, seeds))}"
        + (" --eval-seeds-only" if args.eval_seeds_only else ""),
        "model": str(lab.model_dir),
        "profile": f"reduced (steps {p.steps}, lr {p.lr}, rank {p.r}, max length {p.max_length}, "
        f"{p.max_new_tokens} new tokens), bertscore off",
        "seeds": seeds,
        "training_seeds": [0] if args.eval_seeds_only else seeds,
        "interval": "two-stage percentile bootstrap (seeds with replacement, then reports within each seed)",
        "library": [s.name for s in library],
        "decoys": [{"name": n, "task": k, "n_train": len(e)} for n, k, e in decoys],
        "targets": [t.describe() for t in targets],
        "k": K,
        "results": rows,
        "retrieval": retrieval,
        "timings": {**timings, "total_s": time.perf_counter() - t_start, "cpu_s": time.process_time()},
        "cache": lab.counts,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(out, indent=1) + "\n")
    (args.out / "DECOYS.md").write_text(markdown(out, ms))
    print(markdown(out, ms), flush=True)


def _paired(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]], n_boot: int) -> dict[str, float]:
    """a − b paired per report within each seed: mean, two-stage interval, sign-flip p over all pairs."""
    diffs = [np.asarray(x, dtype=np.float64) - np.asarray(y, dtype=np.float64) for x, y in zip(a, b, strict=True)]
    mean, lo, hi = seeds_interval(diffs, n_boot)
    flat = np.concatenate(diffs) if diffs else np.zeros(0)
    p = paired_test(flat, np.zeros_like(flat), n_boot)["p"]
    return {"diff": mean, "lo": lo, "hi": hi, "p": p}


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
    seeds = out.get("seeds", [0])
    n_eval = sorted(
        {n for r in out["results"] for n in (r["n_eval"] if isinstance(r["n_eval"], list) else [r["n_eval"]])}
    )
    lines = [
        f"Command: `{out['command']}`; {len(out['library'])} impression sites, {len(out['decoys'])} decoys "
        f"({', '.join(sorted({d['task'] for d in out['decoys']}))}); k = {out['k']}; seeds {seeds} (LoRA training seeds {out.get('training_seeds', seeds)}); "
        f"{'/'.join(map(str, n_eval))} held-out reports per target and seed; "
        f"{out['timings']['total_s'] / 60:.1f} min wall, "
        f"{out['timings'].get('cpu_s', float('nan')) / 60:.1f} min CPU of this process; cache {out['cache']}.",
        "",
        "ROUGE-L per held-out report, mean [95 % interval: "
        + (out.get("interval") or "bootstrap over reports")
        + "]; differences paired over the same reports, * = sign-flip p < 0.05. `soup` = uniform average of the "
        "k retrieved adapters (AdapterSoup); `avg-all` = uniform average of the whole library (one-shot FedAvg).",
        "",
        "| target | arm | "
        + " | ".join(f"M={m}" for m in ms)
        + f" | vs base at M={max(ms)} | vs avg-all at M={max(ms)} | decoy weight at M={max(ms)} |",
        "|---|---|" + "---|" * len(ms) + "---|---|---|",
    ]
    by = {(r["target"], r["arm"], r["m"]): r for r in out["results"]}
    for t in dict.fromkeys(r["target"] for r in out["results"]):
        for arm in ("base", "own"):
            r = by[(t, arm, None)]
            lines.append(f"| {t} | {arm} | " + " | ".join([_cell(r)] * len(ms)) + f" | {_diff(r['vs_base'])} | – | – |")
        for arm in ARMS:
            cells = [_cell(by[(t, arm, m)]) for m in ms]
            last = by[(t, arm, max(ms))]
            lines.append(
                f"| {t} | {arm} | "
                + " | ".join(cells)
                + f" | {_diff(last['vs_base'])} | {_diff(last.get('vs_avg_all'))} | {last.get('decoy_weight', 0):.2f} |"
            )
    if len(seeds) > 1:
        lines += ["", "Per-seed means (seed " + ", ".join(map(str, seeds)) + "), their mean ± sd:", ""]
        lines += ["| target | arm | " + " | ".join(f"M={m}" for m in ms) + " |", "|---|---|" + "---|" * len(ms)]
        for t in dict.fromkeys(r["target"] for r in out["results"]):
            for arm in ("base", "own", *ARMS):
                rs = [by[(t, arm, None)]] * len(ms) if arm in ("base", "own") else [by[(t, arm, m)] for m in ms]
                lines.append(f"| {t} | {arm} | " + " | ".join(_spread(r) for r in rs) + " |")
    lines += ["", "Retrieval: share of the k retrieved adapters that are impression adapters (same task).", ""]
    lines += ["| target | M | precision (same task) | retrieved decoys |", "|---|---|---|---|"]
    for r in out["retrieval"]:
        lines.append(
            f"| {r['target']} | {r['m']} | {r['precision_same_task']:.2f} | {', '.join(r['decoy_kinds_retrieved']) or '–'} |"
        )
    return "\n".join(lines) + "\n"


def _spread(row: dict[str, Any]) -> str:
    s = row.get("per_seed") or {}
    if not s:
        return "–"
    return " / ".join(f"{m:.3f}" for m in s["means"]) + f" ({s['mean']:.3f} ± {s['sd']:.3f})"


if __name__ == "__main__":
    raise SystemExit(main())
