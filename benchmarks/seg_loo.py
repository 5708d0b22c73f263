"""Leave-one-site-out segmentation experiment (the paper's Table 4), as a library-level recipe.

For every site: train one LoRA on its training slices (plus augmented copies) and compute z from
all its images (no labels needed). For every target site, the OTHER sites' LoRAs are composed
exactly (``common.adapters.lora.compose``) with weights from ``server.strategies.compute_weights`` (avg,
nearest, sim, lin, lin-l1) on the z's, and scored by DICE on the target's test slices, next to the
pretrained model without a LoRA and the target's own LoRA (a supervised reference the ensemble does
not see). Each cell also gets a bootstrap 95 % interval over the target's test slices, and each
strategy a paired test (difference, interval, sign-flip p) against the pretrained model and
against ``avg`` (``benchmarks.zero_shot.bootstrap_ci`` / ``paired_test``).

``--virtual V`` adds V simulated scanner sites (``benchmarks.virtual_scanners.make_virtual_site``: a real
site's slices, masks unchanged, through a seeded scanner profile histogram-matched to another real
site). They join the library only: a target never sees a site of its own lineage (the real site
itself or any virtual site made from its slices, which would share its patients and masks). With
them the recipe also measures **N scaling**: for each target, nested random libraries of N sites
(``--sizes``) drawn from every eligible site, each strategy composed over all N. Each site has
only a few test slices, so besides the per-target cells the recipe pools over targets with a
**cluster bootstrap** (resampling lineages, the independent unit) and a sign-flip test over the
per-lineage mean differences.

    python -m benchmarks.seg_loo --dataset prostate-multisite --steps 12 --virtual 12
    python -m benchmarks.seg_loo --dataset fundus-multidomain:disc
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.virtual_scanners import make_virtual_site, random_profile
from benchmarks.zero_shot import bootstrap_ci, diff_cell, paired_test
from common.adapters import compose, load_peft_adapter, save_peft_adapter
from common.families.segmentation import sam
from common.families.segmentation.data import SegSite, load_sites
from common.families.segmentation.task import PromptSpec, SegLoraSpec, SegmentationTask
from server.strategies import compute_weights

STRATEGIES = ("avg", "nearest", "sim", "lin", "lin-l1")
N_BOOT = 2000
COLUMNS = ("pretrained", "own", *STRATEGIES)
OUT_DIR = Path(__file__).resolve().parent


def lineage(site: SegSite) -> str:
    """The real site whose patients a site's slices come from (itself, for a real site)."""
    return str(site.meta.get("source_site", site.name)) if site.simulated else site.name


def virtual_sites(real: list[SegSite], count: int, seed: int = 0) -> list[SegSite]:
    """``count`` simulated scanner sites, made round-robin from the ``real`` sites; each profile is
    seeded and histogram-matched to one of the other real sites (images only, no masks)."""
    names = tuple(s.name for s in real)
    out = []
    for i in range(count):
        src = real[i % len(real)]
        prof = random_profile(10_000 * (seed + 1) + i, tuple(n for n in names if n != src.name))
        ref = next(s for s in real if s.name == prof.match_site)
        out.append(make_virtual_site(src, prof, f"v{i:02d}-{src.name}-as-{ref.name}", ref))
    return out


