"""``rpe audit`` sub-commands: verify, report, cross-check, export (a signed report), check-report.

Split from ``server/cli.py`` (its own reason to change: what the auditor's tools say). Every
command covers every family under the coordinator's registry root (``server.coordroot``) and runs
the one shared check ``server.coordroot.verify_sources``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from common.cli_base import CliError


def cmd_audit_verify(args: argparse.Namespace) -> None:
    """Every family's audit chain under the coordinator root (and each record's binding to it); exit 1
    naming the family, file, line and kind of every problem."""
    from server.coordroot import audit_sources, verify_sources

    if not args.log and not args.registry:
        raise CliError("name the coordinator's registry root (--registry ROOT) or an audit log (--log FILE)")
    anchor = _parse_anchor(args.anchor) if args.anchor else None
    sources = audit_sources([args.log] if args.log else [], args.registry)
    anchors = {_anchored_log(sources, args.log, anchor): anchor} if anchor else {}
    verdicts = verify_sources(sources, anchors)
    ok = all(v.ok for v in verdicts)
    many = len(verdicts) > 1
    if args.json:
        problems, records = [], []
        for v in verdicts:
            problems += [{**p, "family": v.family, "log": str(v.log)} for p in v.to_dict()["problems"]]
            records += [f"{v.family}: {b}" if many else b for b in v.binding]
        families = [v.to_dict() for v in verdicts]
        print(json.dumps({"ok": ok, "problems": problems, "records": records, "families": families}, indent=2))
    else:
        for v in verdicts:
            head = f"family {v.family}: " if many else ""
            if v.ok:
                what = f" and every record of {v.records} bound to it" if v.records else ""
                found = f", anchor seq {anchor['seq']} found" if anchor and v.anchored else ""
                print(f"{head}{v.log}: OK, hash chain intact{what}{found}")
            for p in v.problems:
                print(f"{head}{v.log}: {p}")
            for b in v.binding:
                print(f"{head}{v.records}: {b}")
            for r in v.registry:
                print(f"{head}{v.log.parent}: {r}")
            for c in v.compositions:
                print(f"{head}{v.log}: {c}")
        if many:
            bad = [v.family for v in verdicts if not v.ok]
            print(
                f"every family OK ({len(verdicts)} audit logs)"
                if ok
                else f"PROBLEMS in {len(bad)} of {len(verdicts)} families: {', '.join(bad)}"
            )
    if not ok:
        sys.exit(1)


def _anchored_log(sources: list[Any], log: str | None, anchor: dict[str, Any]) -> Path:
    """The log an ``--anchor`` speaks of: the registry a receipt names, else ``--log``, else the root's."""
    rid = anchor.get("registry_id")
    for s in sources:
        if rid is not None and s.registry_id == rid:
            return s.log
    if rid is not None:
        raise CliError(f"--anchor is a receipt of registry {rid}, which is none of the audit logs checked")
    if log:
        return next(s.log for s in sources if s.log.resolve() == Path(log).expanduser().resolve())
    return sources[0].log


def _parse_anchor(text: str) -> dict[str, Any]:
    """``SEQ:HASH`` or a JSON file holding ``{"seq", "line_sha256"}`` (what ``head`` or a receipt gives)."""
    from common.files.safeio import loads_json, read_regular_file

    if ":" in text and not Path(text).exists():
        seq, _, digest = text.partition(":")
        data: Any = {"seq": seq, "line_sha256": digest}
    else:
        data = loads_json(read_regular_file(text, 1 << 20, what="anchor file"), f"anchor file {text}")
        if isinstance(data, dict) and isinstance(data.get("body"), dict):
            data = data["body"]  # a receipt statement
    try:
        seq, digest = int(data["seq"]), str(data["line_sha256"]).lower()
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"--anchor {text!r}: expected SEQ:SHA256 or a JSON file with seq and line_sha256") from None
    if seq < 0 or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError(f"--anchor {text!r}: seq must be >= 0 and the hash 64 hex digits")
    out: dict[str, Any] = {"seq": seq, "line_sha256": digest}
    if isinstance(data, dict) and isinstance(data.get("registry_id"), str):
        out["registry_id"] = data["registry_id"]  # a receipt names the family registry it is of
    return out


