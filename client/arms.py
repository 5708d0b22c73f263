"""``train.evaluate``: score every arm of one leave-one-site-out target with the model loaded once.

The coordinator sends a target all its composed adapters (every strategy, the baselines and the
site's own LoRA) in one message (``common.protocol.wire.build_evaluate_request``); this handler checks each
against this site's base and its hash, scores them together on the held-out data (the family's
``score``: a report family generates all arms in one pass) and replies with numbers only:
``a<i>_<metric>`` per arm and ``base_<metric>`` for the base model. Nothing is stored.

Before anything is loaded, the coordinator's ``delivery`` statement must verify against the key
this site pinned and name exactly these arms (``arms_digest`` of their hashes), this site, run and
request (``client/delivery.check_delivery``, as for ``train.apply``). Held-out scores are
data-derived and not noised: a site with a privacy budget sends none, and none leave over fewer
held-out items than its ``metrics-min-reports`` (``client/policy.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Context, RecordDict

from client.delivery import check_delivery, rebuild_adapter
from client.policy import ReleaseRefused
from client.release import guard_metrics, round_metric_counts, say
from client.site import Site, family_options, load_family_data, site_family
from common.protocol import wire


def numeric(result: dict[str, Any]) -> dict[str, float]:
    """Only the scalar scores of an evaluation: predictions and references never leave the site."""
    return {
        k: float(v)
        for k, v in result.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) and wire.METRIC_NAME_RE.match(k)
    }


def evaluate_arms(req: wire.Request, site: Site, context: Context) -> RecordDict:
    """Rebuild and check every arm's adapter, score each (and the base with ``with_base``), reply."""
    cfg = req.config
    assert req.arms is not None
    digest = wire.arms_digest([str(arm["blob_sha256"]) for arm, _ in req.arms])
    check_delivery(site, {**cfg, "blob_sha256": digest, "name": "evaluate"}, str(context.run_id))
    family = site_family(site, cfg.get("task"))
    family_options(family, cfg)
    fp = family.base_fingerprint(site.inputs())
    adapters = [
        rebuild_adapter(
            arrays,
            arm["lora_config"],
            arm["blob_sha256"],
            fp,
            arm["base_fingerprint"],
            what=f"arm {i} ({arm['arm']})",
            record=f"adapter-{i}",
        )
        for i, (arm, arrays) in enumerate(req.arms)
    ]
    hashes = [str(arm["blob_sha256"]) for arm, _ in req.arms]
    metrics: dict[str, float] = {}
    held = scorable(site, family, cfg)
    if held:
        base = family.load_base(site.inputs())
        family.to_compute(base, site.compute_dtype)
        scored = family.score(base, site.inputs(), held, [*adapters, *([None] if cfg.get("with_base") else [])])
        for i, result in enumerate(scored):
            prefix = f"a{i}" if i < len(adapters) else "base"
            metrics.update({f"{prefix}_{k}": v for k, v in numeric(result).items()})
        metrics = round_metric_counts(metrics, site.release.min_metric_reports)
    receipt = {
        "schema": wire.WIRE_SCHEMA,
        "site": site.site,
        "name": "evaluate",
        "blob_sha256": wire.arms_digest(hashes),
        "evaluated": bool(metrics),
        "nonce": cfg["nonce"],
    }
    return wire.build_evaluate_reply(metrics, receipt)


def scorable(site: Site, family: Any, cfg: dict[str, Any]) -> list[Any]:
    """The held-out items the site may score (``max_eval`` of them), or none: no held-out data, a
    privacy budget, or fewer items than its release policy allows."""
    if site.policy.get("privacy-budget"):
        return []
    held = load_family_data(site, family).eval
    held = held[: cfg["max_eval"]] if cfg.get("max_eval") else held
    if not held:
        return []
    try:
        site.release.metrics(len(held))
    except ReleaseRefused as exc:
        say(site, f"metrics withheld: {exc.reason}")
        return []
    if not guard_metrics(site, family, held):  # differencing over time (client/history.py)
        return []
    return held
