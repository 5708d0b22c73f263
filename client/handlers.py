"""The four handlers, one per message type of the fixed vocabulary (``common/protocol/wire.py``):

- ``query.whoami``: site id, tasks, example counts (no data), and an identity statement signed
  with the site's key over the coordinator's challenge, the run and the node;
- ``train`` (enrol): fine-tune a LoRA on the local labeled data, compute z over the same data and
  reply with exactly the adapter, z and the metadata record;
- ``query.embed``: z over the local *unlabeled* view of the data (findings only);
- ``train.apply``: check the coordinator's delivery signature (pinned key), store the composed
  adapter as a NEW PEFT directory ``<site-dir>/adapters/<name>/`` (never over an existing one) and,
  if the site holds enough labeled evaluation data, reply with metrics only.

What z and metrics leave is the site's release policy (``client/policy.py``): z only over the whole
data set of at least ``z-min-examples``, from a ``z-layers`` layer; metrics over at least
``metrics-min-reports``. The request cannot widen it.

Each handler takes a validated request and returns the reply content; ``client/app.py`` checks
the reply against the vocabulary and logs it before it leaves. The adapter leaves in one form:
``common.protocol.wire.encode_adapter`` makes its wire arrays and canonical bytes once and hashes them
once; the site keeps that same adapter.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Context, RecordDict

from client import seg_handlers as seg
from client.policy import ReleaseRefused
from client.release import ZRelease, allowed_layer, check_budget, release_z, say
from client.site import (
    Site,
    SiteData,
    SiteError,
    key_id,
    load_model,
    load_site_data,
    signing_key,
    site_task,
    split_list,
    to_compute_dtype,
)
from common.families.report.data import DatasetFormatError, Example
from common.protocol import wire
from common.protocol.wire import WireError

OWN_PREFIX = "own-"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


# -- query.whoami --------------------------------------------------------------------------------
def whoami(req: wire.Request, site: Site, context: Context) -> RecordDict:
    """Counts only (a segmentation-only site counts its slices) and the signed identity statement.
    Deliberately cheap (no torch import, no model): it runs at the start of every run."""
    counts = seg.counts(site) if seg.is_segmentation(site) and "report-text" not in site.tasks else report_counts(site)
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


def report_counts(site: Site) -> dict[str, Any]:
    """The whoami counts of a report site: groups, examples, labelled, unlabelled, held-out."""
    try:
        data, ok = load_site_data(site.data_path), True
    except (OSError, DatasetFormatError, SiteError):
        data, ok = SiteData([], [], []), False
    return {
        "groups": json.dumps(data.groups[:8]),
        "n_examples": len(data.all),
        "n_labeled": len(data.train),
        "n_unlabeled": len(data.unlabeled),
        "n_eval": len(data.eval),
        "data_ok": ok,
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
@dataclass(frozen=True)
class TrainPlan:
    """What the request and the site's policy ask of training (``common.families.report.training``)."""

    spec: Any  # LoraSpec
    dp: Any  # DPConfig | None
    steps: int
    lr: float
    batch_size: int
    max_length: int
    seed: int
    embed_layer: int


def enroll(req: wire.Request, site: Site, context: Context) -> RecordDict:
    """Train, embed, encode once, keep a copy, describe, sign, reply."""
    cfg = req.config
    if seg.is_segmentation(site, cfg["task"]):
        return seg.enroll(req, site, context)
    task = site_task(site, cfg["task"])
    train = training_examples(site, cfg)
    plan = train_plan(cfg, site)
    refuse_over_budget(site, plan, len(train))
    model, tok, fp = load_model(site)
    # z first, from the float32 weights: it must not depend on the site's compute dtype. The
    # enrolment z is cached like the query z: a second enrolment re-sends the same noisy z
    rel = release_z(
        site, task.embedding_texts(train), plan.embed_layer, lambda: (model, tok, fp), adapter_sent=True, check=False
    )
    z = rel.z
    dtype = to_compute_dtype(site, model)
    adapter, stats = train_adapter(model, tok, train, task, plan, fp)
    encoded = wire.encode_adapter(adapter, base_model=fp)  # the one form: sent, hashed, stored, kept
    keep_own_copy(site, task.name, encoded)
    meta = enroll_meta(
        site,
        task.name,
        train,
        fp,
        rel.info,
        encoded,
        release_privacy(plan, stats, rel),
        train_stats(plan, stats, len(train), dtype),
        cfg["nonce"],
    )
    sign(meta, site, z, str(context.run_id))
    return wire.build_enroll_reply(encoded.arrays, z, meta, check=False)  # the gate checks it once


