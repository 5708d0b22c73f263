"""Training heterogeneity (issue 28 item 2): sites trained with different steps, learning rates and
ranks, against the uniform setting; how much do the strategies lose, and does ``update-norm``
(``common/adapters/normalise.py``) recover it?

Family and profile: segmentation, the six prostate sites (``prostate-multisite``), LiteMedSAM with
LoRAs on the mask decoder's attention (the encoder is frozen, so its maps are cached and a LoRA
costs seconds to minutes on a loaded 2-core CPU; a report-text LoRA costs tens of minutes there).
Leave-one-site-out, as ``benchmarks/seg_loo.py``: each site in turn is the target, the library is
the other five, every strategy (``avg``, ``nearest``, ``sim``, ``lin``, ``lin-l1``, defaults,
weights from the z's) composes over all five, and DICE is measured on the target's 3 test slices.

Settings, per draw ``d`` (``--draws``; the draw is also every LoRA's training seed):

- ``uniform``: every site ``--steps`` (12) steps at ``--lr`` (2e-3), rank ``--rank`` (4);
- ``hetero``: every site draws its steps from ``HETERO_STEPS``, its learning rate from
  ``HETERO_LR`` and its rank from ``HETERO_RANK`` (seeded by the draw and the site's name), alpha
  fixed at 8 as in PEFT's habit, so the update's size varies with all three.

Each composition is made twice, ``update-norm=none`` (today's composition) and ``frobenius``
(``norm_scaling``: every retrieved update rescaled to the median norm of the five before weighting),
with the coordinator's own code (``server.strategies.compute_weights``,
``common.adapters.normalise.norm_scaling``, ``common.adapters.compose``).

Intervals: per-slice DICE differences are paired (same draw, target, slice); the 95 % interval is a
two-level bootstrap that resamples draws and target sites (the independent units) with replacement,
so it includes the draw's (seed's) variance as well as the targets'.

Everything expensive is cached under ``--workdir`` (default ``$RPE_CACHE_DIR/zero_shot_hetero``):
each LoRA by (site, steps, lr, rank, seed), each z by site, each evaluation by (target, composed
coefficients), so adding draws only computes what is new.

    python -m benchmarks.zero_shot_hetero --draws 0,1,2     # writes benchmarks/zero_shot/hetero/
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

STRATEGIES = ("avg", "nearest", "sim", "lin", "lin-l1")
MODES = ("none", "frobenius")
HETERO_STEPS = (4, 12, 24)
HETERO_LR = (5e-4, 2e-3, 8e-3)
HETERO_RANK = (2, 4, 8)
KINDS = ("train", "scaled")
N_BOOT = 4000
OUT_DIR = Path(__file__).resolve().parent / "zero_shot" / "hetero"


def site_config(
    setting: str,
    draw: int,
    site: str,
    steps: int,
    lr: float,
    rank: int,
    kind: str = "train",
    train_seed: int | None = None,
) -> dict[str, Any]:
    """The (steps, lr, rank, seed) site ``site`` trains with in ``setting`` at draw ``draw``. With
    ``kind="scaled"`` the hetero site is its uniform adapter with the update times ``factor`` = (drawn lr
    / lr) x (drawn steps / steps), the same draw as ``train``'s: the first-order size of that training."""
    seed = draw if train_seed is None else train_seed  # --train-seed: the same LoRAs, only the draw varies
    if setting == "uniform":
        return {"steps": steps, "lr": lr, "rank": rank, "seed": seed}
    rng = np.random.default_rng([draw, zlib.crc32(site.encode())])
    drawn = {
        "steps": int(rng.choice(HETERO_STEPS)),
        "lr": float(rng.choice(HETERO_LR)),
        "rank": int(rng.choice(HETERO_RANK)),
        "seed": seed,
    }
    if kind == "scaled":
        factor = drawn["lr"] / lr * drawn["steps"] / steps
        return {"steps": steps, "lr": lr, "rank": rank, "seed": seed, "factor": factor, "as_if": drawn}
    return drawn


def config_key(c: dict[str, Any]) -> str:
    key = f"s{c['steps']}-lr{c['lr']:g}-r{c['rank']}-seed{c['seed']}"
    return key + (f"-x{c['factor']:g}" if "factor" in c else "")


