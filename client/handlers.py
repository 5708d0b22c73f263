"""The handlers, one per message type of the fixed vocabulary (``common/protocol/wire.py``), written
once for every task family: each asks the request's family (``common/families/``) what the data,
the model, the training, z and the score are, and never names one.

- ``query.whoami``: site id, tasks, example counts (no data), and an identity statement signed
  with the site's key over the coordinator's challenge, the run and the node;
- ``train`` (enrol): fine-tune a LoRA on the local labeled data, compute z over the family's
  enrolment view of the data and reply with exactly the adapter, z and the metadata record;
- ``query.embed``: z over the local *unlabeled* view of the data (no labels are read for it);
- ``train.apply``: check the coordinator's delivery signature (pinned key), store the composed
  adapter as a NEW PEFT directory ``<site-dir>/adapters/<name>/`` (never over an existing one) and,
  if the site holds enough labeled evaluation data, reply with metrics only;
- ``train.evaluate``: every arm of one leave-one-site-out target (``client/arms.py``).

What z and metrics leave is the site's release policy (``client/policy.py``): z only over the whole
data set of at least ``z-min-examples``, from a ``z-layers`` layer; metrics over at least
``metrics-min-reports`` held-out items. The request cannot widen it. The Gaussian mechanism, its
cache and the privacy budget: ``client/release.py``.

Each handler takes a validated request and returns the reply content; ``client/app.py`` checks
the reply against the vocabulary and logs it before it leaves. The adapter leaves in one form:
``common.protocol.wire.encode_adapter`` makes its wire arrays and canonical bytes once and hashes them
once; the site keeps that same adapter.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import Context, RecordDict

from client.arms import evaluate_arms, numeric
from client.delivery import (
    OWN_PREFIX,
    DeliveryRefused,
    check_delivery,
    check_name,
    received_adapter,
    store_received,
)
from client.history import round_count
from client.policy import ReleaseRefused
from client.release import (
    ZRelease,
    allowed_layer,
    check_budget,
    guard_metrics,
    release_z,
    round_metric_counts,
    say,
)
from client.site import Site, SiteError, family_options, key_id, load_family_data, signing_key, site_family
from common.families import get_family
from common.families.base import DPSettings, Family, SiteDataset, TrainPlan
from common.protocol import wire

__all__ = [
    "HANDLERS",
    "OWN_PREFIX",
    "DeliveryRefused",
    "apply",
    "check_delivery",
    "embed",
    "enroll",
    "evaluate",
    "numeric",
    "score",
    "whoami",
]


# -- query.whoami --------------------------------------------------------------------------------
def whoami(req: wire.Request, site: Site, context: Context) -> RecordDict:
    """Counts only (from the site's first declared family) and the signed identity statement.
    Deliberately cheap (no torch import, no model): it runs at the start of every run."""
    counts = whoami_counts(site)
    info = {
        "schema": wire.WIRE_SCHEMA,
        "site": site.site,
        "tasks": json.dumps(list(site.tasks)),
        **counts,
        "nonce": req.config["nonce"],
        "signer": key_id(site),
        "identity": identity_statement(site, req.config.get("challenge", ""), str(context.run_id), context.node_id),
    }
    return wire.build_whoami_reply(info)


def whoami_counts(site: Site) -> dict[str, Any]:
    """The whoami counts of the site's first family it knows (zeros and ``data_ok`` false if none)."""
    from common.families import FAMILIES

    known = [t for t in site.tasks if t in FAMILIES]
    if not known:
        return {"groups": "[]", "n_examples": 0, "n_labeled": 0, "n_unlabeled": 0, "n_eval": 0, "data_ok": False}
    c = get_family(known[0]).counts(site.inputs())
    return {
        "groups": json.dumps(c.groups),
        "n_examples": c.n_examples,
        "n_labeled": c.n_labeled,
        "n_unlabeled": c.n_unlabeled,
        "n_eval": c.n_eval,
        "data_ok": c.ok,
    }


def identity_statement(site: Site, challenge: str, run_id: str, node_id: Any) -> str:
    """The signed answer to the coordinator's challenge: "I am site S, answering run R, challenge C,
    as node N" (canonical JSON; "" when the site has no key or the request carries no challenge).

    Only the holder of the allow-listed key can produce it, so a node that merely *says* it is S is
    refused at discovery and never gets a message meant for S.

    With a SuperNode key in the node config (``supernode-key``), the body also names that key's
    fingerprint and the statement carries ``node_signature``: the same digest signed with the
    SuperNode key, which binds the site id to the key the SuperLink authenticates the node by
    (``common.trust.nodekey``)."""
    key = signing_key(site)
    if key is None or not challenge:
        return ""
    from common.trust.statements import sign_statement, statement_digest

    body = {
        "site": site.site,
        "run_id": run_id,
        "challenge": challenge,
        "node_id": str(node_id) if node_id is not None else "",
    }
    node_key = None
    if site.supernode_key is not None:
        from common.trust.nodekey import NodeKeyError, load_node_private_key, node_key_fingerprint

        try:
            node_key = load_node_private_key(site.supernode_key)
        except NodeKeyError as exc:
            raise SiteError(f"node config supernode-key: {exc}") from None
        body["supernode_key"] = node_key_fingerprint(node_key.public_key())
    statement = sign_statement(key, "identity", body)
    if node_key is not None:
        from common.trust.nodekey import node_sign

        statement["node_signature"] = node_sign(node_key, statement_digest("identity", body))
    return wire.canonical_json(statement)


# -- train (enrol) -------------------------------------------------------------------------------
def enroll(req: wire.Request, site: Site, context: Context) -> RecordDict:
    """Check, z (from the float32 weights), train, encode once, keep a copy, describe, sign, reply."""
    cfg = req.config
    family = site_family(site, cfg["task"])
    data = load_family_data(site, family)
    if not data.train:
        raise SiteError(f"site {site.site!r} has no labeled training examples in {site.data_path}")
    z_examples = family.z_examples(data, enrolment=True)
    # z only over the whole set the adapter comes from (a smaller ``max_examples`` is refused)
    site.release.embedding_examples(len(z_examples), int(cfg.get("max_examples", 0)))
    plan = family.train_plan({**cfg, "options": family_options(family, cfg)}, dp_settings(site, family))
    layer = allowed_layer(site, family, cfg.get("embed_layer", -1))
    refuse_over_budget(site, plan, len(data.train))
    base = family.load_base(site.inputs())
    # z first, from the float32 weights: it must not depend on the site's compute dtype. The
    # enrolment z is cached like the query z: a second enrolment re-sends the same noisy z
    rel = release_z(site, family, z_examples, layer, lambda: base, adapter_sent=True, check=False)
    dtype = family.to_compute(base, site.compute_dtype)
    trained = family.train(base, site.inputs(), data, plan)
    encoded = wire.encode_adapter(trained.adapter, base_model=base.fingerprint)  # sent, hashed, stored, kept
    keep_own_copy(site, family.name, encoded)
    stats = finite({**trained.stats, "compute_dtype": dtype})
    meta = enroll_meta(site, family, data, rel, encoded, release_privacy(trained.dp, rel), stats, cfg["nonce"])
    sign(meta, site, rel.z, str(context.run_id))
    return wire.build_enroll_reply(encoded.arrays, rel.z, meta, check=False)  # the gate checks it once


def dp_settings(site: Site, family: Family) -> DPSettings | None:
    """DP-SGD when the site's policy asks for it; a family without DP-SGD then refuses to train
    rather than release a non-private adapter."""
    if not site.policy.get("dp-noise-multiplier", 0.0) > 0:
        return None
    if not family.supports_dp:
        raise SiteError(
            f"DP-SGD is not implemented for the {family.name} family; this site's policy asks for it, "
            "so it does not train (remove dp-noise-multiplier or use a family that has it)"
        )
    return DPSettings(
        noise_multiplier=site.policy["dp-noise-multiplier"],
        max_grad_norm=site.policy.get("dp-max-grad-norm", 1.0),
        delta=site.policy.get("dp-delta", 1e-5),
    )


def refuse_over_budget(site: Site, plan: TrainPlan, n_train: int) -> None:
    """The ε of this release is known before training: a budget refuses it early, not after an hour."""
    from common.privacy import ZMechanism, dp_sgd_stats, release_record

    dp = plan.dp
    planned = (
        None
        if dp is None
        else dp_sgd_stats(
            dp.noise_multiplier, dp.max_grad_norm, dp.delta, min(1.0, plan.batch_size / n_train), plan.steps
        )
    )
    check_budget(site, release_record(planned, ZMechanism.from_policy(site.policy), adapter_sent=True), True)


def keep_own_copy(site: Site, task_name: str, encoded: wire.WireAdapter) -> None:
    """The site keeps the adapter it sends, as a PEFT directory (``adapters/own-<task>``)."""
    from common.adapters import save_peft_adapter

    save_peft_adapter(encoded.adapter, site.adapters_dir / f"{OWN_PREFIX}{task_name}", str(site.model_path))


def release_privacy(dp_stats: dict[str, Any] | None, rel: ZRelease) -> dict[str, Any]:
    from common.privacy import release_record

    return release_record(dp_stats, rel.mech, adapter_sent=True, z_repeat=rel.repeat)


def finite(stats: dict[str, Any]) -> dict[str, Any]:
    """Training statistics with a non-finite float (a diverged loss) sent as null."""
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in stats.items()}


