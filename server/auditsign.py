"""A signed, self-contained audit report: what ``verify``, ``report`` and ``cross-check`` found.

Why: an auditor hands findings to people who did not run the tools (a hospital's privacy officer,
a regulator). The report says, in one file, every family's verdict (the same
``server.coordroot.verify_sources`` the CLI and the console run), the per-site report and each
cross-check the auditor ran, and it is signed with the coordinator key the registry already holds
(``<root>/coordinator.key``; its public half ``coordinator.pub`` is the one the sites pin), so a
copy altered afterwards is refused offline by ``rpe audit check-report FILE --key coordinator.pub``.

Format: JSON ``{"format": FORMAT, "body": {...}, "key_id", "signature"}``; the Ed25519 signature
covers ``DOMAIN`` + the body's canonical JSON (its own domain, so no other statement the
coordinator signs can be passed off as a report, nor the reverse). The printable HTML form
carries the same signed JSON in one ``<pre id="signed-report">`` element, which ``check_report``
reads back; what the page shows around it is derived from it, and only the JSON is vouched for.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import html
import json
import re
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from common.trust.digests import canonical_json
from common.trust.signing import key_fingerprint

FORMAT = "rpe-audit-report/1"
DOMAIN = b"rpe audit report v1\x00"
MAX_REPORT_BYTES = 64 << 20
_PRE = re.compile(r'<pre id="signed-report">(.*?)</pre>', re.S)


class ReportError(ValueError):
    """A report file that is not a genuine, unaltered report of the given key."""


def _digest(body: Mapping[str, Any]) -> bytes:
    return hashlib.sha256(DOMAIN + canonical_json(dict(body)).encode("ascii")).digest()


def build_body(
    verdicts: list[Any],
    reports: Mapping[str, dict[str, Any]],
    cross_checks: Mapping[str, dict[str, Any]],
    root: str,
    anchors: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The report's body from ``verify_sources`` verdicts, ``report`` per family and cross-checks."""
    fams = [{**v.to_dict(), "findings": v.all_problems()} for v in verdicts]
    checks = {site: {k: c[k] for k in _CHECK_KEYS if k in c} for site, c in cross_checks.items()}
    ok = all(f["ok"] for f in fams) and all(c.get("ok") for c in checks.values())
    return json.loads(
        canonical_json(
            {
                "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "root": root,
                "ok": ok,
                "anchors": dict(anchors or {}),
                "verify": fams,
                "report": {f: _slim(r) for f, r in reports.items()},
                "cross_checks": checks,
            }
        )
    )


_CHECK_KEYS = (
    "site_id",
    "ok",
    "unexplained",
    "matched",
    "coordinator_only",
    "site_only",
    "expected",
    "truncation",
    "unverifiable",
    "audit_problems",
    "receipt_problems",
    "receipts_checked",
    "egress_unreadable_lines",
    "file",
)


def _slim(rep: dict[str, Any]) -> dict[str, Any]:
    """A family's ``report`` without the per-site privacy lists of every query (kept: the counts)."""
    return {k: v for k, v in rep.items() if k != "query_privacy"}


def sign(private_key: Any, body: Mapping[str, Any]) -> dict[str, Any]:
    """The signed report document."""
    sig = private_key.sign(_digest(body))
    return {
        "format": FORMAT,
        "body": dict(body),
        "key_id": key_fingerprint(private_key.public_key()),
        "signature": base64.b64encode(sig).decode("ascii"),
    }


def to_json(doc: Mapping[str, Any]) -> str:
    return json.dumps(doc, indent=1, sort_keys=True, ensure_ascii=True) + "\n"


