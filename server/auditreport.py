"""``rpe audit report``: what the coordinator received from each site and what it did with it.

Built from the readable entries of one family's audit log (a damaged log is still reported, with
its problems listed first). Counts that an auditor compares with the sites' own numbers:

- ``registry``: records that entered (``submission.accepted`` that stored a new record, a bulk add
  or migration's ``count``, a ``registry.add``) and left (``registry.remove``) the registry;
- compositions by what happened to them: ``delivered`` (a ``composition.delivered`` to a site names
  its output hash), ``evaluation`` (an arm of a leave-one-site-out evaluation, never stored by the
  site), ``undelivered`` (the delivery failed) and ``local`` (composed by ``rpe compose``, sent to
  nobody); each with its ``update-norm`` record (``normalisation``: the mode and, for ``frobenius``,
  the reference norm and each retrieved adapter's norm and scale c_i; text and ``--json``) and
  its ``nearness`` check (the "nothing close enough" warning when the target was far from the
  library; text: the line ``rpe compose`` printed).
"""

from __future__ import annotations

import json
import os
from typing import Any

from common.adapters.normalise import describe_record
from server.audit import (
    EV_COMPOSITION,
    EV_QUERY_EMBEDDING,
    EV_REGISTRY_ADD,
    EV_REGISTRY_REMOVE,
    EV_SUBMISSION_ACCEPTED,
    EV_SUBMISSION_REJECTED,
    AuditLogCorruptError,
    head,
    read_entries,
    verify,
)
from server.nearness import summary as nearness_summary

_SUBMISSION_KEYS = ("record_id", "blob_sha256", "z_sha256", "bytes", "reason", "run_id", "privacy", "blob_encryption")


def _blank_site() -> dict[str, Any]:
    return {"accepted": 0, "rejected": 0, "bytes_accepted": 0, "bytes_rejected": 0, "submissions": []}


#: the order in which a composition's fate wins when several events name its output hash
_KIND_RANK = {"delivered": 3, "evaluation": 2, "undelivered": 1}


def _note_delivery(e: dict[str, Any], outcomes: dict[str, str]) -> None:
    """What a delivery event says of the compositions whose output hash it names."""
    arms = e.get("arms")
    delivered = e.get("event") == "composition.delivered"
    if isinstance(arms, list):  # a leave-one-site-out evaluation: every arm, none stored by the site
        hashes = [a.get("output_sha256") for a in arms if isinstance(a, dict)]
        kind = "evaluation"
    else:
        hashes = [e.get("output_sha256")]
        kind = "delivered" if delivered else "undelivered"
    for h in hashes:
        if isinstance(h, str) and _KIND_RANK[kind] > _KIND_RANK.get(outcomes.get(h, ""), 0):
            outcomes[h] = kind