def enroll_meta(
    site: Site,
    family: Family,
    data: SiteDataset,
    rel: ZRelease,
    encoded: wire.WireAdapter,
    privacy: dict[str, Any],
    stats: dict[str, Any],
    nonce: str,
) -> dict[str, Any]:
    """The enrolment ``meta`` record (exactly ``wire.ENROLL_META_KEYS``); unsigned."""
    described = family.describe(data)
    return {
        "schema": wire.WIRE_SCHEMA,
        "site": site.site,
        "task": family.name,
        "modality": described["modality"],
        "group": described["group"],
        "base_fingerprint": rel.info["base_fingerprint"],
        # rounded down to a multiple of z-min-examples, as every count that leaves (client/history.py)
        "sample_count": round_count(len(data.train), site.release.min_examples),
        "token_count": int(rel.info["token_count"]),
        "lora_config": wire.canonical_json(encoded.lora_config),
        "blob_sha256": encoded.sha256,
        "embedding_spec": wire.canonical_json(rel.info["embedding_spec"]),
        "privacy": wire.canonical_json(privacy),
        "train_stats": wire.canonical_json(stats),
        "nonce": nonce,
        "created_at": time.time(),
        "signer": "",
        "signature": "",
    }


def sign(meta: dict[str, Any], site: Site, z: np.ndarray, run_id: str) -> None:
    """Fill ``signer`` / ``signature`` when the site has a signing key: the signature covers the blob
    hash, z, every other metadata field, the run id and the coordinator's nonce."""
    key = signing_key(site)
    if key is None:
        return
    from common.trust import signing

    signed = {k: v for k, v in meta.items() if k not in ("signer", "signature")}
    meta["signer"] = signing.key_fingerprint(key.public_key())
    meta["signature"] = signing.sign_submission(key, meta["blob_sha256"], z, signed, run_id, meta["nonce"])