def two_level_ci(cells: dict[tuple[int, str], np.ndarray], n_boot: int = N_BOOT, seed: int = 0) -> dict[str, float]:
    """Mean over all slices of ``cells[(draw, target)]`` and a 95 % bootstrap interval resampling
    draws and targets (independently, with replacement)."""
    draws = sorted({d for d, _ in cells})
    targets = sorted({t for _, t in cells})
    S = np.zeros((len(draws), len(targets)))
    C = np.zeros((len(draws), len(targets)))
    for (d, t), v in cells.items():
        S[draws.index(d), targets.index(t)] = float(np.sum(v))
        C[draws.index(d), targets.index(t)] = float(np.size(v))
    rng = np.random.default_rng(seed)
    wd = np.stack([np.bincount(x, minlength=len(draws)) for x in rng.integers(0, len(draws), (n_boot, len(draws)))])
    wt = np.stack(
        [np.bincount(x, minlength=len(targets)) for x in rng.integers(0, len(targets), (n_boot, len(targets)))]
    )
    sums = np.einsum("bd,dt,bt->b", wd, S, wt)
    cnts = np.einsum("bd,dt,bt->b", wd, C, wt)
    boots = sums / np.maximum(cnts, 1)
    lo, hi = np.quantile(boots, [0.025, 0.975])
    return {"mean": float(S.sum() / C.sum()), "lo": float(lo), "hi": float(hi), "draws": len(draws)}


def _log(msg: str, t0: float) -> None:
    print(f"[hetero {time.perf_counter() - t0:7.1f}s] {msg}", file=sys.stderr, flush=True)


class NotCached(LookupError):
    """``--cached-only``: a cell that no earlier process has computed."""


class Bench:
    """The model, the sites and the caches of one run."""

    def __init__(self, dataset: str, workdir: Path, copies: int, t0: float) -> None:
        from common.families.segmentation import sam
        from common.families.segmentation.data import load_sites

        self.t0 = t0
        self.dataset = dataset
        self.copies = copies
        self.model = sam.load_sam(sam.LITEMEDSAM)
        self.fingerprint = sam.model_fingerprint(self.model)
        self.sites = load_sites(dataset)
        self.by_name = {s.name: s for s in self.sites}
        self.root = workdir / dataset.replace(":", "_") / self.fingerprint.split(":")[-1][:16]
        self.root.mkdir(parents=True, exist_ok=True)
        self.evals_dir = self.root / "evals"  # one file per evaluation: processes in parallel never clobber
        self.evals_dir.mkdir(exist_ok=True)
        self.cached_only = False
        self.adapters: dict[str, Any] = {}
        self.stats: dict[str, dict[str, Any]] = {}
        self.train_s = 0.0
        self.eval_s = 0.0
        self.n_evals = 0

    def task(self, rank: int) -> Any:
        from common.families.segmentation.task import PromptSpec, SegLoraSpec, SegmentationTask

        return SegmentationTask(spec=SegLoraSpec(rank=rank, prompt=PromptSpec()), augment_copies=self.copies)

    def z(self, site: str) -> np.ndarray:
        path = self.root / "z" / f"{site}.npy"
        if path.is_file():
            return np.load(path)
        s = self.by_name[site]
        z = self.task(4).site_embedding(self.model, s.all_images, site=s.name).z.astype(np.float64)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, z)
        return z

    def adapter(self, site: str, c: dict[str, Any]) -> tuple[str, Any]:
        from common.adapters import load_peft_adapter, save_peft_adapter

        key = f"{site}/{config_key(c)}"
        if key in self.adapters:
            return key, self.adapters[key]
        if "factor" in c:  # the uniform adapter, its update times factor (B scaled): nothing to train
            from common.adapters import LoraAdapter, LoraModule

            src_key, src = self.adapter(site, {k: v for k, v in c.items() if k != "factor"})
            f = float(c["factor"])
            self.adapters[key] = LoraAdapter(
                {n: LoraModule(m.A, m.B * f, m.scale) for n, m in src.modules.items()}, src.base_model
            )
            self.stats[key] = {"from": src_key, "factor": f}
            return key, self.adapters[key]
        done = self.root / "adapters" / key
        if (done / "stats.json").is_file():
            adapter = load_peft_adapter(done / "adapter")
            self.stats[key] = json.loads((done / "stats.json").read_text())
        else:
            t = time.perf_counter()
            adapter, stats = self.task(c["rank"]).train_adapter(
                self.model, self.by_name[site], steps=c["steps"], lr=c["lr"], seed=c["seed"]
            )
            self.train_s += time.perf_counter() - t
            save_peft_adapter(adapter, done / "adapter", base_model_name_or_path=adapter.base_model)
            (done / "stats.json").write_text(json.dumps(stats))
            self.stats[key] = stats
            _log(
                f"trained {key} ({stats['loss_first']:.3f} -> {stats['loss_last']:.3f}, {stats['seconds']:.0f} s)",
                self.t0,
            )
        self.adapters[key] = adapter
        return key, adapter

    def dice(self, target: str, parts: Sequence[tuple[str, float]]) -> list[float]:
        """Per-slice DICE of ``Σ coef · adapter`` (``parts``: (adapter key, coefficient)) on ``target``."""
        from common.adapters import compose

        used = [(k, float(c)) for k, c in parts if c != 0.0]
        key = hashlib.sha256(json.dumps([target, sorted((k, round(c, 12)) for k, c in used)]).encode()).hexdigest()
        path = self.evals_dir / f"{key}.json"
        if path.is_file():
            return list(json.loads(path.read_text()))
        if self.cached_only:
            raise NotCached(target)
        t = time.perf_counter()
        adapter = compose([self.adapters[k] for k, _ in used], [c for _, c in used]) if used else None
        got = self.task(4).evaluate(self.model, adapter, self.by_name[target])["dice_per_image"]
        self.eval_s += time.perf_counter() - t
        self.n_evals += 1
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(got))
        tmp.replace(path)
        return list(got)


