"""How the ServerApp talks to sites: the resend protocol (:func:`exchange`) and site discovery.

Every mode builds its requests as :class:`Request` s, hands them to :func:`exchange` and gets one
:class:`Reply` per request back; a reply that is not a usable answer carries a typed
:class:`SiteFailure` (a kind and the Flower error code) that the modes report, so nothing downstream
matches strings.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from common.protocol import wire
from common.protocol.wire import WireError
from common.trust.digests import record_digests
from common.trust.nodekey import NodeKeyError, node_key_fingerprint, node_verify
from common.trust.signing import SigningError
from common.trust.statements import StatementError, statement_digest, verify_statement
from server.allowlist import AllowList, unsigned_claim_refusal
from server.allowlist import make_nonce as allowlist_make_nonce
from server.audit import AuditLog

#: Flower's error code for a node that is not connected
ERROR_NODE_UNAVAILABLE = 5


_RUN_LOGS: list[TextIO] = []


def log(msg: str) -> None:
    """ServerApp output: ``flwr log`` / ``flwr run --stream`` show it, and the run's own log file
    (:func:`run_log`), which ``deploy/demo.py`` follows while the run is in flight."""
    line = f"[rpe] {msg}"
    print(line, flush=True)
    for fh in _RUN_LOGS:
        fh.write(line + "\n")
        fh.flush()


@contextlib.contextmanager
def run_log(path: Path) -> Iterator[None]:
    """Also append every :func:`log` line to ``path`` (``<registry>/runs/<run id>-<mode>.log``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        _RUN_LOGS.append(fh)
        try:
            yield
        finally:
            _RUN_LOGS.remove(fh)


def make_nonce() -> str:
    """A fresh submission nonce (``server.allowlist.make_nonce``: its time is checked at acceptance)."""
    return allowlist_make_nonce()


@dataclass(frozen=True)
class SiteFailure:
    """Why a site's answer is not usable. ``kind``: timeout | refused | failed | offline | error |
    invalid (answered, but not what the vocabulary allows) | rejected (valid, but refused here)."""

    kind: str
    reason: str
    code: int | None = None

    def __str__(self) -> str:
        if self.kind == "timeout":
            return "timeout: no reply in time (site offline or too slow)"
        if self.code is not None:
            return f"{self.kind} (code {self.code}): {self.reason}"
        return self.reason


_ERROR_KINDS = {wire.ERROR_REFUSED: "refused", wire.ERROR_FAILED: "failed", ERROR_NODE_UNAVAILABLE: "offline"}


@dataclass(frozen=True)
class Request:
    """One message to one site: ``key`` names it in the results (a site id, or ``target|arm``)."""

    key: str
    node_id: int
    message_type: str
    content: RecordDict
    nonce: str


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
    def failure(self) -> SiteFailure | None:
        """None when the site answered with content; else the typed reason."""
        if self.message is None:
            return SiteFailure("timeout", "no reply in time (site offline or too slow)")
        if self.message.has_error():
            err = self.message.error
            return SiteFailure(_ERROR_KINDS.get(err.code, "error"), err.reason, err.code)
        return None

    @property
    def problem(self) -> str:
        failure = self.failure
        return "" if failure is None else str(failure)

    @property
    def content(self) -> RecordDict:
        assert self.message is not None
        return self.message.content


def request(
    key: str, node_id: int, message_type: str, config: dict[str, Any], adapter: Any = None, nonce: str = ""
) -> Request:
    """A validated request with a fresh nonce (or ``nonce``, made by the caller) put into its config."""
    nonce = nonce or make_nonce()
    content = wire.build_request(message_type, {"nonce": nonce, **config}, adapter)
    return Request(key, node_id, message_type, content, nonce)


#: the first pause between two pulls for replies; each pull that brings nothing makes the next pause
#: POLL_GROWTH times longer, up to ``exchange``'s ``poll_s``: a quick answer (a whoami, a z) is seen
#: within a fraction of a second, a long training is asked about every ``poll_s``
FIRST_POLL_S = 0.25
POLL_GROWTH = 1.5

#: what this process's exchanges did (one ServerApp process = one run; the run report's ``messages``):
#: ``sent`` requests pushed once, ``resent`` re-pushed after a loss, ``probes`` liveness probes,
#: ``replies`` answers matched to a request, ``error_replies`` those that carry an error, ``unanswered``
#: requests without any answer when their exchange ended, ``push_refused`` pushes the SuperLink refused
_COUNTS = dict.fromkeys(("sent", "resent", "probes", "replies", "error_replies", "unanswered", "push_refused"), 0)


#: the coordinator's setting (environment of the SuperLink, inherited by every ServerApp): at most this
#: many sites hold a message of one exchange at a time (0 or unset: no limit). Why: each message a site
#: takes makes its SuperNode start a ClientApp process and, for training, send its adapter back at
#: about the same time as every other site; a bound keeps the SuperLink's burst of replies (and, with
#: many SuperNodes on one machine, the ClientApps' memory) bounded, at the price of a longer round.
MAX_SITES_ENV = "RPE_MAX_SITES_IN_FLIGHT"


def max_sites_in_flight() -> int:
    """:data:`MAX_SITES_ENV` as a number (0: no limit); a value that is not a whole number >= 0 is an error."""
    raw = os.environ.get(MAX_SITES_ENV, "").strip()
    if not raw:
        return 0
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"${MAX_SITES_ENV}={raw!r}: expected a whole number of sites >= 0 (0 = no limit)")
    return value


