"""``train.evaluate``: score every arm of one leave-one-site-out target with the model loaded once.

The coordinator sends a target all its composed adapters (every strategy, the baselines and the
site's own LoRA) in one message (``common.protocol.wire.build_evaluate_request``); this handler checks each
against this site's base and its hash, scores it on the held-out data and replies with numbers
only: ``a<i>_<metric>`` per arm and ``base_<metric>`` for the base model. Nothing is stored.

Before anything is loaded, the coordinator's ``delivery`` statement must verify against the key
this site pinned and name exactly these arms (``arms_digest`` of their hashes), this site, run and
request (``client/handlers.check_delivery``, as for ``train.apply``). Held-out scores are
data-derived and not noised: a site with a privacy budget sends none, and none leave over fewer
held-out items than its ``metrics-min-reports`` (``client/policy.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flwr.app import Context, RecordDict

from client import seg_handlers as seg
from client.release import say
from client.site import Site, SiteError, load_model, load_site_data, site_task, to_compute_dtype
from common.protocol import wire
from common.protocol.wire import WireError


def _scorer(site: Site, cfg: dict[str, Any]) -> tuple[str, Callable[[list[Any]], list[dict[str, float]]] | None]:
    """(base fingerprint, [adapter-or-None] -> [metrics]), or None as scorer when there is nothing
    the site may score (no held-out data, or fewer held-out items than its release policy allows).
    Report arms are generated together (``common.families.report.evaluation.evaluate_task_arms``: the weights are
    read once per decoding step for all of them)."""
    from client.policy import ReleaseRefused

    if seg.is_segmentation(site, cfg.get("task")):
        model, fp = seg._model(site)
        return fp, lambda adapters: [seg.score(site, {"max_eval": cfg.get("max_eval", 0)}, model, a) for a in adapters]
    from client.handlers import numeric
    from common.families.report.evaluation import evaluate_task_arms

    data = load_site_data(site.data_path)
    held = data.eval[: cfg["max_eval"]] if cfg.get("max_eval") else data.eval
    task = site_task(site, cfg.get("task", "report-text"))
    model, tok, fp = load_model(site)
    if not held:
        return fp, None
    to_compute_dtype(site, model)
    try:
        site.release.metrics(len(held))
    except ReleaseRefused as exc:
        say(site, f"metrics withheld: {exc.reason}")
        return fp, None
    return fp, lambda adapters: [numeric(r) for r in evaluate_task_arms(model, tok, task, held, adapters)]


def evaluate_arms(req: wire.Request, site: Site, context: Context) -> RecordDict:
    """Rebuild and check every arm's adapter, score each (and the base with ``with_base``), reply."""
    from client.handlers import check_delivery

    cfg = req.config
    assert req.arms is not None
    digest = wire.arms_digest([str(arm["blob_sha256"]) for arm, _ in req.arms])
    check_delivery(site, {**cfg, "blob_sha256": digest, "name": "evaluate"}, str(context.run_id))
    fp, scorer = _scorer(site, cfg)
    adapters, hashes = [], []
    for i, (arm, arrays) in enumerate(req.arms):
        if arm["base_fingerprint"] != fp:
            raise SiteError(f"arm {i} ({arm['arm']}) is for base model {arm['base_fingerprint']}, this site runs {fp}")
        adapter = wire.adapter_from_wire(arrays, arm["lora_config"], base_model=fp)
        got = wire.adapter_sha256(adapter)
        if got != arm["blob_sha256"]:
            raise WireError(f"arm {i} adapter hashes to {got}, the request says {arm['blob_sha256']}", f"adapter-{i}")
        adapters.append(adapter)
        hashes.append(got)
    metrics: dict[str, float] = {}
    evaluated = scorer is not None and not site.policy.get("privacy-budget")
    if evaluated:
        assert scorer is not None
        scored = scorer([*adapters, *([None] if cfg.get("with_base") else [])])
        for i, result in enumerate(scored):
            prefix = f"a{i}" if i < len(adapters) else "base"
            metrics.update({f"{prefix}_{k}": v for k, v in result.items()})
        evaluated = bool(metrics)
    receipt = {
        "schema": wire.WIRE_SCHEMA,
        "site": site.site,
        "name": "evaluate",
        "blob_sha256": wire.arms_digest(hashes),
        "evaluated": evaluated,
        "nonce": cfg["nonce"],
    }
    return wire.build_evaluate_reply(metrics, receipt)