def to_html(doc: Mapping[str, Any]) -> str:
    """A printable page: the verdict, each family's findings and cross-check, and the signed JSON."""
    b = doc["body"]
    esc = html.escape
    rows = []
    for f in b["verify"]:
        state = "OK" if f["ok"] else "PROBLEMS"
        items = "".join(f"<li>{esc(str(p))}</li>" for p in f["findings"]) or "<li>none</li>"
        rows.append(f"<h3>family {esc(str(f['family']))}: {state}</h3><p>{esc(str(f['log']))}</p><ul>{items}</ul>")
    for site, c in sorted(b["cross_checks"].items()):
        state = "OK" if c.get("ok") else "MISMATCH"
        rows.append(
            f"<h3>cross-check of site {esc(site)}: {state}</h3><p>{len(c.get('matched', []))} matched, "
            f"{c.get('unexplained', 0)} unexplained, {len(c.get('expected', []))} expected</p>"
            + "".join(f"<p>truncation: {esc(str(t))}</p>" for t in c.get("truncation", []))
        )
    for fam, r in sorted(b["report"].items()):
        reg = r.get("registry", {})
        rows.append(
            f"<h3>report of {esc(fam)}</h3><p>{r.get('entries')} entries; registry: {reg.get('added')} added, "
            f"{reg.get('removed')} removed</p>"
        )
    verdict = "every check OK" if b["ok"] else "PROBLEMS FOUND"
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>rpe audit report</title>"
        "<style>body{font-family:sans-serif;max-width:60em}pre{white-space:pre-wrap;font-size:7pt}</style></head>"
        f"<body><h1>Audit report of {esc(str(b['root']))}</h1><p>created {esc(str(b['created']))}; "
        f"<b>{verdict}</b>; signed by coordinator key {esc(str(doc['key_id']))}. Check it offline: "
        "<code>rpe audit check-report FILE --key coordinator.pub</code> (only the signed JSON below is "
        "vouched for).</p>" + "".join(rows) + "<h2>Signed report</h2>"
        f'<pre id="signed-report">{esc(to_json(doc))}</pre></body></html>\n'
    )


def load_document(path: str | Path) -> dict[str, Any]:
    """The signed document in a report file (.json, or the HTML form's ``signed-report`` block)."""
    from common.files.safeio import UnsafeInputError, loads_json, read_regular_file

    try:
        raw = read_regular_file(path, MAX_REPORT_BYTES, what="audit report")
    except (UnsafeInputError, OSError) as exc:
        raise ReportError(f"{path}: cannot read the report ({exc})") from None
    text = raw.decode("utf-8", errors="replace")
    m = _PRE.search(text)
    if m is not None:
        text = html.unescape(m.group(1))
    try:
        doc = loads_json(text.encode("utf-8"), f"audit report {path}", max_bytes=MAX_REPORT_BYTES)
    except (UnsafeInputError, ValueError) as exc:
        raise ReportError(f"{path}: not a signed audit report ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ReportError(f"{path}: not a signed audit report (format {FORMAT} expected)")
    return doc


def check_report(path: str | Path, public_key: Any) -> dict[str, Any]:
    """The body of the report in ``path`` if ``public_key`` signed exactly it; ReportError otherwise."""
    doc = load_document(path)
    if set(doc) != {"format", "body", "key_id", "signature"} or not isinstance(doc["body"], dict):
        raise ReportError(f"{path}: a report has exactly format, body, key_id and signature")
    if doc["key_id"] != key_fingerprint(public_key):
        raise ReportError(
            f"{path}: signed by key {str(doc['key_id'])[:16]}…, not the given key {key_fingerprint(public_key)[:16]}…"
        )
    try:
        sig = base64.b64decode(str(doc["signature"]), validate=True)
        public_key.verify(sig, _digest(doc["body"]))
    except (binascii.Error, ValueError, TypeError):
        raise ReportError(f"{path}: the signature is malformed") from None
    except Exception:  # noqa: BLE001 - cryptography's InvalidSignature
        raise ReportError(f"{path}: the signature does not verify: the report was altered") from None
    return dict(doc["body"])


def findings(
    sources: list[Any],
    anchors: Mapping[Path, dict[str, Any]] | None = None,
    egress: Mapping[str, str | Path] | None = None,
    coordinator_key: Any = None,
) -> tuple[list[Any], dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """(verdicts, reports, cross-checks) of an auditor's scope: the same calls as ``rpe audit verify``,
    ``rpe audit report`` and ``rpe audit cross-check`` (``egress``: {site: its egress.jsonl})."""
    from server.auditreport import report
    from server.coordroot import verify_sources
    from server.crosscheck import cross_check

    verdicts = verify_sources(sources, anchors)
    reports = {s.family: report(s.log) for s in sources if s.log.is_file()}
    logs = {s.family: s.log for s in sources}
    checks = {
        site: {**cross_check(p, logs, site, coordinator_key=coordinator_key).to_dict(), "file": str(p)}
        for site, p in (egress or {}).items()
    }
    return verdicts, reports, checks


def write(doc: Mapping[str, Any], out: str | Path) -> Path:
    """Write the signed report as JSON, or as printable HTML when ``out`` ends in .html / .htm."""
    p = Path(out)
    text = to_html(doc) if p.suffix.lower() in (".html", ".htm") else to_json(doc)
    p.write_text(text, encoding="utf-8")
    return p
