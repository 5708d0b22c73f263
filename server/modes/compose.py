"""``mode=compose``: for each ``target`` site, ``query.embed`` -> retrieve the ``k`` nearest adapters
(never the target's own unless ``include-own``) -> weights (``strategy``) -> exact composition ->
``train.apply`` -> metrics. Stored adapters of offline sites take part all the same.

The composed adapter is put in its wire form once (float32 factors, scale = alpha / r) and hashed
once: that one sha256 names it in the ``composition`` audit entry, in the request, in the site's
receipt and egress log, and in ``composition.delivered``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import RecordDict
from flwr.serverapp import Grid

from common.protocol import wire
from common.protocol.wire import WireError
from server.coordkey import load_or_create
from server.messaging import Request, SiteInfo, audit_reply, exchange, log, request
from server.modes.enroll import failed
from server.reporting import Progress
from server.settings import Settings


def embed_sites(
    grid: Grid,
    s: Settings,
    registry: Any,
    sites: dict[str, SiteInfo],
    targets: Sequence[str],
    run_id: str,
    problems: dict[str, str],
) -> dict[str, np.ndarray]:
    """``query.embed`` every target that is online; z per site (problems reported, not raised)."""
    from common.trust.digests import record_digests, z_sha256

    requests = []
    for t in targets:
        if t not in sites:
            problems[t] = "target site is offline: it cannot send its embedding or receive an adapter"
            continue
        requests.append(
            request(
                t, sites[t].node_id, wire.EMBED, {"task": s.task, "embed_layer": s.embed_layer, **s.options_config()}
            )
        )
    progress = Progress("embed", len(requests))
    replies = exchange(
        grid,
        requests,
        s.timeout_query,
        on_wait=progress.waiting,
        audit=registry.audit,
        run_id=run_id,
        on_reply=lambda req, rep: progress.result(req.key, "z received" if rep.ok else rep.problem),
    )
    out: dict[str, np.ndarray] = {}
    for req in requests:
        t, rep = req.key, replies[req.key]
        if not rep.ok:
            problems[t] = rep.problem
            audit_reply(registry.audit, "query.failed", req, rep, run_id, t, reason=rep.problem[:1000])
            continue
        try:
            z, meta = wire.parse_embed_reply(rep.content)
            if meta["site"] != t or meta["nonce"] != req.nonce:
                raise WireError("embedding reply does not answer this request (site or nonce mismatch)", "meta")
            if meta["embedding_spec"]["dim"] != registry.embedding_dim:
                raise WireError(
                    f"site sent {z.shape[0]} values, the registry holds {registry.embedding_dim}", "embedding", "z"
                )
        except WireError as exc:
            problems[t] = f"invalid embedding reply: {exc}"
            audit_reply(registry.audit, "query.failed", req, rep, run_id, t, reason=problems[t][:1000])
            continue
        registry.audit.append(
            "query.embedding",
            site=t,
            target=t,
            z_sha256=z_sha256(z),
            run_id=run_id,
            privacy=json.loads(meta["privacy"]) or "none",
            nonce=req.nonce,
            message_type=wire.EMBED,
            record_digests=record_digests({n: rep.content[n] for n in rep.content.keys()}),
        )
        out[t] = z
    return out


def compose_one(
    s: Settings,
    registry: Any,
    target: str,
    z: np.ndarray,
    strategy: str,
    out_dir: Path | None,
    exclude_own: bool = True,
) -> dict[str, Any]:
    """Retrieve, weigh and compose for one target (``server/composer.py``); returns a summary whose
    ``adapter`` is already in wire form and whose ``output_sha256`` is its one hash.

    ``k`` is capped at the number of eligible adapters, so a small federation still composes.
    """
    from server.composer import compose_for_target

    exclude = target if exclude_own else None
    held = registry.distinct("site", task=s.task)  # {site: live adapters}: k counts sites unless one-per-site=false
    n_eligible = sum(n if not s.one_per_site else 1 for site, n in held.items() if site != exclude)
    if n_eligible == 0:
        raise ValueError(f"no stored adapter for task {s.task!r} to compose for {target!r}")
    result = compose_for_target(
        registry,
        z,
        strategy=strategy,
        k=min(s.k, n_eligible),
        exclude_site=exclude,
        task=s.task,
        max_rank=s.max_rank or None,
        strategy_params=s.strategy_params(strategy),
        out_dir=out_dir,
        target=target,
        audit_query=False,
        wire_form=True,
        one_per_site=s.one_per_site,
        far_ratio=s.far_ratio,
        update_norm=s.update_norm,
    )
    return {
        "adapter": result.adapter,
        "ids": list(result.ids),
        "sites": list(result.sites),
        "weights": [float(w) for w in result.weights],
        "distances": [float(d) for d in result.distances],
        "out_dir": str(result.out_dir or ""),
        "output_sha256": result.output_sha256,
        "nearness": result.nearness,
        "normalisation": result.normalisation,
    }


def delivery_statement(coord_key: Any, sha256: str, target: str, run_id: str, name: str, nonce: str) -> str:
    """The coordinator's signed ``delivery`` statement (canonical JSON) for one ``train.apply``: the
    site installs the adapter only if this verifies against the coordinator key it pinned."""
    from common.trust.statements import sign_statement

    body = {"blob_sha256": sha256, "target": target, "run_id": run_id, "name": name, "nonce": nonce}
    return wire.canonical_json(sign_statement(coord_key, "delivery", body))


def apply_request(
    s: Settings,
    key: str,
    node_id: int,
    adapter: Any,
    sha256: str,
    name: str,
    strategy: str,
    summary: Mapping[str, Any],
    evaluate: bool,
    store: bool = True,
    with_base: bool = False,
    target: str = "",
    run_id: str = "",
    coord_key: Any = None,
) -> Request:
    """The ``train.apply`` request for an adapter in wire form whose canonical bytes hash to ``sha256``,
    signed for ``target`` in ``run_id`` with the coordinator key (``server/coordkey.py``)."""
    from server.messaging import make_nonce

    arrays, lora_config = wire.adapter_to_wire(adapter)
    nonce = make_nonce()
    config: dict[str, Any] = {
        "task": s.task,
        "name": name,
        "lora_config": wire.canonical_json(lora_config),
        "blob_sha256": sha256,
        "base_fingerprint": adapter.base_model or "",
        "strategy": strategy,
        "sources": json.dumps(summary.get("ids", [])),
        "weights": json.dumps(summary.get("weights", [])),
        "evaluate": evaluate,
        "store": store,
        "with_base": with_base,
        **s.options_config(),
    }
    if s.max_eval:
        config["max_eval"] = s.max_eval
    if summary.get("nearness"):
        config["nearness"] = wire.canonical_json(summary["nearness"])
    if summary.get("normalisation"):  # common/adapters/normalise.py: the update-norm scales c_i, as applied
        config["normalisation"] = wire.canonical_json(summary["normalisation"])
    if coord_key is not None:
        config["delivery"] = delivery_statement(coord_key, sha256, target or key, run_id, name, nonce)
    return request(key, node_id, wire.APPLY, config, arrays, nonce=nonce)


def parse_receipt(content: RecordDict, req: Request, sha256: str) -> tuple[dict[str, float], dict[str, Any]]:
    """(metrics, receipt) of a ``train.apply`` reply that answers ``req`` for the adapter ``sha256``."""
    metrics, receipt = wire.parse_apply_reply(content)
    if receipt["nonce"] != req.nonce or receipt["blob_sha256"] != sha256:
        raise WireError("receipt does not match the adapter sent", "receipt")
    return metrics, receipt


def run_compose(
    grid: Grid, s: Settings, registry: Any, sites: dict[str, SiteInfo], run_id: str, report: dict[str, Any]
) -> None:
    """Compose and deliver for every ``target``; ``report["compose"][target]`` says what happened."""
    if not s.targets:
        raise ValueError("mode=compose needs run config 'target' (one or more site ids, comma-separated)")
    problems: dict[str, str] = {}
    zs = embed_sites(grid, s, registry, sites, s.targets, run_id, problems)
    results: dict[str, dict[str, Any]] = {t: {"status": "failed", "reason": p} for t, p in problems.items()}
    requests = []
    # With blob encryption on, composed adapters (a weighted sum of stored ones; with k=1 a copy of
    # one) are delivered but not kept in clear at the coordinator; the audit log holds their hashes.
    out_root = None if registry.blob_encryption else registry.path / "compositions" / run_id
    for t, z in zs.items():
        try:
            summary = compose_one(
                s, registry, t, z, s.strategy, out_root / t if out_root else None, exclude_own=not s.include_own
            )
        except Exception as exc:  # noqa: BLE001 - one target's failure must not stop the others
            results[t] = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}", "error": type(exc).__name__}
            continue
        name = f"rpe-{s.strategy}-k{len(summary['ids'])}-run{run_id}"
        sha = summary["output_sha256"]
        requests.append(
            apply_request(
                s,
                t,
                sites[t].node_id,
                summary.pop("adapter"),
                sha,
                name,
                s.strategy,
                summary,
                s.evaluate,
                target=t,
                run_id=run_id,
                coord_key=load_or_create(registry.path),
            )
        )
        results[t] = {"status": "composed", "adapter_name": name, "strategy": s.strategy, "blob_sha256": sha, **summary}
    progress = Progress("apply", len(requests))
    replies = exchange(
        grid,
        requests,
        s.timeout_train,
        on_wait=progress.waiting,
        audit=registry.audit,
        run_id=run_id,
        on_reply=lambda req, rep: progress.result(req.key, "receipt" if rep.ok else rep.problem),
    )

    def audit_undelivered(req: Any, rep: Any, res: dict[str, Any]) -> None:
        t = req.key
        audit_reply(
            registry.audit,
            "composition.undelivered",
            req,
            rep,
            run_id,
            t,
            target=t,
            name=res["adapter_name"],
            output_sha256=res["blob_sha256"],
            reason=res["reason"][:1000],
        )

    for req in requests:
        t, rep, res = req.key, replies[req.key], results[req.key]
        if rep.failure is not None:
            res.update(failed("undelivered", rep.failure))
            audit_undelivered(req, rep, res)
            continue
        try:
            metrics, receipt = parse_receipt(rep.content, req, res["blob_sha256"])
        except WireError as exc:
            res.update(status="undelivered", reason=f"invalid apply reply: {exc}", kind="invalid")
            audit_undelivered(req, rep, res)
            continue
        res.update(status="delivered", metrics=metrics, evaluated=receipt["evaluated"])
        audit_reply(
            registry.audit,
            "composition.delivered",
            req,
            rep,
            run_id,
            t,
            target=t,
            name=res["adapter_name"],
            output_sha256=res["blob_sha256"],
            metrics=metrics,
        )
    report["compose"] = results
    for t, res in sorted(results.items()):
        extra = res.get("reason") or f"sources {res.get('sites')} weights {np.round(res.get('weights', []), 3)}"
        if (res.get("nearness") or {}).get("warning"):  # server/nearness.py: delivered, but say so
            extra += f"; WARNING {res['nearness']['warning']}: {res['nearness']['reason']}"
        norm = res.get("normalisation") or {}
        if norm.get("scales"):  # common/adapters/normalise.py: the composition is Σ w_i c_i δ_i
            extra += f"; update-norm {norm['mode']} scales {np.round(norm['scales'], 3)}"
        log(f"compose {t}: {res['status']} ({extra})")
