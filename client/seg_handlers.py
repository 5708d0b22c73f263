"""The segmentation family's side of the four handlers (``client/handlers.py`` dispatches here).

Same vocabulary, same records, same gate (``client/app.py``), same identity statement, delivery
signature check and release policy (``client/handlers.py``, ``client/policy.py``; for this family
one image is one example and one held-out slice one report): a segmentation site answers
``query.whoami`` with image counts, ``train`` with a SAM LoRA (PEFT, mask decoder by default) +
z (the frozen encoder's spatial mean, ``common.families.segmentation.task.REPRESENTATION``) + the metadata
record, ``query.embed`` with z, and ``train.apply`` with DICE on its held-out slices.

What a site holds comes from its node config: ``task = "segmentation"``, ``seg-dataset``
(``prostate-multisite`` or ``fundus-multidomain[:disc|:cup]``), ``seg-site`` (e.g. ``RUNMC``),
``model-path`` (``litemedsam`` or a SAM-style checkpoint directory), optional ``seg-copies``
(augmented copies of each training slice; 1 by default) and ``data-path`` (the data root that
holds the dataset directory; else the shared data root). DP-SGD is not implemented for this
family: a site whose policy asks for it refuses to train rather than release a non-private adapter.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
from flwr.app import Context, RecordDict

from client.release import check_budget, say
from client.site import Site, SiteError, split_list
from common.protocol import wire

TASK = "segmentation"
SEG_TARGETS = ("decoder", "last-stage", "neck")


def is_segmentation(site: Site, task: str | None = None) -> bool:
    """Whether this request (``task``; None: any request) is for the site's segmentation family."""
    if TASK not in site.tasks:
        return False
    return task is None or task == TASK


def _conf(site: Site, key: str, default: str = "") -> str:
    return str(site.seg.get(key, default) or default)


def seg_site(site: Site) -> Any:
    """The site's slices (``common.families.segmentation.data.SegSite``) from the node config's dataset and site name."""
    from common.families.segmentation.data import PROSTATE, load_fundus_site, load_prostate_site

    dataset, name = _conf(site, "seg-dataset", PROSTATE), _conf(site, "seg-site")
    if not name:
        raise SiteError(f"site {site.site!r}: node config has task=segmentation but no 'seg-site'")
    base, _, structure = dataset.partition(":")
    root = site.data_path if (site.data_path / base).is_dir() else None
    try:
        if base == PROSTATE:
            return load_prostate_site(name, root)
        return load_fundus_site(name, structure or "disc", root)
    except KeyError as exc:
        raise SiteError(f"site {site.site!r}: {exc.args[0]}") from None


def _model(site: Site) -> tuple[Any, str]:
    from common.families.segmentation import sam

    model = sam.load_sam(site.model_path)
    return model, sam.model_fingerprint(model)


def _task(site: Site, cfg: dict[str, Any]) -> Any:
    """The ``SegmentationTask`` a request asks for; LoRA targets outside the family's names (e.g. the
    report default ``q_proj,v_proj``) mean the family's default, the mask decoder."""
    from common.families.segmentation.task import SegLoraSpec, SegmentationTask

    targets = tuple(t for t in split_list(cfg.get("lora_targets", "")) if t in SEG_TARGETS) or ("decoder",)
    spec = SegLoraSpec(
        rank=int(cfg.get("lora_r", 4)),
        alpha=float(cfg.get("lora_alpha", 8.0)),
        targets=targets,
        batch_size=int(cfg.get("batch_size", 2)),
    )
    return SegmentationTask(
        spec=spec, augment_copies=int(_conf(site, "seg-copies", "1")), cache=site.site_dir / "seg-embeddings"
    )


