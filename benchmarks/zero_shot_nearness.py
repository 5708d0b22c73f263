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
THRESHOLDS = (1.5, 2.0, 3.0, 4.0, 6.0, 8.0)


def report_rows(results_path: Path, model: str, cache: Path | None) -> list[dict[str, Any]]:
    """One row per (target, N) of the reduced zero-shot profile: ratio, and what ``sim`` did."""
    import os

    from benchmarks.zero_shot import PROFILES, Lab, build_library, build_targets, split_pools
    from common.families.report.data import report_groups

    res = json.loads(results_path.read_text())
    p = PROFILES[res["profile"]]
    seed = 0
    cache = cache or Path(os.environ.get("RPE_CACHE_DIR", Path.home() / ".cache" / "rpe")) / "zero_shot"
    lab = Lab(model, p, cache)
    from benchmarks.zero_shot import GROUPS

    all_groups = report_groups(min_size=1)
    groups = {g: all_groups[g] for g in GROUPS if g in all_groups}
    ref_pool, tgt_pool = split_pools(groups, p.target_fraction, seed, min_target=max(4, min(20, p.n_eval + p.n_query)))
    library = build_library(ref_pool, p, max(p.library_sizes), seed)
    targets = build_targets(tgt_pool, library, p, seed)
    Z = {s.name: lab.z(s.train, "last") for s in library}
    Z.update({t.name: lab.z(t.query, "last") for t in targets})
    rows = []
    for t in targets:
        for n in p.library_sizes:
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
                    "study": "zero_shot reduced",
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
    ap.add_argument("--results", type=Path, default=HERE / "zero_shot" / "reduced" / "results.json")
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--no-segmentation", action="store_true")
    ap.add_argument("--out", type=Path, default=HERE / "zero_shot")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows = report_rows(args.results, args.model, args.cache)
    print(f"reports: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    if not args.no_segmentation:
        rows += seg_rows(HERE / "SEG_LOO_prostate_multisite.json", "prostate-multisite")
        rows += seg_rows(HERE / "SEG_LOO_fundus_multidomain_disc.json", "fundus-multidomain:disc")
        print(f"segmentation: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    table = precision_table(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "nearness.json").write_text(
        json.dumps({"command": "python -m benchmarks.zero_shot_nearness", "rows": rows, "thresholds": table}, indent=1)
        + "\n"
    )
    md = markdown(rows, table)
    (args.out / "nearness.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
