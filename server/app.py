"""The coordinator's Flower ServerApp: enrol sites, compose adapters for targets, evaluate.

A run is an ordinary Flower run with ``mode`` in the run config (``pyproject.toml``,
``[tool.flwr.app.config]`` lists every key):

- ``enroll``: ask the chosen sites (``sites``, default every online site) to train a LoRA for
  ``task``; each reply is validated (``common/wire.py``, then the site's signature, then the
  registry's own checks) and stored. A site that errors, is refused or times out is reported and
  leaves the registry unchanged.
- ``compose``: for each ``target`` site: ``query.embed`` -> retrieve the ``k`` nearest adapters
  (never the target's own unless ``include-own``) -> weights (``strategy``) -> exact composition
  -> ``train.apply`` -> metrics. Stored adapters of offline sites take part all the same.
- ``evaluate``: leave-one-site-out over every enrolled site with held-out data: every strategy in
  ``eval-strategies`` plus the baselines (base model, ``nearest``, ``avg``, the site's own LoRA as
  the supervised reference); results CSV + Markdown + plots under ``<registry>/evaluations/``.
- ``whoami``: only discover the online sites (a connectivity check).

Nothing is kept in memory between runs: the registry directory (``registry-dir`` or
``$RPE_REGISTRY``) holds the records, blobs, audit log, allow-list and nonce ledger; each run
writes its report to ``<registry>/runs/<run id>-<mode>.json``. Site ids are discovered every run
with ``query.whoami`` (Flower node ids are random per registration).

``blob-key-file``: path (on the coordinator) of the AES-256-GCM key that encrypts adapter blobs at
rest (``rpe blob-key new FILE``; mode 0600); "" = ``$RPE_BLOB_KEY_FILE`` / ``$RPE_BLOB_KEY`` of the
SuperLink, or none. A registry created by a run with a key stores every blob encrypted; an
encrypted registry refuses enroll/compose/evaluate runs without its key, and any key is refused
for a registry created without one (``common/blobcrypt.py``, ``server/registry.py``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from common import wire
from common.wire import WireError

MODES = ("enroll", "compose", "evaluate", "whoami")
BASELINES = ("base", "nearest", "avg", "own")
REGISTRY_ENV = "RPE_REGISTRY"
ALLOWLIST_ENV = "RPE_ALLOWLIST"

app = ServerApp()


def log(msg: str) -> None:
    """ServerApp output goes to the SuperLink's log and to ``flwr log`` / ``--stream``."""
    print(f"[rpe] {msg}", flush=True)


# -- settings ---------------------------------------------------------------------------------
def _list(value: Any) -> list[str]:
    return [s.strip() for s in str(value or "").split(",") if s.strip()]


@dataclass
class Settings:
    """The run config, typed (defaults mirror ``[tool.flwr.app.config]``)."""

    mode: str = "enroll"
    registry_dir: str = ""
    base_model: str = ""
    chroma: str = "embedded"
    sites: list[str] = field(default_factory=list)
    task: str = "report-text"
    steps: int = 40
    lr: float = 1e-3
    batch_size: int = 4
    max_length: int = 192
    seed: int = 0
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_targets: str = "q_proj,v_proj"
    lora_dropout: float = 0.0
    embed_layer: int = -1
    max_examples: int = 0
    targets: list[str] = field(default_factory=list)
    strategy: str = "sim"
    k: int = 3
    include_own: bool = False
    max_rank: int = 0
    lam1: float = 0.0
    lam2: float = 0.0
    max_l1: float = 0.0
    evaluate: bool = True
    max_eval: int = 0
    eval_strategies: list[str] = field(default_factory=lambda: ["sim", "lin", "lin-l1"])
    require_signatures: bool = False
    allowlist: str = ""
    blob_key_file: str = ""
    timeout_train: float = 1800.0
    timeout_query: float = 300.0

    @classmethod
    def from_run_config(cls, rc: Mapping[str, Any]) -> Settings:
        def get(key: str, default: Any) -> Any:
            value = rc.get(key, default)
            return default if value is None else value

        s = cls(
            mode=str(get("mode", "enroll")), registry_dir=str(get("registry-dir", "")),
            base_model=str(get("base-model", "")), chroma=str(get("chroma", "embedded")),
            sites=_list(get("sites", "")), task=str(get("task", "report-text")),
            steps=int(get("steps", 40)), lr=float(get("lr", 1e-3)), batch_size=int(get("batch-size", 4)),
            max_length=int(get("max-length", 192)), seed=int(get("seed", 0)), lora_r=int(get("lora-r", 8)),
            lora_alpha=float(get("lora-alpha", 16.0)), lora_targets=str(get("lora-targets", "q_proj,v_proj")),
            lora_dropout=float(get("lora-dropout", 0.0)), embed_layer=int(get("embed-layer", -1)),
            max_examples=int(get("max-examples", 0)), targets=_list(get("target", "")),
            strategy=str(get("strategy", "sim")), k=int(get("k", 3)), include_own=bool(get("include-own", False)),
            max_rank=int(get("max-rank", 0)), lam1=float(get("lam1", 0.0)), lam2=float(get("lam2", 0.0)),
            max_l1=float(get("max-l1", 0.0)), evaluate=bool(get("evaluate", True)), max_eval=int(get("max-eval", 0)),
            eval_strategies=_list(get("eval-strategies", "sim,lin,lin-l1")),
            require_signatures=bool(get("require-signatures", False)), allowlist=str(get("allowlist", "")),
            blob_key_file=str(get("blob-key-file", "")),
            timeout_train=float(get("timeout-train", 1800.0)), timeout_query=float(get("timeout-query", 300.0)),
        )
        if s.mode not in MODES:
            raise ValueError(f"run config mode={s.mode!r}; expected one of {MODES}")
        if not s.registry_dir:
            s.registry_dir = os.environ.get(REGISTRY_ENV, "")
        if not s.registry_dir:
            raise ValueError(f"no registry: set run config 'registry-dir' or ${REGISTRY_ENV} on the SuperLink")
        if not s.allowlist:
            s.allowlist = os.environ.get(ALLOWLIST_ENV, "") or str(Path(s.registry_dir) / "allowlist.json")
        return s

    def strategy_params(self, strategy: str) -> dict[str, float | None]:
        """Only the parameter the strategy takes; 0 means "the strategy's default"."""
        key = strategy.replace("_", "-")
        if key == "sim":
            return {"lam1": self.lam1 or None}
        if key == "lin-l1":
            return {"lam2": self.lam2 or None, "max_l1": self.max_l1 or None}
        if key == "lin":
            return {"max_l1": self.max_l1 or None}
        return {}


