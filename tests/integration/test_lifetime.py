"""Servers started through deploy.launch die with their parent, even when it gets SIGKILL.

The parent here is a pytest-like Python process that starts a real SuperLink behind the real nginx
proxy through ``deploy.launch.start_superlink`` and is then killed with SIGKILL (no clean-up code
can run); PR_SET_PDEATHSIG must take the SuperLink, nginx and everything they spawned with it.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from deploy.launch import descendants, free_port, is_alive, proc_start_time

pytestmark = pytest.mark.integration  # real SuperLink, nginx, SIGKILLed parents

ROOT = Path(__file__).resolve().parents[2]

CHILD = """
import json, sys, time
from pathlib import Path
from deploy import launch

state = launch.start_superlink(Path(sys.argv[1]), port=int(sys.argv[2]), proxy=sys.argv[3] == "1",
                               timeout=120)
print(json.dumps({"ok": True}), flush=True)
time.sleep(600)
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture
def open_workdir():
    """A workdir nginx's workers can reach: as root they run as their own account, and the launcher
    refuses a --workdir below a directory other users cannot enter (pytest's temporary root is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="rpe-lifetime-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_servers_die_with_a_sigkilled_parent(open_workdir: Path) -> None:
    tmp_path = open_workdir
    proxy = shutil.which("nginx") is not None or Path("/usr/sbin/nginx").exists()
    port = free_port()
    parent = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path), str(port), "1" if proxy else "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        start_new_session=True,
    )
    try:
        line = parent.stdout.readline() if parent.stdout else ""
        assert line.strip(), f"the launcher failed: {parent.stderr.read() if parent.stderr else ''}"
        state = json.loads((tmp_path / "launch-state.json").read_text())
        servers = [(state["superlink"]["pid"], state["superlink"]["start_time"])]
        if proxy:
            assert state["proxy"] is not None
            servers.append((state["proxy"]["pid"], state["proxy"]["start_time"]))
        family = [p for pid, _ in servers for p in descendants(pid)]
        everyone = servers + family
        assert all(is_alive(*p) for p in servers)
        # each server leads its own process group (stopped by group, never by name)
        for pid, _ in servers:
            assert os.getpgid(pid) == pid
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(is_alive(*p) for p in everyone):
            time.sleep(0.2)
        left = [p for p in everyone if is_alive(*p)]
        assert not left, f"still running after the parent's SIGKILL: {left}"
    finally:
        if parent.poll() is None:
            os.kill(parent.pid, signal.SIGKILL)
            parent.wait(10)
        # nothing of ours may survive a failed assertion either
        for key in ("superlink", "proxy"):
            try:
                proc = json.loads((tmp_path / "launch-state.json").read_text()).get(key)
            except (OSError, ValueError):
                proc = None
            if proc and proc_start_time(proc["pid"]) == proc["start_time"]:
                os.killpg(proc["pid"], signal.SIGKILL)


def test_site_processes_run_below_the_control_plane() -> None:
    """SuperNodes (and the ClientApps they start, which inherit it) get a lower CPU priority than
    the SuperLink: training at equal priority on a small machine starved the SuperLink until its
    sqlite state reported "database is locked" and flwr's processes exited."""
    from deploy import launch

    assert launch.SITE_NICE > 0
    base = os.nice(0)
    child = launch.popen_tied(
        [
            sys.executable,
            "-c",
            "import os, subprocess, sys; print(os.nice(0)); "
            "print(subprocess.run([sys.executable, '-c', 'import os; print(os.nice(0))'], "
            "capture_output=True, text=True).stdout.strip())",
        ],
        nice=launch.SITE_NICE,
        stdout=subprocess.PIPE,
        text=True,
    )
    out, _ = child.communicate(timeout=60)
    assert [int(x) for x in out.split()] == [base + launch.SITE_NICE] * 2
    plain = launch.popen_tied([sys.executable, "-c", "import os; print(os.nice(0))"], stdout=subprocess.PIPE, text=True)
    assert int(plain.communicate(timeout=60)[0]) == base


def test_superlink_waits_longer_for_sqlite_locks(tmp_path: Path) -> None:
    """The SuperLink launcher raises flwr's sqlite busy timeout (5 s, after which a request fails
    with "database is locked" and flwr's SuperNodes and SuperExec exit) on every connection."""
    import sqlite3

    from flwr.supercore import sql_mixin

    from deploy import launch, superlink_main

    saved = sql_mixin.SQLITE_PRAGMAS
    try:
        superlink_main.patch_busy_timeout()
        conn = sqlite3.connect(tmp_path / "state.db")
        sql_mixin._set_sqlite_pragmas(conn, None)
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == superlink_main.BUSY_TIMEOUT_MS
        conn.close()
    finally:
        sql_mixin.SQLITE_PRAGMAS = saved
    assert "deploy.superlink_main" in Path(inspect.getsourcefile(launch.start_superlink)).read_text()


def test_idle_supernode_asks_for_work_every_second_not_every_three(monkeypatch) -> None:
    """The SuperNode launcher shortens flwr's fixed 3 s idle pause (every message a site answers
    waited 1.5 s on average for it) and leaves every other pause of the loop alone."""
    from flwr.supernode import start_client_internal as sci

    from deploy import launch, supernode_main

    slept: list[float] = []
    monkeypatch.setattr(supernode_main.time, "sleep", slept.append)
    saved = sci.time
    try:
        supernode_main.patch_idle_poll(1.0)
        sci.time.sleep(3)
        sci.time.sleep(0.5)  # the reply wait of _push_messages
        assert sci.time.monotonic() > 0  # the rest of `time` is still there
    finally:
        sci.time = saved
    assert slept == [1.0, 0.5]
    assert "deploy.supernode_main" in Path(inspect.getsourcefile(launch.start_supernode)).read_text()
    assert launch.process_env(Path("/tmp/x"))["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] == str(launch.SUPEREXEC_POLL_S)


def test_a_restarted_supernode_is_the_same_site(tmp_path: Path) -> None:
    """``restart_site`` rebuilds the site's spec from the node config it was started with: every key
    (release policy, privacy policy, task family, compute dtype, pinned coordinator key) survives,
    so a restarted segmentation site does not come back as a report site."""
    from deploy.launch import SiteSpec, spec_from_node_config

    spec = SiteSpec(
        "HK",
        str(tmp_path),
        "litemedsam",
        str(tmp_path / "s"),
        0,
        1,
        {"z-clip": 2.0, "z-epsilon": 4.0},
        "ab" * 32,
        str(tmp_path / "coordinator.pub"),
        release={"z-min-examples": 5},
        extra={
            "task": "segmentation",
            "seg-dataset": "prostate-multisite",
            "seg-site": "HK",
            "compute-dtype": "float32",
        },
    )
    nc = {**spec.node_config(), "supernode-key": str(tmp_path / "HK_auth")}
    again = spec_from_node_config("HK", nc, port=9100)
    assert {**again.node_config(), "supernode-key": str(tmp_path / "HK_auth")} == nc
    assert again.port == 9100
