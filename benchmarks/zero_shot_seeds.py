"""The reduced zero-shot profile over several seeds: one table with intervals that hold seed variance.

Each seed of ``python -m benchmarks.zero_shot --profile reduced --seed S`` is a different federation:
the split of the report groups into library and targets, the library's Dirichlet mixtures, the
targets' mixtures and every LoRA's data change with it. So the unit pooled across seeds is the target
*kind* (``single``: one report group the library holds alone; ``affine``: a mixture of two;
``far``: a group the library does not hold), not a target.

For every kind and arm this prints, per seed, the arm's mean ROUGE-L and its paired difference to
``base`` and to ``avg-all`` over the same library, then the mean over seeds with two intervals:

- *between seeds*: a Student-t interval over the per-seed means (n - 1 degrees of freedom). Each
  seed's mean already carries its reports' sampling noise, so this interval holds both; with 3 seeds
  it is wide (t = 4.30), which is the honest price of 3 seeds.
- *two-stage bootstrap* (seeds, then reports within each seed): only where every run kept its
  per-report scores (``rouge_l_per_report``, written since 2026-12-08).

    python -m benchmarks.zero_shot_seeds benchmarks/zero_shot/reduced benchmarks/zero_shot/reduced-seed1 \\
        benchmarks/zero_shot/reduced-seed2 --out benchmarks/zero_shot/reduced-seeds
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.zero_shot_decoys import seeds_interval

# (arm, n, k) rows pooled: the N = 32 arms at k = 3, the scaling of sim with N, and the references
ARMS: tuple[tuple[str, int | None, int | None], ...] = (
    ("base", None, None),
    ("own", None, None),
    ("fewshot", 32, 3),
    ("avg-all", 32, 32),
    ("nearest", 32, 1),
    ("sim", 32, 3),
    ("lin", 32, 3),
    ("lin-l1", 32, 3),
    ("sim", 4, 3),
    ("sim", 8, 3),
    ("sim", 16, 3),
)
KINDS = ("single", "affine", "far")


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, lo, hi) of a Student-t interval over ``values`` (nan bounds with fewer than 2)."""
    x = np.asarray(values, dtype=np.float64)
    mean = float(np.mean(x)) if x.size else float("nan")
    if x.size < 2:
        return mean, float("nan"), float("nan")
    from scipy import stats

    half = float(stats.t.ppf(0.5 + level / 2, x.size - 1) * np.std(x, ddof=1) / math.sqrt(x.size))
    return mean, mean - half, mean + half


def load_run(folder: Path) -> dict[str, Any]:
    path = folder / "results.json" if folder.is_dir() else folder
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no results.json (run `python -m benchmarks.zero_shot --seed S --out DIR`)")
    return json.loads(path.read_text())


def _row(run: dict[str, Any], kind: str, arm: tuple[str, int | None, int | None]) -> dict[str, Any] | None:
    for r in run["results"]:
        if r["target_kind"] == kind and (r["arm"], r["n"], r["k"]) == arm:
            return r
    return None


def pool(runs: Sequence[dict[str, Any]], n_boot: int = 2000) -> list[dict[str, Any]]:
    """One row per (kind, arm) present in every run: per-seed figures and the pooled intervals."""
    rows: list[dict[str, Any]] = []
    for kind in KINDS:
        for arm in ARMS:
            found = [_row(run, kind, arm) for run in runs]
            if any(f is None for f in found):
                continue
            cells = [f for f in found if f is not None]
            bases = [_row(run, kind, ARMS[0]) for run in runs]
            avgs = [_row(run, kind, ("avg-all", arm[1], arm[1])) if arm[1] else None for run in runs]
            row: dict[str, Any] = {
                "kind": kind,
                "arm": arm[0],
                "n": arm[1],
                "k": arm[2],
                "targets": [c["target"] for c in cells],
                "per_seed": [c["rouge_l"] for c in cells],
                "vs_base_per_seed": [c["vs_base"]["diff"] for c in cells],
                "vs_avg_per_seed": [c["vs_avg"]["diff"] for c in cells] if all(c["vs_avg"] for c in cells) else None,
                "rouge_l_t": t_interval([c["rouge_l"] for c in cells]),
                "vs_base_t": t_interval([c["vs_base"]["diff"] for c in cells]),
            }
            if row["vs_avg_per_seed"] is not None:
                row["vs_avg_t"] = t_interval(row["vs_avg_per_seed"])
            if all("rouge_l_per_report" in c for c in cells):
                per = [c["rouge_l_per_report"] for c in cells]
                row["rouge_l_boot"] = seeds_interval(per, n_boot)
                row["vs_base_boot"] = seeds_interval(
                    [np.subtract(a, b["rouge_l_per_report"]) for a, b in zip(per, bases, strict=True) if b], n_boot
                )
                if all(a is not None for a in avgs):
                    row["vs_avg_boot"] = seeds_interval(
                        [np.subtract(a, b["rouge_l_per_report"]) for a, b in zip(per, avgs, strict=True) if b],
                        n_boot,
                    )
            rows.append(row)
    return rows