def cmd_audit_report(args: argparse.Namespace) -> None:
    """What was received per site and used per composition, for every family's log under the root."""
    from server.auditreport import format_report, report
    from server.coordroot import audit_sources

    if not args.log and not args.registry:
        raise CliError("name the coordinator's registry root (--registry ROOT) or an audit log (--log FILE)")
    sources = audit_sources([args.log] if args.log else [], args.registry)
    reports = {s.family: _report_or_missing(report, s.log) for s in sources}
    if len(reports) == 1:
        (rep,) = reports.values()
        print(json.dumps(rep, indent=2) if args.json else format_report(rep))
    elif args.json:
        print(json.dumps({"families": reports}, indent=2))
    else:
        print("\n\n".join(f"== family {family} ==\n{format_report(rep)}" for family, rep in reports.items()))


def _report_or_missing(report: Any, log: Path) -> dict[str, Any]:
    """``report(log)``, or an empty report whose problem says the log is gone (a family's damage is
    reported with the others, not a crash of the whole command)."""
    if log.is_file():
        return report(log)
    gone = f"line 0: missing: {log} does not exist: the family's audit chain is gone"
    return {
        "path": str(log),
        "entries": 0,
        "head": None,
        "problems": [gone],
        "sites": {},
        "compositions": [],
        "registry": {"added": 0, "removed": 0},
        "queries": {},
        "query_privacy": {},
    }


def cmd_audit_cross_check(args: argparse.Namespace) -> None:
    """One cross-check of a site's egress log over every family's audit log (a site may answer runs
    of several families); exit 1 on any mismatch."""
    from server.coordroot import audit_sources
    from server.crosscheck import cross_check

    if not args.audit and not args.registry:
        raise CliError("name the coordinator's registry root (--registry ROOT) or its audit log(s) (--audit FILE)")
    sources = audit_sources(args.audit or [], args.registry)
    logs = {s.family: s.log for s in sources}
    result = cross_check(args.egress, logs, args.site, coordinator_key=args.coordinator_key)
    if len(logs) > 1:
        print(f"audit logs: {', '.join(f'{family} ({log})' for family, log in logs.items())}")
    print(result.format())
    if not result.ok:
        sys.exit(1)


def cmd_audit_export(args: argparse.Namespace) -> None:
    """A signed, self-contained report of verify, report and cross-check (``server.auditsign``)."""
    from server import auditsign
    from server.coordroot import audit_sources
    from server.registry.coordkey import key_paths
    from server.registry.coordkey import load_key as load_coordinator_key

    sources = audit_sources([], args.registry)
    anchor = _parse_anchor(args.anchor) if args.anchor else None
    anchors = {_anchored_log(sources, None, anchor): anchor} if anchor else {}
    egress = {}
    for item in args.egress or []:
        site, sep, path = item.partition("=")
        if not sep or not site or not path:
            raise CliError(f"--egress {item!r}: expected SITE=PATH (the site's id and its egress.jsonl)")
        egress[site] = Path(path)
    key_file = key_paths(Path(args.registry))[0]
    if not key_file.is_file():
        raise CliError(f"{key_file} does not exist: the report is signed with the registry's coordinator key")
    verdicts, reports, checks = auditsign.findings(sources, anchors, egress)
    body = auditsign.build_body(
        verdicts, reports, checks, str(Path(args.registry)), {str(k): v for k, v in anchors.items()}
    )
    out = auditsign.write(auditsign.sign(load_coordinator_key(Path(args.registry)), body), args.out)
    print(
        f"wrote {out}: {'every check OK' if body['ok'] else 'PROBLEMS FOUND'} (signed; check it with "
        f"`rpe audit check-report {out} --key {key_paths(Path(args.registry))[1]}`)"
    )