def training_examples(site: Site, cfg: dict[str, Any]) -> list[Example]:
    """The labeled examples to train on: always all of them (the z sent with the adapter is pooled
    over the same set, and the site releases z only over its whole set of at least
    ``z-min-examples``: ``client/policy.py``); a smaller ``max_examples`` is refused."""
    data = load_site_data(site.data_path)
    if not data.train:
        raise SiteError(f"site {site.site!r} has no labeled training examples in {site.data_path}")
    site.release.embedding_examples(len(data.train), int(cfg.get("max_examples", 0)))
    return data.train


def train_plan(cfg: dict[str, Any], site: Site) -> TrainPlan:
    """The LoRA spec and hyper-parameters of the request; DP-SGD when the site's policy asks for it."""
    from common.families.report.training import DPConfig, LoraSpec

    spec = LoraSpec(
        r=int(cfg.get("lora_r", 8)),
        alpha=float(cfg.get("lora_alpha", 16.0)),
        target_modules=tuple(split_list(cfg.get("lora_targets", "q_proj,v_proj"))),
        dropout=float(cfg.get("lora_dropout", 0.0)),
    )
    dp = None
    if site.policy.get("dp-noise-multiplier", 0.0) > 0:
        dp = DPConfig(
            noise_multiplier=site.policy["dp-noise-multiplier"],
            max_grad_norm=site.policy.get("dp-max-grad-norm", 1.0),
            delta=site.policy.get("dp-delta", 1e-5),
        )
    return TrainPlan(
        spec,
        dp,
        int(cfg.get("steps", 40)),
        float(cfg.get("lr", 1e-3)),
        int(cfg.get("batch_size", 4)),
        int(cfg.get("max_length", 192)),
        int(cfg.get("seed", 0)),
        allowed_layer(site, cfg.get("embed_layer", -1)),
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


def train_adapter(
    model: Any, tok: Any, train: list[Example], task: Any, plan: TrainPlan, fp: str
) -> tuple[Any, dict[str, Any]]:
    """(LoraAdapter, training statistics) of ``common.families.report.training.train_lora``."""
    from common.families.report.training import train_lora

    return train_lora(
        model,
        tok,
        train,
        task,
        plan.spec,
        steps=plan.steps,
        lr=plan.lr,
        batch_size=plan.batch_size,
        max_length=plan.max_length,
        seed=plan.seed,
        progress=True,
        dp=plan.dp,
        base_model=fp,
    )


def keep_own_copy(site: Site, task_name: str, encoded: wire.WireAdapter) -> None:
    """The site keeps the adapter it sends, as a PEFT directory (``adapters/own-<task>``)."""
    from common.adapters import save_peft_adapter

    save_peft_adapter(encoded.adapter, site.adapters_dir / f"own-{task_name}", str(site.model_path))


def release_privacy(plan: TrainPlan, stats: dict[str, Any], rel: ZRelease) -> dict[str, Any]:
    from common.privacy import release_record

    return release_record(stats if plan.dp is not None else None, rel.mech, adapter_sent=True, z_repeat=rel.repeat)


def train_stats(plan: TrainPlan, stats: dict[str, Any], n_train: int, compute_dtype: str = "float32") -> dict[str, Any]:
    out = {
        "steps": stats.get("steps", plan.steps),
        "lr": plan.lr,
        "batch_size": plan.batch_size,
        "max_length": plan.max_length,
        "seed": plan.seed,
        "loss_first": stats.get("first_loss"),
        "loss_last": stats.get("final_loss"),
        "seconds": round(float(stats.get("seconds", 0.0)), 3),
        "n_train": n_train,
        "compute_dtype": compute_dtype,
    }
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in out.items()}