def message_counts() -> dict[str, int]:
    """The counts of every :func:`exchange` in this process so far (see :data:`_COUNTS`)."""
    return dict(_COUNTS)


def exchange(
    grid: Grid,
    requests: list[Request],
    timeout: float,
    max_in_flight: int = 2,
    max_resends: int = 2,
    poll_s: float = 2.0,
    on_reply: Callable[[Request, Reply], None] | None = None,
    on_wait: Callable[[], None] | None = None,
    probe_after: float = 45.0,
    audit: AuditLog | None = None,
    run_id: str = "",
) -> dict[str, Reply]:
    """Push the requests; collect replies until ``timeout``; ``on_reply`` sees each as it arrives and
    ``on_wait`` is called before every pause (progress lines, ``server/reporting.py``).

    The pause between two pulls starts at :data:`FIRST_POLL_S` and grows while nothing arrives, up
    to ``poll_s``. Replies are matched to requests by message id (an error reply from the SuperLink carries the
    SuperLink's node id, not the site's). Messages live only ``timeout`` + 60 s at the SuperLink, so
    a request that timed out is not executed hours later.

    Why not push everything at once: a SuperNode handles one message at a time anyway, and under
    load Flower 1.41's SuperLink can answer a SuperNode's pull with "database is locked" after it
    has already handed the message out, and that message is then lost (seen with 28 adapters in
    flight on two cores). So at most ``max_in_flight`` messages per site are outstanding (and, with
    ``$RPE_MAX_SITES_IN_FLIGHT``, at most that many sites hold one at a time), and a
    message is re-sent (at most ``max_resends`` times) when it is provably lost: the site answered
    a message sent *after* it. A SuperNode takes its messages one at a time, oldest first, so a
    site that has been quiet for ``probe_after`` seconds (or twice its longest answer so far, if
    longer) gets a probe, a cheap ``query.whoami`` pushed behind what it holds: a busy site answers
    the probe only after its real work, while a site whose message (or reply) was lost answers the
    probe first, and the lost message is re-sent at once instead of after a long silence. A probe
    that itself goes unanswered is replaced after the same interval. With ``audit``, every answered
    probe is audited (``probe.answered``), so that ``rpe audit cross-check`` finds the site's reply
    on the coordinator's side too. Duplicates are harmless: the first reply wins, and every request
    carries its own nonce.
    """
    out = {r.key: Reply(r.key, None, r.nonce) for r in requests}
    if not requests:
        return out
    queues: dict[int, list[int]] = {}
    for i, r in enumerate(requests):
        queues.setdefault(r.node_id, []).append(i)
    in_flight: dict[str, int] = {}  # message id -> request index
    push_seq: dict[int, int] = {}
    sent_at: dict[int, float] = {}
    resends: dict[int, int] = {}
    done: set[int] = set()
    last_reply: dict[int, float] = {}
    took: dict[int, list[float]] = {}
    counter = iter(range(1 << 62))
    deadline = time.monotonic() + timeout
    probes: dict[str, tuple[Request, int, float]] = {}  # message id -> (probe, push seq, sent at)
    newest_done: dict[int, int] = {}  # node -> push seq of its newest answered request
    site_cap = max_sites_in_flight()

    def push(indices: list[int]) -> None:
        msgs = [
            Message(
                requests[i].content,
                dst_node_id=requests[i].node_id,
                message_type=requests[i].message_type,
                ttl=timeout + 60.0,
            )
            for i in indices
        ]
        for i, mid in zip(indices, grid.push_messages(msgs)):
            if mid:
                _COUNTS["resent" if i in push_seq else "sent"] += 1
                in_flight[mid] = i
                push_seq[i] = next(counter)
                sent_at[i] = time.monotonic()
            else:
                _COUNTS["push_refused"] += 1

    def probe(node: int) -> None:
        ask = request(f"probe:{node}", node, wire.WHOAMI, {"challenge": secrets.token_hex(32)})
        msg = Message(ask.content, dst_node_id=node, message_type=ask.message_type, ttl=timeout + 60.0)
        for mid in grid.push_messages([msg]):
            if mid:
                _COUNTS["probes"] += 1
                probes[mid] = (ask, next(counter), time.monotonic())
                if audit is not None:  # its reply may come after the main one, unawaited: cross-check expects it
                    audit.append(
                        "probe.sent",
                        site=None,
                        node_id=str(node),
                        run_id=run_id,
                        nonce=ask.nonce,
                        message_type=wire.WHOAMI,
                    )

    def lost_before(node: int, seq: int) -> list[str]:
        """In-flight messages of ``node`` pushed before ``seq``: the site answered something newer."""
        return [
            m
            for m, i in in_flight.items()
            if requests[i].node_id == node and push_seq[i] < seq and resends.get(i, 0) < max_resends
        ]

    def fill() -> None:
        batch = []
        active_of: dict[int, int] = {}
        for i in in_flight.values():
            active_of[requests[i].node_id] = active_of.get(requests[i].node_id, 0) + 1
        busy = sum(1 for a in active_of.values() if a)
        for node, queue in queues.items():
            active = active_of.get(node, 0)
            if queue and not active and site_cap and busy >= site_cap:
                continue  # this site waits until another one has answered everything it held
            busy += int(bool(queue) and not active)
            while queue and active < max_in_flight:
                batch.append(queue.pop(0))
                active += 1
        if batch:
            push(batch)

    fill()
    quiet = 0  # pulls in a row that brought nothing: the pause grows from FIRST_POLL_S up to poll_s
    while (in_flight or any(queues.values())) and time.monotonic() < deadline:
        lost: list[str] = []
        pulled = list(grid.pull_messages([*in_flight, *probes]))
        quiet = 0 if pulled else quiet + 1
        for message in pulled:
            answered = probes.pop(message.metadata.reply_to_message_id, None)
            if answered is not None:
                ask, seq, _ = answered
                last_reply[ask.node_id] = time.monotonic()
                lost += [m for m in lost_before(ask.node_id, seq) if m not in lost]
                if audit is not None:
                    _audit_probe(audit, ask, Reply(ask.key, message, ask.nonce), run_id)
                continue
            i = in_flight.pop(message.metadata.reply_to_message_id, None)
            if i is None or i in done:
                continue
            done.add(i)
            reply = out[requests[i].key]
            reply.message = message
            _COUNTS["replies"] += 1
            _COUNTS["error_replies"] += int(message.has_error())
            node, now = requests[i].node_id, time.monotonic()
            newest_done[node] = max(newest_done.get(node, -1), push_seq[i])
            took.setdefault(node, []).append(now - max(sent_at[i], last_reply.get(node, 0.0)))
            last_reply[node] = now
            if on_reply is not None:
                on_reply(requests[i], reply)
        for mid in [m for m, i in in_flight.items() if i in done]:
            del in_flight[mid]
        now = time.monotonic()
        for mid, i in in_flight.items():
            overtaken = newest_done.get(requests[i].node_id, -1) > push_seq[i]
            if overtaken and resends.get(i, 0) < max_resends and mid not in lost:
                lost.append(mid)
        waiting: dict[int, float] = {}
        for mid, i in in_flight.items():
            if mid not in lost:
                node = requests[i].node_id
                waiting[node] = min(waiting.get(node, now), sent_at[i])
        for node, since in waiting.items():
            patience = max(probe_after, 2 * max(took.get(node, [0.0])))
            mine = [sent for ask, _, sent in probes.values() if ask.node_id == node]
            if now - max(since, last_reply.get(node, 0.0), *mine) > patience:
                probe(node)
        for mid in lost:
            i = in_flight.pop(mid, None)
            if i is None or i in done:
                continue
            resends[i] = resends.get(i, 0) + 1
            log(
                f"message for {requests[i].key!r} was lost between the SuperLink and the site; re-sending "
                f"({resends[i]}/{max_resends})"
            )
            push([i])
        fill()
        if in_flight or any(queues.values()):
            if on_wait is not None:
                on_wait()
            pause = min(poll_s, FIRST_POLL_S * POLL_GROWTH**quiet)
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
    _COUNTS["unanswered"] += sum(1 for r in out.values() if r.message is None)
    return out