# -- messaging --------------------------------------------------------------------------------
@dataclass
class Reply:
    """What came back from one site for one request (``message`` None: no answer in time)."""

    site: str
    message: Message | None
    nonce: str

    @property
    def ok(self) -> bool:
        return self.message is not None and not self.message.has_error()

    @property
    def problem(self) -> str:
        if self.message is None:
            return "timeout: no reply in time (site offline or too slow)"
        if self.message.has_error():
            err = self.message.error
            kind = {wire.ERROR_REFUSED: "refused", wire.ERROR_FAILED: "failed", 5: "offline"}.get(err.code, "error")
            return f"{kind} (code {err.code}): {err.reason}"
        return ""


def make_nonce() -> str:
    from server.allowlist import make_nonce as _make

    return _make()


def exchange(grid: Grid, requests: list[tuple[str, int, str, RecordDict, str]], timeout: float,
             max_in_flight: int = 2, max_resends: int = 2, poll_s: float = 2.0) -> dict[str, Reply]:
    """Push ``(key, node id, message type, content, nonce)`` requests; collect replies until ``timeout``.

    Replies are matched to requests by message id (an error reply from the SuperLink carries the
    SuperLink's node id, not the site's). Messages live only ``timeout`` + 60 s at the SuperLink, so
    a request that timed out is not executed hours later.

    Why not push everything at once: a SuperNode handles one message at a time anyway, and under
    load Flower 1.41's SuperLink can answer a SuperNode's pull with "database is locked" after it
    has already handed the message out, and that message is then lost (seen with 28 adapters in
    flight on two cores). So at most ``max_in_flight`` messages per site are outstanding, and a
    message is re-sent (at most ``max_resends`` times) when it is provably lost: the site answered
    a message sent *after* it, or the site went quiet for much longer than its other answers took.
    Duplicates are harmless: the first reply wins, and every request carries its own nonce.
    """
    out = {key: Reply(key, None, nonce) for key, _, _, _, nonce in requests}
    if not requests:
        return out
    queues: dict[int, list[int]] = {}
    for i, (_, node, _, _, _) in enumerate(requests):
        queues.setdefault(node, []).append(i)
    in_flight: dict[str, int] = {}  # message id -> request index
    push_seq: dict[int, int] = {}
    sent_at: dict[int, float] = {}
    resends: dict[int, int] = {}
    done: set[int] = set()
    last_reply: dict[int, float] = {}
    took: dict[int, list[float]] = {}
    counter = iter(range(1 << 62))
    deadline = time.monotonic() + timeout

    def push(indices: list[int]) -> None:
        msgs = [Message(requests[i][3], dst_node_id=requests[i][1], message_type=requests[i][2], ttl=timeout + 60.0)
                for i in indices]
        for i, mid in zip(indices, grid.push_messages(msgs)):
            if mid:
                in_flight[mid] = i
                push_seq[i] = next(counter)
                sent_at[i] = time.monotonic()

    def fill() -> None:
        batch = []
        for node, queue in queues.items():
            active = sum(1 for i in in_flight.values() if requests[i][1] == node)
            while queue and active < max_in_flight:
                batch.append(queue.pop(0))
                active += 1
        if batch:
            push(batch)

    fill()
    while (in_flight or any(queues.values())) and time.monotonic() < deadline:
        for reply in grid.pull_messages(list(in_flight)):
            i = in_flight.pop(reply.metadata.reply_to_message_id, None)
            if i is None or i in done:
                continue
            done.add(i)
            out[requests[i][0]].message = reply
            node, now = requests[i][1], time.monotonic()
            took.setdefault(node, []).append(now - max(sent_at[i], last_reply.get(node, 0.0)))
            last_reply[node] = now
        for mid in [m for m, i in in_flight.items() if i in done]:
            del in_flight[mid]
        now = time.monotonic()
        lost = []
        for mid, i in in_flight.items():
            node = requests[i][1]
            overtaken = any(requests[j][1] == node and push_seq[j] > push_seq[i] for j in done)
            quiet = node in took and now - max(sent_at[i], last_reply[node]) > max(120.0, 5 * max(took[node]))
            if (overtaken or quiet) and resends.get(i, 0) < max_resends:
                lost.append(mid)
        for mid in lost:
            i = in_flight.pop(mid)
            resends[i] = resends.get(i, 0) + 1
            log(f"message for {requests[i][0]!r} was lost between the SuperLink and the site; re-sending "
                f"({resends[i]}/{max_resends})")
            push([i])
        fill()
        if in_flight or any(queues.values()):
            time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
    return out