# -- query.embed ---------------------------------------------------------------------------------
def embed(req: wire.Request, site: Site, context: Context) -> RecordDict:
    """z over the unlabeled view of the site's whole data set (whatever labels it may hold), only
    from an allowed layer (``client/policy.py``)."""
    from common.privacy import release_record

    cfg = req.config
    family = site_family(site, cfg.get("task"))
    family_options(family, cfg)  # none shapes z today; an unknown one is still refused
    examples = family.z_examples(load_family_data(site, family), enrolment=False)
    site.release.embedding_examples(len(examples), int(cfg.get("max_examples", 0)))
    layer = allowed_layer(site, family, cfg.get("embed_layer", -1))
    rel = release_z(site, family, examples, layer, lambda: family.load_base(site.inputs()))
    meta = {
        "schema": wire.WIRE_SCHEMA,
        "site": site.site,
        "task": family.name,
        "base_fingerprint": rel.info["base_fingerprint"],
        "sample_count": rel.info["sample_count"],
        "token_count": rel.info["token_count"],
        "embedding_spec": wire.canonical_json(rel.info["embedding_spec"]),
        "privacy": wire.canonical_json(release_record(None, rel.mech, adapter_sent=False, z_repeat=rel.repeat)),
        "nonce": cfg["nonce"],
    }
    return wire.build_embed_reply(rel.z, meta)


