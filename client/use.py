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
#: what a site's own processes write into its directory: one of them marks a folder as a site
SITE_MARKERS = (EGRESS_FILE, ADAPTERS_DIR, "keys", "node-config.toml", "join-request.json")
NODE_CONFIG_FILE = "node-config.toml"


def resolve_site_dir(
    site_dir: str | os.PathLike[str] | None = None, dir_: str | os.PathLike[str] | None = None
) -> Path:
    """The site directory ``rpe site status`` reads: ``--site-dir`` (the node config's ``site-dir``)
    as given, or the site directory of ``--dir`` (the folder of ``rpe site init``): its own
    ``node-config.toml``'s ``site-dir``, else the one site ``deploy.launch`` keeps under it
    (``sites/<id>/``), else the folder itself. A folder that holds nothing a site writes
    (``SITE_MARKERS``) is refused, so a wrong path never reads as "this site has sent nothing"."""
    if (site_dir is None) == (dir_ is None):
        raise SiteCommandError("give the site as --dir S (the folder of `rpe site init`) or --site-dir, not both")
    root = Path(site_dir if site_dir is not None else dir_).expanduser()  # type: ignore[arg-type]
    if not root.is_dir():
        what = "the SuperNode's node-config site-dir" if site_dir is not None else "the folder of `rpe site init --dir`"
        raise SiteCommandError(f"site directory {root} does not exist; it is {what}")
    if dir_ is not None:
        root = _site_dir_under(root)
    if not any((root / m).exists() for m in SITE_MARKERS):
        raise SiteCommandError(
            f"{root} is not a site directory: it holds none of {', '.join(SITE_MARKERS)} (what a site's "
            "SuperNode and `rpe site init` write). Pass --dir S, the folder of `rpe site init`, or --site-dir, "
            "the site-dir of the SuperNode's node config"
        )
    return root


def _site_dir_under(root: Path) -> Path:
    """The site directory a ``rpe site init`` / ``deploy.launch`` folder names (see ``resolve_site_dir``)."""
    configs = [root / NODE_CONFIG_FILE] if (root / NODE_CONFIG_FILE).is_file() else []
    if not configs and (root / "sites").is_dir():
        configs = sorted((root / "sites").glob(f"*/{NODE_CONFIG_FILE}"))
        if len(configs) > 1:
            names = ", ".join(c.parent.name for c in configs)
            raise SiteCommandError(
                f"{root} holds several sites ({names}); pass --site-dir {root}/sites/<id> for one of them"
            )
    for cfg in configs:
        try:
            named = load_toml(cfg.read_text(encoding="utf-8")).get("site-dir")
        except (OSError, ValueError) as exc:
            raise SiteCommandError(f"{cfg}: not a readable node config ({exc})") from None
        if isinstance(named, str) and named:
            path = Path(named).expanduser()
            return path if path.is_absolute() else (cfg.parent / path)
        return cfg.parent
    return root


def load_toml(text: str) -> dict[str, Any]:
    """A TOML document (``tomllib``; ``tomli`` on Python 3.10); a syntax error is a ``ValueError``."""
    try:
        import tomllib  # type: ignore[import-not-found, unused-ignore]
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef, unused-ignore]
    return dict(tomllib.loads(text))


def _as_list(value: Any) -> list[Any] | None:
    """A provenance list: a list, or (files written before the fix) the JSON text of one as the
    delivery carried it, or comma-separated text; None when absent."""
    if value is None or isinstance(value, list):
        return value
    if isinstance(value, str):
        try:
            got = json.loads(value)
        except ValueError:
            return [v.strip() for v in value.split(",") if v.strip()]
        return got if isinstance(got, list) else [got]
    return [value]