def _iv(t: Sequence[float] | None, signed: bool = False) -> str:
    if not t:
        return "–"
    mean, lo, hi = t
    f = "{:+.3f}" if signed else "{:.3f}"
    if math.isnan(lo):
        return f.format(mean)
    star = "**" if signed and (lo > 0 or hi < 0) else ""
    return f"{star}{f.format(mean)} [{f.format(lo)}, {f.format(hi)}]{star}"


def markdown(rows: Sequence[dict[str, Any]], runs: Sequence[dict[str, Any]], sources: Sequence[str]) -> str:
    seeds = [str(r.get("seed", "?")) for r in runs]
    lines = [
        f"### The reduced profile over {len(runs)} seeds (issue 28 item 4)",
        "",
        "Runs pooled: " + ", ".join(f"`{s}`" for s in sources) + f" (seeds {', '.join(seeds)}).",
        "ROUGE-L; each seed's mean, and the mean over seeds with a Student-t interval over the per-seed "
        "means (it holds seed and report variance; bold: the interval of a difference excludes 0).",
        "",
        "| target kind | arm | N | per-seed means | mean over seeds | − base | − `avg-all` (same N) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        per = " / ".join(f"{x:.3f}" for x in r["per_seed"])
        n = "" if r["n"] is None else str(r["n"])
        arm = r["arm"] if r["arm"] in ("base", "own") else f"`{r['arm']}`"
        vs_base = "" if r["arm"] == "base" else _iv(r["vs_base_t"], True)
        vs_avg = "" if r["arm"] == "avg-all" else _iv(r.get("vs_avg_t"), True)
        lines.append(f"| {r['kind']} | {arm} | {n} | {per} | {_iv(r['rouge_l_t'])} | {vs_base} | {vs_avg} |")
    boot = [r for r in rows if "rouge_l_boot" in r]
    if boot:
        lines += [
            "",
            "Two-stage bootstrap (seeds with replacement, then reports within each seed), where every run "
            "kept its per-report scores:",
            "",
            "| target kind | arm | N | mean | − base | − `avg-all` |",
            "|---|---|---|---|---|---|",
        ]
        for r in boot:
            n = "" if r["n"] is None else str(r["n"])
            lines.append(
                f"| {r['kind']} | {r['arm']} | {n} | {_iv(r['rouge_l_boot'])} | "
                f"{'' if r['arm'] == 'base' else _iv(r['vs_base_boot'], True)} | "
                f"{'' if r['arm'] == 'avg-all' else _iv(r.get('vs_avg_boot'), True)} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.zero_shot_seeds",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    ap.add_argument(
        "runs", nargs="+", type=Path, help="folders (or results.json files) of zero_shot runs, one per seed"
    )
    ap.add_argument("--out", type=Path, required=True, help="where SEEDS.md and seeds.json go")
    ap.add_argument("--bootstrap", type=int, default=2000, help="bootstrap replicates (default 2000)")
    args = ap.parse_args(argv)
    if args.bootstrap < 100:
        ap.error(f"--bootstrap {args.bootstrap}: expected at least 100 replicates")
    try:
        runs = [load_run(p) for p in args.runs]
    except (FileNotFoundError, json.JSONDecodeError) as exc:
        ap.error(str(exc))
    profiles = {r.get("profile") for r in runs}
    if len(profiles) != 1:
        ap.error(f"the runs are of different profiles {sorted(map(str, profiles))}: pool one profile at a time")
    for run, path in zip(runs, args.runs, strict=True):
        run.setdefault("seed", seed_of(run, path))
    rows = pool(runs, args.bootstrap)
    args.out.mkdir(parents=True, exist_ok=True)
    sources = [str(p) for p in args.runs]
    (args.out / "SEEDS.md").write_text(markdown(rows, runs, sources))
    (args.out / "seeds.json").write_text(json.dumps({"runs": sources, "rows": rows}, indent=1) + "\n")
    print(markdown(rows, runs, sources))
    return 0


def seed_of(run: dict[str, Any], path: Path) -> int | str:
    """The run's seed: recorded (since 2026-12-08), else from its command, else from a ``seedN`` folder name."""
    cmd = str(run.get("command", ""))
    if "--seed" in cmd:
        return cmd.split("--seed", 1)[1].split()[0].lstrip("=")
    m = re.search(r"seed[-_]?(\d+)", str(path))
    return int(m.group(1)) if m else 0


if __name__ == "__main__":
    raise SystemExit(main())
