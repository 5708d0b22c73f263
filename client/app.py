"""The site's Flower ClientApp: the only code that touches a hospital's reports.

Four handlers, one per message type of the fixed vocabulary (``common/wire.py``):

- ``query.whoami``: site id, tasks, example counts (no data);
- ``train`` (enrol): fine-tune a LoRA on the local labeled data, compute z over the same data and
  reply with exactly the adapter tensors, z and the metadata record;
- ``query.embed``: z over the local *unlabeled* view of the data (findings only);
- ``train.apply``: store a composed adapter as a PEFT directory under ``<site-dir>/adapters/<name>/``
  and, if the site holds labeled evaluation data, reply with metrics only.

Every request is checked against the vocabulary first (``wire.parse_request``) and every reply
last (``wire.check_reply``): a request for anything else - an unknown message type, an extra
record, an unknown config key - is refused with an error reply and nothing else leaves the site.
Every reply, refusals included, appends one line to the site's egress log.

Configuration comes from the SuperNode's ``--node-config`` (deployment): ``site-id``,
``data-path`` (a JSONL file, or a directory with ``train.jsonl`` / ``eval.jsonl`` /
``unlabeled.jsonl``), ``model-path`` (base model directory or ``smollm2-135m-instruct``),
``site-dir`` (adapters, egress log, signing key); optional ``dp-noise-multiplier``,
``dp-max-grad-norm``, ``dp-delta`` (DP-SGD for the adapter), ``z-clip`` with ``z-noise-multiplier``
or ``z-epsilon``, ``z-delta`` (the Gaussian mechanism on z, ``common.privacy``), ``privacy-budget``
(the total ε the site will ever release; non-private releases and held-out metrics are then
refused) - the site's own privacy policy, off by default, reported with the ε spent in every
release's ``privacy`` metadata; a repeated embedding query gets the noisy z already released.
Also ``threads`` (torch CPU threads; on a shared or small machine 1 avoids oversubscription, which
made generation ~50x slower on a loaded 2-core host). In simulation
the node config holds only ``partition-id``: the run config's ``sim-sites``,
``sim-data-root``, ``sim-model-path`` and ``sim-site-root`` map it to a site.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from common import wire
from common.data import DatasetFormatError, Example, read_jsonl
from common.wire import WireError

TRAIN_FILE, EVAL_FILE, UNLABELED_FILE = "train.jsonl", "eval.jsonl", "unlabeled.jsonl"
EGRESS_FILE = "egress.jsonl"
DEFAULT_MODEL = "smollm2-135m-instruct"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class SiteError(RuntimeError):
    """The site cannot do what was asked (bad node config, missing data, mismatched base model)."""


# -- site configuration and data ----------------------------------------------------------------
@dataclass
class Site:
    """Where this site's things are (from the node config, or the run config in simulation)."""

    site: str
    data_path: Path
    model_path: str
    site_dir: Path
    policy: dict[str, float] = field(default_factory=dict)
    threads: int = 0

    @property
    def egress_path(self) -> Path:
        return self.site_dir / EGRESS_FILE

    @property
    def adapters_dir(self) -> Path:
        return self.site_dir / "adapters"


def _split_list(value: Any) -> list[str]:
    return [s.strip() for s in str(value or "").split(",") if s.strip()]


