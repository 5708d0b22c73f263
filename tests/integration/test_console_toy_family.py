"""Issue 25 acceptance: a family written only for the tests (one folder, one table line) appears in
the console, in a real browser, with its own metric — the console process learns it from
``$RPE_FAMILIES`` (no file in server/, client/ or deploy/ names it)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from support.console import ROOT, Console
from support.toy import SITES, run

from common.families import get_family

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_the_toy_family_shows_in_the_browser_with_its_own_metric(toy, browser, tmp_path: Path) -> None:
    assert run(toy, 61, mode="enroll", sites=",".join(SITES))["status"] == "completed"
    evaluated = run(toy, 62, mode="evaluate", k=2, **{"eval-strategies": "sim"})
    assert evaluated["status"] == "completed", evaluated.get("error")
    results = Path(evaluated["evaluate"]["outputs"]["csv"])
    with open(results, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and all("accuracy" in r for r in rows)
    title = get_family("toy").metric_title

    env = {"RPE_FAMILIES": "toy=support.families.toy:FAMILY", "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
    console = Console(toy["registry"], tmp_path / "console.log", env=env)
    try:
        page = browser.new_page()
        page.goto(console.url + "/")
        assert "toy" in page.locator("#families .family").evaluate_all("xs => xs.map(x => x.dataset.family)")
        page.goto(f"{console.url}/evaluations/{results.parent.name}?family=toy")
        assert page.inner_text("#eval-metric") == title
        shown = page.locator("td.num[data-metric='accuracy']").evaluate_all("xs => xs.map(x => x.textContent)")
        assert sorted(shown) == sorted(r["accuracy"] for r in rows if r["accuracy"])
        page.close()
    finally:
        console.stop()
