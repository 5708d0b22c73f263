"""How many sites one launcher runs with warm ClientApp starters (``$RPE_WARM_MAX_SITES``): a bad
value is refused by ``deploy.launch up`` before anything is written. (A deployment over the limit
starting cold: ``tests/integration/test_up_coordinator_key.py``.)"""

from __future__ import annotations

import pytest

from deploy import launch, warm_clientapp


def test_the_limit_defaults_to_16_and_reads_the_environment(monkeypatch):
    monkeypatch.delenv(warm_clientapp.MAX_SITES_ENV, raising=False)
    assert warm_clientapp.max_warm_sites() == warm_clientapp.DEFAULT_MAX_SITES == 16
    monkeypatch.setenv(warm_clientapp.MAX_SITES_ENV, "0")
    assert warm_clientapp.max_warm_sites() == 0


@pytest.mark.parametrize("bad", ["many", "-1", "2.5"])
def test_a_bad_limit_stops_up_before_anything_is_written(bad, monkeypatch, tmp_path):
    monkeypatch.setenv(warm_clientapp.MAX_SITES_ENV, bad)
    data = tmp_path / "a.jsonl"
    data.write_text('{"prompt": "Findings: normal.", "target": "Normal."}\n')
    with pytest.raises(launch.LaunchError, match=r"RPE_WARM_MAX_SITES=.*expected a whole number"):
        launch.up(tmp_path / "wd", [launch.SiteSpec("a", str(data))], port=launch.free_port(), timeout=5)
    assert not (tmp_path / "wd").exists()