def site_from_context(context: Context) -> Site:
    """Resolve the site from ``node_config`` (deployment) or ``partition-id`` + run config (simulation)."""
    nc, rc = context.node_config, context.run_config
    if "site-id" in nc:
        site = str(nc["site-id"])
        data = nc.get("data-path")
        if not data:
            raise SiteError(f"site {site!r}: node config has no 'data-path' (a JSONL file or directory)")
        model = str(nc.get("model-path") or DEFAULT_MODEL)
        site_dir = Path(str(nc.get("site-dir") or Path.cwd() / f"rpe-site-{site}"))
        policy_src: Any = nc
    elif "partition-id" in nc:
        sites = _split_list(rc.get("sim-sites"))
        pid = int(nc["partition-id"])
        if pid >= len(sites):
            raise SiteError(f"simulation partition {pid} has no site: run config sim-sites lists {sites}")
        site = sites[pid]
        root = Path(str(rc.get("sim-data-root") or "."))
        data = root / f"{site}.jsonl" if (root / f"{site}.jsonl").exists() else root / site
        model = str(rc.get("sim-model-path") or DEFAULT_MODEL)
        site_dir = Path(str(rc.get("sim-site-root") or Path.cwd() / "rpe-sites")) / site
        policy_src = {}
    else:
        raise SiteError("node config has neither 'site-id' (deployment) nor 'partition-id' (simulation)")
    if not wire._SITE_RE.match(site):
        raise SiteError(f"site id {site!r} is not a plain identifier")
    policy = _privacy_policy(policy_src)
    threads = int(nc.get("threads", 0) or rc.get("sim-threads", 0) or 0)
    return Site(site, Path(str(data)).expanduser(), model, site_dir.expanduser().resolve(), policy, threads)


@dataclass
class SiteData:
    """The site's examples: labeled training data, labeled held-out data, unlabeled data."""

    train: list[Example]
    eval: list[Example]
    unlabeled: list[Example]

    @property
    def all(self) -> list[Example]:
        return [*self.train, *self.eval, *self.unlabeled]

    @property
    def groups(self) -> list[str]:
        return [g for g, _ in Counter(e.group for e in self.all).most_common()]


def load_site_data(path: Path) -> SiteData:
    """A JSONL file (labeled lines train, unlabeled lines are unlabeled) or a directory of them."""
    if path.is_dir():
        files = {name: path / name for name in (TRAIN_FILE, EVAL_FILE, UNLABELED_FILE)}
        if not any(f.exists() for f in files.values()):
            raise SiteError(f"{path}: expected {TRAIN_FILE}, {EVAL_FILE} and/or {UNLABELED_FILE}")
        rows = {name: read_jsonl(f) if f.exists() else [] for name, f in files.items()}
        train = [e for e in rows[TRAIN_FILE] if e.labeled]
        held = [e for e in rows[EVAL_FILE] if e.labeled]
        unlabeled = [e for rs in rows.values() for e in rs if not e.labeled]
        return SiteData(train, held, unlabeled)
    rows = read_jsonl(path)
    return SiteData([e for e in rows if e.labeled], [], [e for e in rows if not e.labeled])


def _task(name: str) -> Any:
    from common.tasks import TextReportTask

    tasks = {"report-text": TextReportTask}
    if name not in tasks:
        raise SiteError(f"unknown task {name!r}; this site can train {sorted(tasks)}")
    return tasks[name]()


def _modality(group: str) -> str:
    return group.split("-", 1)[0] if group else ""


def _load_model(site: Site) -> tuple[Any, Any, str]:
    from common.models import fingerprint, load_base_model

    model, tok = load_base_model(site.model_path)
    return model, tok, fingerprint(site.model_path)


def _privacy_policy(src: Any) -> dict[str, float]:
    """The site's privacy keys from its node config, checked (a bad policy stops the site early)."""
    from common.privacy import PrivacyConfigError, check_policy

    try:
        return check_policy(src)
    except PrivacyConfigError as exc:
        raise SiteError(str(exc)) from None


def _site_embedding(model: Any, tok: Any, texts: list[str], site: Site, layer: int) -> tuple[Any, np.ndarray, Any]:
    """z as it leaves the site: (EmbeddingResult, z, ZMechanism or None). With the site's Gaussian
    mechanism on, each report's token sum is clipped and noise from OS entropy is added."""
    from common.embedding import mean_embedding
    from common.privacy import ZMechanism

    mech = ZMechanism.from_policy(site.policy)
    emb = mean_embedding(model, tok, texts, layer=layer, clip_norm=mech.clip if mech else None)
    if mech is None:
        return emb, emb.z, None
    print(f"[{site.site}] z: Gaussian mechanism, clip {mech.clip:g} ({emb.n_clipped}/{emb.n_examples} "
          f"reports clipped), noise multiplier {mech.noise_multiplier:.3f}, epsilon {mech.epsilon:.3f} "
          f"at delta {mech.delta:g}", flush=True)
    return emb, mech.apply(emb.z, emb.n_tokens), mech


