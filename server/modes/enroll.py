"""``mode=enroll``: ask the chosen sites to train a LoRA for ``task``; validate and store each reply.

Per site: whoami said it is online -> ``train`` request (fresh nonce) -> the reply is checked
against the vocabulary (``common/protocol/wire.py``), then the site's signature (allow-list + nonce ledger),
then the registry's own checks, and stored. A site that errors, is refused or times out is
reported and leaves the registry unchanged; every submission leaves exactly one audit entry.

Without ``sites=`` only the online sites whose whoami says they hold labelled data for ``task``
are asked; the others are reported ``skipped`` with the reason (not failures). A site's accepted
adapter supersedes its earlier ones of the same task and base (``Registry.supersede``: kept in the
record log, audit log and blob store, no longer retrievable; one ``record.superseded`` entry)
unless ``keep-previous=true``, which every ``submission.accepted`` entry records.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flwr.serverapp import Grid

from common.protocol import wire
from common.protocol.wire import WireError
from server.messaging import Reply, Request, SiteFailure, SiteInfo, exchange, log, request
from server.reporting import Progress
from server.settings import Settings


def _security(s: Settings, registry: Any) -> tuple[Any, Any]:
    """The site allow-list (``allowlist`` / $RPE_ALLOWLIST / <registry>/allowlist.json) and nonce ledger."""
    from server.allowlist import AllowList, NonceLedger

    return AllowList(s.allowlist), NonceLedger(registry.path / "nonces.jsonl")


def _signed_fields(meta: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in meta.items() if k not in ("signer", "signature")}


def train_config(s: Settings) -> dict[str, Any]:
    """The ``train`` request's config (without the nonce)."""
    config: dict[str, Any] = {
        "task": s.task,
        "steps": s.steps,
        "lr": s.lr,
        "batch_size": s.batch_size,
        "max_length": s.max_length,
        "seed": s.seed,
        "lora_r": s.lora_r,
        "lora_alpha": s.lora_alpha,
        "lora_targets": s.lora_targets,
        "lora_dropout": s.lora_dropout,
        "embed_layer": s.embed_layer,
        **s.options_config(),
    }
    if s.max_examples:
        config["max_examples"] = s.max_examples
    return config


def unlabelled(task: str, info: Mapping[str, Any]) -> str | None:
    """Why a site's whoami says it has nothing to enrol for ``task`` (None: ask it). Its counts are
    those of its first task; a site that does not hold ``task`` at all is left out too. A site whose
    data could not be read (``data_ok`` false) is asked all the same: its failure, with its cause, is
    what the operator must see (a broken export is not an unlabelled site)."""
    tasks = list(info.get("tasks") or [])
    if task not in tasks:
        return f"the site does not hold task {task!r} (it holds {', '.join(tasks) or 'none'})"
    if tasks[0] == task and info.get("data_ok", True) and int(info.get("n_labeled") or 0) == 0:
        return (
            f"no labelled data ({int(info.get('n_unlabeled') or 0)} unlabelled examples): a target for "
            "composition, not an enrolment; name it in sites= to ask it anyway"
        )
    return None


def failed(status: str, failure: SiteFailure) -> dict[str, Any]:
    """A result entry for a site whose answer could not be used (``kind``/``code`` for tests and tools)."""
    return {"status": status, "reason": str(failure), "kind": failure.kind, "code": failure.code}