def _audit_probe(audit: AuditLog, ask: Request, rep: Reply, run_id: str) -> None:
    """``probe.answered`` for a liveness probe's reply, under the site the reply names (if any)."""
    site = None
    if rep.ok:
        try:
            site = wire.parse_whoami_reply(rep.content)["site"]
        except WireError:
            site = None
    audit_reply(audit, "probe.answered", ask, rep, run_id, site, node_id=str(ask.node_id))


def audit_reply(
    audit: AuditLog, event: str, req: Request, rep: Reply, run_id: str, site: str | None, **fields: Any
) -> None:
    """One audit entry for one site reply (or its absence), with what ``rpe audit cross-check``
    matches it on: run id, nonce, message type and, when the reply carried records, their digests."""

    digests = None
    if rep.message is not None and rep.message.has_content():
        digests = record_digests({n: rep.content[n] for n in rep.content.keys()})
    audit.append(
        event,
        site=site,
        run_id=run_id,
        nonce=req.nonce,
        message_type=req.message_type,
        record_digests=digests,
        **fields,
    )


@dataclass
class SiteInfo:
    """An online site bound to its node for this run: its id, its Flower node id, what its whoami
    said, and whether the claim was proved with the site's allow-listed key (``verified``)."""

    site: str
    node_id: int
    info: dict[str, Any] = field(default_factory=dict)
    verified: bool = False


