"""Simulation mode: ``flwr run . local`` with a local simulation federation of two partitions.

In simulation a node's config holds only ``partition-id``, so the run config maps partitions to
sites (``sim-sites``, ``sim-data-root``, ``sim-model-path``, ``sim-site-root``). The test runs
``enroll`` then ``compose`` with the tiny model and checks that the registry holds one record per
site and that the composition was delivered. ``flwr run`` in simulation leaves a SuperLink and a
SuperExec (and the simulation backend's workers) running: every process started with this test's
``FLWR_HOME`` is found through its environment and stopped by PID.

``flwr run --stream`` exits 0 whenever the run *finished*, also when Flower's runtime failed it
before our ServerApp ran (on a starved CI machine one enroll run ended so, without a report). Each
run is therefore checked for its report; a run without one is described (``flwr ls`` status and
details, the run's output, the SuperLink log) on stderr and tried once more, and the tests show
that description if it happens again.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from support import write_site_data
from support.procs import processes_with_env

from deploy import launch
from deploy.launch.appdir import staged_app

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SITES = {"a": "ct-head", "b": "mr-head"}
RUN_TIMEOUT = 420.0


def sim_env(flwr_home: Path, ports: tuple[int, int]) -> dict[str, str]:
    """Flower's environment with this test's FLWR_HOME and its own local-SuperLink ports (no clash with others)."""
    return launch.process_env(
        flwr_home, {"FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(ports[0]), "FLWR_LOCAL_CONTROL_API_PORT": str(ports[1])}
    )


def start_local_superlink(flwr_home: Path, ports: tuple[int, int], timeout: float = 150.0) -> subprocess.Popen:
    """The simulation SuperLink ``flwr run . local`` would start, started here with a longer wait.

    flwr gives it 15 s to answer, too short on a busy two-core machine; started as flwr would start
    it (same flags, same ports), ``flwr run`` finds it up and uses it, and its PID is known here.
    """
    runtime = flwr_home / "local-superlink"
    runtime.mkdir(parents=True, exist_ok=True)
    cmd = [
        str(Path(sys.executable).parent / "flower-superlink"),
        "--insecure",
        "--simulation",
        "--isolation",
        "subprocess",
        "--control-api-address",
        f"127.0.0.1:{ports[1]}",
        "--host",
        "127.0.0.1",
        "--port",
        str(ports[0]),
        "--database",
        str(runtime / "state.db"),
    ]
    with open(runtime / "superlink.log", "ab") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=flwr_home,
            env=sim_env(flwr_home, ports),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"local SuperLink exited with {proc.returncode}: {(runtime / 'superlink.log').read_text()[-2000:]}"
            )
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/health", timeout=2):
                return proc
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"local SuperLink not ready within {timeout:.0f} s")


def flwr_ls_local(flwr_home: Path, ports: tuple[int, int]) -> str:
    """``flwr ls local --format json``: status and details of every run, for failure messages."""
    cmd = [str(Path(sys.executable).parent / "flwr"), "ls", "local", "--format", "json"]
    try:
        res = subprocess.run(
            cmd, cwd=flwr_home, env=sim_env(flwr_home, ports), capture_output=True, text=True, timeout=60
        )
    except subprocess.TimeoutExpired:
        return "flwr ls: no answer within 60 s"
    return (res.stdout + res.stderr)[-3000:]


def describe_run(flwr_home: Path, ports: tuple[int, int], res: subprocess.CompletedProcess) -> str:
    """What is known about a run that left no report: its status, output and the SuperLink's log."""
    log = flwr_home / "local-superlink" / "superlink.log"
    tail = log.read_text(errors="replace")[-3000:] if log.is_file() else "(no SuperLink log)"
    return (
        f"flwr run exit {res.returncode}\n--- flwr ls ---\n{flwr_ls_local(flwr_home, ports)}\n"
        f"--- flwr run stdout ---\n{res.stdout[-3000:]}\n--- flwr run stderr ---\n{res.stderr[-2000:]}\n"
        f"--- superlink.log ---\n{tail}"
    )


def reports_of(registry: Path, mode: str) -> list[Path]:
    return sorted((registry / "runs").glob(f"*-{mode}.json"), key=lambda p: p.stat().st_mtime)