def cmd_audit_check_report(args: argparse.Namespace) -> None:
    """Check a signed audit report offline against the coordinator's public key; exit 1 if it is not genuine."""
    from common.trust.signing import load_public_key
    from server.auditsign import ReportError, check_report

    try:
        body = check_report(args.file, load_public_key(args.key))
    except ReportError as exc:
        print(f"NOT GENUINE: {exc}")
        sys.exit(1)
    print(f"{args.file}: signature OK (created {body.get('created')} for {body.get('root')})")
    print("the report says: " + ("every check OK" if body.get("ok") else "PROBLEMS FOUND"))
    for fam in body.get("verify", []):
        for finding in fam.get("findings", []):
            print(f"  family {fam.get('family')}: {finding}")
    for site, c in sorted(body.get("cross_checks", {}).items()):
        print(f"  cross-check {site}: {'OK' if c.get('ok') else 'MISMATCH'} ({c.get('unexplained')} unexplained)")


def register(sub: Any) -> None:
    """Add ``audit`` and its actions to the top-level ``rpe`` subparsers."""
    a = sub.add_parser(
        "audit",
        help="verify and summarise audit logs",
        description="Offline checks an auditor can run without trusting the coordinator.",
    )
    asub = a.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    v = asub.add_parser(
        "verify",
        help="check every family's hash chain and record binding; exit 1 and say where if broken",
        description="Verify the audit log of every task family's registry under the coordinator's registry "
        "root (the root's own and each family sub-registry's), and every record of each registry against "
        "its log. Exit 0 only when all are intact; otherwise each problem is named with its family, file, "
        "line and kind.",
    )
    v.add_argument(
        "--log",
        help="an audit.jsonl; a registry's log stands for the whole root it is in (every family under its "
        "directory is verified too)",
    )
    v.add_argument(
        "--registry",
        help="the coordinator's registry root: every family registry under it is verified "
        "(default: the directory of --log)",
    )
    v.add_argument(
        "--anchor",
        help="a known head, SEQ:LINE_SHA256 or a JSON file (audit head, or a receipt): "
        "also detects a truncated or rewritten tail",
    )
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_audit_verify)
    v = asub.add_parser(
        "report",
        help="what was received per site and used per composition, for every family",
        description="Summarise the audit log of every task family under the coordinator's registry root: "
        'one section per family (with several families --json gives {"families": {family: report}}).',
    )
    v.add_argument("--log", help="an audit.jsonl (a registry's log stands for its whole root)")
    v.add_argument("--registry", help="the coordinator's registry root (default: the directory of --log)")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_audit_report)
    v = asub.add_parser("cross-check", help="match a site's egress log against every family's coordinator audit log")
    v.add_argument("--egress", required=True, help="the site's egress.jsonl")
    v.add_argument(
        "--audit",
        action="append",
        help="a coordinator audit.jsonl (repeatable); a registry's log stands for its whole root, so every "
        "family's log under it is matched too",
    )
    v.add_argument(
        "--registry",
        help="the coordinator's registry root: the site's replies are matched against every family's audit log",
    )
    v.add_argument("--site", required=True, help="the site id the coordinator knows it by")
    v.add_argument(
        "--coordinator-key",
        help="the coordinator's public key (PEM) the site holds, to check the "
        "receipts in its egress log (default: coordinator.pub next to "
        "the audit log)",
    )
    v.set_defaults(func=cmd_audit_cross_check)
    v = asub.add_parser(
        "export",
        help="write a signed audit report (JSON, or printable HTML) of verify, report and cross-checks",
        description="Run verify (every family), report and a cross-check per --egress, and write the findings "
        "as one report signed with the registry's coordinator key (<root>/coordinator.key).",
    )
    v.add_argument("--registry", required=True, help="the coordinator's registry root")
    v.add_argument("--egress", action="append", help="SITE=PATH of a site's egress.jsonl to cross-check (repeatable)")
    v.add_argument("--anchor", help="a known head, SEQ:LINE_SHA256 or a JSON file (as for verify)")
    v.add_argument("--out", required=True, help="the report file: .json, or .html for a printable page")
    v.set_defaults(func=cmd_audit_export)
    v = asub.add_parser(
        "check-report",
        help="check a signed audit report offline against the coordinator's public key",
        description="Exit 0 and print its verdict when FILE (.json or .html) is a report signed by --key and "
        "unaltered; exit 1 naming why otherwise.",
    )
    v.add_argument("file", help="the report (.json or .html)")
    v.add_argument("--key", required=True, help="the coordinator's public key (coordinator.pub, PEM)")
    v.set_defaults(func=cmd_audit_check_report)