def setting_modes(setting: str, uniform_frobenius: bool) -> tuple[str, ...]:
    """The update-norm modes composed in ``setting`` (uniform: ``none`` unless asked for both)."""
    return MODES if setting == "hetero" or uniform_frobenius else ("none",)


def run_draw(
    b: Bench,
    draw: int,
    steps: int,
    lr: float,
    rank: int,
    *,
    only_site: str | None = None,
    only_target: str | None = None,
    uniform_frobenius: bool = False,
    own: bool = False,
    kind: str = "train",
    train_seed: int | None = None,
) -> dict[str, Any]:
    """Every cell of one draw: ``dice[setting][target][column]`` per slice, weights, scales, norms.
    ``only_site``: train that site's adapters (both settings) and stop; ``only_target``: evaluate that
    target only (the caches let separate processes share the work)."""
    from common.adapters.normalise import update_norm

    names = [s.name for s in b.sites]
    if only_site is not None:
        for setting in ("uniform", "hetero"):
            b.adapter(only_site, site_config(setting, draw, only_site, steps, lr, rank, kind, train_seed))
        return {}
    zs = {n: b.z(n) for n in names}
    out: dict[str, Any] = {"configs": {}, "norms": {}, "dice": {}, "weights": {}, "scales": {}}
    for setting in ("uniform", "hetero"):
        configs = {n: site_config(setting, draw, n, steps, lr, rank, kind, train_seed) for n in names}
        keys = {n: b.adapter(n, configs[n])[0] for n in names}
        out["configs"][setting] = configs
        out["norms"][setting] = {n: update_norm(b.adapters[keys[n]]) for n in names}
        dice: dict[str, dict[str, list[float]]] = {}
        weights: dict[str, dict[str, list[float]]] = {}
        scales: dict[str, dict[str, list[float]]] = {}
        for target in [only_target] if only_target else names:
            try:
                dice[target], weights[target], scales[target] = _target_cells(
                    b, target, names, keys, zs, setting, own, uniform_frobenius
                )
            except NotCached:
                _log(f"draw {draw} {setting} {target}: not every cell is cached; target left out", b.t0)
                continue
            _log(
                f"draw {draw} {setting} {target}: "
                + ", ".join(f"{c} {np.mean(v):.3f}" for c, v in dice[target].items()),
                b.t0,
            )
        out["dice"][setting], out["weights"][setting], out["scales"][setting] = dice, weights, scales
    # a target is kept only where both settings have it (the comparisons are paired)
    both = set(out["dice"]["uniform"]) & set(out["dice"]["hetero"])
    for setting in ("uniform", "hetero"):
        out["dice"][setting] = {t: v for t, v in out["dice"][setting].items() if t in both}
    return out


