"""The warm ClientApp starter (deploy/warm_clientapp.py): a site's ``flwr-clientapp`` wrapper runs
``client.pin.clientapp_main`` in a fork of the starter when one answers, else itself, and either way
the caller sees the same thing: the same arguments, working directory, environment and streams, the
same exit status, a signal reaches the ClientApp and a killed wrapper takes its ClientApp along.

The starter and the wrapper are the real ones (``serve``, ``install_wrapper``), as processes; the
ClientApp is a stand-in ``client/pin.py`` on the wrapper's path (the one thing these tests do not
run is Flower: a real site's ClientApps run warm in every deployment test, e.g.
test_one_machine_guide.py, which also checks the SuperNode log says so). The starter preloads
``wave`` (a module nothing else imports), so the stand-in can tell where it runs, and a module that
sets an environment variable on import.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deploy import launch
from deploy.warm_clientapp import COLD_LINE, ENV, FORK_LINE, WARMING, install_wrapper

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

STAND_IN = """\
import json, os, sys, time

def clientapp_main():
    out = {"argv": sys.argv[1:], "cwd": os.getcwd(), "marker": os.environ.get("MARKER"),
           "warm": "wave" in sys.modules, "set": os.environ.get("SET_BY_IMPORT"), "pid": os.getpid(), "path0": sys.path[0]}
    print(json.dumps(out), flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    if "--sleep" in sys.argv:
        open(sys.argv[-1], "w").write(str(os.getpid()))
        time.sleep(60)
    raise SystemExit(int(sys.argv[sys.argv.index("--exit") + 1]) if "--exit" in sys.argv else 0)
"""


@pytest.fixture
def site(tmp_path: Path):
    """A stand-in checkout with client/pin.py, the wrapper installed for it, and a starter."""
    root = tmp_path / "checkout"
    (root / "client").mkdir(parents=True)
    (root / "client" / "__init__.py").write_text("")
    (root / "client" / "pin.py").write_text(STAND_IN)
    (root / "deploy").symlink_to(REPO / "deploy")  # the wrapper imports deploy.warm_clientapp from here
    wrapper = install_wrapper(tmp_path / "bin", sys.executable, str(root))
    lib = tmp_path / "lib"  # a preloaded library that sets a variable on import (as grpc and peft do)
    lib.mkdir()
    (lib / "envsetter.py").write_text("import os\nos.environ['SET_BY_IMPORT'] = '1'\n")
    name = f"rpe-test-{secrets.token_hex(6)}"
    env = {**os.environ, ENV: name, "MARKER": "m1", "PYTHONPATH": f"{REPO}{os.pathsep}{lib}"}
    log = open(tmp_path / "starter.log", "wb")  # noqa: SIM115 - closed below
    code = f"from deploy.warm_clientapp import serve; serve({name!r}, preload=('wave', 'envsetter'))"
    server = launch.popen_tied([sys.executable, "-c", code], env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    first = None
    while b"ready" not in (tmp_path / "starter.log").read_bytes():
        if b"importing" not in (tmp_path / "starter.log").read_bytes():  # until the starter listens
            res = subprocess.run([str(wrapper)], env=env, capture_output=True, text=True, timeout=60)
            first = res if WARMING in res.stderr else first  # the one that made the starter import
        assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "starter.log").read_text()
        time.sleep(0.05)
    try:
        yield {
            "wrapper": wrapper,
            "env": env,
            "root": root,
            "log": tmp_path / "starter.log",
            "tmp": tmp_path,
            "first": first,
        }
    finally:
        launch.stop_process(server.pid, launch.proc_start_time(server.pid), timeout=5)
        log.close()


def run(site: dict, *args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(site["wrapper"]), *args],
        env=env or site["env"],
        cwd=cwd or site["tmp"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_warm_start_looks_like_a_cold_one_to_the_caller(site: dict) -> None:
    cwd = site["tmp"] / "work"
    cwd.mkdir()
    warm = run(site, "--token", "t1", "--exit", "3", cwd=cwd)
    cold = run(site, "--token", "t1", "--exit", "3", env={**site["env"], ENV: "off"}, cwd=cwd)
    for res in (warm, cold):
        assert res.returncode == 3, res.stderr
        assert res.stderr.strip().endswith("to stderr"), res.stderr
    w, c = json.loads(warm.stdout), json.loads(cold.stdout)
    assert w.pop("warm") is True and c.pop("warm") is False
    assert f"{FORK_LINE} PID {w['pid']} for {site['wrapper']}" in site["log"].read_text()
    # the variable the preloaded import set is there, as if the fork had imported it itself
    assert w.pop("set") == "1" and c.pop("set") is None
    assert w.pop("pid") != c.pop("pid")
    assert (
        w
        == c
        == {"argv": ["--token", "t1", "--exit", "3"], "cwd": str(cwd), "marker": "m1", "path0": str(site["root"])}
    )


def test_the_first_clientapp_runs_cold_while_the_starter_imports(site: dict) -> None:
    first = site["first"]
    assert first.returncode == 0 and json.loads(first.stdout)["warm"] is False, first.stderr
    assert first.stderr.startswith(f"{COLD_LINE} ({WARMING})"), first.stderr


def test_a_wrapper_whose_environment_differs_runs_cold_and_the_starter_says_why(site: dict) -> None:
    res = run(site, env={**site["env"], "MARKER": "m2"})
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["warm"] is False and out["marker"] == "m2"
    assert "cold start (its environment differs in MARKER)" in site["log"].read_text()


def test_no_starter_means_a_cold_start_and_the_wrapper_says_so(site: dict) -> None:
    res = run(site, env={**site["env"], ENV: "rpe-test-nobody-listens"})
    assert res.returncode == 0 and json.loads(res.stdout)["warm"] is False, res.stderr
    assert res.stderr.startswith(COLD_LINE), res.stderr
    # turned off: no starter asked, nothing said
    off = run(site, env={**site["env"], ENV: "off"})
    assert off.returncode == 0 and COLD_LINE not in off.stderr, off.stderr


def test_sigterm_reaches_the_clientapp_and_the_wrapper_dies_of_it(site: dict) -> None:
    pidfile = site["tmp"] / "pid"
    proc = subprocess.Popen([str(site["wrapper"]), "--sleep", str(pidfile)], env=site["env"], stdout=subprocess.PIPE)
    app = _wait_pid(pidfile)
    assert app != proc.pid
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == -signal.SIGTERM
    assert _gone(app)


def test_a_killed_wrapper_takes_its_clientapp_along(site: dict) -> None:
    pidfile = site["tmp"] / "pid"
    proc = subprocess.Popen([str(site["wrapper"]), "--sleep", str(pidfile)], env=site["env"], stdout=subprocess.PIPE)
    app = _wait_pid(pidfile)
    proc.kill()
    proc.wait(timeout=10)
    assert _gone(app)


def _wait_pid(path: Path) -> int:
    deadline = time.monotonic() + 30
    while not (path.exists() and path.read_text()):
        assert time.monotonic() < deadline, "the ClientApp never started"
        time.sleep(0.05)
    return int(path.read_text())


def _gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if launch.proc_start_time(pid) is None:
            return True
        time.sleep(0.05)
    return False
