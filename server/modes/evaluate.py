"""``mode=evaluate``: leave-one-site-out over every enrolled site with held-out data.

For each target: its z (``query.embed``), then one ``train.apply`` per arm - every strategy in
``eval-strategies``, the baselines ``nearest`` and ``avg`` (composed from the *other* sites only),
and the site's own LoRA (the supervised reference); the first arm also scores the base model.
Results: CSV + Markdown + plots under ``<registry>/evaluations/<run id>/`` (``server/reporting.py``),
and one progress line per (target, arm) as each score arrives, with the time left.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.serverapp import Grid

from common import wire
from common.wire import WireError
from server.coordkey import load_or_create
from server.messaging import Reply, Request, SiteInfo, audit_reply, exchange, log
from server.modes.compose import apply_request, compose_one, embed_sites, parse_receipt
from server.reporting import SCORE_METRICS, SCORE_TITLES, Progress, evaluation_row, write_evaluation
from server.settings import Settings


def arms(s: Settings) -> list[str]:
    """The composed arms in table order (strategies, then nearest and avg), without duplicates."""
    return [*dict.fromkeys([m.replace("_", "-") for m in s.eval_strategies] + ["nearest", "avg"])]


def own_summary(s: Settings, registry: Any, target: str, z: np.ndarray) -> dict[str, Any]:
    """The target's own stored adapter as a one-source "composition" (its blob hash names it)."""
    own = registry.list(task=s.task, site=target)
    if not own:
        raise ValueError(f"site {target!r} has no enrolled adapter of its own")
    rec = own[-1]
    adapter = wire.wire_normalized(registry.load_adapter(rec.id), base_model=rec.meta.base_fingerprint)
    return {"adapter": adapter, "ids": [rec.id], "sites": [target], "weights": [1.0],
            "distances": [float(np.sum((rec.z - z) ** 2))], "output_sha256": wire.adapter_sha256(adapter)}


def run_evaluate(grid: Grid, s: Settings, registry: Any, sites: dict[str, SiteInfo], run_id: str,
                 report: dict[str, Any]) -> None:
    """Every strategy and baseline for every enrolled site with held-out data."""
    enrolled = sorted({r.meta.site for r in registry.list(task=s.task)})
    targets = list(s.targets) or [t for t in enrolled if t in sites and sites[t].info["n_eval"] > 0]
    problems: dict[str, str] = {}
    for t in enrolled:
        if t not in targets and t not in s.targets:
            problems[t] = "offline" if t not in sites else "no held-out evaluation data"
    zs = embed_sites(grid, s, registry, sites, targets, run_id, problems)
    methods = arms(s)
    coord_key = load_or_create(registry.path)
    requests: list[Request] = []
    meta_by_key: dict[str, dict[str, Any]] = {}
    for t, z in zs.items():
        first = True
        for method in [*methods, "own"]:
            key = f"{t}|{method}"
            try:
                summary = (own_summary(s, registry, t, z) if method == "own"
                           else compose_one(s, registry, t, z, method, None))
            except Exception as exc:  # noqa: BLE001 - report and go on with the other arms
                problems[key] = f"{type(exc).__name__}: {exc}"
                continue
            adapter, sha = summary.pop("adapter"), summary["output_sha256"]
            requests.append(apply_request(s, key, sites[t].node_id, adapter, sha, f"eval-{run_id}-{method}", method,
                                          summary, evaluate=True, store=False, with_base=first, target=t,
                                          run_id=run_id, coord_key=coord_key))
            first = False
            meta_by_key[key] = {"target": t, "method": method, **summary}
    log(f"evaluating {len(requests)} (target, arm) pairs over {len(zs)} targets")
    progress = Progress("evaluate", len(requests))

    def on_reply(req: Request, rep: Reply) -> None:
        target, method = req.key.split("|", 1)
        progress.result(f"target {target}, arm {method}", _score(rep))

    replies = exchange(grid, requests, s.timeout_train, on_reply=on_reply, on_wait=progress.waiting,
                       audit=registry.audit, run_id=run_id)
    rows: list[dict[str, Any]] = []
    base_scores: dict[str, dict[str, float]] = {}
    for req in requests:
        rep, info = replies[req.key], meta_by_key[req.key]
        where = {"target": info["target"], "name": f"eval-{run_id}-{info['method']}",
                 "output_sha256": info["output_sha256"]}
        if not rep.ok:
            problems[req.key] = rep.problem
            audit_reply(registry.audit, "composition.undelivered", req, rep, run_id, info["target"], **where,
                        reason=rep.problem[:1000])
            continue
        try:
            metrics, receipt = parse_receipt(rep.content, req, info["output_sha256"])
        except WireError as exc:
            problems[req.key] = f"invalid apply reply: {exc}"
            audit_reply(registry.audit, "composition.undelivered", req, rep, run_id, info["target"], **where,
                        reason=problems[req.key][:1000])
            continue
        audit_reply(registry.audit, "composition.delivered", req, rep, run_id, info["target"], **where,
                    metrics=metrics, stored=False)
        if not receipt["evaluated"]:
            problems[req.key] = "site did not evaluate (no held-out data)"
            continue
        if any(f"base_{m}" in metrics for m in SCORE_METRICS):
            base_scores[info["target"]] = {k[5:]: v for k, v in metrics.items() if k.startswith("base_")}
        rows.append(evaluation_row(info, {k: v for k, v in metrics.items() if not k.startswith("base_")}))
    for t, metrics in base_scores.items():
        rows.append(evaluation_row({"target": t, "method": "base", "ids": [], "sites": [], "weights": [],
                                    "distances": []}, metrics))
    order = {m: i for i, m in enumerate(["base", *methods, "own"])}
    rows.sort(key=lambda r: (r["target"], order.get(r["method"], 99)))
    out_root = registry.path / "evaluations" / run_id
    out = write_evaluation(out_root, rows, registry, zs)
    report["evaluate"] = {"rows": rows, "problems": problems, "outputs": out}
    log(f"evaluation: {len(rows)} results, {len(problems)} problems; written to {out_root}")


def _score(rep: Reply) -> str:
    """What a progress line says about one reply (the score, or why there is none)."""
    if not rep.ok:
        return rep.problem
    try:
        metrics, receipt = wire.parse_apply_reply(rep.content)
    except WireError as exc:
        return f"invalid reply ({exc})"
    if not receipt["evaluated"]:
        return "not evaluated (no held-out data)"
    metric = next((m for m in SCORE_METRICS if m in metrics), None)
    if metric is None:
        return "no score"
    text = f"{SCORE_TITLES[metric]} {metrics[metric]:.4f}"
    if f"base_{metric}" in metrics:
        text += f" (base model {metrics[f'base_{metric}']:.4f})"
    return text
