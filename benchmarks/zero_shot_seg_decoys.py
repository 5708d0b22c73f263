"""Segmentation decoys: a prostate library that also holds adapters of other tasks (issue 28, item 1).

The report-text decoy study (``benchmarks/zero_shot_decoys.py``) asked whether retrieval keeps its
score while "average everything" falls when the library holds other tasks; here the same question on
segmentation, where a decoy's inputs are other images (not, as on text, the same site's reports).

Library, for each prostate target (leave-one-site-out, as ``benchmarks/zero_shot_hetero.py``): the
other five prostate sites' LoRAs (the uniform seed-0 ones of the heterogeneity study and of
``SEG_LOO_prostate_multisite.md``: LiteMedSAM, LoRA rank 4 on the mask decoder's attention, 12 steps,
lr 2e-3, one augmented copy per training slice, centre-box prompt) plus ``M`` decoy LoRAs of other
tasks, trained the same way on their own task's data, round-robin over four kinds:

- ``fundus-disc`` / ``fundus-cup``: optic disc / optic cup on the four fundus cameras
  (``fundus-multidomain`` Domain1-4, 3 train + 3 test ROIs each; disc and cup of one camera have the
  same images, so the same z);
- ``ct``: an abdominal organ (liver, spleen, right kidney, left kidney: TotalSegmentator labels 5, 1,
  2, 3) on the TotalSegmentator CT test volume, window ``ct-abdomen``;
- ``mr``: the same organs on the TotalSegmentator MR test volume (auto window).

A volume decoy uses 6 axial slices that show its organ, evenly spaced, alternately train and test (3 +
3, as a prostate site). Every decoy's z is the LiteMedSAM encoder's mean embedding of its images, as a
prostate site's. M = 4 holds one decoy of each kind, M = 8 two, M = 16 four; M = 32 adds 8 more CT and 8
more MR labels of the same volumes (``EXTRA_LABELS``).

Arms per target and M (``zero_shot_decoys.library_arms``: the coordinator's ``server.strategies``
weights, composed by ``common.adapters.compose``): ``sim``, ``lin``, ``lin-l1`` over the k nearest by z
(default k = 5, the heterogeneity study's: at M = 0 these are its uniform cells), ``soup`` (uniform
average of those k: AdapterSoup), ``avg-all`` (uniform average of the whole library, decoys included:
one-shot FedAvg of the deltas), ``nearest``; and per target ``pretrained`` and ``own`` (its own LoRA).

Score: DICE on each target's 3 test slices. Pooled means and paired differences (to ``avg-all``, to
``pretrained``, to the same arm at M = 0) carry a 95 % bootstrap interval that resamples the six
targets (``zero_shot_hetero.two_level_ci`` with one draw). Retrieval precision is the share of the k
retrieved that are prostate adapters; decoy weight the total |weight| an arm puts on decoys.

Everything is cached in the heterogeneity study's cache (``$RPE_CACHE_DIR/zero_shot_hetero``: LoRAs,
z, one file per evaluation), so the prostate LoRAs are reused and a rerun takes seconds. From an empty
decoy cache the 32 decoy LoRAs took 26 min of training (20-105 s each) and the whole study 41 min of wall
time on a loaded 2-core CPU (nice 10, one thread); results and timings in ``benchmarks/ZERO_SHOT.md``.

    python -m benchmarks.zero_shot_seg_decoys --decoys 0,4,8,16,32     # writes benchmarks/zero_shot/seg_decoys/
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.zero_shot_decoys import decoy_weight, library_arms, precision_same_task
from benchmarks.zero_shot_hetero import Bench, NotCached, config_key, site_config, two_level_ci

TASK = "prostate"
DECOY_KINDS = ("fundus-disc", "ct", "fundus-cup", "mr")
ORGANS = (("liver", 5), ("spleen", 1), ("kidney-right", 2), ("kidney-left", 3))
#: after the 16 round-robin decoys: more labels of the same two volumes (4 gallbladder and 6 stomach in both
#: TotalSegmentator class maps; the others named by number), each shown on at least 10 axial slices
EXTRA_LABELS = {"ct": (4, 6, 7, 20, 86, 87, 117, 31), "mr": (4, 6, 7, 15, 19, 46, 47, 14)}
N_DECOYS = 4 * 4 + 8 + 8
FUNDUS_DOMAINS = ("Domain1", "Domain2", "Domain3", "Domain4")
VOLUMES = {
    "ct": ("example_ct_sm.nii.gz", "example_seg.nii.gz", "ct-abdomen"),
    "mr": ("example_mr_sm.nii.gz", "example_seg_mr.nii.gz", "auto"),
}
ARMS = ("sim", "lin", "lin-l1", "soup", "nearest", "avg-all")
K_DEFAULT = 5
OUT_DIR = Path(__file__).resolve().parent / "zero_shot" / "seg_decoys"


# ---------------------------------------------------------------------------------------------
# Pure parts: the decoy plan, slice split, arms per target, summaries
# ---------------------------------------------------------------------------------------------


def decoy_plan(m: int) -> list[dict[str, Any]]:
    """The first ``m`` decoys: 16 round-robin over ``DECOY_KINDS`` (so every M <= 16 mixes the kinds), then
    further TotalSegmentator labels (``EXTRA_LABELS``), CT and MR alternately."""
    if not 0 <= m <= N_DECOYS:
        raise ValueError(
            f"M = {m}: this study has {N_DECOYS} decoys (8 fundus, {N_DECOYS // 2 - 4} CT and as many MR); "
            f"use 0 to {N_DECOYS}"
        )
    out = []
    n_rr = len(DECOY_KINDS) * len(ORGANS)
    for i in range(m):
        if i >= n_rr:
            kind = ("ct", "mr")[(i - n_rr) % 2]
            label = EXTRA_LABELS[kind][(i - n_rr) // 2]
            out.append({"name": f"{kind}-label{label}", "kind": kind, "organ": f"label{label}", "label": label})
            continue
        kind, j = DECOY_KINDS[i % len(DECOY_KINDS)], i // len(DECOY_KINDS)
        if kind.startswith("fundus"):
            structure = kind.split("-")[1]
            out.append({"name": f"fundus-{structure}-{FUNDUS_DOMAINS[j]}", "kind": kind, "domain": FUNDUS_DOMAINS[j]})
        else:
            organ, label = ORGANS[j]
            out.append({"name": f"{kind}-{organ}", "kind": kind, "organ": organ, "label": label})
    return out


def split_slices(indices: Sequence[int], n_train: int = 3, n_test: int = 3) -> tuple[list[int], list[int]]:
    """``n_train + n_test`` of ``indices`` evenly spaced (ends included), alternately train and test."""
    n = n_train + n_test
    if len(indices) < n:
        raise ValueError(f"{len(indices)} slices show the object; need at least {n} ({n_train} train + {n_test} test)")
    picks = [indices[int(i)] for i in np.round(np.linspace(0, len(indices) - 1, n)).astype(int)]
    return picks[0::2][:n_train], picks[1::2][:n_test]


def target_arms(
    z_t: np.ndarray, Z: dict[str, np.ndarray], library: Sequence[str], kind: dict[str, str], k: int
) -> dict[str, Any]:
    """Retrieved names, precision and every arm's weights (and decoy weight) for one target."""
    chosen, arms = library_arms(z_t, Z, list(library), k)
    return {
        "retrieved": chosen,
        "precision": precision_same_task(chosen, kind, TASK),
        "decoys_retrieved": [c for c in chosen if kind[c] != TASK],
        "weights": dict(arms),
        "decoy_weight": {a: decoy_weight(w, kind, TASK) for a, w in arms},
    }