def flwr_run_local(
    flwr_home: Path, ports: tuple[int, int], config: dict, num_supernodes: int, app: Path = REPO
) -> subprocess.CompletedProcess:
    import tomli_w

    cfg_file = flwr_home / f"run-{config['mode']}.toml"
    cfg_file.write_text(tomli_w.dumps(config))
    cmd = [
        str(Path(sys.executable).parent / "flwr"),
        "run",
        str(app),
        "local",
        "--stream",
        "--federation-config",
        f"num-supernodes={num_supernodes}",
        "--run-config",
        str(cfg_file),
    ]
    return subprocess.run(
        cmd, cwd=REPO, env=sim_env(flwr_home, ports), capture_output=True, text=True, timeout=RUN_TIMEOUT
    )


@pytest.fixture(scope="module")
def simulation(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):
    tmp = tmp_path_factory.mktemp("simulation")
    data = write_site_data(tmp / "data", SITES, n=10, n_eval=2)
    flwr_home = tmp / "flwr-home"
    flwr_home.mkdir()
    (flwr_home / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n')
    registry = tmp / "registry"
    base = {
        "registry-dir": str(registry),
        "base-model": str(tiny_model_dir),
        "chroma": "off",
        "steps": 2,
        "lora-r": 4,
        "lora-alpha": 8.0,
        "batch-size": 4,
        "max-length": 96,
        "max-eval": 2,
        "timeout-train": 300.0,
        "timeout-query": 120.0,
        "sim-sites": ",".join(SITES),
        "sim-data-root": str(next(iter(data.values())).parent),
        "sim-model-path": str(tiny_model_dir),
        "sim-site-root": str(tmp / "sites"),
        "sim-threads": 1,
        # simulated sites hold no signing keys; they pin the coordinator key of this registry and
        # release z over their 8 training reports and metrics over their 2 held-out ones
        "require-signatures": False,
        "sim-coordinator-key": str(registry / "coordinator.pub"),
        "sim-z-min-examples": 8,
        "sim-metrics-min-reports": 1,
    }
    runs = {}
    stack = contextlib.ExitStack()
    try:
        ports = (launch.free_port(), launch.free_port())
        while ports[1] == ports[0]:
            ports = (ports[0], launch.free_port())
        start_local_superlink(flwr_home, ports)
        problems: dict[str, str] = {}
        # the app as `rpe fed run` hands it over: only the bundle's files (flwr's walk of the checkout
        # would enter .venv, ~5 s of CPU per run); compose delivers without evaluating (not asserted)
        app = stack.enter_context(staged_app(REPO))
        compose = {"target": "a", "strategy": "avg", "k": 1, "evaluate": False}
        for mode, extra in (("enroll", {}), ("compose", compose)):
            for attempt in (1, 2):
                before = len(reports_of(registry, mode))
                t0 = time.monotonic()
                res = flwr_run_local(
                    flwr_home, ports, {**base, "mode": mode, **extra}, num_supernodes=len(SITES), app=app
                )
                print(f"simulation {mode} (try {attempt}): {time.monotonic() - t0:.1f} s", file=sys.stderr)
                runs[mode] = res
                if res.returncode != 0 or len(reports_of(registry, mode)) > before:
                    problems.pop(mode, None)
                    break
                problems[mode] = describe_run(flwr_home, ports, res)
                print(f"simulation {mode}: the run finished without a report\n{problems[mode]}", file=sys.stderr)
        yield {"registry": registry, "runs": runs, "tmp": tmp, "flwr_home": flwr_home, "problems": problems}
    finally:
        stack.close()
        leftover = processes_with_env(f"FLWR_HOME={flwr_home}")
        for pid, start in leftover:
            launch.stop_process(pid, start, timeout=10.0)
        still = [pid for pid, start in leftover if launch.is_alive(pid, start)]
        assert not still, f"simulation processes still running: {still}"


def _report(simulation: dict, mode: str) -> dict:
    registry = simulation["registry"]
    reports = reports_of(registry, mode)
    assert reports, f"no {mode} report under {registry / 'runs'} (two tries):\n{simulation['problems'].get(mode)}"
    return json.loads(reports[-1].read_text())


def test_simulation_enroll_stores_one_record_per_partition(simulation):
    res = simulation["runs"]["enroll"]
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = _report(simulation, "enroll")
    assert {s: r["status"] for s, r in report["enroll"].items()} == dict.fromkeys(SITES, "accepted")
    records = [json.loads(x) for x in (simulation["registry"] / "records.jsonl").read_text().splitlines() if x]
    assert sorted({r["meta"]["site"] for r in records if "meta" in r}) == sorted(SITES)


def test_simulation_compose_delivers_to_the_target_partition(simulation):
    res = simulation["runs"]["compose"]
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = _report(simulation, "compose")
    assert report["compose"]["a"]["status"] == "delivered", (report["compose"]["a"], simulation["problems"])
    assert report["compose"]["a"]["sites"] == ["b"]
