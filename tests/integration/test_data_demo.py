"""The README's first command, ``bash scripts/demo.sh`` (read from the README itself), without a data
root stops within seconds with the message that says where the data goes.
(The data sets in this process: tests/unit/test_data.py; the demo with a data root, its delivery
and the README's role sections: tests/integration/test_demo_delivery.py.)
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest
from support.doc_commands import blocks

from common.families.report.data import (
    DATA_DIR_ENV,
    REPO_ROOT,
)


@pytest.mark.integration
def test_demo_without_a_data_root_stops_within_seconds_with_the_message(tmp_path) -> None:
    command = blocks(REPO_ROOT / "README.md")[0].commands[0]
    assert command.startswith("bash scripts/demo.sh")
    env = {**os.environ, DATA_DIR_ENV: str(tmp_path / "empty")}
    t0 = time.monotonic()
    res = subprocess.run(["bash", "-c", command], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert time.monotonic() - t0 < 20
    assert res.returncode == 2
    assert f"expected {tmp_path / 'empty' / 'iu-xray'}" in res.stderr and DATA_DIR_ENV in res.stderr
    assert "Open-i" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.integration
def test_the_demo_options_the_readme_names_are_in_its_help() -> None:
    """The README's first screen tells a reader to run ``bash scripts/demo.sh --help`` for the
    options it names; they are there (set-up runs first, as the README says)."""
    readme = (REPO_ROOT / "README.md").read_text()
    command = "bash scripts/demo.sh --help"
    assert f"`{command}`" in readme
    res = subprocess.run(["bash", "-c", command], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    named = readme[readme.index(f"`{command}`") :].split("\n\n")[0]
    for option in ("--families", "--no-evaluate", "--workdir", "--model", "--profile", "--fresh"):
        assert option in res.stdout, option
    for option in ("--families", "--no-evaluate", "--workdir", "--model", "--profile"):
        assert option in named, option