@dataclass
class SiteInfo:
    site: str
    node_id: int
    info: dict[str, Any]


def discover(grid: Grid, timeout: float, report: dict[str, Any]) -> dict[str, SiteInfo]:
    """Ask every online node who it is; ignore (and report) nodes that refuse or claim a taken id."""
    nodes = sorted(grid.get_node_ids())
    requests = []
    for node in nodes:
        nonce = make_nonce()
        requests.append((str(node), node, wire.WHOAMI, wire.build_request(wire.WHOAMI, {"nonce": nonce}), nonce))
    replies = exchange(grid, requests, timeout)
    sites: dict[str, SiteInfo] = {}
    problems: dict[str, str] = {}
    for (key, node, _, _, nonce) in requests:
        rep = replies[key]
        if not rep.ok:
            problems[f"node {node}"] = rep.problem
            continue
        try:
            info = wire.parse_whoami_reply(rep.message.content)  # type: ignore[union-attr]
        except WireError as exc:
            problems[f"node {node}"] = f"invalid whoami reply: {exc}"
            continue
        if info["nonce"] != nonce:
            problems[f"node {node}"] = "whoami reply answers another request (nonce mismatch)"
            continue
        if info["site"] in sites:
            problems[f"node {node}"] = f"site id {info['site']!r} is already used by node {sites[info['site']].node_id}"
            continue
        sites[info["site"]] = SiteInfo(info["site"], node, info)
    report["online"] = {s: {"node_id": str(i.node_id), "n_examples": i.info["n_examples"],
                            "n_labeled": i.info["n_labeled"], "n_eval": i.info["n_eval"],
                            "data_ok": i.info["data_ok"], "groups": i.info["groups"]}
                        for s, i in sorted(sites.items())}
    if problems:
        report["discovery_problems"] = problems
    log(f"online sites: {sorted(sites)}" + (f"; problems: {problems}" if problems else ""))
    return sites


# -- registry ---------------------------------------------------------------------------------
def open_registry(s: Settings) -> Any:
    """Open ``registry-dir``; create it from ``base-model`` (on the coordinator) if it does not exist.

    The blob key (``blob-key-file``, else the environment) is loaded first, so a bad key fails the
    run before any site is asked to train; so does a missing key for an encrypted registry."""
    from server.registry.blobcrypt import load_blob_key

    reg = _open_or_create(s, load_blob_key(s.blob_key_file or None))
    if not reg.has_blob_key and s.mode != "whoami":
        reg.close()
        raise ValueError(
            f"registry {reg.path} stores adapter blobs encrypted (key {reg.blob_encryption['key_id']}) and this "
            f"{s.mode} run has no key: set run config 'blob-key-file', or $RPE_BLOB_KEY_FILE on the SuperLink"
        )
    return reg


def _open_or_create(s: Settings, blob_key: Any) -> Any:
    from server.registry import Registry

    path = Path(s.registry_dir).expanduser()
    chroma: Any = None
    if s.chroma == "off":
        chroma = "off"
    elif ":" in s.chroma:
        host, port = s.chroma.rsplit(":", 1)
        chroma = (host, int(port))
    if (path / "registry.json").is_file():
        return Registry(path, chroma=chroma, blob_key=blob_key)
    if not s.base_model:
        raise ValueError(f"{path} holds no registry yet: create it with `rpe registry init`, or set run config "
                         "'base-model' to the base model directory so the first run creates it")
    from transformers import AutoConfig

    from common.models import fingerprint, resolve_model_dir

    model_dir = resolve_model_dir(s.base_model)
    shapes = _linear_shapes(model_dir)
    hidden = int(AutoConfig.from_pretrained(str(model_dir)).hidden_size)
    log(f"creating registry {path} for base {model_dir} ({len(shapes)} linear modules, z dim {hidden})")
    kwargs: dict[str, Any] = {}
    if isinstance(chroma, tuple):
        kwargs = {"chroma_host": chroma[0], "chroma_port": chroma[1]}
    reg = Registry.init(path, base_fingerprint=fingerprint(model_dir), module_shapes=shapes, embedding_dim=hidden,
                        base_name=str(model_dir), exist_ok=True, blob_key=blob_key, **kwargs)
    if chroma == "off":
        reg.close()
        reg = Registry(path, chroma="off", blob_key=blob_key)
    return reg