def _key_id(site: Site) -> str:
    key = _signing_key(site)
    if key is None:
        return ""
    from common.signing import key_fingerprint

    return key_fingerprint(key.public_key())


def _signing_key(site: Site) -> Any:
    """The site's Ed25519 key ``<site-dir>/keys/<site>.key`` (``common.signing``), or None."""
    path = site.site_dir / "keys" / f"{site.site}.key"
    if not path.exists():
        return None
    from common.signing import load_private_key

    return load_private_key(path)


# -- handlers -----------------------------------------------------------------------------------
def _whoami(req: wire.Request, site: Site, context: Context) -> RecordDict:
    """Counts only. Deliberately cheap (no torch import, no model): it runs at the start of every run."""
    try:
        data = load_site_data(site.data_path)
        ok = True
    except (OSError, DatasetFormatError, SiteError):
        data, ok = SiteData([], [], []), False
    info = {
        "schema": wire.WIRE_SCHEMA, "site": site.site, "tasks": json.dumps(["report-text"]),
        "groups": json.dumps(data.groups[:8]), "n_examples": len(data.all), "n_labeled": len(data.train),
        "n_unlabeled": len(data.unlabeled), "n_eval": len(data.eval), "data_ok": ok,
        "nonce": req.config["nonce"],
        "signer": _key_id(site),
    }
    return wire.build_whoami_reply(info)


def _enroll(req: wire.Request, site: Site, context: Context) -> RecordDict:
    from common.lora import adapter_to_bytes, save_peft_adapter
    from common.privacy import ZMechanism, dp_sgd_stats, release_record
    from common.training import DPConfig, LoraSpec, train_lora

    cfg = req.config
    task = _task(cfg["task"])
    data = load_site_data(site.data_path)
    train = data.train[: cfg["max_examples"]] if cfg.get("max_examples") else data.train
    if not train:
        raise SiteError(f"site {site.site!r} has no labeled training examples in {site.data_path}")
    model, tok, fp = _load_model(site)
    spec = LoraSpec(r=int(cfg.get("lora_r", 8)), alpha=float(cfg.get("lora_alpha", 16.0)),
                    target_modules=tuple(_split_list(cfg.get("lora_targets", "q_proj,v_proj"))),
                    dropout=float(cfg.get("lora_dropout", 0.0)))
    dp = None
    if site.policy.get("dp-noise-multiplier", 0.0) > 0:
        dp = DPConfig(noise_multiplier=site.policy["dp-noise-multiplier"],
                      max_grad_norm=site.policy.get("dp-max-grad-norm", 1.0),
                      delta=site.policy.get("dp-delta", 1e-5))
    steps, lr, seed = int(cfg.get("steps", 40)), float(cfg.get("lr", 1e-3)), int(cfg.get("seed", 0))
    batch_size, max_length = int(cfg.get("batch_size", 4)), int(cfg.get("max_length", 192))
    # the ε of this release is known before training: a budget refuses it early, not after an hour
    planned = None if dp is None else dp_sgd_stats(dp.noise_multiplier, dp.max_grad_norm, dp.delta,
                                                   min(1.0, batch_size / len(train)), steps)
    _check_budget(site, release_record(planned, ZMechanism.from_policy(site.policy), adapter_sent=True), True)
    adapter, stats = train_lora(model, tok, train, task, spec, steps=steps, lr=lr, batch_size=batch_size,
                                max_length=max_length, seed=seed, progress=True, dp=dp, base_model=fp)
    adapter = wire.wire_normalized(adapter, base_model=fp)
    emb, z, z_mech = _site_embedding(model, tok, task.embedding_texts(train), site, int(cfg.get("embed_layer", -1)))
    arrays, lora_config = wire.adapter_to_wire(adapter)
    blob = adapter_to_bytes(adapter)
    save_peft_adapter(adapter, site.adapters_dir / f"own-{task.name}", str(site.model_path))
    group = Counter(e.group for e in train).most_common(1)[0][0]
    privacy = release_record(stats if dp is not None else None, z_mech, adapter_sent=True)
    train_stats = {"steps": stats.get("steps", steps), "lr": lr, "batch_size": batch_size,
                   "max_length": max_length, "seed": seed, "loss_first": stats.get("first_loss"),
                   "loss_last": stats.get("final_loss"), "seconds": round(float(stats.get("seconds", 0.0)), 3),
                   "n_train": len(train)}
    meta: dict[str, Any] = {
        "schema": wire.WIRE_SCHEMA, "site": site.site, "task": task.name, "modality": _modality(group),
        "group": group, "base_fingerprint": fp, "sample_count": len(train), "token_count": int(emb.n_tokens),
        "lora_config": wire.canonical_json(lora_config), "blob_sha256": hashlib.sha256(blob).hexdigest(),
        "embedding_spec": wire.canonical_json(emb.spec()), "privacy": wire.canonical_json(privacy),
        "train_stats": wire.canonical_json(_finite(train_stats)), "nonce": cfg["nonce"],
        "created_at": time.time(), "signer": "", "signature": "",
    }
    _sign(meta, site, z, str(context.run_id))
    return wire.build_enroll_reply(arrays, z, meta)