def pooled(
    per_target: dict[str, dict[str, list[float]]],
    lineages: dict[str, str],
    columns: Sequence[str],
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> dict[str, Any]:
    """Pool DICE over targets: each column's mean over all slices, a cluster-bootstrap 95 % interval
    (lineages resampled with replacement, all their slices kept), and each strategy's paired
    difference to ``pretrained`` and ``avg`` with a sign-flip p over the per-lineage mean
    differences (the lineage is the independent unit; slices of one patient are not)."""
    groups: dict[str, list[str]] = {}
    for t in per_target:
        groups.setdefault(lineages[t], []).append(t)
    keys = list(groups)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(keys), size=(n_boot, len(keys)))

    def stack(col: str) -> list[np.ndarray]:
        return [np.concatenate([np.asarray(per_target[t][col], dtype=np.float64) for t in groups[g]]) for g in keys]

    def summary(vals: list[np.ndarray]) -> dict[str, float]:
        sums = np.array([v.sum() for v in vals])
        cnts = np.array([v.size for v in vals], dtype=np.float64)
        boots = sums[draws].sum(axis=1) / cnts[draws].sum(axis=1)
        lo, hi = np.quantile(boots, [0.025, 0.975])
        return {"mean": float(sums.sum() / cnts.sum()), "lo": float(lo), "hi": float(hi)}

    def signflip(d: list[np.ndarray]) -> dict[str, float]:
        out = summary(d)
        means = np.array([v.mean() for v in d])
        if means.size <= 16:  # every sign pattern: the exact permutation p
            signs = 1.0 - 2.0 * ((np.arange(2**means.size)[:, None] >> np.arange(means.size)) & 1)
            null = np.abs((signs * means).mean(axis=1))
            out["p"] = float(np.mean(null >= abs(means.mean()) - 1e-12))
        else:
            signs = np.random.default_rng(seed + 1).choice([-1.0, 1.0], size=(max(n_boot, 2000), means.size))
            null = np.abs((signs * means).mean(axis=1))
            out["p"] = float((1 + np.sum(null >= abs(means.mean()) - 1e-12)) / (1 + signs.shape[0]))
        return {"diff": out.pop("mean"), **out}

    res: dict[str, Any] = {
        "targets": len(per_target),
        "lineages": len(keys),
        "slices": int(sum(len(per_target[t]["pretrained"]) for t in per_target)),
        "columns": {},
    }
    base, avg = stack("pretrained"), stack("avg") if "avg" in columns else None
    for c in columns:
        v = stack(c)
        cell: dict[str, Any] = summary(v)
        if c in STRATEGIES:
            cell["vs_pretrained"] = signflip([a - b for a, b in zip(v, base, strict=True)])
            if avg is not None and c != "avg":
                cell["vs_avg"] = signflip([a - b for a, b in zip(v, avg, strict=True)])
        res["columns"][c] = cell
    return res


def _log(msg: str, t0: float) -> None:
    print(f"[seg-loo {time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def _prepare(
    task: SegmentationTask, model: Any, s: SegSite, steps: int, lr: float, seed: int, workdir: Path | None
) -> tuple[Any, np.ndarray, dict[str, Any], bool]:
    """(adapter, z, training stats, reused) for one site, from ``workdir`` when it holds them."""
    done = workdir / s.name if workdir is not None else None
    profile = json.dumps(s.meta.get("profile"), sort_keys=True)
    if (
        done is not None
        and (done / "stats.json").is_file()
        and (done / "profile.json").is_file()
        and (done / "profile.json").read_text() == profile
    ):
        return (
            load_peft_adapter(done / "adapter"),
            np.load(done / "z.npy"),
            json.loads((done / "stats.json").read_text()),
            True,
        )
    z = task.site_embedding(model, s.all_images, site=s.name).z.astype(np.float64)
    adapter, stats = task.train_adapter(model, s, steps=steps, lr=lr, seed=seed)
    if done is not None:
        save_peft_adapter(adapter, done / "adapter", base_model_name_or_path=adapter.base_model)
        np.save(done / "z.npy", z)
        (done / "profile.json").write_text(profile)
        (done / "stats.json").write_text(json.dumps(stats))
    return adapter, z, stats, False


def _library_cells(
    task: SegmentationTask,
    model: Any,
    target: SegSite,
    names: list[str],
    adapters: dict[str, Any],
    zs: dict[str, np.ndarray],
    base: dict[str, list[float]],
) -> tuple[dict[str, list[float]], dict[str, dict[str, float]]]:
    """Per-slice DICE of every strategy composed over the library ``names`` (and the weights)."""
    Z = np.stack([zs[n] for n in names])
    per = dict(base)
    weights = {}
    for strategy in STRATEGIES:
        w = compute_weights(strategy, zs[target.name], Z)
        weights[strategy] = {n: float(x) for n, x in zip(names, w, strict=True)}
        per[strategy] = task.evaluate(model, compose([adapters[n] for n in names], w), target)["dice_per_image"]
    return per, weights