def _linear_shapes(model_dir: Path) -> dict[str, tuple[int, int]]:
    """Module shapes of the base model without loading its weights (meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from common.models import linear_module_shapes

    config = AutoConfig.from_pretrained(str(model_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return linear_module_shapes(model)


def _security(s: Settings, registry: Any) -> tuple[Any, Any]:
    """The site allow-list (``allowlist`` / $RPE_ALLOWLIST / <registry>/allowlist.json) and nonce ledger."""
    from server.allowlist import AllowList, NonceLedger

    return AllowList(s.allowlist), NonceLedger(registry.path / "nonces.jsonl")


def _signed_fields(meta: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in meta.items() if k not in ("signer", "signature")}


# -- enroll -----------------------------------------------------------------------------------
def run_enroll(grid: Grid, s: Settings, registry: Any, sites: dict[str, SiteInfo], run_id: str,
               report: dict[str, Any]) -> None:
    from common.digests import record_digests, z_sha256
    from server import allowlist as signing  # AllowList/ledger checks + the signing error types
    from server.registry import RegistryError, ValidationError

    chosen = s.sites or sorted(sites)
    results: dict[str, dict[str, Any]] = {}
    requests = []
    for site in chosen:
        if site not in sites:
            results[site] = {"status": "offline", "reason": "site did not answer query.whoami (offline or unknown)"}
            registry.audit.append("submission.rejected", site=site, reason="offline", run_id=run_id)
            continue
        nonce = make_nonce()
        config = {"nonce": nonce, "task": s.task, "steps": s.steps, "lr": s.lr, "batch_size": s.batch_size,
                  "max_length": s.max_length, "seed": s.seed, "lora_r": s.lora_r, "lora_alpha": s.lora_alpha,
                  "lora_targets": s.lora_targets, "lora_dropout": s.lora_dropout, "embed_layer": s.embed_layer}
        if s.max_examples:
            config["max_examples"] = s.max_examples
        requests.append((site, sites[site].node_id, wire.ENROLL, wire.build_request(wire.ENROLL, config), nonce))
    log(f"enrolling {[r[0] for r in requests]} (task {s.task}, {s.steps} steps)")
    replies = exchange(grid, requests, s.timeout_train)
    allow, ledger = _security(s, registry)
    for site, _, _, _, nonce in requests:
        rep = replies[site]
        if not rep.ok:
            results[site] = {"status": "error", "reason": rep.problem}
            registry.audit.append("submission.rejected", site=site, reason=rep.problem[:1000], run_id=run_id,
                                  nonce=nonce)
            continue
        content = rep.message.content  # type: ignore[union-attr]
        # What arrived on the wire, for the ONE audit entry of this submission: the registry's own
        # submission.accepted / submission.rejected entry (``audit_fields``), or the app's rejection
        # entry when the reply never reached the registry. server/crosscheck.py matches it against
        # the site's egress line by record_digests, run_id and nonce.
        fields: dict[str, Any] = {"run_id": run_id, "nonce": nonce, "message_type": wire.ENROLL,
                                  "record_digests": None}
        at_registry = False
        try:
            fields["record_digests"] = record_digests({name: content[name] for name in content.keys()})
            payload = wire.parse_enroll_reply(content)
            meta = payload.meta
            fields.update(blob_sha256=meta["blob_sha256"], z_sha256=z_sha256(payload.z),
                          signer=meta["signer"] or None, signature=meta["signature"] or None)
            if meta["site"] != site:
                raise WireError(f"reply claims site {meta['site']!r} but came from {site!r}", "meta", "site")
            if meta["nonce"] != nonce:
                raise WireError("reply answers another request (nonce mismatch)", "meta", "nonce")
            if meta["signature"]:
                signing.authenticate_submission(allow, ledger, site, meta["signature"], meta["blob_sha256"],
                                                payload.z, _signed_fields(meta), run_id, nonce)
            elif s.require_signatures:
                raise signing.SignatureError("unsigned submission, and this coordinator requires signatures")
            adapter = wire.adapter_from_wire(payload.arrays, payload.lora_config, meta["base_fingerprint"])
            at_registry = True
            record = registry.add(adapter, payload.z, _registry_meta(payload), expected_sha256=meta["blob_sha256"],
                                  audit_fields=fields)
        except (WireError, RegistryError, signing.SigningError, ValueError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
            results[site] = {"status": "rejected", "reason": reason}
            if not (at_registry and isinstance(exc, ValidationError)):  # else the registry logged it, with fields
                registry.audit.append("submission.rejected", site=site, reason=reason[:1000], **fields)
            continue
        results[site] = {"status": "accepted", "record_id": record.id, "blob_sha256": record.blob_sha256,
                         "signed": bool(meta["signature"]), "sample_count": meta["sample_count"],
                         "train_stats": payload.train_stats}
    report["enroll"] = results
    for site, res in sorted(results.items()):
        log(f"enroll {site}: {res['status']}" + (f" ({res.get('reason')})" if res.get("reason") else
                                                 f" -> {res.get('record_id')}"))


def _registry_meta(p: wire.EnrollPayload) -> dict[str, Any]:
    """The registry's metadata for a submission (no nonce/time, so a resubmission is idempotent)."""
    m = p.meta
    privacy = {k: v for k, v in p.privacy.items() if v is not None} or "none"
    return {
        "site": m["site"], "task": m["task"], "modality": m["modality"], "base_fingerprint": m["base_fingerprint"],
        "sample_count": m["sample_count"], "token_count": m["token_count"], "privacy": privacy,
        "extra": {"group": m["group"], "embedding_spec": p.embedding_spec, "lora_config": p.lora_config,
                  "train_stats": {k: v for k, v in p.train_stats.items() if v is not None},
                  "signer": m["signer"], "signature": m["signature"], "wire_schema": m["schema"]},
    }