def _target_cells(
    b: Bench,
    target: str,
    names: list[str],
    keys: dict[str, str],
    zs: dict[str, np.ndarray],
    setting: str,
    own: bool,
    uniform_frobenius: bool,
) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, list[float]]]:
    """(per-slice DICE per column, weights per strategy, scales per mode) of one target in one setting."""
    from common.adapters.normalise import norm_scaling
    from server.strategies import compute_weights

    lib = [n for n in names if n != target]
    Z = np.stack([zs[n] for n in lib])
    cells = {"pretrained": b.dice(target, [])}
    if own:
        cells["own"] = b.dice(target, [(keys[target], 1.0)])
    weights: dict[str, list[float]] = {}
    scales: dict[str, list[float]] = {}
    for mode in setting_modes(setting, uniform_frobenius):
        scaling = norm_scaling([b.adapters[keys[n]] for n in lib], mode)
        scales[mode] = scaling.scales
        for strategy in STRATEGIES:
            w = [float(x) for x in compute_weights(strategy, zs[target], Z)]
            weights[strategy] = w
            coef = scaling.apply(w)
            cells[f"{strategy}/{mode}"] = b.dice(target, [(keys[n], c) for n, c in zip(lib, coef, strict=True)])
    return cells, weights, scales


COMPARISONS = (
    ("heterogeneity cost", ("hetero", "none"), ("uniform", "none")),
    ("recovered by frobenius", ("hetero", "frobenius"), ("hetero", "none")),
    ("hetero+frobenius vs uniform", ("hetero", "frobenius"), ("uniform", "none")),
    ("frobenius when uniform", ("uniform", "frobenius"), ("uniform", "none")),
)