def z_distances(z_t: np.ndarray, Z: dict[str, np.ndarray], kind: dict[str, str]) -> dict[str, Any]:
    """Squared distances from the target's z, summarised by kind (``TASK`` = the prostate library)."""
    d = {n: float(np.sum((np.asarray(v) - z_t) ** 2)) for n, v in Z.items()}
    by: dict[str, list[float]] = {}
    for n, v in d.items():
        by.setdefault(kind[n], []).append(v)
    decoys = [v for n, v in d.items() if kind[n] != TASK]
    return {
        "d2": d,
        "median_by_kind": {k: float(np.median(v)) for k, v in by.items()},
        "farthest_prostate": max(by.get(TASK, [float("nan")])),
        "nearest_decoy": min(decoys) if decoys else float("nan"),
    }


def pooled(cells: dict[str, Sequence[float]]) -> dict[str, float]:
    """Mean of every slice and a 95 % interval resampling the targets (``cells``: target -> per slice)."""
    return two_level_ci({(0, t): np.asarray(v, dtype=np.float64) for t, v in cells.items()})


def paired(a: dict[str, Sequence[float]], b: dict[str, Sequence[float]]) -> dict[str, float]:
    """``a - b`` per slice (same target, same slice), pooled with a target-resampling interval."""
    return pooled({t: np.asarray(a[t], dtype=np.float64) - np.asarray(b[t], dtype=np.float64) for t in a})