def run_enroll(
    grid: Grid, s: Settings, registry: Any, sites: dict[str, SiteInfo], run_id: str, report: dict[str, Any]
) -> None:
    """Enrol ``sites`` (default: every online site with labelled data for the task);
    ``report["enroll"][site]`` says what happened."""
    results: dict[str, dict[str, Any]] = {}
    chosen = list(s.sites)
    if not chosen:
        for site in sorted(sites):
            why = unlabelled(s.task, sites[site].info)
            if why is None:
                chosen.append(site)
            else:
                results[site] = {"status": "skipped", "reason": why}
    requests: list[Request] = []
    for site in chosen:
        if site not in sites:
            results[site] = failed(
                "offline", SiteFailure("offline", "site did not answer query.whoami (offline or unknown)")
            )
            registry.audit.append("submission.rejected", site=site, reason="offline", run_id=run_id)
            continue
        requests.append(request(site, sites[site].node_id, wire.ENROLL, train_config(s)))
    log(f"enrolling {[r.key for r in requests]} (task {s.task}, {s.steps} steps)")
    progress = Progress("enroll", len(requests), heartbeat_s=60.0)
    replies = exchange(
        grid,
        requests,
        s.timeout_train,
        on_wait=progress.waiting,
        audit=registry.audit,
        run_id=run_id,
        on_reply=lambda req, rep: progress.result(req.key, "reply" if rep.ok else rep.problem),
    )
    allow, ledger = _security(s, registry)
    checked = {req.key: check_submission(s, registry, req, replies[req.key], run_id, allow, ledger) for req in requests}
    results.update({site: res for site, res in checked.items() if isinstance(res, dict)})
    results.update(store_submissions(s, registry, {k: v for k, v in checked.items() if isinstance(v, Pending)}, run_id))
    report["enroll"] = results
    for site, res in sorted(results.items()):
        log(
            f"enroll {site}: {res['status']}"
            + (f" ({res.get('reason')})" if res.get("reason") else f" -> {res.get('record_id')}")
        )


@dataclass
class Pending:
    """A reply that passed the wire, identity, nonce and signature checks: the registry's turn."""

    submission: Any  # server.registry.Submission
    signed: bool
    sample_count: Any
    train_stats: Any


def accept_submission(
    s: Settings, registry: Any, req: Request, rep: Reply, run_id: str, allow: Any, ledger: Any
) -> dict[str, Any]:
    """Check one enrolment reply and store it (a batch of one: ``check_submission`` then
    ``store_submissions``)."""
    res = check_submission(s, registry, req, rep, run_id, allow, ledger)
    if isinstance(res, dict):
        return res
    return store_submissions(s, registry, {req.key: res}, run_id)[req.key]


def check_submission(
    s: Settings, registry: Any, req: Request, rep: Reply, run_id: str, allow: Any, ledger: Any
) -> dict[str, Any] | Pending:
    """Check one enrolment reply (vocabulary, identity, nonce, signature): a ``Pending`` submission
    for the registry, or the result entry of a reply refused here (audited: one entry).

    What arrived on the wire goes into the ONE audit entry of this submission: the registry's own
    submission.accepted / submission.rejected entry (``audit_fields``), or this function's rejection
    entry when the reply never reached the registry. ``server/crosscheck.py`` matches it against
    the site's egress line by record_digests, run_id and nonce.
    """
    from common.trust.digests import record_digests, z_sha256
    from server import allowlist as signing
    from server.registry import Submission

    site, nonce = req.key, req.nonce
    failure = rep.failure
    if failure is not None:
        registry.audit.append("submission.rejected", site=site, reason=str(failure)[:1000], run_id=run_id, nonce=nonce)
        return failed("error", failure)
    content = rep.content
    fields: dict[str, Any] = {
        "run_id": run_id,
        "nonce": nonce,
        "message_type": wire.ENROLL,
        "record_digests": None,
        "keep_previous": s.keep_previous,
    }
    try:
        fields["record_digests"] = record_digests({name: content[name] for name in content.keys()})
        payload = wire.parse_enroll_reply(content)
        meta = payload.meta
        fields.update(
            blob_sha256=meta["blob_sha256"],
            z_sha256=z_sha256(payload.z),
            signer=meta["signer"] or None,
            signature=meta["signature"] or None,
        )
        if meta["site"] != site:
            raise WireError(f"reply claims site {meta['site']!r} but came from {site!r}", "meta", "site")
        if meta["nonce"] != nonce:
            raise WireError("reply answers another request (nonce mismatch)", "meta", "nonce")
        if meta["task"] != s.task:  # issue 26 class 6: stored under a task nobody asked for, unbounded
            raise WireError(f"reply is for task {meta['task']!r} but the request asked for {s.task!r}", "meta", "task")
        if meta["signature"]:
            signing.authenticate_submission(
                allow,
                ledger,
                site,
                meta["signature"],
                meta["blob_sha256"],
                payload.z,
                _signed_fields(meta),
                run_id,
                nonce,
            )
        elif s.require_signatures:
            raise signing.SignatureError("unsigned submission, and this coordinator requires signatures")
        adapter = wire.adapter_from_wire(payload.arrays, payload.lora_config, meta["base_fingerprint"])
    except (WireError, signing.SigningError, ValueError) as exc:
        return _refused(registry, site, exc, fields)
    sub = Submission(adapter, payload.z, registry_meta(payload), meta["blob_sha256"], fields)
    return Pending(sub, bool(meta["signature"]), meta["sample_count"], payload.train_stats)


