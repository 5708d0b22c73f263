"""Issue 26 class 10: the pin must describe the code that runs, and the run config must not set a
site's own settings.

At a pinned site the SuperNode starts the site-owned ``flwr-clientapp`` wrapper (``client/pin.py``),
which imports ``client.pin`` from the site's checkout; the ``client`` package then stayed in
``sys.modules``, so flwr's ``load_app`` imported ``client.app`` (and all of ``client/``) from the
checkout and only ``common/`` from the hash-checked bundle. These tests drive the wrapper's guard
and flwr's real install and loader in a fresh interpreter; only the SuperNode's answer to
``pull_task_input`` is stood in (there is no SuperNode here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from flwr.app import Context, RecordDict

ROOT = Path(__file__).resolve().parents[2]

PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fakeapp"
version = "1.0.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "rpe"

[tool.flwr.app.components]
serverapp = "server.app:app"
clientapp = "client.app:app"

[tool.flwr.app.config]
mode = "enroll"
"""

RUNNER = """\
import hashlib, json, sys, types
sys.path.insert(0, {root!r})  # what the installed wrapper does (client/pin.py install_wrapper)
from client import pin
from flwr.cli.install import install_from_fab
from flwr.supernode.runtime import run_clientapp as rc

content = open({fab!r}, "rb").read()
digest = hashlib.sha256(content).hexdigest()
run = types.SimpleNamespace(run_id=1, fab_id="rpe/fakeapp", fab_version="1.0.0")
fab = types.SimpleNamespace(content=content, hash_str=digest)
message = types.SimpleNamespace(metadata=types.SimpleNamespace(message_type="query.whoami"))
context = types.SimpleNamespace(node_config={{"app-sha256": digest, "site-dir": {site_dir!r}}})
rc.pull_task_input = lambda client: (message, context, run, fab)  # the SuperNode's answer
pin._install_guard()
# flwr-clientapp's own sequence (flwr/supernode/runtime/run_clientapp.py)
message, context, run, fab = rc.pull_task_input(None)
install_from_fab(fab.content, skip_prompt=True)
load = rc.get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
try:
    load(run.fab_id, run.fab_version, fab.hash_str)
except Exception as exc:
    print(json.dumps({{"refused": str(exc)}}))
    raise SystemExit(0)
import client, client.app, common
print(json.dumps({{"client": client.app.__file__, "pkg": client.__file__, "common": common.__file__}}))
"""


def _run_wrapper(tmp_path: Path, app_py: str) -> dict:
    from flwr.cli.build import build_fab_from_disk

    app = tmp_path / "app"
    for pkg in ("client", "common", "server"):
        (app / pkg).mkdir(parents=True)
        (app / pkg / "__init__.py").write_text("FROM_BUNDLE = True\n")
    (app / "pyproject.toml").write_text(PYPROJECT)
    (app / "client" / "app.py").write_text(textwrap.dedent(app_py))
    (app / "server" / "app.py").write_text("from flwr.serverapp import ServerApp\napp = ServerApp()\n")
    fab = tmp_path / "app.fab"
    fab.write_bytes(build_fab_from_disk(app))
    script = RUNNER.format(root=str(ROOT), fab=str(fab), site_dir=str(tmp_path / "site"))
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home"), "PYTHONPATH": ""}
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_pinned_site_runs_client_and_common_from_the_bundle_not_its_checkout(tmp_path):
    got = _run_wrapper(tmp_path, "from flwr.clientapp import ClientApp\napp = ClientApp()\n")
    home = (tmp_path / "flwr-home").resolve()
    for name in ("client", "pkg", "common"):
        assert Path(got[name]).resolve().is_relative_to(home), (name, got[name])
        assert not Path(got[name]).resolve().is_relative_to(ROOT), (name, got[name])


def test_a_module_from_outside_the_bundle_is_refused(tmp_path):
    """The bundle lacks ``deploy``; the site's editable install would find it in the checkout: the
    loader's check refuses to run that mix, naming the module and where it came from."""
    got = _run_wrapper(tmp_path, "import deploy\nfrom flwr.clientapp import ClientApp\napp = ClientApp()\n")
    assert "refused" in got, got
    assert "module deploy was loaded from" in got["refused"] and "not from the pinned app bundle" in got["refused"]


def test_the_run_config_cannot_set_a_deployed_sites_own_settings(tmp_path, capsys):
    from client.site import site_from_context

    nc = {"site-id": "a", "data-path": str(tmp_path), "site-dir": str(tmp_path / "s"), "threads": 2}
    rc = {
        "sim-threads": 64,
        "sim-compute-dtype": "float32",
        "sim-z-min-examples": 1,
        "sim-metrics-min-reports": 1,
        "sim-data-root": "/elsewhere",
        "sim-coordinator-key": "/tmp/other.pem",
    }
    site = site_from_context(Context(run_id=1, node_id=1, node_config=nc, state=RecordDict(), run_config=rc))
    assert site.threads == 2 and site.compute_dtype == "auto"
    assert site.data_path == tmp_path and site.coordinator_key is None
    assert site.release.min_examples > 1 and site.release.min_metric_reports > 1
    log = capsys.readouterr().out
    assert "ignoring run-config" in log and "sim-threads=64" in log and "sim-compute-dtype='float32'" in log
    bare = site_from_context(
        Context(run_id=1, node_id=1, node_config={**nc, "threads": 0}, state=RecordDict(), run_config=rc)
    )
    assert bare.threads == 0  # the node config's own default, not the coordinator's 64
    # a simulated site (one trusted process) still takes them from the run config
    sim = site_from_context(
        Context(
            run_id=1,
            node_id=1,
            node_config={"partition-id": 0},
            state=RecordDict(),
            run_config={**rc, "sim-sites": "a"},
        )
    )
    assert sim.threads == 64 and sim.compute_dtype == "float32"