# -- compose ----------------------------------------------------------------------------------
def embed_sites(grid: Grid, s: Settings, registry: Any, sites: dict[str, SiteInfo], targets: list[str],
                run_id: str, problems: dict[str, str]) -> dict[str, np.ndarray]:
    """``query.embed`` every target that is online; z per site (problems reported, not raised)."""
    from common.digests import record_digests, z_sha256

    requests = []
    for t in targets:
        if t not in sites:
            problems[t] = "target site is offline: it cannot send its embedding or receive an adapter"
            continue
        nonce = make_nonce()
        config: dict[str, Any] = {"nonce": nonce, "task": s.task, "embed_layer": s.embed_layer}
        requests.append((t, sites[t].node_id, wire.EMBED, wire.build_request(wire.EMBED, config), nonce))
    replies = exchange(grid, requests, s.timeout_query)
    out: dict[str, np.ndarray] = {}
    for t, _, _, _, nonce in requests:
        rep = replies[t]
        if not rep.ok:
            problems[t] = rep.problem
            continue
        try:
            content = rep.message.content  # type: ignore[union-attr]
            z, meta = wire.parse_embed_reply(content)
            if meta["site"] != t or meta["nonce"] != nonce:
                raise WireError("embedding reply does not answer this request (site or nonce mismatch)", "meta")
            if meta["embedding_spec"]["dim"] != registry.embedding_dim:
                raise WireError(f"site sent {z.shape[0]} values, the registry holds {registry.embedding_dim}",
                                "embedding", "z")
        except WireError as exc:
            problems[t] = f"invalid embedding reply: {exc}"
            continue
        registry.audit.append("query.embedding", site=t, target=t, z_sha256=z_sha256(z), run_id=run_id,
                              privacy=json.loads(meta["privacy"]) or "none",
                              record_digests=record_digests({n: content[n] for n in content.keys()}))
        out[t] = z
    return out


def compose_one(s: Settings, registry: Any, target: str, z: np.ndarray, strategy: str, out_dir: Path | None,
                exclude_own: bool = True) -> dict[str, Any]:
    """Retrieve, weigh and compose for one target (``server/composer.py``); returns a summary.

    ``k`` is capped at the number of eligible adapters, so a small federation still composes.
    """
    from server.composer import compose_for_target

    exclude = target if exclude_own else None
    n_eligible = len([r for r in registry.list(task=s.task) if r.meta.site != exclude])
    if n_eligible == 0:
        raise ValueError(f"no stored adapter for task {s.task!r} to compose for {target!r}")
    params = {k: v for k, v in s.strategy_params(strategy).items() if v is not None}
    result = compose_for_target(registry, z, strategy=strategy, k=min(s.k, n_eligible), exclude_site=exclude,
                                task=s.task, max_rank=s.max_rank or None, strategy_params=params,
                                out_dir=out_dir, target=target, audit_query=False)
    return {"adapter": result.adapter, "ids": list(result.ids), "sites": list(result.sites),
            "weights": [float(w) for w in result.weights], "distances": [float(d) for d in result.distances],
            "out_dir": str(result.out_dir or ""), "output_sha256": result.output_sha256}