class IdentityRefused(Exception):
    """A node's claim to be a site does not hold (unsigned where signatures are required, signed
    by another key, for another run or challenge, or for another node)."""


def verify_identity(
    info: dict[str, Any], node_id: int, run_id: str, challenge: str, allow: AllowList | None, require: bool
) -> bool:
    """True if the whoami's identity statement proves the claimed site; False if it is unsigned and
    unsigned claims are allowed here; :class:`IdentityRefused` otherwise. Sets ``info["node_bound"]``
    when the proof includes the site's recorded SuperNode key (:func:`check_node_binding`)."""

    site, raw = info["site"], info.get("identity", "")
    if not raw:
        bound = unsigned_claim_refusal(allow, site, node_id)  # issue 26 class 7: never behind the switch
        if bound is not None:
            raise IdentityRefused(bound)
        if require:
            raise IdentityRefused(
                f"node {node_id} claims site {site!r} without a signed identity statement, "
                "and this coordinator requires signatures: give the site its key "
                "(rpe keygen on the site, then rpe allowlist add on the coordinator)"
            )
        return False
    if allow is None or site not in allow:
        raise IdentityRefused(
            f"node {node_id} claims site {site!r}, which is not on the allow-list (rpe allowlist add)"
        )
    try:
        statement = json.loads(raw)
        node_sig = statement.pop("node_signature", None) if isinstance(statement, dict) else None
        body = verify_statement(
            allow.get(site), statement, "identity", expect={"site": site, "run_id": run_id, "challenge": challenge}
        )
    except (ValueError, StatementError, SigningError) as exc:
        raise IdentityRefused(f"node {node_id} claims site {site!r}: {exc}") from None
    if body.get("node_id") not in ("", str(node_id)):
        raise IdentityRefused(
            f"node {node_id} claims site {site!r} with a statement made by node "
            f"{body.get('node_id')} (relayed or replayed)"
        )
    info["node_bound"] = check_node_binding(allow, site, node_id, body, node_sig)
    return True


def check_node_binding(allow: AllowList, site: str, node_id: int, body: dict[str, Any], node_sig: Any) -> bool:
    """True when ``site``'s identity is bound to its recorded SuperNode key (``server.allowlist.NodeKeys``);
    False when the coordinator records no SuperNode keys at all; :class:`IdentityRefused` otherwise.

    Once any SuperNode key is recorded, every claimed site must have one, the statement must be
    made by node ``node_id`` (the node the reply came from) and name that key, and its
    ``node_signature`` must verify with it: only the holder of the SuperNode key the SuperLink
    authenticates the site's node by can be bound to the site.
    """

    records = allow.node_keys
    if not records.sites():
        return False
    key = records.get(site)
    if key is None:
        raise IdentityRefused(
            f"node {node_id} claims site {site!r}, for which no SuperNode key is recorded "
            f"in {records.path} (register the site's SITE_auth.pub: python -m deploy.launch "
            "register)"
        )
    if body.get("node_id") != str(node_id):
        raise IdentityRefused(f"node {node_id} claims site {site!r} with a statement that names no node")
    if body.get("supernode_key") != node_key_fingerprint(key):
        raise IdentityRefused(
            f"node {node_id} claims site {site!r} but does not present the SuperNode key "
            f"recorded for it ({node_key_fingerprint(key)[:16]}…)"
        )
    try:
        node_verify(key, statement_digest("identity", body), node_sig)
    except NodeKeyError as exc:
        raise IdentityRefused(f"node {node_id} claims site {site!r}: {exc}") from None
    return True


