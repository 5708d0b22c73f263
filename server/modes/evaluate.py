"""``mode=evaluate``: leave-one-site-out over every enrolled site with held-out data (or the sites
``target=`` names). Only targets that could not be evaluated are problems; an enrolled site that is no
target (not named, or without held-out data) is listed under ``skipped`` (:func:`choose_targets`).

For each target: its z (``query.embed``), then ONE ``train.evaluate`` carrying every arm - every
strategy in ``eval-strategies``, the baselines ``nearest`` and ``avg`` (composed from the *other*
sites only), and the site's own LoRA (the supervised reference) - and asking for the base model's
score too, so the site loads its model once per target (``client/arms.py``). The message is signed
like a delivery (a ``delivery`` statement over :func:`common.protocol.wire.arms_digest` of the arms'
hashes, name ``evaluate``); the site checks it against its pinned coordinator key, and every reply
(or its absence) is audited (``composition.delivered`` / ``composition.undelivered``).
Results: CSV + Markdown + plots under ``<registry>/evaluations/<run id>/`` (``server/reporting.py``),
and one progress line per (target, arm) as each score arrives, with the time left. The Markdown also
says, per target, on what share of the held-out items two arms produced identical output (the site
counts it and keeps the outputs themselves: ``client/arms.py``), and how far the library was from the
target (the "nothing close enough" check, ``server/nearness.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.serverapp import Grid

from common.protocol import wire
from common.protocol.wire import WireError
from server.coordkey import load_or_create
from server.messaging import Reply, Request, SiteInfo, audit_reply, exchange, log, make_nonce
from server.modes.compose import compose_one, delivery_statement, embed_sites
from server.reporting import Progress, evaluation_row, metric_title, write_evaluation
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
    return {
        "adapter": adapter,
        "ids": [rec.id],
        "sites": [target],
        "weights": [1.0],
        "distances": [float(np.sum((rec.z - z) ** 2))],
        "output_sha256": wire.adapter_sha256(adapter),
    }


def run_evaluate(
    grid: Grid, s: Settings, registry: Any, sites: dict[str, SiteInfo], run_id: str, report: dict[str, Any]
) -> None:
    """Every strategy and baseline for every enrolled site with held-out data, scored by the family's metric."""
    from common.families import get_family

    metric = get_family(s.task).metric
    enrolled = sorted({r.meta.site for r in registry.list(task=s.task)})
    targets, problems, skipped = choose_targets(list(s.targets), enrolled, sites)
    if skipped:
        log(f"evaluate: {len(skipped)} enrolled site(s) not evaluated on purpose: {_skipped_text(skipped)}")
    zs = embed_sites(grid, s, registry, sites, targets, run_id, problems)
    methods = arms(s)
    coord_key = load_or_create(registry.path)
    requests: list[Request] = []
    arms_of: dict[str, list[dict[str, Any]]] = {}  # target -> the summaries of its arms, in request order
    for t, z in zs.items():
        batch: list[tuple[dict[str, Any], Any]] = []
        for method in [*methods, "own"]:
            try:
                summary = (
                    own_summary(s, registry, t, z) if method == "own" else compose_one(s, registry, t, z, method, None)
                )
            except Exception as exc:  # noqa: BLE001 - report and go on with the other arms
                problems[f"{t}|{method}"] = f"{type(exc).__name__}: {exc}"
                continue
            adapter = summary.pop("adapter")
            batch.append(({"arm": method, "blob_sha256": summary["output_sha256"]}, adapter))
            arms_of.setdefault(t, []).append({"target": t, "method": method, **summary})
        if batch:
            requests.append(evaluate_request(s, t, sites[t].node_id, batch, run_id, coord_key))
    n_arms = sum(len(v) for v in arms_of.values())
    log(f"evaluating {n_arms} (target, arm) pairs over {len(zs)} targets, one message per target")
    progress = Progress("evaluate", n_arms)

    def on_reply(req: Request, rep: Reply) -> None:
        for i, info in enumerate(arms_of[req.key]):
            progress.result(f"target {req.key}, arm {info['method']}", _score(rep, i, metric))

    replies = exchange(
        grid,
        requests,
        s.timeout_train,
        on_reply=on_reply,
        on_wait=progress.waiting,
        audit=registry.audit,
        run_id=run_id,
    )
    rows: list[dict[str, Any]] = []
    identical: dict[str, dict[str, float]] = {}  # target -> {"sim|avg": share of identical outputs}
    for req in requests:
        t, rep, infos = req.key, replies[req.key], arms_of[req.key]
        digest = wire.arms_digest([info["output_sha256"] for info in infos])
        where = {
            "target": t,
            "name": "evaluate",
            "output_sha256": digest,
            "arms": [{"arm": i["method"], "output_sha256": i["output_sha256"]} for i in infos],
        }
        if not rep.ok:
            problems[t] = rep.problem
            audit_reply(
                registry.audit, "composition.undelivered", req, rep, run_id, t, **where, reason=rep.problem[:1000]
            )
            continue
        try:
            metrics, receipt = wire.parse_evaluate_reply(rep.content)
            if receipt["nonce"] != req.nonce or receipt["blob_sha256"] != digest:
                raise WireError("receipt does not match the adapters sent", "receipt")
        except WireError as exc:
            problems[t] = f"invalid evaluate reply: {exc}"
            audit_reply(
                registry.audit, "composition.undelivered", req, rep, run_id, t, **where, reason=problems[t][:1000]
            )
            continue
        audit_reply(
            registry.audit, "composition.delivered", req, rep, run_id, t, **where, metrics=metrics, stored=False
        )
        if not receipt["evaluated"]:
            problems[t] = "site did not evaluate (no held-out data, or its policy withholds the metrics)"
            continue
        for i, info in enumerate(infos):
            rows.append(evaluation_row(info, _arm_metrics(metrics, f"a{i}_"), metric))
        identical[t] = same_pairs(metrics, [info["method"] for info in infos])
        base = _arm_metrics(metrics, "base_")
        if base:
            rows.append(
                evaluation_row(
                    {"target": t, "method": "base", "ids": [], "sites": [], "weights": [], "distances": []},
                    base,
                    metric,
                )
            )
    order = {m: i for i, m in enumerate(["base", *methods, "own"])}
    rows.sort(key=lambda r: (r["target"], order.get(r["method"], 99)))
    out_root = registry.path / "evaluations" / run_id
    out = write_evaluation(out_root, rows, registry, zs, identical)
    report["evaluate"] = {
        "rows": rows,
        "problems": problems,
        "skipped": skipped,
        "outputs": out,
        "identical": identical,
    }
    log(f"evaluation: {len(rows)} results, {len(problems)} problems; written to {out_root}")