def apply_request(s: Settings, adapter: Any, name: str, strategy: str, summary: Mapping[str, Any],
                  evaluate: bool, store: bool = True, with_base: bool = False) -> tuple[RecordDict, str, str]:
    """The ``train.apply`` request for an adapter; returns (content, nonce, blob sha256)."""
    from common.lora import adapter_to_bytes

    normalized = wire.wire_normalized(adapter)
    arrays, lora_config = wire.adapter_to_wire(normalized)
    blob_sha = hashlib.sha256(adapter_to_bytes(normalized)).hexdigest()
    nonce = make_nonce()
    config: dict[str, Any] = {
        "nonce": nonce, "task": s.task, "name": name, "lora_config": wire.canonical_json(lora_config),
        "blob_sha256": blob_sha, "base_fingerprint": normalized.base_model or "", "strategy": strategy,
        "sources": json.dumps(summary.get("ids", [])), "weights": json.dumps(summary.get("weights", [])),
        "evaluate": evaluate, "store": store, "with_base": with_base,
    }
    if s.max_eval:
        config["max_eval"] = s.max_eval
    return wire.build_request(wire.APPLY, config, arrays), nonce, blob_sha


def _base_of(registry: Any, summary: Mapping[str, Any]) -> str:
    ids = summary.get("ids") or []
    return registry.get(ids[0]).meta.base_fingerprint if ids else ""


def _with_base(adapter: Any, base: str) -> Any:
    from common.lora import LoraAdapter

    return LoraAdapter(adapter.modules, base or adapter.base_model)


def run_compose(grid: Grid, s: Settings, registry: Any, sites: dict[str, SiteInfo], run_id: str,
                report: dict[str, Any]) -> None:
    targets = s.targets
    if not targets:
        raise ValueError("mode=compose needs run config 'target' (one or more site ids, comma-separated)")
    problems: dict[str, str] = {}
    zs = embed_sites(grid, s, registry, sites, targets, run_id, problems)
    results: dict[str, dict[str, Any]] = {t: {"status": "failed", "reason": p} for t, p in problems.items()}
    requests = []
    # With blob encryption on, composed adapters (a weighted sum of stored ones; with k=1 a copy of
    # one) are delivered but not kept in clear at the coordinator; the audit log holds their hashes.
    out_root = None if registry.blob_encryption else registry.path / "compositions" / run_id
    for t, z in zs.items():
        try:
            summary = compose_one(s, registry, t, z, s.strategy, out_root / t if out_root else None,
                                  exclude_own=not s.include_own)
        except Exception as exc:  # noqa: BLE001 - one target's failure must not stop the others
            results[t] = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
            continue
        name = f"rpe-{s.strategy}-k{len(summary['ids'])}-run{run_id}"
        adapter = _with_base(summary.pop("adapter"), _base_of(registry, summary))
        content, nonce, blob_sha = apply_request(s, adapter, name, s.strategy, summary, s.evaluate)
        results[t] = {"status": "composed", "adapter_name": name, "strategy": s.strategy,
                      "blob_sha256": blob_sha, **summary}
        requests.append((t, sites[t].node_id, wire.APPLY, content, nonce))
    replies = exchange(grid, requests, s.timeout_train)
    for t, _, _, _, nonce in requests:
        rep = replies[t]
        res = results[t]
        if not rep.ok:
            res.update(status="undelivered", reason=rep.problem)
            continue
        try:
            metrics, receipt = wire.parse_apply_reply(rep.message.content)  # type: ignore[union-attr]
            if receipt["nonce"] != nonce or receipt["blob_sha256"] != res["blob_sha256"]:
                raise WireError("receipt does not match the adapter sent", "receipt")
        except WireError as exc:
            res.update(status="undelivered", reason=f"invalid apply reply: {exc}")
            continue
        res.update(status="delivered", metrics=metrics, evaluated=receipt["evaluated"])
        registry.audit.append("composition.delivered", target=t, site=t, run_id=run_id, name=res["adapter_name"],
                              output_sha256=res["blob_sha256"], metrics=metrics)
    report["compose"] = results
    for t, res in sorted(results.items()):
        extra = res.get("reason") or f"sources {res.get('sites')} weights {np.round(res.get('weights', []), 3)}"
        log(f"compose {t}: {res['status']} ({extra})")