def discover(
    grid: Grid,
    timeout: float,
    report: dict[str, Any],
    run_id: str = "",
    allow: AllowList | None = None,
    require_signatures: bool = False,
    audit: AuditLog | None = None,
) -> dict[str, SiteInfo]:
    """Ask every online node who it is and bind each proved site id to its node for this run.

    Each ``query.whoami`` carries a fresh challenge; the site answers with an identity statement
    signed by its allow-listed key (``client/handlers.py``). A node whose claim does not verify, or
    that claims a site another node claims too, is refused, reported and (with ``audit``) audited
    as ``identity.refused``; nothing for that site goes to it. Two nodes that both prove the same
    site (a copied key) are both refused: there is no telling which is the site.
    """
    requests = [
        request(str(node), node, wire.WHOAMI, {"challenge": secrets.token_hex(32)})
        for node in sorted(grid.get_node_ids())
    ]
    challenges = {r.key: r.content["config"]["challenge"] for r in requests}
    replies = exchange(grid, requests, timeout, audit=audit, run_id=run_id)
    claims: dict[str, list[SiteInfo]] = {}
    problems: dict[str, str] = {}
    digests: dict[int, dict[str, str]] = {}

    def refuse(where: str, node: int, site: str | None, reason: str, nonce: str) -> None:
        problems[where] = reason
        if audit is not None:
            audit.append(  # never under the claimed site's name: an impostor's claim is not that site's reply
                "identity.refused",
                site=None,
                claimed_site=site,
                node_id=str(node),
                reason=reason[:1000],
                run_id=run_id,
                nonce=nonce,
                message_type=wire.WHOAMI,
                record_digests=digests.get(node),
            )

    for req in requests:
        rep, where = replies[req.key], f"node {req.node_id}"
        if not rep.ok:
            problems[where] = rep.problem
            continue
        digests[req.node_id] = record_digests({n: rep.content[n] for n in rep.content.keys()})
        try:
            info = wire.parse_whoami_reply(rep.content)
        except WireError as exc:
            refuse(where, req.node_id, None, f"invalid whoami reply: {exc}", req.nonce)
            continue
        if info["nonce"] != req.nonce:
            refuse(where, req.node_id, info["site"], "whoami reply answers another request (nonce mismatch)", req.nonce)
            continue
        try:
            verified = verify_identity(info, req.node_id, run_id, challenges[req.key], allow, require_signatures)
        except IdentityRefused as exc:
            refuse(where, req.node_id, info["site"], str(exc), req.nonce)
            continue
        claims.setdefault(info["site"], []).append(SiteInfo(info["site"], req.node_id, info, verified))
    sites: dict[str, SiteInfo] = {}
    for site, cands in claims.items():
        proved = [c for c in cands if c.verified]
        keep = proved[0] if len(proved) == 1 else cands[0] if len(cands) == 1 else None
        for c in cands:
            if c is keep:
                continue
            other = keep.node_id if keep is not None else [x.node_id for x in cands if x is not c]
            refuse(
                f"node {c.node_id}",
                c.node_id,
                site,
                f"node {c.node_id} claims site {site!r}, which node(s) {other} also claim; the claim is refused",
                c.info["nonce"],
            )
        if keep is not None:
            sites[site] = keep
            if audit is not None:
                audit.append(
                    "identity.verified" if keep.verified else "identity.unverified",
                    site=site,
                    node_id=str(keep.node_id),
                    node_bound=bool(keep.info.get("node_bound")),
                    run_id=run_id,
                    nonce=keep.info["nonce"],
                    message_type=wire.WHOAMI,
                    record_digests=digests.get(keep.node_id),
                )
    report["online"] = {
        s: {
            "node_id": str(i.node_id),
            "n_examples": i.info["n_examples"],
            "n_labeled": i.info["n_labeled"],
            "n_eval": i.info["n_eval"],
            "data_ok": i.info["data_ok"],
            "groups": i.info["groups"],
            "verified": i.verified,
            "node_bound": bool(i.info.get("node_bound")),
        }
        for s, i in sorted(sites.items())
    }
    if problems:
        report["discovery_problems"] = problems
    log(f"online sites: {sorted(sites)}" + (f"; problems: {problems}" if problems else ""))
    return sites