def read_provenance(path: Path) -> dict[str, Any]:
    """A received adapter's ``rpe-provenance.json``, its ``sources`` and ``weights`` as lists (older
    sites stored them as the JSON text the delivery carried) and numbers as numbers."""
    try:
        prov = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return {"error": f"{PROVENANCE_FILE} is not readable JSON ({exc})"}
    if not isinstance(prov, dict):
        return {"error": f"{PROVENANCE_FILE} is not a JSON object"}
    sources, weights = _as_list(prov.get("sources")), _as_list(prov.get("weights"))
    prov["sources"] = [str(x) for x in sources] if sources is not None else None
    if weights is not None:
        out: list[Any] = []
        for w in weights:
            try:
                out.append(float(w))
            except (TypeError, ValueError):
                out.append(None)
        prov["weights"] = out
    if not isinstance(prov.get("received_at"), (int, float)):
        prov["received_at"] = None
    return prov


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float made valid JSON: ∞ as ``"inf"``, NaN as ``null``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def site_status(
    site_dir: str | os.PathLike[str] | None = None, *, dir_: str | os.PathLike[str] | None = None
) -> dict[str, Any]:
    """What this site released (egress log), the ε it spent, and the adapters it holds."""
    from common.privacy import read_egress, spent_from_egress

    root = resolve_site_dir(site_dir, dir_)
    egress_path = root / EGRESS_FILE
    try:
        lines = read_egress(egress_path) if egress_path.is_file() else []
    except ValueError as exc:
        raise SiteCommandError(str(exc)) from None
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
        prov = read_provenance(d / PROVENANCE_FILE) if (d / PROVENANCE_FILE).is_file() else {}
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
                "task": prov.get("task") or (d.name[4:] if d.name.startswith("own-") else None),
                "strategy": prov.get("strategy"),
                "sources": prov.get("sources"),
                "weights": prov.get("weights"),
                "blob_sha256": prov.get("blob_sha256"),
                "rank": cfg.get("r"),
                "received_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(received)) if received else None,
                **({"error": prov["error"]} if "error" in prov else {}),
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
            w = list(a["weights"] or [])
            src = " from " + ", ".join(
                f"{n} ({x:+.3f})" if isinstance(x, (int, float)) else str(n)
                for n, x in zip(a["sources"], w + [None] * (len(a["sources"]) - len(w)), strict=False)
            )
        when = f", received {a['received_at']}" if a["received_at"] else ""
        strat = f" {a['strategy']}" if a["strategy"] else ""
        task = f" ({a['task']})" if a.get("task") else ""
        out.append(f"  adapter {a['name']}: {a['kind']}{strat}{task}, rank {a['rank']}{src}{when}")
        if a.get("error"):
            out.append(f"    {a['error']}")
    return "\n".join(out)


def cmd_site_status(args: argparse.Namespace) -> None:
    s = site_status(args.site_dir, dir_=args.dir)
    if args.json:  # strict JSON: ε = ∞ is "inf", never the non-JSON Infinity
        print(json.dumps(json_safe(s), default=str, allow_nan=False))
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
    ssub = site_subparsers(subparsers)
    st = ssub.add_parser(
        "status",
        help="what this site released, the ε it spent, the adapters it holds",
        description="From <site-dir>/egress.jsonl and <site-dir>/adapters/. A folder that is not a site "
        "(none of egress.jsonl, adapters/, keys/, node-config.toml, join-request.json) is refused.",
    )
    where = st.add_mutually_exclusive_group(required=True)
    where.add_argument("--dir", help="the site's folder (`rpe site init --dir S`)")
    where.add_argument("--site-dir", help="the SuperNode's node-config site-dir")
    st.add_argument("--json", action="store_true", help='strict JSON (ε = ∞ is "inf", not a number: null)')
    st.set_defaults(func=cmd_site_status)


def site_subparsers(subparsers: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """The sub-parsers of the ``rpe site`` group, created on first call and returned again after:
    other modules add their ``rpe site ACTION`` here (``init``, ``join``, ``start``, ``stop``)."""
    found = getattr(subparsers, "_rpe_site_group", None)
    if found is not None:
        return found
    s = subparsers.add_parser(
        "site",
        help="a hospital site: its own files, set-up and status",
        description="Commands a hospital site runs on its own machine.",
    )
    ssub = s.add_subparsers(dest="site_command", required=True, metavar="ACTION")
    subparsers._rpe_site_group = ssub  # type: ignore[attr-defined]
    return ssub