# -- evaluate ---------------------------------------------------------------------------------
def run_evaluate(grid: Grid, s: Settings, registry: Any, sites: dict[str, SiteInfo], run_id: str,
                 report: dict[str, Any]) -> None:
    """Leave-one-site-out: every strategy and baseline for every enrolled site with held-out data."""
    enrolled = sorted({r.meta.site for r in registry.list(task=s.task)})
    targets = s.targets or [t for t in enrolled if t in sites and sites[t].info["n_eval"] > 0]
    problems: dict[str, str] = {}
    for t in enrolled:
        if t not in targets and t not in s.targets:
            problems[t] = "offline" if t not in sites else "no held-out evaluation data"
    zs = embed_sites(grid, s, registry, sites, targets, run_id, problems)
    methods = [*dict.fromkeys([m.replace("_", "-") for m in s.eval_strategies] + ["nearest", "avg"])]
    rows: list[dict[str, Any]] = []
    requests = []
    meta_by_key: dict[str, dict[str, Any]] = {}
    out_root = registry.path / "evaluations" / run_id
    for t, z in zs.items():
        first = True
        for method in [*methods, "own"]:
            key = f"{t}|{method}"
            try:
                if method == "own":
                    own = registry.list(task=s.task, site=t)
                    if not own:
                        raise ValueError(f"site {t!r} has no enrolled adapter of its own")
                    rec = own[-1]
                    summary = {"adapter": registry.load_adapter(rec.id), "ids": [rec.id], "sites": [t],
                               "weights": [1.0], "distances": [float(np.sum((rec.z - z) ** 2))]}
                else:
                    summary = compose_one(s, registry, t, z, method, None)
            except Exception as exc:  # noqa: BLE001 - report and go on with the other arms
                problems[key] = f"{type(exc).__name__}: {exc}"
                continue
            adapter = _with_base(summary.pop("adapter"), _base_of(registry, summary))
            content, nonce, _ = apply_request(s, adapter, f"eval-{run_id}-{method}", method, summary,
                                              evaluate=True, store=False, with_base=first)
            first = False
            meta_by_key[key] = {"target": t, "method": method, **summary}
            requests.append((key, sites[t].node_id, wire.APPLY, content, nonce))
    replies = exchange(grid, requests, s.timeout_train)
    base_scores: dict[str, dict[str, float]] = {}
    for key, _, _, _, _ in requests:
        rep = replies[key]
        info = meta_by_key[key]
        if not rep.ok:
            problems[key] = rep.problem
            continue
        try:
            metrics, receipt = wire.parse_apply_reply(rep.message.content)  # type: ignore[union-attr]
        except WireError as exc:
            problems[key] = f"invalid apply reply: {exc}"
            continue
        if not receipt["evaluated"]:
            problems[key] = "site did not evaluate (no held-out data)"
            continue
        if "base_rouge_l" in metrics:
            base_scores[info["target"]] = {k[5:]: v for k, v in metrics.items() if k.startswith("base_")}
        rows.append(_row(info, {k: v for k, v in metrics.items() if not k.startswith("base_")}))
    for t, metrics in base_scores.items():
        rows.append(_row({"target": t, "method": "base", "ids": [], "sites": [], "weights": [], "distances": []},
                         metrics))
    order = {m: i for i, m in enumerate(["base", *methods, "own"])}
    rows.sort(key=lambda r: (r["target"], order.get(r["method"], 99)))
    out = write_evaluation(out_root, rows, registry, zs)
    report["evaluate"] = {"rows": rows, "problems": problems, "outputs": out}
    log(f"evaluation: {len(rows)} results, {len(problems)} problems; written to {out_root}")


def _row(info: Mapping[str, Any], metrics: Mapping[str, float]) -> dict[str, Any]:
    return {"target": info["target"], "method": info["method"], "rouge_l": metrics.get("rouge_l"),
            "n": int(metrics.get("n", 0)), "sources": list(info.get("sites", [])),
            "weights": [round(float(w), 6) for w in info.get("weights", [])],
            "distances": [float(d) for d in info.get("distances", [])],
            "metrics": dict(metrics)}


