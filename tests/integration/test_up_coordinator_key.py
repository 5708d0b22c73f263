"""``deploy.launch up`` with a registry that does not exist yet (the demo's first run) makes the
coordinator key before any site starts: no site warns "--coordinator-key ... does not exist (yet)",
every site's node config pins ``<registry>/coordinator.pub`` and finds it there when it starts.
The same deployment runs more sites than ``$RPE_WARM_MAX_SITES`` allows warm: every SuperNode starts
its ClientApps cold (no ~310 MB warm starter per site) and ``up`` says so.
(Real SuperLink and SuperNodes on loopback, stopped by PID; the first run then creating the
registry around that key, for both families: ``tests/unit/test_coordinator_key_up_front.py``.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib

from deploy import launch, warm_clientapp
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
    monkeypatch.setenv(warm_clientapp.MAX_SITES_ENV, "1")
    capfd.readouterr()
    try:
        state = launch.up(workdir, specs, port=launch.free_port(), timeout=60.0, registry=str(registry))
        for site, proc in state["sites"].items():
            env = Path(f"/proc/{proc['pid']}/environ").read_bytes().split(b"\0")
            assert f"{warm_clientapp.ENV}={warm_clientapp.OFF}".encode() in env, site
    finally:
        launch.down(workdir, timeout=15.0)
    err = capfd.readouterr().err
    assert "does not exist (yet)" not in err, err
    assert "2 sites on this machine: their ClientApps start cold" in err, err
    pub = registry / "coordinator.pub"
    assert at_start == {"a": pub.read_bytes(), "b": pub.read_bytes()}
    for spec in specs:
        node_config = tomllib.loads((Path(spec.site_dir) / "node-config.toml").read_text())
        assert node_config["coordinator-key"] == str(pub)
    assert (registry / "coordinator.key").is_file() and not (registry / "registry.json").exists()