def _finite(values: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in values.items()}


def _sign(meta: dict[str, Any], site: Site, z: np.ndarray, run_id: str) -> None:
    """Fill ``signer`` / ``signature`` when the site has a signing key: the signature covers the blob
    hash, z, every other metadata field, the run id and the coordinator's nonce."""
    key = _signing_key(site)
    if key is None:
        return
    from common import signing

    signed = {k: v for k, v in meta.items() if k not in ("signer", "signature")}
    meta["signer"] = signing.key_fingerprint(key.public_key())
    meta["signature"] = signing.sign_submission(key, meta["blob_sha256"], z, signed, run_id, meta["nonce"])


def _embed(req: wire.Request, site: Site, context: Context) -> RecordDict:
    from common.privacy import ZMechanism, release_record

    cfg = req.config
    task = _task(cfg.get("task", "report-text"))
    data = load_site_data(site.data_path)
    examples = data.all[: cfg["max_examples"]] if cfg.get("max_examples") else data.all
    # the unlabeled view: findings only, whatever labels the site may hold
    texts = task.embedding_texts([Example(e.prompt, None, e.group, e.uid) for e in examples])
    layer = int(cfg.get("embed_layer", -1))
    mech = ZMechanism.from_policy(site.policy)
    cache = _z_cache_path(site, texts, layer, mech) if mech is not None else None
    cached = _cached_z(site, cache) if cache is not None else None
    if cached is not None:  # the same noisy z again: repeated queries cannot average the noise away
        z, info = cached
        privacy = release_record(None, mech, adapter_sent=False, z_repeat=True)
        print(f"[{site.site}] z: re-sending the noisy z already released for this data (no new privacy cost)",
              flush=True)
    else:
        _check_budget(site, release_record(None, mech, adapter_sent=False), False)
        model, tok, fp = _load_model(site)
        emb, z, mech = _site_embedding(model, tok, texts, site, layer)
        info = {"base_fingerprint": fp, "sample_count": emb.n_examples, "token_count": int(emb.n_tokens),
                "embedding_spec": emb.spec()}
        privacy = release_record(None, mech, adapter_sent=False)
        if cache is not None:
            _store_z(cache, z, info)
    meta = {
        "schema": wire.WIRE_SCHEMA, "site": site.site, "task": task.name, "base_fingerprint": info["base_fingerprint"],
        "sample_count": info["sample_count"], "token_count": info["token_count"],
        "embedding_spec": wire.canonical_json(info["embedding_spec"]), "privacy": wire.canonical_json(privacy),
        "nonce": cfg["nonce"],
    }
    return wire.build_embed_reply(z, meta)


def _check_budget(site: Site, record: dict[str, Any], adapter_sent: bool) -> None:
    """Refuse (before anything is computed or sent) a release beyond the site's ``privacy-budget``."""
    budget = site.policy.get("privacy-budget", 0.0)
    if not budget:
        return
    from common.privacy import PrivacyBudgetError, check_budget, read_egress

    past = read_egress(site.egress_path) if site.egress_path.exists() else []
    try:
        total = check_budget(budget, past, record, adapter_sent)
    except PrivacyBudgetError as exc:
        raise SiteError(str(exc)) from None
    print(f"[{site.site}] privacy budget: ε {total:.3f} of {budget:g} after this release", flush=True)