def write_evaluation(out_dir: Path, rows: list[dict[str, Any]], registry: Any,
                     zs: Mapping[str, np.ndarray]) -> dict[str, str]:
    """results.csv, results.md and three plots (weights, site distances, score vs distance)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "results.csv"
    with open(csv_path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["target", "method", "rouge_l", "n", "sources", "weights", "min_distance"])
        for r in rows:
            writer.writerow([r["target"], r["method"], "" if r["rouge_l"] is None else f"{r['rouge_l']:.4f}", r["n"],
                             ";".join(r["sources"]), ";".join(f"{w:.4f}" for w in r["weights"]),
                             f"{min(r['distances']):.6g}" if r["distances"] else ""])
    targets = sorted({r["target"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    table = {(r["target"], r["method"]): r["rouge_l"] for r in rows}
    lines = ["# Leave-one-site-out evaluation (ROUGE-L F1)", "",
             "| target | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for t in targets:
        cells = [f"{table[(t, m)]:.4f}" if table.get((t, m)) is not None else "-" for m in methods]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    means = []
    for m in methods:
        vals = [table[(t, m)] for t in targets if table.get((t, m)) is not None]
        means.append(f"{np.mean(vals):.4f}" if vals else "-")
    lines.append("| **mean** | " + " | ".join(means) + " |")
    lines += ["", "`own` is the target site's own LoRA (supervised reference, not zero-shot); `base` the base "
              "model without adapter; all other columns compose adapters of the *other* sites only.", ""]
    md_path = out_dir / "results.md"
    md_path.write_text("\n".join(lines) + "\n")
    out = {"csv": str(csv_path), "markdown": str(md_path)}
    try:
        out.update(_plots(out_dir, rows, registry, zs))
    except Exception as exc:  # noqa: BLE001 - plots are a convenience; the tables are the result
        log(f"plots failed: {type(exc).__name__}: {exc}")
    return out


def _plots(out_dir: Path, rows: list[dict[str, Any]], registry: Any, zs: Mapping[str, np.ndarray]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, str] = {}
    composed = [r for r in rows if r["weights"] and r["method"] not in ("own", "base")]
    targets = sorted({r["target"] for r in composed})
    if targets:
        fig, axes = plt.subplots(1, len(targets), figsize=(4.5 * len(targets), 3.5), squeeze=False)
        for ax, t in zip(axes[0], targets, strict=True):
            sub = [r for r in composed if r["target"] == t]
            sources = sorted({s for r in sub for s in r["sources"]})
            width = 0.8 / max(1, len(sub))
            for i, r in enumerate(sub):
                w = dict(zip(r["sources"], r["weights"], strict=False))
                ax.bar(np.arange(len(sources)) + i * width, [w.get(src, 0.0) for src in sources], width,
                       label=r["method"])
            ax.set_xticks(np.arange(len(sources)) + 0.4 - width / 2, sources)
            ax.set_title(f"target {t}")
            ax.axhline(0, color="k", linewidth=0.5)
        axes[0][0].set_ylabel("weight")
        axes[0][-1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "weights.png", dpi=120)
        plt.close(fig)
        out["weights_plot"] = str(out_dir / "weights.png")
    site_z: dict[str, np.ndarray] = {}
    for rec in registry.list():
        site_z.setdefault(rec.meta.site, rec.z)
    for t, z in zs.items():
        site_z[f"{t} (target)"] = z
    names = sorted(site_z)
    if names:
        Z = np.stack([site_z[n] for n in names]).astype(np.float64)
        D = ((Z[:, None, :] - Z[None, :, :]) ** 2).sum(-1)
        fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(names), 1 + 0.6 * len(names)))
        im = ax.imshow(D, cmap="viridis")
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        fig.colorbar(im, ax=ax, label="squared L2 distance of z")
        fig.tight_layout()
        fig.savefig(out_dir / "site_distances.png", dpi=120)
        plt.close(fig)
        out["distance_plot"] = str(out_dir / "site_distances.png")
    scored = [r for r in rows if r["distances"] and r["rouge_l"] is not None]
    if scored:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for method in dict.fromkeys(r["method"] for r in scored):
            sub = [r for r in scored if r["method"] == method]
            ax.scatter([float(np.dot(r["weights"], r["distances"])) if r["weights"] else min(r["distances"])
                        for r in sub], [r["rouge_l"] for r in sub], label=method)
        ax.set_xlabel("weighted squared distance of the sources to the target")
        ax.set_ylabel("ROUGE-L")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "score_vs_distance.png", dpi=120)
        plt.close(fig)
        out["score_plot"] = str(out_dir / "score_vs_distance.png")
    return out


# -- main -------------------------------------------------------------------------------------
def write_report(registry_dir: str, report: dict[str, Any]) -> Path | None:
    """``<registry>/runs/<run id>-<mode>.json`` (atomic): what the operator and tests read."""
    if not registry_dir:
        return None
    runs = Path(registry_dir).expanduser() / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    path = runs / f"{report['run_id']}-{report['mode']}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)
    return path


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Dispatch on ``mode``; always leave a run report, and fail the run only on coordinator errors."""
    run_id = str(grid.run.run_id)
    report: dict[str, Any] = {"run_id": run_id, "mode": str(context.run_config.get("mode", "?")),
                              "started_at": time.time(), "status": "running"}
    registry_dir = str(context.run_config.get("registry-dir") or os.environ.get(REGISTRY_ENV, ""))
    try:
        s = Settings.from_run_config(context.run_config)
        registry_dir = s.registry_dir
        report["settings"] = {k: v for k, v in vars(s).items()}
        timings: dict[str, float] = {}
        report["timings"] = timings
        t0 = time.monotonic()
        registry = open_registry(s)
        try:
            timings["open_registry"] = round(time.monotonic() - t0, 3)
            t0 = time.monotonic()
            sites = discover(grid, s.timeout_query, report)
            timings["discover"] = round(time.monotonic() - t0, 3)
            handler = {"enroll": run_enroll, "compose": run_compose, "evaluate": run_evaluate}.get(s.mode)
            if handler is not None:
                t0 = time.monotonic()
                handler(grid, s, registry, sites, run_id, report)
                timings[s.mode] = round(time.monotonic() - t0, 3)
        finally:
            registry.close()
        report["status"] = "completed"
    except Exception as exc:
        report["status"] = "failed"
        report["error"] = f"{type(exc).__name__}: {exc}"
        report["traceback"] = traceback.format_exc()
        log(f"run failed: {report['error']}")
        raise
    finally:
        report["finished_at"] = time.time()
        path = write_report(registry_dir, report)
        if path is not None:
            log(f"report: {path}")