def summarise(per_target: dict[str, Any], ms: Sequence[int]) -> dict[str, Any]:
    """Pooled DICE per (arm, M), paired differences, mean precision and decoy weight per M."""

    def col(arm: str, m: int | None) -> dict[str, list[float]]:
        return {t: r["dice"][arm] if m is None else r["by_m"][str(m)]["dice"][arm] for t, r in per_target.items()}

    out: dict[str, Any] = {
        "pretrained": pooled(col("pretrained", None)),
        "own": pooled(col("own", None)),
        "arms": {},
        "vs_avg_all": {},
        "vs_pretrained": {},
        "vs_m0": {},
        "precision": {},
        "decoy_weight": {},
    }
    for m in ms:
        key = str(m)
        out["arms"][key] = {a: pooled(col(a, m)) for a in ARMS}
        out["vs_avg_all"][key] = {a: paired(col(a, m), col("avg-all", m)) for a in ARMS if a != "avg-all"}
        out["vs_pretrained"][key] = {a: paired(col(a, m), col("pretrained", None)) for a in ARMS}
        if m != ms[0]:
            out["vs_m0"][key] = {a: paired(col(a, m), col(a, ms[0])) for a in ARMS}
        rs = [r["by_m"][key] for r in per_target.values()]
        out["precision"][key] = float(np.mean([r["precision"] for r in rs]))
        out["decoy_weight"][key] = {
            a: {
                "mean": float(np.mean([r["decoy_weight"][a] for r in rs])),
                "max": float(np.max([r["decoy_weight"][a] for r in rs])),
            }
            for a in ARMS
        }
    return out


def _ci(c: dict[str, float] | None, signed: bool = False) -> str:
    if c is None:
        return "–"
    f = "+.3f" if signed else ".3f"
    star = "*" if signed and (c["lo"] > 0 or c["hi"] < 0) else ""
    return f"{c['mean']:{f}} [{c['lo']:{f}}, {c['hi']:{f}}]{star}"


