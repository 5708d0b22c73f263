"""``scripts/demo.sh`` without a data root stops within seconds with the message that says where the
data goes. (The data sets in this process: tests/unit/test_data.py.)
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from common.families.report.data import (
    DATA_DIR_ENV,
    REPO_ROOT,
)


@pytest.mark.integration
def test_demo_without_a_data_root_stops_within_seconds_with_the_message(tmp_path) -> None:
    env = {**os.environ, DATA_DIR_ENV: str(tmp_path / "empty")}
    t0 = time.monotonic()
    res = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "demo.sh")], env=env, capture_output=True, text=True, timeout=60
    )
    assert time.monotonic() - t0 < 20
    assert res.returncode == 2
    assert f"expected {tmp_path / 'empty' / 'iu-xray'}" in res.stderr and DATA_DIR_ENV in res.stderr
    assert "Open-i" in res.stderr and "Traceback" not in res.stderr
