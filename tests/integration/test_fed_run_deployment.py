"""Launch and runs that tell the truth, on a real one-machine deployment (SuperLink with TLS and
SuperNode auth, real SuperNodes, this repository's ServerApp and ClientApp, a tiny model):

- a SuperNode with a real *other* CA, or with a key the SuperLink never registered, exits
  non-zero within bounded time with the log's own error line (the TLS error, exit code 305), and
  leaves no process behind; the CLI prints no PID for it;
- a second SuperLink on the deployment's port fails at once, naming the process that holds it;
- ``rpe fed run`` exits 1 when a site fails its enrolment, 3 with one line when the registry is
  held by another run, 0 when every site did its part; Ctrl-C (SIGINT to ``rpe fed run``) stops
  the run (``flwr ls`` says so) and exits 130, and the stopped run lets go of the registry;
- the commands of deploy/README.md "Runs: ..." as the document gives them (the doc test runs
  before the Ctrl-C test: a stopped run leaves its site busy with the message it was working on).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.doc_commands import section_commands
from support.federation import LOCAL_RELEASE, make_site_data

from deploy import launch, tls, warm_clientapp
from server.registry.errors import RegistryLockedError
from server.registry.lock import PathLock, set_holder

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):
    tmp = tmp_path_factory.mktemp("fedrun")
    data = make_site_data(tmp / "data")
    corrupt = tmp / "data" / "d.jsonl"
    corrupt.write_text('{"prompt": "Findings: normal.", "target": "Normal.", "group": "ct-head"}\n{"prompt": \n')
    specs = [
        launch.SiteSpec("a", str(data["a"]), str(tiny_model_dir), threads=1, release=dict(LOCAL_RELEASE)),
        launch.SiteSpec("d", str(corrupt), str(tiny_model_dir), threads=1),
    ]
    workdir = tmp / "coord"
    registry = tmp / "registry"
    # Cold ClientApps here: with warm ones (deploy/warm_clientapp.py) a run stopped mid-training left
    # site a busy (a later run: "a: offline") and once kept `rpe fed run` from exiting within 120 s of
    # Ctrl-C in the full suite (passes alone). A known defect of the warm starter, not yet fixed.
    env = pytest.MonkeyPatch()
    env.setenv(warm_clientapp.ENV, warm_clientapp.OFF)
    try:
        state = launch.up(workdir, specs, port=launch.free_port(), timeout=120.0, registry=str(registry))
        yield {
            "tmp": tmp,
            "workdir": workdir,
            "registry": registry,
            "model": tiny_model_dir,
            "state": state,
            "data": data["a"],
        }
    finally:
        launch.down(workdir, timeout=15.0)
        env.undo()


def rpe_fed(dep: dict, *args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deploy.cli", "fed", *args, "--dir", str(dep["workdir"])],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=timeout,
    )


def run_args(dep: dict, mode: str, *extra: str) -> list[str]:
    return [
        "run",
        mode,
        f"registry-dir={dep['registry']}",
        f"base-model={dep['model']}",
        "chroma=off",
        "steps=2",
        "lora-r=4",
        "lora-alpha=8",
        "batch-size=4",
        "max-length=96",
        "timeout-train=150",
        "timeout-query=60",
        "evaluate=false",
        *extra,
    ]


# -- launch ---------------------------------------------------------------------------------------
def test_a_supernode_with_another_ca_exits_with_the_tls_error(dep):
    other = tls.generate(dep["tmp"] / "other-pki", ["x"], ["127.0.0.1"])
    data = dep["data"]
    workdir = dep["tmp"] / "site-x"
    t0 = time.monotonic()
    res = subprocess.run(
        [
            sys.executable, "-m", "deploy.launch", "supernode", "--workdir", str(workdir),
            "--superlink", dep["state"]["superlink"]["address"], "--root-certificates", str(other.ca_cert),
            "--auth-key", str(other.sites["x"].private_key), "--site-id", "x", "--data-path", str(data),
            "--model-path", str(dep["model"]), "--port", str(launch.free_port()),
        ],
        capture_output=True, text=True, cwd=REPO, timeout=150,
    )  # fmt: skip
    assert res.returncode == 1, res
    assert "CERTIFICATE_VERIFY_FAILED" in res.stderr and "exit code 305" in res.stderr, res.stderr
    assert "PID" not in res.stdout and time.monotonic() - t0 < 120
    proc = launch.load_state(workdir)["sites"]["x"]
    assert not launch.is_alive(proc["pid"], proc["start_time"])
    assert not launch.processes.group_members(proc["pgid"]), "the dead SuperNode's SuperExec was left running"


def test_a_supernode_whose_key_was_never_registered_is_refused(dep):
    other = tls.generate(dep["tmp"] / "other-keys", ["y"], ["127.0.0.1"])
    spec = launch.SiteSpec("y", str(dep["data"]), str(dep["model"]), str(dep["tmp"] / "site-y"))
    state = dep["state"]
    with pytest.raises(launch.LaunchError) as err:
        launch.start_supernode(
            dep["workdir"], spec, state["superlink"]["address"], Path(state["ca_cert"]), other.sites["y"].private_key
        )
    assert "exit code 305" in str(err.value) and "site 'y'" in str(err.value), str(err.value)
    assert "supernode-y.log" in str(err.value)


def test_a_second_superlink_on_the_port_fails_at_once_naming_the_holder(dep):
    link = dep["state"]["superlink"]
    t0 = time.monotonic()
    with pytest.raises(launch.LaunchError) as err:
        launch.start_superlink(dep["tmp"] / "coord-2", "127.0.0.1", link["port"], proxy=False)
    assert time.monotonic() - t0 < 5
    assert f"pid {link['pid']}" in str(err.value) and "deploy.superlink_main" in str(err.value)


def test_status_lists_every_process(dep):
    procs = launch.status(dep["workdir"])["processes"]
    assert {"superlink", "superexec", "supernode-a", "supernode-d"} <= set(procs)
    assert procs["superlink"]["state"] == "alive" and procs["supernode-a"]["state"] == "alive"


# -- runs -----------------------------------------------------------------------------------------
def test_a_failed_enrolment_exits_1_naming_the_site(dep):
    res = rpe_fed(dep, *run_args(dep, "enroll", "sites=a,d"))
    assert res.returncode == 1, res
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("rpe: error: run ") and "site failures" in last and "d: error: failed" in last, res.stderr
    assert "a:" not in last.split("site failures:")[1]
    assert "RPE-RUN-SUMMARY" not in res.stdout  # the verdict is read, not shown raw
    assert "[rpe] enroll a: accepted" in res.stdout  # the run's own log was streamed


def test_every_site_ok_exits_0(dep):
    res = rpe_fed(dep, *run_args(dep, "whoami"))
    assert res.returncode == 0, res
    assert "every site ok ['a', 'd']" in res.stdout


def test_a_locked_registry_is_one_line_naming_the_run(dep):
    set_holder("run 999 (enroll)", "999")
    lock = PathLock.acquire(dep["registry"])
    try:
        res = rpe_fed(dep, *run_args(dep, "whoami"))
    finally:
        lock.release()
        set_holder("")
    assert res.returncode == 3, res
    errors = [line for line in res.stderr.splitlines() if line.startswith("rpe: error:")]
    assert len(errors) == 1, res.stderr
    assert f"is in use by run 999 (enroll), pid {os.getpid()}, since" in errors[0]
    assert "rpe fed stop 999" in errors[0]
    assert "Traceback" not in res.stdout + res.stderr and "Registry(" not in res.stdout + res.stderr


# -- the guide's own commands ---------------------------------------------------------------------
def test_the_runs_section_of_the_guide(dep):
    """Every command of deploy/README.md "Runs: ..." as written there; the only rewrites: the
    coordinator directory, `rpe` as this interpreter's module, steps=20 -> steps=2 (a tiny model on
    two shared cores), and RUN_ID -> the id of a run this test started and that is in flight."""
    cmds = section_commands(REPO / "deploy" / "README.md", "Runs: ")
    assert [c.split()[:3] for c in cmds] == [
        ["rpe", "fed", "run"],
        ["rpe", "fed", "run"],
        ["rpe", "fed", "ls"],
        ["rpe", "fed", "run"],
        ["rpe", "fed", "stop"],
    ], cmds
    if not dep["registry"].is_dir() or not any(dep["registry"].iterdir()):
        assert rpe_fed(dep, *run_args(dep, "whoami")).returncode == 0  # the registry, from base-model

    def run(cmd: str, **kw) -> subprocess.CompletedProcess:
        cmd = cmd.replace("/srv/rpe/coord", str(dep["workdir"])).replace("steps=20", "steps=2")
        argv = cmd.split()
        assert argv[0] == "rpe"
        return subprocess.run(
            [sys.executable, "-m", "deploy.cli", *argv[1:]],
            capture_output=True,
            text=True,
            cwd=REPO,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
            timeout=400,
            **kw,
        )

    whoami, enroll, ls, typo, stop = cmds
    assert run(whoami).returncode == 0
    res = run(enroll)
    assert res.returncode == 0 and "[rpe] enroll a: accepted" in res.stdout, res
    res = run(ls)
    assert res.returncode == 0 and "finished:completed" in res.stdout, res
    res = run(typo)
    documented = (
        "rpe: error: unknown run-config key 'stpes'; did you mean 'steps'? (the keys: [tool.flwr.app.config] of "
    )
    assert res.returncode == 2 and res.stderr.startswith(documented), res.stderr
    # `rpe fed stop RUN_ID` on a run in flight, started by another `rpe fed run`: that one exits 3
    other = subprocess.Popen(
        [sys.executable, "-m", "deploy.cli", "fed", *run_args(dep, "enroll", "sites=a", "steps=5000"),
         "--dir", str(dep["workdir"])],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    try:
        run_id = None
        for line in other.stdout:
            if "submitted" in line and run_id is None:
                run_id = line.split("run ", 1)[1].split()[0]
            if "enrolling" in line:
                break
        assert run_id is not None
        res = run(stop.replace("RUN_ID", run_id))
        assert res.returncode == 0 and f"run {run_id} stopped" in res.stdout, res
        out, err = other.communicate(timeout=150)
    finally:
        if other.poll() is None:
            other.kill()
            other.wait()
    assert other.returncode == 3 and f"run {run_id} was stopped before it finished" in err, (out, err)


def _wait_registry_free(dep: dict, timeout: float = 90) -> None:
    """Until no run holds the registry (a stopped run's ServerApp lets go at its next heartbeat)."""
    deadline = time.monotonic() + timeout
    while dep["registry"].is_dir():
        try:
            PathLock.acquire(dep["registry"]).release()
            return
        except RegistryLockedError:
            assert time.monotonic() < deadline, "a stopped run still holds the registry"
            time.sleep(2)


def test_ctrl_c_stops_the_run(dep):
    _wait_registry_free(dep)
    # Flower 1.41 does not stop the ClientApp of a stopped run: the guide's stopped 5000-step run (the
    # test above) can still be training at site a, which then answers no whoami. Restart a's
    # SuperNode (by PID, with its ClientApps) so this run finds it idle.
    launch.stop_site(dep["workdir"], "a")
    launch.restart_site(dep["workdir"], "a")
    launch.wait_online(dep["workdir"], ["a"], timeout=60)
    proc = subprocess.Popen(
        [sys.executable, "-m", "deploy.cli", "fed", *run_args(dep, "enroll", "sites=a", "steps=5000"),
         "--dir", str(dep["workdir"])],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    run_id = None
    try:
        deadline = time.monotonic() + 180
        for line in proc.stdout:
            if "submitted" in line and run_id is None:
                run_id = line.split("run ", 1)[1].split()[0]
                break
            assert time.monotonic() < deadline, "the run did not start"
        assert run_id is not None
        time.sleep(5)  # the ServerApp starts and discovers the sites (it cannot be done in 5 s: 5000 steps)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert f"interrupted: run {run_id} stopped" in err
    ls = launch.flwr_cli(["ls", "rpe", "--run-id", run_id], Path(dep["state"]["flwr_home"]))
    assert ls["runs"][0]["status"] == "finished:stopped", json.dumps(ls)
    listed = rpe_fed(dep, "ls", "--run-id", run_id)
    assert listed.returncode == 0 and run_id in listed.stdout
    again = rpe_fed(dep, "stop", run_id)
    assert again.returncode == 1 and again.stderr.startswith("rpe: error: run ")
    # the stopped run's ServerApp lets go of the registry (at its next heartbeat), and a rerun works
    _wait_registry_free(dep)
    # a rerun is not refused (a site still busy with the stopped run's message may not answer in time:
    # Flower stops the run, not the ClientApp already at work, so 1 with a timeout is possible; the
    # short timeout-query bounds that wait: site a is still training 5000 steps, it cannot answer)
    rerun = rpe_fed(dep, *run_args(dep, "whoami", "timeout-query=15"))
    assert rerun.returncode in (0, 1) and "is in use by" not in rerun.stderr, rerun
