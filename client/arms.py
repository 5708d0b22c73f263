"""``train.evaluate``: score every arm of one leave-one-site-out target with the model loaded once.

The coordinator sends a target all its composed adapters (every strategy, the baselines and the
site's own LoRA) in one message (``common.protocol.wire.build_evaluate_request``); this handler checks each
against this site's base and its hash, scores them together on the held-out data (the family's
``score``: a report family generates all arms in one pass) and replies with numbers only:
``a<i>_<metric>`` per arm and ``base_<metric>`` for the base model, and for every pair of arms the
share of held-out items on which the two produced identical output (``a<i>_same_a<j>``,
``a<i>_same_base``: issue 28, "what the arms say"), within the reply's metric budget.

What each arm generated (a report family's texts, a segmentation family's mask digests) never
leaves the site: it is kept in ``<site dir>/arm-outputs/run-<run id>-<nonce>.json`` (mode 0600, one
file per request) for the site's own people to read, and nothing about it is in the egress log
because nothing of it is sent. No adapter is stored.

Before anything is loaded, the coordinator's ``delivery`` statement must verify against the key
this site pinned and name exactly these arms (``arms_digest`` of their hashes), this site, run and
request (``client/delivery.check_delivery``, as for ``train.apply``). Held-out scores are
data-derived and not noised: a site with a privacy budget sends none, and none leave over fewer
held-out items than its ``metrics-min-reports`` (``client/policy.py``).
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Sequence
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
        labels = [f"a{i}" for i in range(len(adapters))] + (["base"] if cfg.get("with_base") else [])
        outputs = [arm_outputs(result) for result in scored]
        keep_outputs(site, cfg, str(context.run_id), req.arms, labels, held, outputs)
        metrics.update(identical_shares(labels, outputs, wire.MAX_EVALUATE_METRICS - len(metrics)))
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


ARM_OUTPUTS_DIR = "arm-outputs"
SAME_KEY_RE = re.compile(r"^(a\d+|base)_same_(a\d+|base)$")


def arm_outputs(result: dict[str, Any]) -> list[Any] | None:
    """What one arm produced per held-out item, as the family's ``score`` returned it: ``outputs``
    (e.g. a mask digest per slice) or ``predictions`` (generated texts); None if it returns neither."""
    got = result.get("outputs", result.get("predictions"))
    return list(got) if isinstance(got, (list, tuple)) else None


def identical_shares(labels: Sequence[str], outputs: Sequence[list[Any] | None], budget: int) -> dict[str, float]:
    """``{"<a>_same_<b>": share of items on which arms a and b produced identical output}`` for each
    pair of arms that both returned outputs, in arm order, at most ``budget`` of them."""
    out: dict[str, float] = {}
    for (la, oa), (lb, ob) in itertools.combinations(zip(labels, outputs, strict=True), 2):
        if len(out) >= budget:
            break
        if oa is None or ob is None or len(oa) != len(ob) or not oa:
            continue
        out[f"{la}_same_{lb}"] = sum(x == y for x, y in zip(oa, ob, strict=True)) / len(oa)
    return out


def keep_outputs(
    site: Site,
    cfg: dict[str, Any],
    run_id: str,
    arms: Sequence[tuple[dict[str, Any], Any]],
    labels: Sequence[str],
    held: Sequence[Any],
    outputs: Sequence[list[Any] | None],
) -> None:
    """Write what every arm produced to ``<site dir>/arm-outputs/`` (whole or not at all; never sent)."""
    from common.files.durable import atomic_write

    names = [str(arm["arm"]) for arm, _ in arms] + (["base"] if len(labels) > len(arms) else [])
    doc = {
        "site": site.site,
        "run_id": run_id,
        "nonce": cfg["nonce"],
        "task": cfg.get("task"),
        "note": "kept at this site only: nothing in this file was sent to the coordinator",
        "items": [str(getattr(ex, "uid", i)) for i, ex in enumerate(held)],
        "arms": [
            {"label": label, "arm": name, "blob_sha256": arm["blob_sha256"] if i < len(arms) else None}
            for i, (label, name, arm) in enumerate(
                zip(labels, names, [a for a, _ in arms] + [{}] * (len(labels) - len(arms)), strict=True)
            )
        ],
        "outputs": {label: out for label, out in zip(labels, outputs, strict=True)},
    }
    path = site.site_dir / ARM_OUTPUTS_DIR / f"run-{run_id}-{cfg['nonce']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(doc, indent=1, ensure_ascii=False, default=str) + "\n")
    say(site, f"every arm's output kept locally (never sent): {path}")
