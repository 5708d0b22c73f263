"""The site's Flower ClientApp: the only code that touches a hospital's data (of any task family).

Every message passes one gate (:func:`serve`): the request is checked against the vocabulary
first (``wire.parse_request``), its handler runs (``client/handlers.py``), and the reply is
checked last (``wire.check_reply``): a request for anything else - an unknown message type, an
extra record, an unknown config key - is refused with an error reply and nothing else leaves the
site. Every reply, refusals included, appends one line to the site's egress log (fsynced) before it is
sent; if that write fails nothing of the reply is sent and nothing of the release is kept (``_send``).
Refusals by the site's release policy carry their code (``refused [subset-refused]: ...``).
The site's settings (node config, data, privacy policy): ``client/site.py``.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from client.handlers import HANDLERS
from client.handlers import apply as _apply
from client.handlers import embed as _embed
from client.handlers import enroll as _enroll
from client.handlers import whoami as _whoami
from client.policy import ReleaseRefused
from client.site import Site, SiteData, SiteError, load_site_data, site_from_context
from common.protocol import wire
from common.protocol.wire import WireError

__all__ = [
    "HANDLERS",
    "Site",
    "SiteData",
    "SiteError",
    "_apply",
    "_embed",
    "_enroll",
    "_whoami",
    "app",
    "load_site_data",
    "serve",
    "site_from_context",
]


# -- the gate every message passes -------------------------------------------------------------
def _egress(site: Site | None, message: Message, reply: Message, outcome: str, reason: str = "") -> None:
    """One egress-log line per reply (refusals and failures included, with no records)."""
    if site is None:
        return
    from client.egress import EgressLog
    from common.trust.digests import z_sha256

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


def _send(site: Site | None, message: Message, reply: Message, outcome: str, reason: str = "") -> Message:
    """The reply, once its egress line is written and fsynced; if that write fails, an error reply
    that carries nothing (no records, no reason from the handler) and nothing of the release is kept.

    Why so strict: a reply whose line is missing is a release the site's privacy budget never
    counts (a site with budget 1.2 once released ε ≈ 1.47 that way)."""
    if reply.has_error():  # no local path leaves the site, whoever built the error (client/release.py)
        from client.release import scrub_paths

        reason = scrub_paths(reason, site)
        reply = _error_reply(message, reply.error.code, scrub_paths(reply.error.reason, site))
    try:
        _egress(site, message, reply, outcome, reason)
    except Exception as exc:  # noqa: BLE001 - whatever broke the write, the content must not leave
        if site is not None:
            site.after_logged.clear()
        print(f"[rpe site] egress log write failed, reply withheld: {type(exc).__name__}: {exc}", flush=True)
        return _error_reply(message, wire.ERROR_FAILED, "the site could not write its egress log; nothing was sent")
    if site is not None:
        for done in site.after_logged:
            done()
        site.after_logged.clear()
    return reply


def limit_threads(n: int) -> None:
    """At most ``n`` torch/BLAS threads in this process, without importing torch for it: a ClientApp
    process answers one message, and a handler that never needs torch (``query.whoami``, in every run
    at every site) must not pay its import. If torch is loaded already, its thread count is set;
    otherwise the OpenMP/MKL variables are, which torch reads when a handler first imports it."""
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
    else:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(n)


def serve(message: Message, context: Context) -> Message:
    """Validate the request, run its handler, validate the reply, log it, send it."""
    mtype = message.metadata.message_type
    site: Site | None = None
    try:
        site = site_from_context(context)
        req = wire.parse_request(mtype, message.content if message.has_content() else RecordDict())
    except (WireError, SiteError) as exc:
        return _send(site, message, _error_reply(message, wire.ERROR_REFUSED, f"refused: {exc}"), "refused", str(exc))
    try:
        if site.threads > 0:
            limit_threads(site.threads)
        content = HANDLERS[mtype](req, site, context)
        wire.check_reply(mtype, content)  # the last gate before anything leaves the site
    except WireError as exc:
        site.after_logged.clear()
        return _send(site, message, _error_reply(message, wire.ERROR_REFUSED, f"refused: {exc}"), "refused", str(exc))
    except ReleaseRefused as exc:  # the site's own policy: typed, with its code
        site.after_logged.clear()
        reason = f"refused [{exc.code}]: {exc.reason}"
        return _send(site, message, _error_reply(message, wire.ERROR_REFUSED, reason), "refused", reason)
    except Exception as exc:  # noqa: BLE001 - any failure becomes an error reply, never data
        # only the exception type and the first line of its message (capped) leave the site; the
        # traceback stays in the SuperNode's log
        site.after_logged.clear()
        first = (str(exc).splitlines() or [""])[0]
        reason = f"{type(exc).__name__}: {first[:300]}"
        print(f"[rpe site {site.site}] {mtype} failed:\n{traceback.format_exc()}", flush=True)
        return _send(site, message, _error_reply(message, wire.ERROR_FAILED, reason), "failed", reason)
    # logged and fsynced before it is sent: a failed write sends nothing
    return _send(site, message, Message(content, reply_to=message), "ok")


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


@app.train("evaluate")
def evaluate(message: Message, context: Context) -> Message:
    """Score every arm of one leave-one-site-out target (``client/arms.py``); metrics only."""
    return serve(message, context)
