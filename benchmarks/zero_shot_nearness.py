"""Calibrate the coordinator's "nothing close enough" warning (``server/nearness.py``, issue 28 item 3).

For every target of the measured studies, the ratio the coordinator would compute - squared z
distance to the nearest library adapter over the library's median nearest-neighbour spacing - next
to what composition actually did for that target (the scores in the studies' JSON, not re-run):

- reports: the reduced zero-shot profile (``benchmarks/zero_shot/reduced/results.json``): its
  library and targets are rebuilt with the same seed and their z recomputed (base-model mean
  embeddings, cached in the zero-shot cache; no training), at every library size N;
- segmentation: leave-one-site-out over the real sites of ``SEG_LOO_prostate_multisite.json`` and
  ``SEG_LOO_fundus_multidomain_disc.json`` (library: the other real sites), z from LiteMedSAM.

"Helped" means the composition (``sim`` at the study's k) scored above the base/pretrained model with
a paired interval above zero (reports) or by more than 0.05 DICE (segmentation, 3 slices per site:
no per-site interval). Then, for candidate thresholds, the warning's precision (share of warned
targets that composition did not help) and recall (share of not-helped targets warned).

    python -m benchmarks.zero_shot_nearness          # writes benchmarks/zero_shot/nearness.json and .md
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from server.nearness import library_spacing

HERE = Path(__file__).resolve().parent
THRESHOLDS = (1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 6.0)


def report_rows(results_path: Path, model: str, cache: Path | None, max_n: int, emit: Any) -> list[dict[str, Any]]:
    """One row per (target, N) of the reduced zero-shot profile: ratio, and what ``sim`` did; the
    targets' z first, then the library's in order, ``emit(rows)`` after each N (z is cached)."""
    import os

    from benchmarks.zero_shot import PROFILES, Lab, build_library, build_targets, split_pools
    from benchmarks.zero_shot_seeds import seed_of
    from common.families.report.data import report_groups

    res = json.loads(results_path.read_text())
    p = PROFILES[res["profile"]]
    seed = int(res.get("seed", seed_of(res, results_path.parent)))
    cache = cache or Path(os.environ.get("RPE_CACHE_DIR", Path.home() / ".cache" / "rpe")) / "zero_shot"
    lab = Lab(model, p, cache)
    from benchmarks.zero_shot import GROUPS

    all_groups = report_groups(min_size=1)
    groups = {g: all_groups[g] for g in GROUPS if g in all_groups}
    ref_pool, tgt_pool = split_pools(groups, p.target_fraction, seed, min_target=max(4, min(20, p.n_eval + p.n_query)))
    library = build_library(ref_pool, p, max(p.library_sizes), seed)
    targets = build_targets(tgt_pool, library, p, seed)
    Z = {t.name: lab.z(t.query, "last") for t in targets}
    rows: list[dict[str, Any]] = []
    for n in [n for n in p.library_sizes if n <= max_n]:
        Z.update({s.name: lab.z(s.train, "last") for s in library[:n] if s.name not in Z})
        for t in targets:
            names = [s.name for s in library[:n]]
            L = np.stack([Z[s] for s in names]).astype(np.float64)
            d = np.sum((L - Z[t.name].astype(np.float64)) ** 2, axis=1)
            spacing = library_spacing(L)
            sim = next(
                r
                for r in res["results"]
                if r["target"] == t.name and r["arm"] == "sim" and r["n"] == n and r["k"] == p.k_default
            )
            vs = sim["vs_base"]
            rows.append(
                {
                    "family": "report-text",
                    "study": "zero_shot reduced" + (f" seed {seed}" if seed else ""),
                    "target": t.name,
                    "n": n,
                    "nearest_distance": float(d.min()),
                    "library_spacing": spacing,
                    "ratio": float(d.min()) / spacing if spacing else None,
                    "gain": vs["diff"],
                    "gain_ci": [vs["lo"], vs["hi"]],
                    "helped": bool(vs["lo"] > 0),
                }
            )
        emit(rows)
    return rows


def registry_rows(
    registry_dir: Path, results_csv: Path, family: str, study: str, margin: float
) -> list[dict[str, Any]]:
    """One row per target of a leave-one-site-out evaluation that a registry holds: the ratio from the
    registry's stored z (the library: every other site, one adapter each) and the evaluation's
    nearest distance; "helped" = ``sim`` beat the base model by more than ``margin``."""
    import csv

    from server.registry import Registry

    with open(results_csv, newline="") as fh:
        table = list(csv.DictReader(fh))
    metric = next(k for k in table[0] if k not in ("target", "method", "n", "sources", "weights", "min_distance"))
    score = {(r["target"], r["method"]): float(r[metric]) for r in table if r[metric]}
    dist = {r["target"]: float(r["min_distance"]) for r in table if r["method"] == "sim" and r["min_distance"]}
    with Registry(registry_dir, read_only=True) as reg:
        z = {r.meta.site: np.asarray(r.z, dtype=np.float64) for r in reg.list()}
    rows = []
    for t in sorted(dist):
        spacing = library_spacing(np.stack([v for s, v in z.items() if s != t]))
        gain = score[(t, "sim")] - score[(t, "base")]
        rows.append(
            {
                "family": family,
                "study": study,
                "target": t,
                "n": len(z) - 1,
                "nearest_distance": dist[t],
                "library_spacing": spacing,
                "ratio": dist[t] / spacing if spacing else None,
                "gain": gain,
                "gain_ci": None,
                "helped": bool(gain > margin),
            }
        )
    return rows


def seg_rows(json_path: Path, dataset: str) -> list[dict[str, Any]]:
    """One row per real target of a SEG_LOO study (library: the other real sites)."""
    from common.families.segmentation import sam
    from common.families.segmentation.data import load_sites
    from common.families.segmentation.task import SegmentationTask

    res = json.loads(json_path.read_text())
    model = sam.load_sam(sam.LITEMEDSAM)
    task = SegmentationTask()
    sites = load_sites(dataset)
    Z = {s.name: task.site_embedding(model, s.all_images, site=s.name).z.astype(np.float64) for s in sites}
    rows = []
    for s in sites:
        names = [o.name for o in sites if o.name != s.name]
        L = np.stack([Z[o] for o in names])
        d = np.sum((L - Z[s.name]) ** 2, axis=1)
        spacing = library_spacing(L)
        dice = res["dice"][s.name]
        gain = dice["sim"] - dice["pretrained"]
        rows.append(
            {
                "family": "segmentation",
                "study": json_path.stem,
                "target": s.name,
                "n": len(names),
                "nearest_distance": float(d.min()),
                "library_spacing": spacing,
                "ratio": float(d.min()) / spacing if spacing else None,
                "gain": gain,
                "gain_ci": None,
                "helped": bool(gain > 0.05),
            }
        )
    return rows


def precision_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for th in THRESHOLDS:
        warned = [r for r in rows if r["ratio"] is not None and r["ratio"] > th]
        not_helped = [r for r in rows if not r["helped"]]
        hit = [r for r in warned if not r["helped"]]
        out.append(
            {
                "threshold": th,
                "warned": len(warned),
                "warned_not_helped": len(hit),
                "precision": len(hit) / len(warned) if warned else None,
                "recall": len(hit) / len(not_helped) if not_helped else None,
                "warned_helped": [f"{r['target']}@{r['n']}" for r in warned if r["helped"]],
            }
        )
    return out


def markdown(rows: list[dict[str, Any]], table: list[dict[str, Any]]) -> str:
    lines = [
        "| family | target | N | nearest d² | library spacing | ratio | `sim` − base | helped |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ci = f" [{r['gain_ci'][0]:+.3f}, {r['gain_ci'][1]:+.3f}]" if r["gain_ci"] else ""
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "–"
        lines.append(
            f"| {r['family']} | {r['target']} | {r['n']} | {r['nearest_distance']:.4g} | {r['library_spacing']:.4g} "
            f"| {ratio} | {r['gain']:+.3f}{ci} | {'yes' if r['helped'] else 'no'} |"
        )
    lines += ["", "| far-ratio | warned | of them not helped | precision | recall | warned although helped |"]
    lines.append("|---|---|---|---|---|---|")
    for t in table:
        prec = "–" if t["precision"] is None else f"{t['precision']:.2f}"
        rec = "–" if t["recall"] is None else f"{t['recall']:.2f}"
        lines.append(
            f"| {t['threshold']:g} | {t['warned']} | {t['warned_not_helped']} | {prec} | {rec} | "
            f"{', '.join(t['warned_helped']) or '–'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument(
        "--results",
        type=Path,
        nargs="+",
        default=[HERE / "zero_shot" / "reduced" / "results.json"],
        help="results.json of reduced zero-shot runs, one per seed (default: the seed-0 run)",
    )
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--registry", type=Path, default=None, help="a registry with evaluations (reports + segmentation/)")
    ap.add_argument("--seg-loo", action="store_true", help="also the SEG_LOO studies (z from LiteMedSAM)")
    ap.add_argument("--max-n", type=int, default=32, help="reduced profile: library sizes up to this (0 = none)")
    ap.add_argument("--out", type=Path, default=HERE / "zero_shot")
    args = ap.parse_args(argv)
    missing = [str(r) for r in args.results if not r.is_file()]
    if missing and args.max_n > 0:
        ap.error(f"--results {' '.join(missing)}: no such file (a zero_shot run's results.json)")
    t0 = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    fixed: list[dict[str, Any]] = []
    if args.registry is not None:  # a registry with leave-one-site-out evaluations (e.g. runs/demo/registry)
        for reg_dir, family, margin in (
            (args.registry, "report-text", 0.01),
            (args.registry / "segmentation", "segmentation", 0.05),
        ):
            evals = sorted(reg_dir.glob("evaluations/*/results.csv"), key=lambda p: p.stat().st_mtime)
            if evals:
                fixed += registry_rows(reg_dir, evals[-1], family, f"{reg_dir} {evals[-1].parent.name}", margin)
    if args.seg_loo:
        fixed += seg_rows(HERE / "SEG_LOO_prostate_multisite.json", "prostate-multisite")
        fixed += seg_rows(HERE / "SEG_LOO_fundus_multidomain_disc.json", "fundus-multidomain:disc")

    def emit(report: list[dict[str, Any]]) -> None:
        rows = [*fixed, *report]
        table = precision_table(rows)
        command = "python -m benchmarks.zero_shot_nearness " + " ".join(argv if argv is not None else sys.argv[1:])
        (args.out / "nearness.json").write_text(
            json.dumps({"command": command.strip(), "rows": rows, "thresholds": table}, indent=1) + "\n"
        )
        md = markdown(rows, table)
        (args.out / "nearness.md").write_text(
            f"Command: `{command.strip()}`; {time.perf_counter() - t0:.0f} s.\n\n" + md
        )
        print(md, flush=True)

    emit([])
    done: list[dict[str, Any]] = []
    for results in args.results if args.max_n > 0 else []:
        done = [
            *done,
            *report_rows(results, args.model, args.cache, args.max_n, lambda rows, prior=done: emit([*prior, *rows])),
        ]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
