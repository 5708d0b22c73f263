"""``rpe data check``: before a site starts, what each of its task families would use of its data.

A hospital's IT person points it at the site's node config (``--node-config``, the TOML file the
SuperNode reads) or at a data folder (``--data-path`` with ``--family`` and ``--option KEY=VALUE``
for the family's node-config keys) and sees, per family: how many examples each split would use,
the files, columns, groups (or slices and label convention), every problem named with its file and
row and what to do, and warnings (usable but suspicious). Exit status 0 when every family can use
its data, 1 on any problem, 2 on bad usage. Nothing is written, no model is loaded, nothing is sent.

Each family answers through its optional ``check_data(SiteInputs) -> DataCheck``
(``common/families/base.py``); a family without one is asked for its whoami counts only. The site's
release policy (``client/policy.py``: ``z-min-examples``, ``metrics-min-reports``) is applied here,
once for every family: data too small for the site to release z or scores is a warning.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from common.cli_base import CliError
from common.families.base import DataCheck, SiteInputs


def read_node_config(path: str | Path) -> dict[str, Any]:
    """The node config TOML file a SuperNode reads (``deploy.launch`` writes ``node-config.toml``)."""
    from client.use import load_toml

    src = Path(path).expanduser()
    try:
        got = load_toml(src.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CliError(f"--node-config {src}: no such file (the SuperNode's node-config.toml)") from None
    except (OSError, ValueError) as exc:
        raise CliError(f"--node-config {src}: not a readable TOML file ({exc})") from None
    return got


def _families(requested: list[str], nc: dict[str, Any]) -> list[str]:
    from client.site import DEFAULT_TASKS, split_list
    from common.families import family_names

    names = [n for item in requested for n in split_list(item)] or split_list(nc.get("task")) or list(DEFAULT_TASKS)
    known = family_names()
    for name in names:
        if name not in known:
            near = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise CliError(f"unknown family {name!r}{hint}; the families are: {', '.join(known)}")
    return list(dict.fromkeys(names))


def _options(families: list[str], nc: dict[str, Any], given: list[str]) -> dict[str, str]:
    from client.site import family_option_keys

    keys = family_option_keys(tuple(families))
    options = {k: str(nc[k]) for k in keys if k in nc}
    for item in given:
        key, sep, value = item.partition("=")
        if not sep:
            raise CliError(f"--option {item!r} is not KEY=VALUE (e.g. report-columns=prompt=Findings)")
        if key not in keys:
            near = difflib.get_close_matches(key, keys, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            takes = ", ".join(keys) or "none"
            raise CliError(
                f"--option {key!r} is not a node-config key of {', '.join(families)}{hint}; they take: {takes}"
            )
        options[key] = value
    return options


def check_site(
    node_config: str | Path | None = None,
    data_path: str | Path | None = None,
    families: list[str] | None = None,
    options: list[str] | None = None,
) -> list[DataCheck]:
    """One ``DataCheck`` per family of the site (see the module docstring)."""
    from client.policy import ReleasePolicy, ReleasePolicyError
    from common.families import get_family

    if (node_config is None) == (data_path is None):
        raise CliError("give the site's --node-config FILE, or its --data-path P (not both)")
    nc = read_node_config(node_config) if node_config is not None else {}
    if data_path is not None:
        nc["data-path"] = str(data_path)
    if not nc.get("data-path"):
        raise CliError(f"--node-config {node_config}: no 'data-path' key (the site's data file or folder)")
    names = _families(list(families or []), nc)
    opts = _options(names, nc, list(options or []))
    try:
        policy = ReleasePolicy.from_node_config(nc)
    except ReleasePolicyError as exc:
        raise CliError(f"--node-config {node_config}: {exc}") from None
    checks = []
    for name in names:
        family = get_family(name)
        site = SiteInputs(
            str(nc.get("site-id") or "site"),
            Path(str(nc["data-path"])).expanduser(),
            str(nc.get("model-path") or family.default_model),
            Path(str(nc.get("site-dir") or ".")).expanduser(),
            opts,
        )
        check = _family_check(family, site)
        _policy_warnings(check, policy, family.unit)
        checks.append(check)
    return checks


def _family_check(family: Any, site: SiteInputs) -> DataCheck:
    """The family's ``check_data``, else its whoami counts; an exception is a problem, never a traceback."""
    from common.families.base import FamilyError

    fn = getattr(family, "check_data", None)
    try:
        if fn is not None:
            return fn(site)
        counts = family.counts(site)
    except (FamilyError, OSError, ValueError) as exc:
        return DataCheck(family.name, str(site.data_path), problems=[f"{site.data_path}: {exc}"])
    check = DataCheck(
        family.name,
        str(site.data_path),
        used={"train": counts.n_labeled, "eval": counts.n_eval, "unlabeled": counts.n_unlabeled},
        lines=[f"groups: {', '.join(counts.groups) or 'none'}", "(this family has no data check: counts only)"],
    )
    if not counts.ok:
        check.problems.append(f"{site.data_path}: the {family.name} family cannot read this data")
    return check


