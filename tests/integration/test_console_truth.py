"""Issue 26, class 1, the console's side, in the real browser (headless Debian chromium).

The same real two-family run as ``tests/unit/test_auditor_truth.py`` (its ``clean`` fixture): the console
started on the clean root says OK on every page, cross-checks every site's egress log OK and hands
out a signed report that ``rpe audit check-report`` accepts. Then, one console per damaged copy, each
kind of damage turns the banner on every page to PROBLEMS naming it, and the record or composition
it concerns is flagged where it is shown; a truncated log is named once the auditor enters the head
kept before (the anchor form), and the cross-check of the site's log names the truncation.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from support.auditor import DAMAGE, SITES, _copy, _report_log
from support.console import Console, _go

from common.trust.signing import load_public_key
from server.auditsign import check_report

PAGES = ("/", "/registry", "/compositions", "/audit", "/privacy", "/evaluations")


def _banner(page) -> tuple[str, str]:
    el = page.locator("#integrity-banner")
    return el.get_attribute("data-ok"), el.inner_text()


def _cross_check(page, url: str, site: str, egress: Path) -> str:
    page.goto(url + "/audit")
    page.fill("#crosscheck-site", site)
    page.set_input_files("#crosscheck-file", str(egress))
    _go(page, "#crosscheck-submit")
    return page.inner_text("#crosscheck-result")


@pytest.mark.integration
@pytest.mark.slow
def test_the_console_says_ok_on_a_clean_run_and_names_each_damage(browser, clean, tmp_path):
    c = Console(clean["root"], tmp_path / "clean.log")
    ctx = browser.new_context()
    page = ctx.new_page()
    try:
        for path in PAGES:
            page.goto(c.url + path)
            ok, text = _banner(page)
            assert ok == "1" and "Verified" in text, (path, text)
        page.goto(c.url + "/compositions")
        assert page.locator("#compositions tr[data-seq]").count() >= 2
        assert page.locator("#compositions tr.flagged").count() == 0
        for site in SITES:
            result = _cross_check(page, c.url, site, clean["egress"][site])
            assert page.inner_text("#crosscheck-status") == "OK", result
            assert page.inner_text("#crosscheck-unexplained") == "0", result
        for fmt in ("json", "html"):
            resp = page.request.get(c.url + f"/audit/report.{fmt}")
            assert resp.status == 200
            out = tmp_path / f"report.{fmt}"
            out.write_bytes(resp.body())
            body = check_report(out, load_public_key(clean["root"] / "coordinator.pub"))
            assert body["ok"] is True and set(body["cross_checks"]) == set(SITES)
    finally:
        ctx.close()
        c.stop()

    for kind, damage in sorted(DAMAGE.items()):
        root, logs = _copy(clean, tmp_path / kind)
        name = damage(root, logs)
        c = Console(root, tmp_path / f"{kind}.log")
        ctx = browser.new_context()
        page = ctx.new_page()
        try:
            for path in PAGES:
                page.goto(c.url + path)
                ok, text = _banner(page)
                assert ok == "0" and "INTEGRITY PROBLEMS" in text and name in text, (kind, path, text)
            page.goto(c.url + "/audit")
            assert "BROKEN" in page.inner_text("#verify-result"), kind
            if kind == "edited-record":
                page.goto(c.url + "/registry")
                assert page.locator(f"tr.flagged[data-id='{name}']").count() == 1
                page.goto(c.url + f"/registry/record/{name}")
                assert "NOT vouched for" in page.inner_text("#record-flag")
            if kind in ("forged-composition", "edited-audit-line"):
                page.goto(c.url + "/compositions")
                flagged = page.locator("tr.flagged[data-seq]")
                assert flagged.count() >= 1, kind
                seq = flagged.first.get_attribute("data-seq")
                fam = flagged.first.get_attribute("data-family")
                page.goto(c.url + f"/compositions/{seq}?family={fam}")
                assert "NOT vouched for" in page.inner_text("#composition-flag"), kind
            result = _cross_check(page, c.url, "a", clean["egress"]["a"])
            assert page.inner_text("#crosscheck-status") == "MISMATCH" and name in result, (kind, result)
        finally:
            ctx.close()
            c.stop()

    # a truncated log: whole lines cut, the chain still holds; named against the head kept before
    root, logs = _copy(clean, tmp_path / "truncated")
    log = _report_log(logs, root)
    family = next(f for f, p in logs.items() if p == log)
    anchor = clean["heads"][family]
    lines = log.read_text().splitlines()
    cut = next(n for n in range(len(lines) - 1, 0, -1) if '"event":"composition"' in lines[n])
    log.write_text("\n".join(lines[:cut]) + "\n")
    c = Console(root, tmp_path / "truncated.log")
    ctx = browser.new_context()
    page = ctx.new_page()
    try:
        page.goto(c.url + "/audit")
        page.select_option("#anchor-family", family)
        page.fill("#anchor-value", f"{anchor['seq']}:{anchor['line_sha256']}")
        _go(page, "#anchor-submit")
        for path in PAGES:
            page.goto(c.url + path)
            ok, text = _banner(page)
            assert ok == "0" and "anchor_mismatch" in text and "truncated" in text, (path, text)
        page.goto(c.url + "/compositions")
        assert "(anchored)" in page.inner_text("main")
        result = _cross_check(page, c.url, "a", clean["egress"]["a"])
        assert "TRUNCATED: the coordinator's audit log ends" in result, result
        # a malformed anchor is a clear error and changes nothing
        page.goto(c.url + "/audit")
        page.fill("#anchor-value", "12:nothex")
        _go(page, "#anchor-submit")
        assert "expected SEQ:LINE_SHA256" in page.inner_text("#anchor-error")
        assert "anchor_mismatch" in _banner(page)[1]  # the anchor entered before still holds
    finally:
        ctx.close()
        c.stop()
