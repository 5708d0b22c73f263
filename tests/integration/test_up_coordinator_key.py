"""``deploy.launch up`` with a registry that does not exist yet (the demo's first run) makes the
coordinator key before any site starts: no site warns "--coordinator-key ... does not exist (yet)",
every site's node config pins ``<registry>/coordinator.pub`` and finds it there when it starts.
(Real SuperLink and SuperNodes on loopback, stopped by PID; the first run then creating the
registry around that key, for both families: ``tests/unit/test_coordinator_key_up_front.py``.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib

from deploy import launch
from deploy.launch import federation

pytestmark = pytest.mark.integration


def test_up_makes_the_coordinator_key_before_the_sites_start(tmp_path, tiny_model_dir, capfd, monkeypatch):
    registry = tmp_path / "registry"
    at_start: dict[str, bytes | None] = {}
    real_start = federation.start_supernode

    def start_supernode(workdir, spec, *args, **kwargs):  # the real one, noting what the site finds
        key = Path(spec.coordinator_key)
        at_start[spec.site] = key.read_bytes() if key.is_file() else None
        return real_start(workdir, spec, *args, **kwargs)

    monkeypatch.setattr(federation, "start_supernode", start_supernode)
    specs = []
    for site in ("a", "b"):
        data = tmp_path / f"{site}.jsonl"
        data.write_text('{"prompt": "Findings: normal.", "target": "Normal.", "group": "ct-head"}\n')
        specs.append(launch.SiteSpec(site, str(data), str(tiny_model_dir), threads=1))
    workdir = tmp_path / "deploy"
    capfd.readouterr()
    try:
        launch.up(workdir, specs, port=launch.free_port(), timeout=60.0, registry=str(registry))
    finally:
        launch.down(workdir, timeout=15.0)
    err = capfd.readouterr().err
    assert "does not exist (yet)" not in err, err
    pub = registry / "coordinator.pub"
    assert at_start == {"a": pub.read_bytes(), "b": pub.read_bytes()}
    for spec in specs:
        node_config = tomllib.loads((Path(spec.site_dir) / "node-config.toml").read_text())
        assert node_config["coordinator-key"] == str(pub)
    assert (registry / "coordinator.key").is_file() and not (registry / "registry.json").exists()