def enroll_meta(
    site: Site,
    task_name: str,
    train: list[Example],
    fp: str,
    emb: dict[str, Any],
    encoded: wire.WireAdapter,
    privacy: dict[str, Any],
    stats: dict[str, Any],
    nonce: str,
) -> dict[str, Any]:
    """The enrolment ``meta`` record (exactly ``wire.ENROLL_META_KEYS``); unsigned."""
    group = Counter(e.group for e in train).most_common(1)[0][0]
    return {
        "schema": wire.WIRE_SCHEMA,
        "site": site.site,
        "task": task_name,
        "modality": group.split("-", 1)[0],
        "group": group,
        "base_fingerprint": fp,
        "sample_count": len(train),
        "token_count": int(emb["token_count"]),
        "lora_config": wire.canonical_json(encoded.lora_config),
        "blob_sha256": encoded.sha256,
        "embedding_spec": wire.canonical_json(emb["embedding_spec"]),
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
    """z over the unlabeled view (findings only, whatever labels the site may hold), always over the
    site's whole data set and only from an allowed layer (``client/policy.py``)."""
    from common.privacy import release_record

    cfg = req.config
    if seg.is_segmentation(site, cfg.get("task")):
        return seg.embed(req, site, context)
    task = site_task(site, cfg.get("task", "report-text"))
    data = load_site_data(site.data_path)
    site.release.embedding_examples(len(data.all), int(cfg.get("max_examples", 0)))
    layer = allowed_layer(site, cfg.get("embed_layer", -1))
    texts = task.embedding_texts([Example(e.prompt, None, e.group, e.uid) for e in data.all])
    rel = release_z(site, texts, layer, lambda: load_model(site))
    privacy = release_record(None, rel.mech, adapter_sent=False, z_repeat=rel.repeat)
    info = rel.info
    meta = {
        "schema": wire.WIRE_SCHEMA,
        "site": site.site,
        "task": task.name,
        "base_fingerprint": info["base_fingerprint"],
        "sample_count": info["sample_count"],
        "token_count": info["token_count"],
        "embedding_spec": wire.canonical_json(info["embedding_spec"]),
        "privacy": wire.canonical_json(privacy),
        "nonce": cfg["nonce"],
    }
    return wire.build_embed_reply(rel.z, meta)


# -- train.apply ---------------------------------------------------------------------------------
def apply(req: wire.Request, site: Site, context: Context) -> RecordDict:
    """Check and rebuild the adapter, keep it (unless ``store`` is off), score it, send a receipt."""
    cfg = req.config
    if not _NAME_RE.match(cfg["name"]) or cfg["name"].startswith(OWN_PREFIX):
        raise WireError(
            f"adapter name must be a plain file name not starting with {OWN_PREFIX!r} (the site's own adapters)",
            "config",
            "name",
        )
    check_delivery(site, cfg, str(context.run_id))
    if seg.is_segmentation(site, cfg.get("task")):
        return seg.apply(req, site, context)
    adapter, sha = received_adapter(req, site)
    if cfg.get("store", True):
        store_received(site, cfg, adapter)
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


class DeliveryRefused(ReleaseRefused):
    """A ``train.apply`` this site will not install: unsigned, signed by another key, or for
    another site, run, adapter or request; or its name is taken."""


def check_delivery(site: Site, cfg: dict[str, Any], run_id: str) -> None:
    """The coordinator's ``delivery`` statement must verify against the key this site pinned
    (node config ``coordinator-key``) and name exactly this adapter, this site, run and request."""
    from common.trust.signing import SigningError, load_public_key
    from common.trust.statements import StatementError, verify_statement

    if site.coordinator_key is None:
        raise DeliveryRefused(
            "no-coordinator-key",
            "this site has no coordinator key pinned (node config "
            "'coordinator-key' = the coordinator's coordinator.pub); it installs only "
            "deliveries signed by its coordinator",
        )
    if not cfg.get("delivery"):
        raise DeliveryRefused("unsigned-delivery", "the delivery carries no coordinator signature; refused")
    try:
        pub = load_public_key(site.coordinator_key)
    except (OSError, SigningError) as exc:
        raise SiteError(f"the pinned coordinator key {site.coordinator_key} is unusable: {exc}") from None
    expect = {
        "blob_sha256": cfg["blob_sha256"],
        "target": site.site,
        "run_id": run_id,
        "name": cfg["name"],
        "nonce": cfg["nonce"],
    }
    try:
        verify_statement(pub, json.loads(cfg["delivery"]), "delivery", expect=expect)
    except (ValueError, StatementError) as exc:
        raise DeliveryRefused("bad-delivery", f"the delivery statement does not hold: {exc}") from None


def received_adapter(req: wire.Request, site: Site, fp: str | None = None) -> tuple[Any, str]:
    """The adapter as sent (for this site's base, fingerprint ``fp``; default: its language model),
    and its hash checked against the request's."""
    cfg = req.config
    if fp is None:
        from common.models import fingerprint

        fp = fingerprint(site.model_path)
    if cfg["base_fingerprint"] != fp:
        raise SiteError(f"the composed adapter is for base model {cfg['base_fingerprint']}, this site runs {fp}")
    assert req.adapter is not None and req.lora_config is not None
    adapter = wire.adapter_from_wire(req.adapter, req.lora_config, base_model=fp)
    got = wire.adapter_sha256(adapter)
    if got != cfg["blob_sha256"]:
        raise WireError(f"adapter hashes to {got}, the request says {cfg['blob_sha256']}", "adapter")
    return adapter, got


def store_received(site: Site, cfg: dict[str, Any], adapter: Any, base_path: str | None = None) -> None:
    """``adapters/<name>/``, a NEW directory: a PEFT directory plus ``rpe-provenance.json`` (sources,
    weights, hash), written to a temporary directory and renamed into place. An existing name is
    refused (a delivery can never overwrite the site's own or an earlier adapter), except the same
    adapter again (a re-sent message). ``base_path``: what the PEFT config names as base (default:
    the site's language model directory)."""
    import os
    import shutil

    from common.adapters import save_peft_adapter

    final = site.adapters_dir / cfg["name"]
    if final.exists() or final.is_symlink():
        try:
            same = json.loads((final / "rpe-provenance.json").read_text()).get("blob_sha256") == cfg["blob_sha256"]
        except (OSError, ValueError, AttributeError):
            same = False
        if same:
            return
        raise DeliveryRefused(
            "name-taken", f"an adapter named {cfg['name']!r} already exists at this site; a delivery never replaces one"
        )
    tmp = site.adapters_dir / f".incoming-{cfg['name']}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    if base_path is None:
        from common.models import resolve_model_dir

        base_path = str(resolve_model_dir(site.model_path))
    out = save_peft_adapter(adapter, tmp, base_path)
    provenance = {k: cfg.get(k) for k in ("strategy", "sources", "weights", "blob_sha256", "task")}
    provenance["received_at"] = time.time()
    (out / "rpe-provenance.json").write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
    os.rename(out, final)


def score(site: Site, cfg: dict[str, Any], adapter: Any) -> tuple[dict[str, float], bool]:
    """Held-out metrics (and the base model's with ``with_base``), or none.

    Held-out scores are data-derived and not noised: a site with a privacy budget never sends them.
    """
    data = load_site_data(site.data_path)
    if not (cfg.get("evaluate", True) and data.eval and not site.policy.get("privacy-budget")):
        return {}, False
    from common.families.report.evaluation import evaluate_task

    task = site_task(site, cfg.get("task", "report-text"))
    held = data.eval[: cfg["max_eval"]] if cfg.get("max_eval") else data.eval
    try:
        site.release.metrics(len(held))
    except ReleaseRefused as exc:  # the adapter is still installed; only the scores stay here
        say(site, f"metrics withheld: {exc.reason}")
        return {}, False
    model, tok, _ = load_model(site)
    to_compute_dtype(site, model)
    metrics = numeric(evaluate_task(model, tok, task, held, adapter=adapter))
    if cfg.get("with_base"):
        base = evaluate_task(model, tok, task, held, adapter=None)
        metrics.update({f"base_{k}": v for k, v in numeric(base).items()})
    return metrics, True


def numeric(result: dict[str, Any]) -> dict[str, float]:
    """Only the scalar scores of an evaluation: predictions and references never leave the site."""
    return {
        k: float(v)
        for k, v in result.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) and wire.METRIC_NAME_RE.match(k)
    }


def evaluate(req: wire.Request, site: Site, context: Context) -> RecordDict:
    """``train.evaluate``: every arm of one leave-one-site-out target, scored with one model load."""
    from client.arms import evaluate_arms

    return evaluate_arms(req, site, context)


HANDLERS: dict[str, Callable[[wire.Request, Site, Context], RecordDict]] = {
    wire.WHOAMI: whoami,
    wire.ENROLL: enroll,
    wire.EMBED: embed,
    wire.APPLY: apply,
    wire.EVALUATE: evaluate,
}