# -- train.apply ---------------------------------------------------------------------------------
def apply(req: wire.Request, site: Site, context: Context) -> RecordDict:
    """Check the name and the signature, rebuild the adapter for this site's base, keep it (unless
    ``store`` is off), score it, send a receipt."""
    cfg = req.config
    check_name(cfg["name"])
    check_delivery(site, cfg, str(context.run_id))
    family = site_family(site, cfg.get("task"))
    family_options(family, cfg)
    adapter, sha = received_adapter(req, family.base_fingerprint(site.inputs()))
    if cfg.get("store", True):
        store_received(site, cfg, adapter, family.peft_base(site.inputs()))
    metrics, evaluated = score(site, cfg, adapter)
    receipt = {
        "schema": wire.WIRE_SCHEMA,
        "site": site.site,
        "name": cfg["name"],
        "blob_sha256": sha,
        "evaluated": evaluated,
        "nonce": cfg["nonce"],
    }
    return wire.build_apply_reply(metrics, receipt)


def score(site: Site, cfg: dict[str, Any], adapter: Any) -> tuple[dict[str, float], bool]:
    """Held-out metrics (and the base model's with ``with_base``), or none.

    Held-out scores are data-derived and not noised: a site with a privacy budget never sends them,
    and none leave over fewer held-out items than its ``metrics-min-reports``."""
    family = site_family(site, cfg.get("task"))
    if not cfg.get("evaluate", True) or site.policy.get("privacy-budget"):
        return {}, False
    held = load_family_data(site, family).eval
    held = held[: cfg["max_eval"]] if cfg.get("max_eval") else held
    if not held:
        return {}, False
    try:
        site.release.metrics(len(held))
    except ReleaseRefused as exc:  # the adapter is still installed; only the scores stay here
        say(site, f"metrics withheld: {exc.reason}")
        return {}, False
    if not guard_metrics(site, family, held):  # differencing over time (client/history.py)
        return {}, False
    base = family.load_base(site.inputs())
    family.to_compute(base, site.compute_dtype)
    metrics = numeric(family.score(base, site.inputs(), held, [adapter])[0])
    if cfg.get("with_base"):
        plain = family.score(base, site.inputs(), held, [None])[0]
        metrics.update({f"base_{k}": v for k, v in numeric(plain).items()})
    metrics = round_metric_counts(metrics, site.release.min_metric_reports)
    return metrics, bool(metrics)


# -- train.evaluate ------------------------------------------------------------------------------
def evaluate(req: wire.Request, site: Site, context: Context) -> RecordDict:
    """``train.evaluate``: every arm of one leave-one-site-out target, scored with one model load."""
    return evaluate_arms(req, site, context)


HANDLERS: dict[str, Callable[[wire.Request, Site, Context], RecordDict]] = {
    wire.WHOAMI: whoami,
    wire.ENROLL: enroll,
    wire.EMBED: embed,
    wire.APPLY: apply,
    wire.EVALUATE: evaluate,
}