def markdown(result: dict[str, Any]) -> str:
    """DECOYS.md: the tables of one run."""
    s, ms = result["summary"], [str(m) for m in result["decoys_m"]]
    head = "| arm | " + " | ".join(f"M = {m}" for m in ms) + " |"
    rule = "|---" * (len(ms) + 1) + "|"
    lines = [
        f"### Segmentation decoys: prostate library (5 sites, leave-one-site-out) + M decoys, k = {result['k']}",
        "",
    ]
    for t in result.get("runs") or [{"command": result["command"], **result["timing"]}]:
        lines.append(
            f"Command: `{t['command']}` — wall {t['wall_s']:.0f} s (training {t['train_s']:.0f} s, "
            f"{t['n_evals']} new evaluations {t['eval_s']:.0f} s, the rest from the cache); load average "
            f"{t['load_start']:.1f} at the start, {t['load_end']:.1f} at the end; {result['machine']}."
        )
    lines += [
        "",
        "Decoys (round-robin; M takes the first M): "
        + ", ".join(f"{i + 1}. {d['name']}" for i, d in enumerate(result["decoys"]))
        + ". Every LoRA: "
        + f"{result['lora']['steps']} steps, lr {result['lora']['lr']:g}, rank {result['lora']['rank']}, seed 0.",
        "",
        "Pooled DICE (6 targets × 3 test slices) [95 % interval, targets resampled]; pretrained "
        f"{_ci(s['pretrained'])}, own LoRA {_ci(s['own'])}:",
        "",
        head,
        rule,
    ]
    lines += [f"| {a} | " + " | ".join(_ci(s["arms"][m][a]) for m in ms) + " |" for a in ARMS]
    for title, key, arms in (
        ("arm − avg-all (same M)", "vs_avg_all", [a for a in ARMS if a != "avg-all"]),
        ("arm − pretrained", "vs_pretrained", list(ARMS)),
        (f"arm at M − the same arm at M = {ms[0]}", "vs_m0", list(ARMS)),
    ):
        cols = [m for m in ms if m in s[key]]
        lines += [
            "",
            f"Paired differences, {title} [95 % interval]; * = the interval excludes 0:",
            "",
            "| arm | " + " | ".join(f"M = {m}" for m in cols) + " |",
            "|---" * (len(cols) + 1) + "|",
        ]
        lines += [f"| {a} | " + " | ".join(_ci(s[key][m][a], signed=True) for m in cols) + " |" for a in arms]
    lines += [
        "",
        f"Retrieval precision (share of the {result['k']} retrieved that are prostate adapters) and the "
        "decoys retrieved:",
        "",
        "| target | " + " | ".join(f"M = {m}" for m in ms) + " |",
        rule,
    ]
    for tgt, r in result["targets"].items():
        cells = []
        for m in ms:
            c = r["by_m"][m]
            cells.append(
                f"{c['precision']:.2f}" + (f" ({', '.join(c['decoys_retrieved'])})" if c["decoys_retrieved"] else "")
            )
        lines.append(f"| {tgt} | " + " | ".join(cells) + " |")
    lines.append("| mean | " + " | ".join(f"{s['precision'][m]:.2f}" for m in ms) + " |")
    lines += ["", "Weight on decoys (Σ|w| over decoy adapters), mean over targets (max):", "", head, rule]
    lines += [
        f"| {a} | "
        + " | ".join(f"{s['decoy_weight'][m][a]['mean']:.2f} ({s['decoy_weight'][m][a]['max']:.2f})" for m in ms)
        + " |"
        for a in ARMS
    ]
    kinds = [TASK, *DECOY_KINDS]
    lines += [
        "",
        f"Does z separate the tasks? Median squared distance from each target's z to the library by kind (at M = {ms[-1]}), "
        "and nearest decoy / farthest prostate site (> 1: every prostate site is nearer than every decoy):",
        "",
        "| target | " + " | ".join(kinds) + " | nearest decoy / farthest prostate |",
        "|---" * (len(kinds) + 2) + "|",
    ]
    for tgt, r in result["targets"].items():
        zd = r["z"]
        lines.append(
            f"| {tgt} | "
            + " | ".join(f"{zd['median_by_kind'].get(k, float('nan')):.3g}" for k in kinds)
            + f" | {zd['nearest_decoy'] / zd['farthest_prostate']:.2f} |"
        )
    if result.get("decoy_dice"):
        lines += [
            "",
            "The decoys on their own task (mean DICE on their 3 test slices, 95 % interval over slices not given: "
            "3 slices), without and with their LoRA, the training loss (first step → mean of the last 5) and "
            "the update's norm ‖δ‖_F (all modules)"
            + (
                f"; the prostate LoRAs' norms: {min(pn):.2f}–{max(pn):.2f}:"
                if (pn := [v for n, v in result.get("update_norms", {}).items() if n not in result["decoy_dice"]])
                else ":"
            ),
            "",
            "| decoy | kind | pretrained | own LoRA | loss | ‖δ‖_F |",
            "|---|---|---|---|---|---|",
        ]
        for d in result["decoys"]:
            q, st = result["decoy_dice"][d["name"]], result["train_stats"].get(result["adapters"][d["name"]]) or {}
            loss = f"{st['loss_first']:.2f} → {st['loss_last']:.2f}" if st.get("loss_first") is not None else "–"
            lines.append(
                f"| {d['name']} | {d['kind']} | {np.mean(q['pretrained']):.3f} | {np.mean(q['own']):.3f} | {loss} | "
                f"{result.get('update_norms', {}).get(d['name'], float('nan')):.2f} |"
            )
    lines += ["", f"Per-target mean DICE at M = {ms[0]} → M = {ms[-1]}:", ""]
    lines += ["| target | pretrained | own | " + " | ".join(ARMS) + " |", "|---" * (len(ARMS) + 3) + "|"]
    for tgt, r in result["targets"].items():
        lines.append(
            f"| {tgt} | {np.mean(r['dice']['pretrained']):.3f} | {np.mean(r['dice']['own']):.3f} | "
            + " | ".join(
                f"{np.mean(r['by_m'][ms[0]]['dice'][a]):.3f} → {np.mean(r['by_m'][ms[-1]]['dice'][a]):.3f}"
                for a in ARMS
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Compute
# ---------------------------------------------------------------------------------------------


def load_decoy(d: dict[str, Any]) -> Any:
    """The decoy's site (a ``SegSite``: train and test slices with binary masks)."""
    from common.dataroot import dataset_dir
    from common.families.segmentation.data import SegSite, load_fundus_site
    from common.families.segmentation.volumes import Foreground, read_nifti, volume_slices

    if d["kind"].startswith("fundus"):
        site = load_fundus_site(d["domain"], d["kind"].split("-")[1])
        site.name = d["name"]
        return site
    image, label, win = VOLUMES[d["kind"]]
    root = dataset_dir("totalsegmentator-test")
    vol, lab = read_nifti(root / image), read_nifti(root / label, "label map")
    vs = volume_slices(vol, lab, Foreground((float(d["label"]),)), axis="axial", win=win, mode="label", cap=0)
    train, test = split_slices(list(range(len(vs.indices))))
    return SegSite(
        d["name"],
        f"totalsegmentator-test:{d['kind']}:{d['organ']}",
        [vs.images[i] for i in train],
        [vs.masks[i] for i in train],
        [vs.images[i] for i in test],
        [vs.masks[i] for i in test],
        meta={"slices": {"train": [vs.indices[i] for i in train], "test": [vs.indices[i] for i in test]}},
    )


def run(b: Bench, decoys: list[dict[str, Any]], ms: Sequence[int], k: int, lora: dict[str, Any]) -> dict[str, Any]:
    """Every target's cells: per-slice DICE per arm and M, retrieval, weights, z distances."""
    names = [s.name for s in b.sites]
    kind = {n: TASK for n in names}
    for d in decoys:
        b.by_name[d["name"]] = load_decoy(d)
        kind[d["name"]] = d["kind"]
    config = site_config("uniform", 0, "", lora["steps"], lora["lr"], lora["rank"])
    keys = {n: b.adapter(n, config)[0] for n in kind}
    Z = {n: b.z(n) for n in kind}
    targets: dict[str, Any] = {}
    for target in names:
        lib = [n for n in names if n != target]
        r: dict[str, Any] = {
            "dice": {"pretrained": b.dice(target, []), "own": b.dice(target, [(keys[target], 1.0)])},
            "z": z_distances(Z[target], {n: Z[n] for n in [*lib, *(d["name"] for d in decoys)]}, kind),
            "by_m": {},
        }
        for m in ms:
            cell = target_arms(Z[target], Z, lib + [d["name"] for d in decoys[:m]], kind, k)
            cell["dice"] = {a: b.dice(target, [(keys[n], c) for n, c in w.items()]) for a, w in cell["weights"].items()}
            r["by_m"][str(m)] = cell
            print(
                f"[seg-decoys {time.perf_counter() - b.t0:6.0f}s] {target} M={m} precision {cell['precision']:.2f}: "
                + ", ".join(f"{a} {np.mean(v):.3f}" for a, v in cell["dice"].items()),
                file=sys.stderr,
                flush=True,
            )
        targets[target] = r
    # is each decoy a working adapter of its own task? DICE on its own test slices, without and with it
    quality = {
        d["name"]: {"pretrained": b.dice(d["name"], []), "own": b.dice(d["name"], [(keys[d["name"]], 1.0)])}
        for d in decoys
    }
    from common.adapters.normalise import update_norm

    return {
        "norms": {n: update_norm(b.adapters[keys[n]]) for n in kind},
        "targets": targets,
        "keys": keys,
        "stats": {keys[n]: b.stats.get(keys[n]) for n in kind},
        "decoy_dice": quality,
    }


def earlier_runs(path: Path, result: dict[str, Any]) -> list[dict[str, Any]]:
    """The runs recorded in an earlier ``results.json`` of the same study (same model, k and LoRAs, its M's
    among this run's): so the files keep what the training runs cost when a rerun only reads the cache."""
    try:
        prev = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    same = ("fingerprint", "k", "lora")
    if not isinstance(prev, dict) or any(prev.get(key) != result.get(key) for key in same):
        return []
    if not set(prev.get("decoys_m") or [-1]) <= set(result.get("decoys_m") or []):
        return []
    if prev.get("runs"):
        return list(prev["runs"])
    return [{"command": prev.get("command", "?"), **prev["timing"]}] if "timing" in prev else []


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.zero_shot_seg_decoys",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--decoys",
        default="0,4,8,16,32",
        help=f"decoy counts M, comma-separated, 0 to {N_DECOYS} (default 0,4,8,16,32)",
    )
    p.add_argument(
        "--k", type=int, default=K_DEFAULT, help="adapters retrieved for sim/lin/lin-l1/soup, 1 to 5 (default 5)"
    )
    p.add_argument(
        "--steps", type=int, default=12, help="training steps of every LoRA (default 12, the prostate ones')"
    )
    p.add_argument("--lr", type=float, default=2e-3, help="learning rate of every LoRA (default 2e-3)")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank (default 4)")
    p.add_argument("--workdir", type=Path, default=None, help="cache (default $RPE_CACHE_DIR/zero_shot_hetero: shared)")
    p.add_argument("--out", type=Path, default=OUT_DIR, help=f"output folder (default {OUT_DIR})")
    p.add_argument(
        "--cached-only",
        action="store_true",
        help="compute no evaluation; stop with a message if a cell is not in the cache",
    )
    a = p.parse_args(argv)
    try:
        a.ms = sorted({int(x) for x in a.decoys.split(",") if x.strip()})
    except ValueError:
        p.error(f"--decoys must be comma-separated integers such as 0,4,8,16; got {a.decoys!r}")
    if not a.ms:
        p.error("--decoys names no M")
    bad = [m for m in a.ms if not 0 <= m <= N_DECOYS]
    if bad:
        p.error(f"--decoys {bad}: M must be between 0 and {N_DECOYS} (the decoys this study has)")
    if not 1 <= a.k <= 5:
        p.error(f"--k {a.k}: k must be between 1 and 5 (the prostate library of a target has 5 sites)")
    if a.steps < 1 or a.rank < 1 or not a.lr > 0:
        p.error("--steps and --rank must be at least 1 and --lr positive")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    from common.models import cache_dir

    t0 = time.perf_counter()
    load_start = os.getloadavg()[0]
    decoys = decoy_plan(max(a.ms))
    try:
        b = Bench("prostate-multisite", a.workdir or cache_dir() / "zero_shot_hetero", 1, t0)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    b.cached_only = a.cached_only
    lora = {"steps": a.steps, "lr": a.lr, "rank": a.rank}
    try:
        got = run(b, decoys, a.ms, a.k, lora)
    except NotCached as exc:
        print(f"error: --cached-only: target {exc} has a cell no earlier run computed; run without it", file=sys.stderr)
        return 1
    except (FileNotFoundError, KeyError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    command = "python -m benchmarks.zero_shot_seg_decoys " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {
        "command": command.strip(),
        "dataset": "prostate-multisite",
        "model": "litemedsam",
        "fingerprint": b.fingerprint,
        "machine": f"{os.cpu_count()} CPU cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
        f"niceness {os.nice(0)}, no GPU",
        "k": a.k,
        "lora": {
            **lora,
            "seed": 0,
            "copies": 1,
            "config": config_key(site_config("uniform", 0, "", a.steps, a.lr, a.rank)),
        },
        "decoys_m": a.ms,
        "decoys": [
            {
                **d,
                "n_train": len(b.by_name[d["name"]].train_images),
                "n_test": len(b.by_name[d["name"]].test_images),
                **({"slices": b.by_name[d["name"]].meta["slices"]} if "slices" in b.by_name[d["name"]].meta else {}),
            }
            for d in decoys
        ],
        "interval": "95 % percentile bootstrap over the 6 targets (4000 replicates), slices pooled",
        "targets": got["targets"],
        "decoy_dice": got["decoy_dice"],
        "update_norms": got["norms"],
        "adapters": got["keys"],
        "train_stats": got["stats"],
        "summary": summarise(got["targets"], a.ms),
        "timing": {
            "wall_s": time.perf_counter() - t0,
            "train_s": b.train_s,
            "eval_s": b.eval_s,
            "n_evals": b.n_evals,
            "load_start": load_start,
            "load_end": os.getloadavg()[0],
        },
    }
    result["runs"] = [*earlier_runs(a.out / "results.json", result), {"command": result["command"], **result["timing"]}]
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    (a.out / "DECOYS.md").write_text(markdown(result))
    sys.stdout.write(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