#: why an enrolled site that is no target of the run is not evaluated (not a problem)
NOT_A_TARGET = "not a target of this run (target= names others)"
NO_HELD_OUT = "holds no held-out evaluation data, so it is no target (it can still be a source)"


def choose_targets(
    asked: list[str], enrolled: list[str], sites: dict[str, SiteInfo]
) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """``(targets, problems, skipped)`` of an evaluation run before anything is sent.

    ``asked`` (the run config's ``target=``) names the targets; without it every enrolled site is
    one. A problem is a target that was asked and cannot be evaluated: an explicitly named site that
    is online but says it holds no held-out data (whoami's ``n_eval``; an offline or failing target
    is named later, by the embedding step and the replies), or, with no ``target=``, an enrolled site
    that is offline (nobody can tell whether it holds data). Every other enrolled site is
    ``skipped``, with the reason: not named, or online without held-out data. They are not problems:
    the run did what it was asked (an evaluation of 10 targets among 50 sites has no 40 problems)."""
    problems: dict[str, str] = {}
    skipped: dict[str, str] = {}
    if asked:
        targets = []
        for t in dict.fromkeys(asked):
            if t in sites and int(sites[t].info.get("n_eval") or 0) <= 0:
                problems[t] = (
                    "asked to evaluate (target=) but the site holds no held-out evaluation data (whoami n_eval = 0); "
                    "give it an eval split (`rpe data check` shows what it uses) or leave it out of target="
                )
            else:
                targets.append(t)
        skipped = {t: NOT_A_TARGET for t in enrolled if t not in problems and t not in targets}
        return targets, problems, skipped
    targets = [t for t in enrolled if t in sites and int(sites[t].info.get("n_eval") or 0) > 0]
    for t in enrolled:
        if t not in sites:
            problems[t] = "offline: an enrolled site that could not be asked to evaluate"
        elif t not in targets:
            skipped[t] = NO_HELD_OUT
    return targets, problems, skipped


def _skipped_text(skipped: dict[str, str], most: int = 8) -> str:
    """``site (reason), ...``: the first ``most`` of them, then how many more."""
    shown = [f"{t} ({why})" for t, why in list(skipped.items())[:most]]
    if len(skipped) > most:
        shown.append(f"and {len(skipped) - most} more")
    return ", ".join(shown)


def evaluate_request(
    s: Settings, target: str, node_id: int, batch: list[tuple[dict[str, Any], Any]], run_id: str, coord_key: Any
) -> Request:
    """The ``train.evaluate`` for one target: every arm, the base score, and the coordinator's
    signed ``delivery`` statement over the arms' digest (the site evaluates only what it signed)."""
    nonce = make_nonce()
    digest = wire.arms_digest([str(info["blob_sha256"]) for info, _ in batch])
    config: dict[str, Any] = {
        "nonce": nonce,
        "task": s.task,
        "with_base": True,
        "delivery": delivery_statement(coord_key, digest, target, run_id, "evaluate", nonce),
        **s.options_config(),
    }
    if s.max_eval:
        config["max_eval"] = s.max_eval
    content = wire.build_evaluate_request(config, batch)
    return Request(target, node_id, wire.EVALUATE, content, nonce)


def same_pairs(metrics: dict[str, float], methods: list[str]) -> dict[str, float]:
    """``{"<arm>|<arm>": share}`` from a reply's ``a<i>_same_a<j>`` / ``a<i>_same_base`` metrics: the
    share of held-out items on which the two arms produced identical output (``client/arms.py``)."""
    import re

    def name(label: str) -> str | None:
        if label == "base":
            return "base"
        i = int(label[1:])
        return methods[i] if i < len(methods) else None

    out: dict[str, float] = {}
    for key, value in metrics.items():
        m = re.match(r"^(a\d+|base)_same_(a\d+|base)$", key)
        if m and (a := name(m.group(1))) and (b := name(m.group(2))):
            out[f"{a}|{b}"] = float(value)
    return out


def _arm_metrics(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    return {k[len(prefix) :]: v for k, v in metrics.items() if k.startswith(prefix)}


def _score(rep: Reply, i: int, metric: str) -> str:
    """What a progress line says about arm ``i`` of one reply (the score, or why there is none)."""
    if not rep.ok:
        return rep.problem
    try:
        metrics, receipt = wire.parse_evaluate_reply(rep.content)
    except WireError as exc:
        return f"invalid reply ({exc})"
    if not receipt["evaluated"]:
        return "not evaluated (no held-out data, or the site withholds the metrics)"
    arm = _arm_metrics(metrics, f"a{i}_")
    if metric not in arm:
        return "no score"
    text = f"{metric_title(metric)} {arm[metric]:.4f}"
    if f"base_{metric}" in metrics:
        text += f" (base model {metrics[f'base_{metric}']:.4f})"
    return text