def _refused(registry: Any, site: str, exc: Exception, fields: dict[str, Any] | None) -> dict[str, Any]:
    """The result of a refused reply; ``fields``: write its rejection entry (None: the registry did)."""
    reason = f"{type(exc).__name__}: {exc}"
    if fields is not None:
        registry.audit.append("submission.rejected", site=site, reason=reason[:1000], **fields)
    return failed("rejected", SiteFailure("rejected", reason)) | {"error": type(exc).__name__}


def store_submissions(
    s: Settings, registry: Any, pending: dict[str, Pending], run_id: str
) -> dict[str, dict[str, Any]]:
    """Store the round's checked submissions as ONE registry commit (``Registry.add_submissions``:
    one fsynced append of the record lines, one of the audit entries, issue 29); each accepted
    one supersedes its site's earlier adapters unless ``keep-previous``. A storage failure
    refuses every submission of the batch, each with its own rejection entry."""
    from server.registry import RegistryError

    if not pending:
        return {}
    sites = list(pending)
    try:
        outcomes = registry.add_submissions([pending[k].submission for k in sites], supersede=not s.keep_previous)
    except RegistryError as exc:
        log(f"enroll: the batch of {len(sites)} submission(s) could not be stored: {exc}")
        return {k: _refused(registry, k, exc, dict(pending[k].submission.audit_fields)) for k in sites}
    out: dict[str, dict[str, Any]] = {}
    for site, oc in zip(sites, outcomes, strict=True):
        if oc.error is not None:  # rejected by the registry, which wrote its entry with the fields
            out[site] = _refused(registry, site, oc.error, None)
            continue
        p = pending[site]
        res: dict[str, Any] = {
            "status": "accepted",
            "record_id": oc.record.id,
            "blob_sha256": oc.record.blob_sha256,
            "signed": p.signed,
            "sample_count": p.sample_count,
            "train_stats": p.train_stats,
        }
        if not s.keep_previous:
            res["superseded"] = [r.id for r in oc.superseded]
        out[site] = res
    return out


def registry_meta(p: wire.EnrollPayload) -> dict[str, Any]:
    """The registry's metadata for a submission (no nonce/time, so a resubmission is idempotent)."""
    m = p.meta
    privacy = {k: v for k, v in p.privacy.items() if v is not None} or "none"
    return {
        "site": m["site"],
        "task": m["task"],
        "modality": m["modality"],
        "base_fingerprint": m["base_fingerprint"],
        "sample_count": m["sample_count"],
        "token_count": m["token_count"],
        "privacy": privacy,
        "extra": {
            "group": m["group"],
            "embedding_spec": p.embedding_spec,
            "lora_config": p.lora_config,
            "train_stats": {k: v for k, v in p.train_stats.items() if v is not None},
            "signer": m["signer"],
            "signature": m["signature"],
            "wire_schema": m["schema"],
        },
    }