def report(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What the coordinator received from each site and what each composition used.

    Returns ``{"path", "entries", "head", "problems": [str], "sites": {site: {...}},
    "compositions": [...], "registry": {"added", "removed"}, "queries": {site: count}}``.
    Per site: ``accepted``, ``rejected``, ``bytes_accepted``, ``bytes_rejected``,
    ``submissions`` (one dict per accepted/rejected event with seq, ts, status, record_id,
    blob_sha256, z_sha256, bytes, reason, run_id). The report is built from the readable entries
    even when ``verify`` finds problems; those are listed in ``problems`` so a damaged log is
    never reported as if it were clean.
    """
    sites: dict[str, dict[str, Any]] = {}
    compositions: list[dict[str, Any]] = []
    queries: dict[str, int] = {}
    query_privacy: dict[str, list[Any]] = {}
    registry = {"added": 0, "removed": 0}
    by_output: dict[str, list[dict[str, Any]]] = {}  # output hash -> the compositions made so far
    n = 0
    for _, e in read_entries(path):
        n += 1
        ev = e.get("event")
        if ev in (EV_SUBMISSION_ACCEPTED, EV_SUBMISSION_REJECTED):
            site = str(e.get("site"))
            s = sites.setdefault(site, _blank_site())
            status = "accepted" if ev == EV_SUBMISSION_ACCEPTED else "rejected"
            s[status] += 1
            size = e.get("bytes")
            if isinstance(size, int):
                s[f"bytes_{status}"] += size
            s["submissions"].append(
                {
                    "seq": e.get("seq"),
                    "ts": e.get("ts"),
                    "status": status,
                    **{k: e.get(k) for k in _SUBMISSION_KEYS},
                }
            )
        elif ev == EV_COMPOSITION:
            keys = (
                "target",
                "site",
                "strategy",
                "params",
                "retrieved",
                "distances",
                "weights",
                "adapter_sha256",
                "output_sha256",
                "z_sha256",
                "normalisation",  # update-norm: mode, reference, each adapter's norm and scale c_i
                "nearness",  # the "nothing close enough" check: ratio, threshold, warning, reason
            )
            compositions.append({"seq": e.get("seq"), "ts": e.get("ts"), **{k: e.get(k) for k in keys}})
            by_output.setdefault(str(e.get("output_sha256")), []).append(compositions[-1])
        elif ev == EV_QUERY_EMBEDDING:
            site = str(e.get("site"))
            queries[site] = queries.get(site, 0) + 1
            query_privacy.setdefault(site, []).append(e.get("privacy"))
        elif ev in ("composition.delivered", "composition.undelivered"):
            fate: dict[str, str] = {}  # output hash -> delivered / evaluation / undelivered
            _note_delivery(e, fate)
            for h, kind in fate.items():  # compositions made before the event, none already named by
                made = by_output.get(h, [])  # one: an identical adapter composed later stays local
                open_ = [c for c in made if "kind" not in c] or made[-1:]
                for c in open_ if kind == "evaluation" else open_[-1:]:  # a delivery: the run's own
                    if _KIND_RANK[kind] > _KIND_RANK.get(c.get("kind", ""), 0):
                        c["kind"] = kind
        if ev == EV_SUBMISSION_ACCEPTED and not e.get("duplicate"):
            registry["added"] += 1  # a resubmitted identical adapter stores nothing new
        elif ev in ("registry.bulk_add", "registry.migrate") and isinstance(e.get("count"), int):
            registry["added"] += int(e["count"])
        elif ev == EV_REGISTRY_ADD:
            registry["added"] += 1
        elif ev == EV_REGISTRY_REMOVE:
            registry["removed"] += 1
    for c in compositions:
        c.setdefault("kind", "local")
    try:
        current_head: dict[str, Any] | None = head(path)
    except (AuditLogCorruptError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        current_head = None
    return {
        "path": str(path),
        "entries": n,
        "head": current_head,
        "problems": [str(p) for p in verify(path)],
        "sites": sites,
        "compositions": compositions,
        "registry": registry,
        "queries": queries,
        "query_privacy": query_privacy,
    }


def privacy_text(privacy: Any) -> str:
    """One phrase for a release's privacy record (``common.privacy.release_record``)."""
    if not isinstance(privacy, dict):
        return "privacy not recorded" if privacy is None else f"privacy {privacy}"
    parts = []
    if privacy.get("dp_sgd"):
        parts.append(f"DP-SGD ε={privacy.get('epsilon', float('nan')):.3g}")
    if privacy.get("z_mechanism"):
        parts.append(f"z Gaussian ε={privacy.get('z_epsilon', float('nan')):.3g}")
    if not parts:
        return "not private"
    total = privacy.get("epsilon_total")
    tail = (
        f"; total ε={total:.3g} at δ={privacy.get('delta_total')}"
        if isinstance(total, (int, float))
        else "; part of it not private"
    )
    return ", ".join(parts) + tail


#: how ``format_report`` heads each kind of composition, in this order
COMPOSITION_KINDS = (
    ("delivered", "compositions delivered to a site"),
    ("evaluation", "evaluation compositions (leave-one-site-out arms; scored by the site, not stored)"),
    ("undelivered", "compositions whose delivery failed"),
    ("local", "compositions sent to no site (rpe compose, or a run that stopped)"),
)


def _num(value: Any, spec: str) -> str:
    """A number as ``format(value, spec)``; anything else (a forged entry) as it is."""
    try:
        return format(float(value), spec)
    except (TypeError, ValueError):
        return repr(value)


def format_report(rep: dict[str, Any]) -> str:
    """Human-readable text of ``report()`` for the CLI (``rpe audit report``)."""
    out = [f"audit log {rep['path']}: {rep['entries']} entries"]
    if rep["head"]:
        out.append(f"head: seq {rep['head']['seq']} line_sha256 {rep['head']['line_sha256']}")
    if rep["problems"]:
        out.append(f"INTEGRITY PROBLEMS ({len(rep['problems'])}):")
        out += [f"  {p}" for p in rep["problems"]]
    else:
        out.append("integrity: OK")
    for site, s in sorted(rep["sites"].items()):
        out.append(
            f"site {site}: {s['accepted']} accepted ({s['bytes_accepted']} bytes), "
            f"{s['rejected']} rejected ({s['bytes_rejected']} bytes)"
        )
        for sub in s["submissions"]:
            accepted = sub["status"] == "accepted"
            detail = (
                f"record {sub['record_id']}; {privacy_text(sub.get('privacy'))}"
                if accepted
                else f"reason: {sub['reason']}"
            )
            if accepted and sub.get("blob_encryption"):
                detail += f"; stored {sub['blob_encryption'].get('alg')} key {sub['blob_encryption'].get('key_id')}"
            out.append(f"  seq {sub['seq']} {sub['status']}: blob {sub['blob_sha256']} ({detail})")
    for kind, title in COMPOSITION_KINDS:
        group = [c for c in rep["compositions"] if c.get("kind", "local") == kind]
        if not group:
            continue
        out.append(f"{title}: {len(group)}")
        for c in group:
            out.append(f"composition seq {c['seq']} for {c['target']} ({c['strategy']}) -> {c['output_sha256']}")
            ids = list(c["retrieved"] or [])
            norm = describe_record(c.get("normalisation"), len(ids))
            out.append(f"  {norm['text']}")
            if near := nearness_summary(c.get("nearness")):
                out.append(f"  {near}")
            rows = zip(
                ids, c["distances"] or [], c["weights"] or [], c["adapter_sha256"] or [], norm["rows"], strict=False
            )
            for rid, dist, w, h, scaled in rows:
                shown = (
                    ""
                    if scaled["scale"] is None
                    else f", norm {_num(scaled['norm'], '.4g')}, scale {_num(scaled['scale'], '.4g')}"
                )
                out.append(f"  {rid}: weight {_num(w, '+.4f')}, distance {_num(dist, '.4g')}{shown}, blob {h}")
    if rep["queries"]:
        out.append("embedding queries: " + ", ".join(f"{k}: {v}" for k, v in sorted(rep["queries"].items())))
        for site, items in sorted(rep.get("query_privacy", {}).items()):
            kinds = sorted({privacy_text(p) for p in items})
            out.append(f"  {site}: {'; '.join(kinds)}")
    out.append(f"registry: {rep['registry']['added']} added, {rep['registry']['removed']} removed")
    return "\n".join(out)
