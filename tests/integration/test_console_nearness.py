"""The "nothing close enough" warning in the console, in a real browser (headless chromium through
Playwright, ``python -m server.console`` as its own process; issue 28 item 3).

Over the two-family registry root (``support.two_family``, which already holds one composition per
family for a target inside the library), the composer makes one more composition per family for a
target far outside the library. The compositions list marks exactly the far ones, on both
families; each far detail page shows the warning box with the recorded reason, and a near one none.
"""

from __future__ import annotations

import numpy as np
import pytest
from support.console import Console, _go
from support.two_family import FAMILIES, build

from server.composer import compose_for_target
from server.nearness import WARNING
from server.registry import Registry

pytestmark = pytest.mark.integration


def test_the_console_marks_far_compositions_of_both_families(browser, tmp_path):
    built = build(tmp_path / "tree")
    far = {}
    for key in FAMILIES:
        with Registry(built["dirs"][key], chroma="off") as reg:
            z = np.stack([r.z for r in reg.list()]).astype(np.float64).mean(axis=0)
            z[0] += 400.0  # far outside every site's z
            far[key] = compose_for_target(reg, z, strategy="sim", k=2, target=f"far-{key}")
            assert far[key].nearness["warning"] == WARNING
            assert built["compositions"][key].nearness["warning"] is None  # the support tree's own one is near

    console = Console(built["root"], tmp_path / "console.log")
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(60_000)
        page.goto(console.url + "/compositions")
        rows = page.locator("#compositions tbody tr").evaluate_all(
            "rs => rs.map(r => [r.cells[3].innerText, r.dataset.family, r.dataset.seq,"
            " r.querySelector('td.nearness').innerText])"
        )
        assert len(rows) == 2 * len(FAMILIES)
        families = {fam for _, fam, _, _ in rows}
        assert len(families) == len(FAMILIES)
        for target, _fam, _seq, cell in rows:
            assert ("nothing close enough" in cell) is target.startswith("far-"), (target, cell)
            assert "×" in cell  # the ratio is shown either way
        for target, fam, seq, _ in rows:
            _go(page, "#nav-compositions")
            _go(page, f"#compositions tr[data-seq='{seq}'][data-family='{fam}'] a.composition-link")
            box = page.locator("#composition-nearness-warning")
            check = page.locator("#comp-nearness")
            if target.startswith("far-"):
                key = target.removeprefix("far-")
                assert box.count() == 1 and far[key].nearness["reason"] in box.inner_text()
                assert check.get_attribute("data-warning") == WARNING
                assert page.inner_text("#comp-output") == far[key].output_sha256
            else:
                assert box.count() == 0 and check.get_attribute("data-warning") == ""
                assert "no warning" in check.inner_text()
    finally:
        console.stop()