def _z(
    site: Site, task: Any, model_fp: Any, images: list[np.ndarray], adapter_sent: bool, check: bool = True
) -> tuple[np.ndarray, dict[str, Any], Any, bool]:
    """(z as it leaves the site, its info, ZMechanism or None, whether it is a repeat): the site's
    Gaussian mechanism applies with one image as one privacy unit, as one report is for the report
    family; a noisy z already released for exactly these images and mechanism is re-sent as it was
    (repeated queries cannot average its noise away), and a fresh one is kept only once its reply's
    egress line is on disk (``site.after_logged``), as for reports (``client/release.py``)."""
    import hashlib

    from client.release import cached_z, store_z, z_cache_path
    from common.privacy import ZMechanism, release_record

    mech = ZMechanism.from_policy(site.policy)
    digests = [hashlib.sha256(np.ascontiguousarray(im).tobytes()).hexdigest() for im in images]
    cache = z_cache_path(site, [TASK, *digests], -1, mech) if mech is not None else None
    cached = cached_z(site, cache) if cache is not None else None
    if cached is not None:
        say(site, "z: re-sending the noisy z already released for these images (no new privacy cost)")
        return cached[0], cached[1], mech, True
    if check:
        check_budget(site, release_record(None, mech, adapter_sent=adapter_sent), adapter_sent)
    model, fp = model_fp()
    emb = task.site_embedding(model, images, mech.clip if mech else None, site.site)
    info = {
        "base_fingerprint": fp,
        "sample_count": len(images),
        "token_count": int(emb.n_tokens),
        "embedding_spec": emb.spec(),
    }
    if mech is None:
        return emb.z, info, None, False
    say(site, f"z: Gaussian mechanism, clip {mech.clip:g} ({emb.n_clipped}/{emb.n_examples} images clipped)")
    z = mech.apply(emb.z, emb.n_tokens)
    if cache is not None:
        site.after_logged.append(lambda: store_z(cache, z, info))
    return z, info, mech, False


def counts(site: Site) -> dict[str, Any]:
    """The whoami counts of a segmentation site: its slices (no model, no pixels leave)."""
    try:
        s, ok = seg_site(site), True
        n_train, n_test = len(s.train_images), len(s.test_images)
        groups = [f"{s.dataset}-{s.name}"]
    except (OSError, SiteError, ValueError):
        n_train = n_test = 0
        ok, groups = False, []
    return {
        "groups": json.dumps(groups),
        "n_examples": n_train + n_test,
        "n_labeled": n_train,
        "n_unlabeled": 0,
        "n_eval": n_test,
        "data_ok": ok,
    }


# -- train (enrol) -------------------------------------------------------------------------------
def enroll(req: wire.Request, site: Site, context: Context) -> RecordDict:
    """Train the SAM LoRA on the training slices (+ augmented copies), z over all images, sign, reply."""
    from client.handlers import keep_own_copy, sign
    from common.privacy import ZMechanism, release_record

    cfg = req.config
    if site.policy.get("dp-noise-multiplier", 0.0) > 0:
        raise SiteError(
            "DP-SGD is not implemented for the segmentation family; this site's policy asks for it, "
            "so it does not train (remove dp-noise-multiplier or use the report family)"
        )
    check_budget(site, release_record(None, ZMechanism.from_policy(site.policy), adapter_sent=True), True)
    data = seg_site(site)
    task = _task(site, cfg)
    model, fp = _model(site)
    steps, lr, seed = int(cfg.get("steps", 30)), float(cfg.get("lr", 2e-3)), int(cfg.get("seed", 0))
    adapter, stats = task.train_adapter(model, data, steps=steps, lr=lr, seed=seed)
    encoded = wire.encode_adapter(adapter, base_model=fp)
    z, info, mech, _ = _z(site, task, lambda: (model, fp), data.all_images, adapter_sent=True, check=False)
    keep_own_copy(site, task.name, encoded)
    train_stats = {
        "steps": steps,
        "lr": lr,
        "batch_size": task.spec.batch_size,
        "max_length": 0,
        "seed": seed,
        "loss_first": stats.get("loss_first"),
        "loss_last": stats.get("loss_last"),
        "seconds": round(float(stats.get("seconds", 0.0)), 3),
        "n_train": int(stats["n_train"]),
    }
    train_stats = {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in train_stats.items()}
    meta = {
        "schema": wire.WIRE_SCHEMA,
        "site": site.site,
        "task": task.name,
        "modality": "mr" if "prostate" in data.dataset else "fundus",
        "group": f"{data.dataset}-{data.name}",
        "base_fingerprint": fp,
        "sample_count": len(data.train_images),
        "token_count": int(info["token_count"]),
        "lora_config": wire.canonical_json(encoded.lora_config),
        "blob_sha256": encoded.sha256,
        "embedding_spec": wire.canonical_json(info["embedding_spec"]),
        "privacy": wire.canonical_json(release_record(None, mech, adapter_sent=True)),
        "train_stats": wire.canonical_json(train_stats),
        "nonce": cfg["nonce"],
        "created_at": time.time(),
        "signer": "",
        "signature": "",
    }
    sign(meta, site, z, str(context.run_id))
    say(site, f"segmentation LoRA: {steps} steps on {stats['n_train']} slices in {stats['seconds']:.1f} s")
    return wire.build_enroll_reply(encoded.arrays, z, meta, check=False)