def _policy_warnings(check: DataCheck, policy: Any, unit: str) -> None:
    if not check.ok:
        return
    total = sum(check.used.values())
    if 0 < total < policy.min_examples:
        check.warnings.append(
            f"{total} {unit}(s) in all: the site's release policy (z-min-examples = {policy.min_examples}) "
            "releases z only over at least that many, so it could neither enrol nor be a composition target"
        )
    elif 0 < check.used.get("train", 0) < policy.min_examples:
        check.warnings.append(
            f"{check.used['train']} training {unit}(s): fewer than z-min-examples = {policy.min_examples}; "
            "enrolment would be refused"
        )
    n_eval = check.used.get("eval", 0)
    if 0 < n_eval < policy.min_metric_reports:
        check.warnings.append(
            f"{n_eval} held-out {unit}(s): fewer than metrics-min-reports = {policy.min_metric_reports}; "
            "the site releases no scores over them"
        )


def format_checks(checks: list[DataCheck]) -> str:
    """The text ``rpe data check`` prints."""
    out = []
    for c in checks:
        verdict = "ok" if c.ok else f"{len(c.problems)} problem(s)"
        out.append(f"{c.family}: {c.path}: {verdict}")
        used = ", ".join(f"{n} {split}" for split, n in c.used.items())
        out.append(f"  would use: {used or 'nothing'}")
        out.extend(f"  {line}" for line in c.lines)
        out.extend(f"  problem: {p}" for p in c.problems)
        out.extend(f"  warning: {w}" for w in c.warnings)
    return "\n".join(out)


def cmd_data_check(args: argparse.Namespace) -> None:
    checks = check_site(args.node_config, args.data_path, args.family, args.option)
    ok = all(c.ok for c in checks)
    if args.json:
        rows = [{**asdict(c), "ok": c.ok} for c in checks]
        print(json.dumps({"ok": ok, "checks": rows}, indent=2))
    else:
        print(format_checks(checks))
    if not ok:
        sys.exit(1)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``data check`` to the ``rpe`` sub-commands."""
    d = subparsers.add_parser(
        "data",
        help="a site's own data: what the federation would use of it",
        description="Commands on the site's data files; nothing is sent anywhere (docs/DATA.md).",
    )
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    c = dsub.add_parser(
        "check",
        help="check a site's data and print what each task family would use",
        description="Read the site's data as the site would, per task family: examples per split, files, "
        "columns, groups, every problem with its file and row, warnings. Exit status 0: usable; 1: a "
        "problem; 2: bad usage. No model is loaded, nothing is written. See docs/DATA.md.",
    )
    where = c.add_mutually_exclusive_group(required=True)
    where.add_argument("--node-config", help="the SuperNode's node-config TOML file (data-path, task, keys)")
    where.add_argument("--data-path", help="a data file or folder (with --family and --option for its keys)")
    c.add_argument(
        "--family",
        action="append",
        default=[],
        help="task family to check (repeatable or comma-separated; default: the node config's task, else report-text)",
    )
    c.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a family's node-config key, e.g. report-columns=prompt=Findings,target=Impression (repeatable)",
    )
    c.add_argument("--json", action="store_true", help="one JSON object: ok and one entry per family")
    c.set_defaults(func=cmd_data_check)