def run(
    dataset: str,
    model_spec: str = sam.LITEMEDSAM,
    steps: int = 20,
    lr: float = 2e-3,
    copies: int = 1,
    prompt: PromptSpec | None = None,
    rank: int = 4,
    seed: int = 0,
    cache: Path | None = None,
    model: Any = None,
    workdir: Path | None = None,
    only: str | None = None,
    virtual: int = 0,
    sizes: Sequence[int] = (2, 4, 8, 16),
    virtual_targets: bool = False,
) -> dict[str, Any]:
    """Run the experiment; returns ``{"dice": {target: {column: DICE}}, "weights": ..., ...}``.

    ``dice`` / ``dice_ci`` / ``tests`` / ``weights`` are for the library of the other real sites
    (the paper's Table 4). With ``virtual`` > 0, ``all_sites`` holds the same for the library of
    every eligible site (real + virtual), ``scaling[target][N]`` the per-slice DICE of each
    strategy over nested random libraries of ``sizes``, and ``pooled`` the over-target summaries.
    With ``workdir`` each site's adapter (PEFT directory), z and training stats are stored there and
    reused, so sites can be prepared by separate processes (``only=SITE`` prepares one and returns).
    """
    t0 = time.perf_counter()
    model = model if model is not None else sam.load_sam(model_spec)
    task = SegmentationTask(
        spec=SegLoraSpec(rank=rank, prompt=prompt or PromptSpec()), augment_copies=copies, cache=cache
    )
    real = load_sites(dataset)
    sites = real + virtual_sites(real, virtual, seed)
    by_name = {s.name: s for s in sites}
    adapters, zs, train_stats = {}, {}, {}
    n_reused = 0
    for i, s in enumerate(sites):
        if only is not None and s.name != only:
            continue
        adapters[s.name], zs[s.name], train_stats[s.name], reused = _prepare(task, model, s, steps, lr, seed, workdir)
        n_reused += reused
        if not reused:
            _log(
                f"[{i + 1}/{len(sites)}] {s.name}: LoRA trained ({train_stats[s.name]['loss_first']:.3f} -> "
                f"{train_stats[s.name]['loss_last']:.3f}), z computed",
                t0,
            )
    if only is not None:
        return {"prepared": only, "wall_s": time.perf_counter() - t0}
    table: dict[str, dict[str, float]] = {}
    weights: dict[str, dict[str, dict[str, float]]] = {}
    per_image: dict[str, dict[str, list[float]]] = {}
    ci: dict[str, dict[str, list[float]]] = {}
    tests: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    all_per: dict[str, dict[str, list[float]]] = {}
    all_weights: dict[str, dict[str, dict[str, float]]] = {}
    scaling: dict[str, dict[str, dict[str, list[float]]]] = {}
    targets = [s for s in sites if virtual_targets or not s.simulated]
    for ti, target in enumerate(targets):
        eligible = [s.name for s in sites if lineage(s) != lineage(target)]
        real_lib = [n for n in eligible if not by_name[n].simulated]
        base = {
            "pretrained": task.evaluate(model, None, target)["dice_per_image"],
            "own": task.evaluate(model, adapters[target.name], target)["dice_per_image"],
        }
        per, weights[target.name] = _library_cells(task, model, target, real_lib, adapters, zs, base)
        row = {c: float(np.mean(v)) for c, v in per.items()}
        per_image[target.name] = per
        ci[target.name] = {c: list(bootstrap_ci(v, N_BOOT)) for c, v in per.items()}
        tests[target.name] = {
            s: {
                "vs_pretrained": paired_test(per[s], per["pretrained"], N_BOOT),
                "vs_avg": paired_test(per[s], per["avg"], N_BOOT),
            }
            for s in STRATEGIES
        }
        table[target.name] = row
        if virtual:
            all_per[target.name], all_weights[target.name] = _library_cells(
                task, model, target, eligible, adapters, zs, base
            )
            order = [eligible[j] for j in np.random.default_rng([seed, ti]).permutation(len(eligible))]
            scaling[target.name] = {str(len(eligible)): all_per[target.name]}
            for n in sorted({int(x) for x in sizes if 0 < int(x) < len(eligible)}):
                scaling[target.name][str(n)] = _library_cells(task, model, target, order[:n], adapters, zs, base)[0]
        _log(f"[{ti + 1}/{len(targets)}] {target.name}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()), t0)
    mean = {c: float(np.mean([table[t][c] for t in table])) for c in COLUMNS}
    lineages = {t.name: lineage(t) for t in targets}
    out = {
        "dataset": dataset,
        "model": model_spec,
        "fingerprint": sam.model_fingerprint(model),
        "steps": steps,
        "lr": lr,
        "augment_copies": copies,
        "rank": rank,
        "prompt": task.spec.prompt.__dict__,
        "seed": seed,
        "dice": table,
        "mean": mean,
        "dice_ci": ci,
        "tests": tests,
        "dice_per_image": per_image,
        "weights": weights,
        "train": train_stats,
        "pooled": {"real": pooled(per_image, lineages, COLUMNS)},
        "simulated_sites": [s.name for s in sites if s.simulated],
        "profiles": {s.name: s.meta.get("profile") for s in sites if s.simulated},
        "lineage": lineages,
        "sites_reused": n_reused,
    }
    if virtual:
        out["all_sites"] = {
            "dice_per_image": all_per,
            "weights": all_weights,
            "dice": {t: {c: float(np.mean(v)) for c, v in p.items()} for t, p in all_per.items()},
        }
        out["pooled"]["all"] = pooled(all_per, lineages, COLUMNS)
        out["scaling"] = scaling
        ns = sorted({int(n) for per_t in scaling.values() for n in per_t})
        # a size every target reached (the full library differs by target: keyed "all")
        common_ns = [n for n in ns if all(str(n) in scaling[t] for t in scaling)]
        out["pooled_scaling"] = {
            str(n): pooled({t: scaling[t][str(n)] for t in scaling}, lineages, COLUMNS) for n in common_ns
        }
        if len({len(per_t) and max(int(n) for n in per_t) for per_t in scaling.values()}) > 1:
            out["pooled_scaling"]["all"] = out["pooled"]["all"]  # full libraries of different sizes
    out["wall_s"] = time.perf_counter() - t0
    return out


def markdown(result: dict[str, Any]) -> str:
    """The DICE table (targets x columns, mean last) and the weights each target received."""
    sim = set(result["simulated_sites"])
    lines = [
        f"### Leave-one-site-out DICE: {result['dataset']} ({result['model']}, prompt "
        f"{result['prompt']['mode']}, {result['steps']} steps, wall {result['wall_s']:.0f} s"
        + (
            f"; {result['sites_reused']} of {len(result['train'])} sites' LoRA and z reused from --workdir"
            if result.get("sites_reused")
            else ""
        )
        + ")",
        "",
        "| target | " + " | ".join(COLUMNS) + " |",
        "|---" * (len(COLUMNS) + 1) + "|",
    ]
    for t, row in result["dice"].items():
        name = f"{t} (simulated)" if t in sim else t
        best = max(row[c] for c in STRATEGIES)
        cells = [f"**{row[c]:.3f}**" if c in STRATEGIES and row[c] == best else f"{row[c]:.3f}" for c in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| mean | " + " | ".join(f"{result['mean'][c]:.3f}" for c in COLUMNS) + " |")
    if result.get("dice_ci"):
        lines += [
            "",
            "With uncertainty: mean DICE [bootstrap 95 % interval over the target's test slices]; "
            "each strategy's paired difference to the pretrained model and to `avg` over the same "
            "slices, * = sign-flip permutation p < 0.05.",
            "",
            "| target | column | DICE | vs pretrained | vs avg |",
            "|---|---|---|---|---|",
        ]
        for t, row in result["dice"].items():
            n = len(result["dice_per_image"][t]["pretrained"])
            for c in COLUMNS:
                lo, hi = result["dice_ci"][t][c]
                test = result["tests"][t].get(c, {})
                cells = [diff_cell(test.get("vs_pretrained")), diff_cell(test.get("vs_avg")) if c != "avg" else "–"]
                lines.append(
                    f"| {t} ({n} slices) | {c} | {row[c]:.3f} [{lo:.3f}, {hi:.3f}] | " + " | ".join(cells) + " |"
                )
    if result.get("pooled"):
        lines += _pooled_lines(result)
    lines += ["", "Weights per target (rows: strategy; columns: source site):", ""]
    for t, per in result["weights"].items():
        sources = list(next(iter(per.values())))
        lines += [f"**{t}**", "", "| strategy | " + " | ".join(sources) + " |", "|---" * (len(sources) + 1) + "|"]
        lines += [f"| {s} | " + " | ".join(f"{w[n]:+.2f}" for n in sources) + " |" for s, w in per.items()]
        lines.append("")
    return "\n".join(lines)


def _pooled_lines(result: dict[str, Any]) -> list[str]:
    """Over-target tables: each library's pooled DICE, and (with virtual sites) DICE vs N."""
    pool = result["pooled"]
    any_pool = next(iter(pool.values()))
    lines = [
        "",
        f"Pooled over targets ({any_pool['targets']} targets, {any_pool['lineages']} lineages, "
        f"{any_pool['slices']} test slices): mean DICE [cluster-bootstrap 95 % interval, lineages "
        "resampled]; differences paired per slice, * = exact sign-flip p < 0.05 over the per-lineage mean "
        f"differences (with {any_pool['lineages']} lineages the smallest possible p is "
        f"{2 / 2 ** any_pool['lineages']:.3f}).",
        "",
        "| library | column | DICE | vs pretrained | vs avg |",
        "|---|---|---|---|---|",
    ]
    names = {"real": "other real sites", "all": "real + virtual sites"}
    for lib, res in pool.items():
        for c, cell in res["columns"].items():
            lines.append(
                f"| {names.get(lib, lib)} | {c} | {cell['mean']:.3f} [{cell['lo']:.3f}, {cell['hi']:.3f}] | "
                f"{diff_cell(cell.get('vs_pretrained'))} | "
                f"{diff_cell(cell.get('vs_avg')) if c != 'avg' else '–'} |"
            )
    if result.get("all_sites"):
        lines += [
            "",
            "Per target, library = every eligible site (real + virtual, none of the target's lineage):",
            "",
            "| target | " + " | ".join(COLUMNS) + " |",
            "|---" * (len(COLUMNS) + 1) + "|",
        ]
        for t, row in result["all_sites"]["dice"].items():
            lines.append(f"| {t} | " + " | ".join(f"{row[c]:.3f}" for c in COLUMNS) + " |")
    if result.get("pooled_scaling"):
        lines += [
            "",
            "DICE vs library size N (nested random libraries per target, each strategy over all N; "
            "pooled over targets, [cluster-bootstrap 95 % interval]):",
            "",
            "| N | " + " | ".join(STRATEGIES) + " | best − avg |",
            "|---" * (len(STRATEGIES) + 2) + "|",
        ]
        for n, res in result["pooled_scaling"].items():
            cols = res["columns"]
            best = max(STRATEGIES, key=lambda c: cols[c]["mean"])
            vs = cols[best].get("vs_avg")
            lines.append(
                f"| {n} | "
                + " | ".join(f"{cols[c]['mean']:.3f} [{cols[c]['lo']:.3f}, {cols[c]['hi']:.3f}]" for c in STRATEGIES)
                + f" | {best}: {diff_cell(vs) if vs else '–'} |"
            )
        lines += [
            "",
            f"Pretrained (no LoRA) pooled: {pool['real']['columns']['pretrained']['mean']:.3f}; "
            f"own LoRA (supervised reference): {pool['real']['columns']['own']['mean']:.3f}.",
        ]
    return lines


def plot_scaling(result: dict[str, Any], path: Path) -> Path:
    """Pooled DICE vs N per strategy, with the cluster-bootstrap intervals as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ps = result["pooled_scaling"]
    n_all = max(int(n) for per in result["scaling"].values() for n in per)
    xs = [n_all if n == "all" else int(n) for n in ps]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for i, c in enumerate(STRATEGIES):
        m = np.array([ps[n]["columns"][c]["mean"] for n in ps])
        lo = np.array([ps[n]["columns"][c]["lo"] for n in ps])
        hi = np.array([ps[n]["columns"][c]["hi"] for n in ps])
        ax.errorbar(np.array(xs) * (1 + 0.03 * (i - 2)), m, yerr=[m - lo, hi - m], marker="o", capsize=2, label=c)
    pre = result["pooled"]["real"]["columns"]
    ax.axhline(pre["pretrained"]["mean"], color="grey", ls=":", label="pretrained")
    ax.axhline(pre["own"]["mean"], color="black", ls="--", label="own LoRA")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.minorticks_off()
    ax.set_xlabel("library size N (sites)")
    return _save(
        fig,
        ax,
        "pooled DICE",
        f"DICE vs N: {result['dataset']} (+{len(result['simulated_sites'])} virtual sites)",
        path,
    )


def _save(fig: Any, ax: Any, ylabel: str, title: str, path: Path) -> Path:
    """Label a DICE axis (0..1), add the legend, write ``path`` and close the figure."""
    import matplotlib.pyplot as plt

    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(ncol=4, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot(result: dict[str, Any], path: Path) -> Path:
    """Grouped bars: DICE per target for each column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = list(result["dice"])
    x = np.arange(len(targets))
    width = 0.8 / len(COLUMNS)
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(targets)), 3.6))
    for i, c in enumerate(COLUMNS):
        ax.bar(x + i * width, [result["dice"][t][c] for t in targets], width, label=c)
    ax.set_xticks(x + width * (len(COLUMNS) - 1) / 2, targets)
    return _save(fig, ax, "DICE", f"Leave-one-site-out: {result['dataset']}", path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="prostate-multisite")
    p.add_argument("--model", default=sam.LITEMEDSAM)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--copies", type=int, default=1, help="augmented copies per training slice")
    p.add_argument("--prompt", default="center", choices=["none", "center", "jitter"])
    p.add_argument("--jitter", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None, help="store/reuse per-site adapters, z and stats here")
    p.add_argument("--only", default=None, help="with --workdir: prepare this one site and stop")
    p.add_argument(
        "--virtual",
        type=int,
        default=0,
        help="add this many simulated scanner sites to the library (and measure DICE vs N)",
    )
    p.add_argument("--sizes", default="2,4,8,16", help="library sizes N for the scaling table (with --virtual)")
    p.add_argument("--virtual-targets", action="store_true", help="evaluate the virtual sites as targets too")
    p.add_argument("--out", type=Path, default=None, help="output stem (default benchmarks/SEG_LOO_<dataset>)")
    a = p.parse_args(argv)
    if a.virtual < 0:
        p.error(f"--virtual must be 0 or more; got {a.virtual}")
    try:
        sizes = [int(x) for x in a.sizes.split(",") if x.strip()]
    except ValueError:
        p.error(f"--sizes must be comma-separated integers such as 2,4,8; got {a.sizes!r}")
    result = run(
        a.dataset,
        a.model,
        a.steps,
        a.lr,
        a.copies,
        PromptSpec(a.prompt, jitter=a.jitter),
        seed=a.seed,
        workdir=a.workdir,
        only=a.only,
        virtual=a.virtual,
        sizes=sizes,
        virtual_targets=a.virtual_targets,
    )
    if a.only is not None:
        return 0
    stem = a.out or OUT_DIR / f"SEG_LOO_{a.dataset.replace(':', '_').replace('-', '_')}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    stem.with_suffix(".md").write_text(md + f"\n![DICE per target]({stem.name}.png)\n")
    plot(result, stem.with_suffix(".png"))
    if result.get("pooled_scaling"):
        plot_scaling(result, stem.parent / f"{stem.name}_vs_n.png")
        stem.with_suffix(".md").write_text(
            md + f"\n![DICE per target]({stem.name}.png)\n![DICE vs N]({stem.name}_vs_n.png)\n"
        )
    sys.stdout.write(md + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