def summarise(draws: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Pooled DICE per (setting, strategy, mode) and the paired comparisons, with two-level intervals."""

    def cells(setting: str, column: str) -> dict[tuple[int, str], np.ndarray]:
        return {
            (d, t): np.asarray(per[column], dtype=np.float64)
            for d, res in draws.items()
            for t, per in res["dice"][setting].items()
        }

    def present(setting: str, column: str) -> bool:
        return all(column in per for res in draws.values() for per in res["dice"][setting].values())

    pooled: dict[str, Any] = {}
    for setting in ("uniform", "hetero"):
        columns = ["pretrained", "own", *(f"{s}/{m}" for s in STRATEGIES for m in MODES)]
        pooled[setting] = {c: two_level_ci(cells(setting, c)) for c in columns if present(setting, c)}
    diffs: dict[str, Any] = {}
    for name, (sa, ma), (sb, mb) in COMPARISONS:
        if not (present(sa, f"avg/{ma}") and present(sb, f"avg/{mb}")):
            continue
        diffs[name] = {}
        for s in STRATEGIES:
            a, b_ = cells(sa, f"{s}/{ma}"), cells(sb, f"{s}/{mb}")
            diffs[name][s] = two_level_ci({k: a[k] - b_[k] for k in a})
    spread = {
        setting: [
            max(r["norms"][setting].values()) / max(min(r["norms"][setting].values()), 1e-12) for r in draws.values()
        ]
        for setting in ("uniform", "hetero")
    }
    return {"pooled": pooled, "diffs": diffs, "norm_spread": spread}


def _factor(c: dict[str, Any]) -> str:
    return f"{c['factor']:.3g}" if "factor" in c else "–"


def _ci(c: dict[str, float] | None, signed: bool = False) -> str:
    if c is None:
        return "not run"
    f = "+.3f" if signed else ".3f"
    star = "*" if signed and (c["lo"] > 0 or c["hi"] < 0) else ""
    return f"{c['mean']:{f}} [{c['lo']:{f}}, {c['hi']:{f}}]{star}"


def markdown(result: dict[str, Any]) -> str:
    summ = result["summary"]
    pooled, diffs = summ["pooled"], summ["diffs"]
    d = result["draws_run"]
    lines = [
        f"### Training heterogeneity: {result['dataset']}, LiteMedSAM decoder LoRAs, leave-one-site-out "
        f"({len(d)} draw(s): {', '.join(map(str, d))})",
        "",
    ]
    for part in result["parts"]:
        lines.append(
            f"Command: `{part['command']}` — draw(s) {', '.join(map(str, part['draws']))}, wall {part['wall_s']:.0f} s "
            f"on the shared 2-core CPU (training {part['train_s']:.0f} s, {part['n_evals']} new evaluations "
            f"{part['eval_s']:.0f} s; the rest from the cache)."
        )
    lines += [
        "",
        f"uniform: every site {result['uniform']['steps']} steps, lr {result['uniform']['lr']:g}, rank "
        f"{result['uniform']['rank']}; "
        + (
            "hetero (`--hetero-kind scaled`): each site's uniform adapter with its update multiplied by "
            "(drawn lr / lr) x (drawn steps / steps), steps drawn from "
            f"{list(HETERO_STEPS)} and lr from {list(HETERO_LR)}: what that training would do to the size of the "
            "update to first order, not to its direction (no training). "
            if result.get("hetero_kind") == "scaled"
            else f"hetero: each site draws steps from {list(HETERO_STEPS)}, lr from {list(HETERO_LR)}, rank from "
            f"{list(HETERO_RANK)} (alpha 8). "
        )
        + "Largest / smallest update norm "
        "among the six sites, per draw: uniform "
        + ", ".join(f"{x:.1f}x" for x in summ["norm_spread"]["uniform"])
        + "; hetero "
        + ", ".join(f"{x:.1f}x" for x in summ["norm_spread"]["hetero"])
        + ".",
        "",
        f"Pooled DICE ({len(next(iter(result['draws'].values()))['dice']['uniform'])} targets × 3 test slices per "
        "draw) [95 % interval, draws and targets resampled]:",
        "",
        "| strategy | uniform, none | uniform, frobenius | hetero, none | hetero, frobenius |",
        "|---|---|---|---|---|",
    ]
    for s in STRATEGIES:
        lines.append(
            f"| {s} | "
            + " | ".join(_ci(pooled[st].get(f"{s}/{m}")) for st in ("uniform", "hetero") for m in MODES)
            + " |"
        )
    lines.append(f"| pretrained (no LoRA) | {_ci(pooled['uniform']['pretrained'])} | – | – | – |")
    if "own" in pooled["uniform"]:
        lines.append(
            f"| own LoRA (supervised) | {_ci(pooled['uniform']['own'])} | – | {_ci(pooled['hetero']['own'])} | – |"
        )
    lines += [
        "",
        "Paired differences (same draw, target and slice) [95 % interval, draws and targets resampled]; "
        "* = the interval excludes 0:",
        "",
        "| strategy | " + " | ".join(diffs) + " |",
        "|---" * (len(diffs) + 1) + "|",
    ]
    for s in STRATEGIES:
        lines.append(f"| {s} | " + " | ".join(_ci(diffs[name][s], signed=True) for name in diffs) + " |")
    lines += ["", "Per-site configurations (hetero) and update norms ‖δ‖_F:", ""]
    lines += [
        "| draw | site | steps | lr | rank | factor | ‖δ‖ hetero | ‖δ‖ uniform |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for draw, res in result["draws"].items():
        for site, c in res["configs"]["hetero"].items():
            lines.append(
                f"| {draw} | {site} | {c.get('as_if', c)['steps']} | {c.get('as_if', c)['lr']:g} | "
                f"{c.get('as_if', c)['rank'] if 'as_if' not in c else c['rank']} | {_factor(c)} | "
                f"{res['norms']['hetero'][site]:.3f} | {res['norms']['uniform'][site]:.3f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="prostate-multisite")
    p.add_argument("--draws", default="0", help="comma-separated draws (each is also the training seed), e.g. 0,1,2")
    p.add_argument("--steps", type=int, default=12, help="uniform setting: steps per site (default 12)")
    p.add_argument("--lr", type=float, default=2e-3, help="uniform setting: learning rate (default 2e-3)")
    p.add_argument("--rank", type=int, default=4, help="uniform setting: LoRA rank (default 4)")
    p.add_argument("--copies", type=int, default=1, help="augmented copies per training slice (default 1)")
    p.add_argument("--workdir", type=Path, default=None, help="cache (default $RPE_CACHE_DIR/zero_shot_hetero)")
    p.add_argument("--out", type=Path, default=OUT_DIR, help=f"output folder (default {OUT_DIR})")
    p.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        metavar="JSON",
        help="compute nothing: combine the draws of these hetero.json files (runs made in parallel) into --out",
    )
    p.add_argument("--only-site", help="train this site's adapters (both settings, every draw) and stop")
    p.add_argument("--only-target", help="evaluate this target only and stop (the cache keeps the cells)")
    p.add_argument("--uniform-frobenius", action="store_true", help="also compose the uniform setting with frobenius")
    p.add_argument(
        "--train-seed",
        type=int,
        default=None,
        help="every LoRA's training seed (default: the draw); with --hetero-kind scaled, draws then vary the "
        "heterogeneity only and reuse one set of LoRAs",
    )
    p.add_argument(
        "--cached-only",
        action="store_true",
        help="compute no evaluation: targets with a cell no earlier run computed are left out (and said so)",
    )
    p.add_argument("--own", action="store_true", help="also score each target's own LoRA (supervised reference)")
    p.add_argument(
        "--hetero-kind",
        choices=KINDS,
        default="train",
        help="train: hetero sites trained with drawn steps / lr / rank (default); scaled: the uniform adapters, "
        "each update multiplied by a drawn factor (no training: the size of the heterogeneity only)",
    )
    a = p.parse_args(argv)
    if a.merge:
        return merge(a.merge, a.out)
    try:
        draw_list = [int(x) for x in a.draws.split(",") if x.strip()]
    except ValueError:
        p.error(f"--draws must be comma-separated integers such as 0,1,2; got {a.draws!r}")
    if not draw_list:
        p.error("--draws names no draw")
    from common.models import cache_dir

    t0 = time.perf_counter()
    b = Bench(a.dataset, a.workdir or cache_dir() / "zero_shot_hetero", a.copies, t0)
    b.cached_only = a.cached_only
    command = "python -m benchmarks.zero_shot_hetero " + " ".join(argv if argv is not None else sys.argv[1:])
    draws: dict[int, dict[str, Any]] = {}
    a.out.mkdir(parents=True, exist_ok=True)
    for draw in draw_list:
        draws[draw] = run_draw(
            b,
            draw,
            a.steps,
            a.lr,
            a.rank,
            only_site=a.only_site,
            only_target=a.only_target,
            uniform_frobenius=a.uniform_frobenius,
            own=a.own,
            kind=a.hetero_kind,
            train_seed=a.train_seed,
        )
        if a.only_site or a.only_target:
            _log(f"draw {draw}: {a.only_site or a.only_target} done", t0)
            continue
        part = {
            "command": command,
            "draws": list(draws),
            "wall_s": time.perf_counter() - t0,
            "train_s": b.train_s,
            "eval_s": b.eval_s,
            "n_evals": b.n_evals,
        }
        result = {
            "dataset": a.dataset,
            "model": "litemedsam",
            "fingerprint": b.fingerprint,
            "uniform": {"steps": a.steps, "lr": a.lr, "rank": a.rank},
            "hetero_kind": a.hetero_kind,
            "train_seed": a.train_seed,
            "copies": a.copies,
            "draws_run": list(draws),
            "draws": {str(k): v for k, v in draws.items()},
            "summary": summarise(draws),
            "parts": [part],
            "train_stats": b.stats,
        }
        write(result, a.out)
        _log(f"draw {draw} done; {a.out / 'HETERO.md'} written", t0)
    if not (a.only_site or a.only_target):
        sys.stdout.write((a.out / "HETERO.md").read_text())
    return 0


def write(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "hetero.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "HETERO.md").write_text(markdown(result))


def _parts(r: dict[str, Any]) -> list[dict[str, Any]]:
    """A result's runs (a result written before ``parts`` existed kept its one run at the top level)."""
    if "parts" in r:
        return list(r["parts"])
    keys = ("command", "wall_s", "train_s", "eval_s", "n_evals")
    return [{"draws": r["draws_run"], **{k: r[k] for k in keys}}]


def merge(paths: Sequence[Path], out: Path) -> int:
    """One result from several runs' ``hetero.json`` (same dataset and uniform setting, distinct draws)."""
    results = [json.loads(Path(p).read_text()) for p in paths]
    first = results[0]
    draws: dict[int, dict[str, Any]] = {}
    for r in results:
        same = ("dataset", "uniform", "copies", "hetero_kind", "train_seed")
        if any(r.get(k) != first.get(k) for k in same):
            raise SystemExit(f"--merge: {paths[results.index(r)]} is another setting than {paths[0]}")
        for k, v in r["draws"].items():
            if int(k) in draws:
                raise SystemExit(f"--merge: draw {k} appears twice")
            draws[int(k)] = v
    draws = dict(sorted(draws.items()))
    merged = {
        **first,
        "draws_run": list(draws),
        "draws": {str(k): v for k, v in draws.items()},
        "summary": summarise(draws),
        "parts": [p for r in results for p in _parts(r)],
        "train_stats": {k: v for r in results for k, v in r["train_stats"].items()},
    }
    write(merged, out)
    sys.stdout.write((out / "HETERO.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