# -- query.embed ---------------------------------------------------------------------------------
def embed(req: wire.Request, site: Site, context: Context) -> RecordDict:
    """z over all of the site's images (no masks are read for it), under the site's release policy:
    never over a subset, never over fewer than ``z-min-examples`` images, only the encoder's output."""
    from client.policy import ReleaseRefused
    from common.privacy import release_record

    cfg = req.config
    if int(cfg.get("embed_layer", -1)) != -1:
        raise ReleaseRefused(
            "layer-not-allowed",
            "a segmentation site's z is its frozen encoder's output (embed_layer -1); it releases no other layer",
        )
    data = seg_site(site)
    site.release.embedding_examples(len(data.all_images), int(cfg.get("max_examples", 0)))
    task = _task(site, cfg)
    z, info, mech, repeat = _z(site, task, lambda: _model(site), data.all_images, adapter_sent=False)
    meta = {
        "schema": wire.WIRE_SCHEMA,
        "site": site.site,
        "task": task.name,
        "base_fingerprint": info["base_fingerprint"],
        "sample_count": info["sample_count"],
        "token_count": info["token_count"],
        "embedding_spec": wire.canonical_json(info["embedding_spec"]),
        "privacy": wire.canonical_json(release_record(None, mech, adapter_sent=False, z_repeat=repeat)),
        "nonce": cfg["nonce"],
    }
    return wire.build_embed_reply(z, meta)


# -- train.apply ---------------------------------------------------------------------------------
def apply(req: wire.Request, site: Site, context: Context) -> RecordDict:
    """Check the adapter against this site's SAM, keep it (unless ``store`` is off), score DICE on the
    held-out slices. Name and coordinator signature were checked by ``client/handlers.apply``."""
    from client.handlers import received_adapter, store_received

    cfg = req.config
    model, fp = _model(site)
    adapter, sha = received_adapter(req, site, fp)
    if cfg.get("store", True):
        store_received(site, cfg, adapter, base_path=str(site.model_path))
    metrics: dict[str, float] = {}
    evaluated = bool(cfg.get("evaluate", True)) and not site.policy.get("privacy-budget")
    if evaluated:
        metrics = score(site, cfg, model, adapter)
        evaluated = bool(metrics)
    receipt = {
        "schema": wire.WIRE_SCHEMA,
        "site": site.site,
        "name": cfg["name"],
        "blob_sha256": sha,
        "evaluated": evaluated,
        "nonce": cfg["nonce"],
    }
    return wire.build_apply_reply(metrics, receipt)


def score(site: Site, cfg: dict[str, Any], model: Any, adapter: Any) -> dict[str, float]:
    """Mean DICE over the held-out slices (and the pretrained model's with ``with_base``); numbers
    only, and none when the site holds fewer slices than its ``metrics-min-reports``."""
    from client.policy import ReleaseRefused
    from common.families.segmentation.task import evaluate

    data = seg_site(site)
    n = int(cfg.get("max_eval") or 0) or len(data.test_images)
    images, masks = data.test_images[:n], data.test_masks[:n]
    try:
        site.release.metrics(len(images))
    except ReleaseRefused as exc:  # the adapter is still installed; only the scores stay here
        say(site, f"metrics withheld: {exc.reason}")
        return {}
    task = _task(site, cfg)
    res = evaluate(model, adapter, images, masks, task.spec.prompt, data.name, task.cache)
    metrics = {"dice": float(res["dice"]), "n": float(res["n"])}
    if cfg.get("with_base"):
        base = evaluate(model, None, images, masks, task.spec.prompt, data.name, task.cache)
        metrics.update(base_dice=float(base["dice"]), base_n=float(base["n"]))
    return metrics