def _z_cache_path(site: Site, texts: list[str], layer: int, mech: Any) -> Path:
    """Where the noisy z released for exactly these texts, model, layer and mechanism is kept."""
    h = hashlib.sha256()
    for t in texts:
        h.update(hashlib.sha256(t.encode()).digest())
    key = wire.canonical_json({"texts": h.hexdigest(), "model": str(site.model_path), "layer": layer,
                               "clip": mech.clip, "sigma": mech.noise_multiplier, "delta": mech.delta})
    return site.site_dir / "privacy" / f"z-{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"


def _cached_z(site: Site, path: Path) -> tuple[np.ndarray, dict[str, Any]] | None:
    """The noisy z this site already released for exactly these texts and this mechanism, if any."""
    try:
        saved = json.loads(path.read_text())
        return np.asarray(saved["z"], dtype=np.float32), saved["info"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:  # torn by a crash: a fresh z is a new, counted release
        print(f"[{site.site}] ignoring unreadable z cache {path} ({exc})", flush=True)
        return None


def _store_z(path: Path, z: np.ndarray, info: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(json.dumps({"z": [float(x) for x in z], "info": info}))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _apply(req: wire.Request, site: Site, context: Context) -> RecordDict:
    from common.lora import adapter_to_bytes, save_peft_adapter
    from common.models import fingerprint, resolve_model_dir

    cfg = req.config
    name = cfg["name"]
    if not _NAME_RE.match(name):
        raise WireError("adapter name must be a plain file name", "config", "name")
    fp = fingerprint(site.model_path)
    if cfg["base_fingerprint"] != fp:
        raise SiteError(f"the composed adapter is for base model {cfg['base_fingerprint']}, this site runs {fp}")
    assert req.adapter is not None and req.lora_config is not None
    adapter = wire.adapter_from_wire(req.adapter, req.lora_config, base_model=fp)
    got = hashlib.sha256(adapter_to_bytes(adapter)).hexdigest()
    if got != cfg["blob_sha256"]:
        raise WireError(f"adapter hashes to {got}, the request says {cfg['blob_sha256']}", "adapter")
    store = bool(cfg.get("store", True))
    if store:
        out = save_peft_adapter(adapter, site.adapters_dir / name, str(resolve_model_dir(site.model_path)))
        provenance = {k: cfg.get(k) for k in ("strategy", "sources", "weights", "blob_sha256", "task")}
        provenance["received_at"] = time.time()
        (out / "rpe-provenance.json").write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
    metrics: dict[str, float] = {}
    data = load_site_data(site.data_path)
    # held-out scores are data-derived and not noised: a site with a privacy budget never sends them
    evaluated = bool(cfg.get("evaluate", True)) and bool(data.eval) and not site.policy.get("privacy-budget")
    if evaluated:
        from common.evaluation import evaluate_task

        task = _task(cfg.get("task", "report-text"))
        held = data.eval[: cfg["max_eval"]] if cfg.get("max_eval") else data.eval
        model, tok, _ = _load_model(site)
        result = evaluate_task(model, tok, task, held, adapter=adapter)
        metrics.update(_numeric(result))
        if cfg.get("with_base"):
            base = evaluate_task(model, tok, task, held, adapter=None)
            metrics.update({f"base_{k}": v for k, v in _numeric(base).items()})
    receipt = {"schema": wire.WIRE_SCHEMA, "site": site.site, "name": name, "blob_sha256": got,
               "evaluated": evaluated, "nonce": cfg["nonce"]}
    return wire.build_apply_reply(metrics, receipt)


def _numeric(result: dict[str, Any]) -> dict[str, float]:
    """Only the scalar scores of an evaluation: predictions and references never leave the site."""
    return {k: float(v) for k, v in result.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)
            and wire.METRIC_NAME_RE.match(k)}


HANDLERS: dict[str, Callable[[wire.Request, Site, Context], RecordDict]] = {
    wire.WHOAMI: _whoami, wire.ENROLL: _enroll, wire.EMBED: _embed, wire.APPLY: _apply,
}


# -- the gate every message passes -------------------------------------------------------------
def _egress(site: Site | None, message: Message, reply: Message, outcome: str, reason: str = "") -> None:
    """One egress-log line per reply (refusals and failures included, with no records)."""
    if site is None:
        return
    from client.egress import EgressLog
    from common.digests import z_sha256

    content = reply.content if reply.has_content() else RecordDict()
    records = {name: content[name] for name in content.keys()}
    extra: dict[str, Any] = {"outcome": outcome}
    if reason:
        extra["reason"] = reason[:500]
    if "meta" in content:
        meta = content["meta"]
        for key in ("nonce", "blob_sha256"):
            if key in meta:
                extra[key] = meta[key]
    elif "receipt" in content:
        extra["nonce"], extra["blob_sha256"] = content["receipt"]["nonce"], content["receipt"]["blob_sha256"]
    if "embedding" in content:
        extra["z_sha256"] = z_sha256(content["embedding"]["z"].numpy())
    log = EgressLog(site.egress_path, full_records=("meta", "whoami", "receipt"))
    log.record(message.metadata.message_type, records, run_id=str(message.metadata.run_id), extra=extra)


def _error_reply(message: Message, code: int, reason: str) -> Message:
    return Message(Error(code=code, reason=reason), reply_to=message)


def serve(message: Message, context: Context) -> Message:
    """Validate the request, run its handler, validate the reply, log it, send it."""
    mtype = message.metadata.message_type
    site: Site | None = None
    try:
        site = site_from_context(context)
        req = wire.parse_request(mtype, message.content if message.has_content() else RecordDict())
    except (WireError, SiteError) as exc:
        reply = _error_reply(message, wire.ERROR_REFUSED, f"refused: {exc}")
        _egress(site, message, reply, "refused", str(exc))
        return reply
    try:
        if site.threads > 0:
            import torch

            torch.set_num_threads(site.threads)
        content = HANDLERS[mtype](req, site, context)
        wire.check_reply(mtype, content)  # the last gate before anything leaves the site
    except WireError as exc:
        reply = _error_reply(message, wire.ERROR_REFUSED, f"refused: {exc}")
        _egress(site, message, reply, "refused", str(exc))
        return reply
    except Exception as exc:  # noqa: BLE001 - any failure becomes an error reply, never data
        # only the exception type and the first line of its message (capped) leave the site; the
        # traceback stays in the SuperNode's log
        first = (str(exc).splitlines() or [""])[0]
        reason = f"{type(exc).__name__}: {first[:300]}"
        print(f"[rpe site {site.site}] {mtype} failed:\n{traceback.format_exc()}", flush=True)
        reply = _error_reply(message, wire.ERROR_FAILED, reason)
        _egress(site, message, reply, "failed", reason)
        return reply
    reply = Message(content, reply_to=message)
    _egress(site, message, reply, "ok")  # logged and fsynced before it is sent: a failed write sends nothing
    return reply


class SiteClientApp(ClientApp):
    """A ClientApp that also refuses message types it does not know, before Flower would raise."""

    def __call__(self, message: Message, context: Context) -> Message:
        if message.metadata.message_type not in wire.MESSAGE_TYPES:
            return serve(message, context)  # parse_request refuses it and logs the refusal
        return super().__call__(message, context)


app = SiteClientApp()


@app.query("whoami")
def whoami(message: Message, context: Context) -> Message:
    """Site id, tasks and example counts."""
    return serve(message, context)


@app.train()
def enroll(message: Message, context: Context) -> Message:
    """Train a LoRA on local data; reply with the adapter, z and metadata."""
    return serve(message, context)


@app.query("embed")
def embed(message: Message, context: Context) -> Message:
    """z over the local unlabeled view of the data."""
    return serve(message, context)


@app.train("apply")
def apply(message: Message, context: Context) -> Message:
    """Store a composed adapter; reply with metrics only."""
    return serve(message, context)
