"""What the Gaussian mechanism on z costs retrieval, on real data and the real model.

``python -m benchmarks.z_privacy [--n-registry 40] [--n-query 8 32] [--epsilons 1 2 4 8 16]``

Every report group of ``data/`` is one site. Each site's registry z comes from ``--n-registry``
of its reports; a query z comes from ``--n-query`` *other* reports of the same group. Retrieval is
right when the nearest registry z (squared L2, as the registry ranks) is the site's own group.
z is SmolLM2-135M-Instruct's final hidden state averaged over the findings tokens, exactly as a
site computes it; one forward pass per report gives its token sum, and every clip / ε / draw
after that is numpy (the mechanism is applied to those sums exactly as ``ZMechanism`` does).

For each clip norm (a percentile of the per-report token-sum norms) and ε (δ = 1e-5, σ
calibrated by the analytic Gaussian mechanism) it reports top-1 retrieval accuracy over
``--draws`` noise draws per site: with only the query noised, and with every site's z noised
(a federation where all sites use the mechanism). ``non-private`` is the exact z.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

from common.privacy import calibrate_gaussian


def _embed_sums(model: object, tok: object, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(token sums [n, d], token counts [n]) of each text, one forward pass over all of them."""
    from common.embedding import mean_embedding

    emb = mean_embedding(model, tok, texts, return_sums=True, progress=False)
    assert emb.example_sums is not None and emb.example_tokens is not None and len(emb.example_sums) == len(texts)
    return emb.example_sums, emb.example_tokens


def _clipped_mean(sums: np.ndarray, counts: np.ndarray, clip: float | None) -> tuple[np.ndarray, int]:
    if clip is not None:
        norms = np.linalg.norm(sums, axis=1, keepdims=True)
        sums = sums * np.minimum(1.0, clip / np.maximum(norms, 1e-300))
    return sums.sum(axis=0) / counts.sum(), int(counts.sum())


def _accuracy(
    reg: np.ndarray,
    reg_t: np.ndarray,
    qry: np.ndarray,
    qry_t: np.ndarray,
    noise_std: float,
    noise_registry: bool,
    draws: int,
    rng: np.random.Generator,
) -> float:
    """Mean top-1 accuracy over draws; ``noise_std`` is on the token *sum* (σ·C), divided by T per site."""
    n, d = reg.shape
    right = 0
    for _ in range(draws):
        r = reg + (rng.normal(0, 1, (n, d)) * (noise_std / reg_t)[:, None] if noise_registry and noise_std else 0)
        q = qry + (rng.normal(0, 1, (n, d)) * (noise_std / qry_t)[:, None] if noise_std else 0)
        dist = ((q[:, None, :] - r[None, :, :]) ** 2).sum(axis=2)
        right += int((dist.argmin(axis=1) == np.arange(n)).sum())
    return right / (draws * n)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-registry", type=int, default=40, help="reports behind each site's registry z")
    p.add_argument("--n-query", type=int, nargs="+", default=[8, 32], help="reports behind a query z")
    p.add_argument("--epsilons", type=float, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--clip-percentiles", type=float, nargs="+", default=[50, 90])
    p.add_argument("--draws", type=int, default=200)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args()

    import torch

    from common.families.report.data import report_groups
    from common.families.report.task import TextReportTask
    from common.models import load_base_model

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    model, tok = load_base_model("smollm2-135m-instruct")
    task = TextReportTask()
    groups = report_groups()
    names = sorted(groups)
    n_q_max = max(args.n_query)
    sums: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for g in names:
        ex = list(groups[g])
        random.Random(0).shuffle(ex)
        need = args.n_registry + n_q_max
        if len(ex) < need:
            print(f"{g}: {len(ex)} reports < {need}; using {len(ex) - n_q_max} for the registry", file=sys.stderr)
        texts = task.embedding_texts(ex[:need])
        sums[g] = _embed_sums(model, tok, texts)
        print(f"embedded {g}: {len(texts)} reports ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    all_norms = np.concatenate([np.linalg.norm(s[:-n_q_max], axis=1) for s, _ in sums.values()])
    clips = {f"p{q:g}": float(np.percentile(all_norms, q)) for q in args.clip_percentiles}
    rng = np.random.default_rng(0)
    rows = []
    for n_q in args.n_query:
        for clip_name, clip in [("none", None), *clips.items()]:
            reg, reg_t, qry, qry_t = [], [], [], []
            for g in names:
                s, c = sums[g]
                z, t = _clipped_mean(s[:-n_q_max], c[:-n_q_max], clip)
                reg.append(z)
                reg_t.append(t)
                z, t = _clipped_mean(s[-n_q_max:][:n_q], c[-n_q_max:][:n_q], clip)
                qry.append(z)
                qry_t.append(t)
            R, RT, Q, QT = np.array(reg), np.array(reg_t, float), np.array(qry), np.array(qry_t, float)
            if clip is None:
                acc = _accuracy(R, RT, Q, QT, 0.0, False, 1, rng)
                rows.append(
                    {
                        "n_query": n_q,
                        "clip": "none",
                        "clip_norm": None,
                        "epsilon": None,
                        "sigma": 0.0,
                        "acc_query_noised": acc,
                        "acc_all_noised": acc,
                    }
                )
                continue
            for eps in args.epsilons:
                sigma = calibrate_gaussian(eps, args.delta)
                rows.append(
                    {
                        "n_query": n_q,
                        "clip": clip_name,
                        "clip_norm": clip,
                        "epsilon": eps,
                        "sigma": sigma,
                        "acc_query_noised": _accuracy(R, RT, Q, QT, sigma * clip, False, args.draws, rng),
                        "acc_all_noised": _accuracy(R, RT, Q, QT, sigma * clip, True, args.draws, rng),
                    }
                )
    seconds = time.perf_counter() - t0
    print(
        f"Chance is {1 / len(names):.3f}. Sites: {len(names)} report groups; "
        f"registry z from {args.n_registry} reports each; "
        f"clip norms {', '.join(f'{k}={v:,.0f}' for k, v in clips.items())}; δ={args.delta:g}; "
        f"{args.draws} draws; {seconds:.0f} s\n"
    )
    print("| query reports | clip | ε | σ | top-1, query noised | top-1, all sites noised |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        eps = "non-private" if r["epsilon"] is None else f"{r['epsilon']:g}"
        print(
            f"| {r['n_query']} | {r['clip']} | {eps} | {r['sigma']:.2f} | {r['acc_query_noised']:.3f} | "
            f"{r['acc_all_noised']:.3f} |"
        )
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "rows": rows,
                    "clips": clips,
                    "seconds": seconds,
                    "groups": names,
                    "n_registry": args.n_registry,
                    "delta": args.delta,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
