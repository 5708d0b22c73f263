"""Site commands for what a hospital receives: each family's own (``rpe generate`` for reports,
``rpe segment`` for images: ``Family.commands``) and ``rpe site status``.

Why on the client side: both run at the site, next to its reports, and read only the site's own
files — the composed adapter the coordinator delivered (``<site-dir>/adapters/<name>/``, see
``client/app.py``) and the site's egress log (``<site-dir>/egress.jsonl``) — so a site can use
and account for the federation without asking the coordinator anything.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

from common.families.base import CommandError

EGRESS_FILE = "egress.jsonl"  # client/app.py writes <site-dir>/egress.jsonl and <site-dir>/adapters/<name>/
ADAPTERS_DIR = "adapters"
PROVENANCE_FILE = "rpe-provenance.json"


#: a site command cannot run as asked (missing directory, unreadable adapter, bad data file)
SiteCommandError = CommandError


# -- rpe site status ----------------------------------------------------------------------------
def site_status(site_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """What this site released (egress log), the ε it spent, and the adapters it holds."""
    from common.privacy import read_egress, spent_from_egress

    root = Path(site_dir).expanduser()
    if not root.is_dir():
        raise SiteCommandError(f"site directory {root} does not exist; it is the SuperNode's node-config site-dir")
    egress_path = root / EGRESS_FILE
    lines = read_egress(egress_path) if egress_path.is_file() else []
    by_kind: Counter[str] = Counter()
    by_outcome: Counter[str] = Counter()
    for line in lines:
        by_kind[str(line.get("message_type"))] += 1
        by_outcome[str((line.get("extra") or {}).get("outcome", "ok"))] += 1
    spent = spent_from_egress(lines)
    adapters = []
    adir = root / ADAPTERS_DIR
    for d in sorted(adir.iterdir()) if adir.is_dir() else []:
        if not (d / "adapter_config.json").is_file():
            continue
        prov: dict[str, Any] = {}
        if (d / PROVENANCE_FILE).is_file():
            try:
                prov = json.loads((d / PROVENANCE_FILE).read_text())
            except ValueError:
                prov = {"error": f"{PROVENANCE_FILE} is not JSON"}
        from common.adapters.peft_io import read_peft_config  # lazy (torch); bounded reader, issue 26 class 9

        try:  # a hostile config is named, never a traceback
            cfg: dict[str, Any] = read_peft_config(d / "adapter_config.json")
        except ValueError as exc:
            cfg = {"r": f"unreadable adapter_config.json: {exc}"}
        received = prov.get("received_at")
        adapters.append(
            {
                "name": d.name,
                "kind": "own (trained here)" if d.name.startswith("own-") else "received",
                "strategy": prov.get("strategy"),
                "sources": prov.get("sources"),
                "weights": prov.get("weights"),
                "blob_sha256": prov.get("blob_sha256"),
                "rank": cfg.get("r"),
                "received_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(received)) if received else None,
            }
        )
    return {
        "site_dir": str(root),
        "egress_log": str(egress_path) if lines else None,
        "replies": len(lines),
        "by_message_type": dict(by_kind),
        "by_outcome": dict(by_outcome),
        "bytes_sent": sum(int(line.get("total_bytes") or 0) for line in lines),
        "last_reply": lines[-1].get("ts") if lines else None,
        "epsilon": spent.epsilon,
        "delta": spent.delta,
        "releases": len(spent.releases),
        "non_private": spent.non_private,
        "adapters": adapters,
    }


def format_status(s: dict[str, Any]) -> str:
    """The text ``rpe site status`` prints."""
    out = [f"site directory {s['site_dir']}"]
    if not s["replies"]:
        out.append("  egress log: none yet (this site has sent nothing)")
    else:
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(s["by_message_type"].items()))
        outcomes = ", ".join(f"{k}: {v}" for k, v in sorted(s["by_outcome"].items()))
        out.append(
            f"  sent {s['replies']} replies ({kinds}; {outcomes}), {s['bytes_sent']:,} bytes, last {s['last_reply']}"
        )
    eps = "∞ (some releases without differential privacy)" if math.isinf(s["epsilon"]) else f"{s['epsilon']:.3f}"
    out.append(f"  privacy: {s['releases']} data-derived release(s), ε spent = {eps} at δ = {s['delta']:g}")
    for np_ in s["non_private"][:5]:
        out.append(f"    not private: {np_}")
    if not s["adapters"]:
        out.append("  adapters: none stored")
    for a in s["adapters"]:
        src = ""
        if a["sources"]:
            w = a["weights"] or []
            src = " from " + ", ".join(
                f"{n} ({x:+.3f})" if isinstance(x, (int, float)) else str(n)
                for n, x in zip(a["sources"], w + [None] * (len(a["sources"]) - len(w)))
            )
        when = f", received {a['received_at']}" if a["received_at"] else ""
        strat = f" {a['strategy']}" if a["strategy"] else ""
        out.append(f"  adapter {a['name']}: {a['kind']}{strat}, rank {a['rank']}{src}{when}")
    return "\n".join(out)


def cmd_site_status(args: argparse.Namespace) -> None:
    s = site_status(args.site_dir)
    if args.json:
        print(json.dumps(s, default=str))
    else:
        print(format_status(s))


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add every family's site commands (``Family.commands``: e.g. ``generate``, ``segment``) and
    ``site status`` to the ``rpe`` sub-commands."""
    import importlib

    from common.families import family_names, get_family

    for name in family_names():
        family = get_family(name)
        if family.commands:
            module, _, attr = family.commands.partition(":")
            getattr(importlib.import_module(module), attr)(subparsers)
    s = subparsers.add_parser(
        "site",
        help="site-side views of the site's own files",
        description="Read only the site's own directory: nothing is sent anywhere.",
    )
    ssub = s.add_subparsers(dest="site_command", required=True, metavar="ACTION")
    st = ssub.add_parser(
        "status",
        help="what this site released, the ε it spent, the adapters it holds",
        description="From <site-dir>/egress.jsonl and <site-dir>/adapters/.",
    )
    st.add_argument("--site-dir", required=True, help="the SuperNode's node-config site-dir")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_site_status)
