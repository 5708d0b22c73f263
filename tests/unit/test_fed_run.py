"""``rpe fed run``: run-config keys checked against the app's ``[tool.flwr.app.config]`` before
anything is submitted (an unknown key named with its closest match; a value of the wrong type;
a mistyped mode), the run's verdict line (``server/run_summary.py``) mapped to the brief's exit
codes for every mode and for both task families, and the one line a locked registry gives.
(Against a real deployment, with a failed run and Ctrl-C: ``integration/test_fed_run_deployment.py``.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.seg import seg_config

from common.cli_base import CliError
from deploy import fed
from server.registry.lock import PathLock, describe_holder, locked_message, set_holder
from server.run_summary import parse_summary, summarize, summary_line

REPO = Path(__file__).resolve().parents[2]


# -- run-config keys ----------------------------------------------------------------------------
def test_known_keys_are_typed_by_their_defaults():
    cfg = fed.run_config("enroll", ["sites=a,b", "steps=3", "lr=0.01", "require-signatures=false"], REPO)
    assert cfg == {"mode": "enroll", "sites": "a,b", "steps": 3, "lr": 0.01, "require-signatures": False}
    # flwr's own quoting is accepted too
    assert fed.run_config("compose", ["target='c'"], REPO)["target"] == "c"


@pytest.mark.parametrize("family_cfg", ["report", "segmentation"])
def test_both_families_run_configs_pass(family_cfg, tmp_path):
    if family_cfg == "segmentation":
        wanted = seg_config(tmp_path / "reg", tmp_path / "model", steps=2)
    else:
        wanted = {"registry-dir": str(tmp_path / "reg"), "task": "report-text", "steps": 2, "lora-r": 4}
    items = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in wanted.items()]
    assert fed.run_config("enroll", items, REPO) == {"mode": "enroll", **wanted}


@pytest.mark.parametrize(
    "items, words",
    [
        (["stpes=3"], ["'stpes'", "did you mean 'steps'"]),
        (["registry_dir=/x"], ["'registry_dir'", "did you mean 'registry-dir'"]),
        (["target-site=c"], ["'target-site'", "did you mean 'target'"]),
        (["zzzzzz=1"], ["unknown run-config key 'zzzzzz'"]),
        (["steps=three"], ["steps=three", "expected an integer"]),
        (["lr=fast"], ["lr=fast", "expected a number"]),
        (["evaluate=maybe"], ["evaluate=maybe", "true or false"]),
        (["steps"], ["'steps'", "KEY=VALUE"]),
        (["mode=compose"], ["first argument"]),
    ],
)
def test_bad_keys_and_values_are_named(items, words):
    with pytest.raises(CliError) as err:
        fed.run_config("enroll", items, REPO)
    for word in words:
        assert word in str(err.value)


def test_a_mistyped_mode_is_named_with_its_match():
    with pytest.raises(CliError, match=r"unknown mode 'enrol' \(did you mean 'enroll'\?\)"):
        fed.run_config("enrol", [], REPO)


def test_keys_come_from_the_app_it_runs(tmp_path):
    app = tmp_path / "app"
    app.mkdir()
    (app / "pyproject.toml").write_text('[tool.flwr.app.config]\nmode = "enroll"\nonly-here = 1\n')
    assert fed.run_config("whoami", ["only-here=2"], app) == {"mode": "whoami", "only-here": 2}
    with pytest.raises(CliError, match="'steps'"):
        fed.run_config("whoami", ["steps=2"], app)
    with pytest.raises(CliError, match=r"no \[tool.flwr.app.config\]"):
        (app / "pyproject.toml").write_text("[project]\nname='x'\n")
        fed.run_config("whoami", [], app)


def test_the_command_line_refuses_before_submitting(tmp_path):
    """exit 2, one ``rpe: error:`` line, nothing submitted (no coordinator exists at all here)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FLWR_HOME": str(tmp_path / "nowhere")}
    for args, word in (
        (["enroll", "stpes=3"], "did you mean 'steps'"),
        (["enroll", "steps=1"], "config.toml does not exist"),
        (["enroll", "--dir", str(tmp_path)], f"--dir {tmp_path}"),
    ):
        res = subprocess.run(
            [sys.executable, "-m", "deploy.cli", "fed", "run", *args],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=env,
            timeout=120,
        )
        assert res.returncode == 2, res
        assert res.stderr.count("\n") == 1 and res.stderr.startswith("rpe: error:") and word in res.stderr, res.stderr


# -- the verdict line and the exit codes --------------------------------------------------------
def _report(mode: str, **parts) -> dict:
    return {"run_id": "7", "mode": mode, "status": "completed", **parts}


CASES = [
    ("ok enroll", _report("enroll", enroll={"a": {"status": "accepted"}, "b": {"status": "accepted"}}), 0),
    (
        "a site failed to enrol",
        _report("enroll", enroll={"a": {"status": "accepted"}, "d": {"status": "failed", "reason": "bad data"}}),
        1,
    ),
    (
        "offline site",
        _report("enroll", enroll={"c": {"status": "offline", "reason": "site did not answer query.whoami"}}),
        1,
    ),
    ("refused delivery", _report("compose", compose={"c": {"status": "undelivered", "reason": "refused"}}), 1),
    ("delivered", _report("compose", compose={"c": {"status": "delivered"}}), 0),
    ("nothing enrolled", _report("enroll", enroll={}), 1),
    ("evaluate ok", _report("evaluate", evaluate={"rows": [{"x": 1}], "problems": {}}), 0),
    ("evaluate problem", _report("evaluate", evaluate={"rows": [{"x": 1}], "problems": {"c": "no held-out"}}), 1),
    ("whoami nobody", _report("whoami", online={}), 1),
    ("whoami ok", _report("whoami", online={"a": {}}), 0),
    ("identity refused", _report("whoami", online={"a": {}}, discovery_problems={"b": "claim refused"}), 1),
    ("ServerApp exception", {"run_id": "7", "mode": "compose", "status": "failed", "error": "ValueError: x"}, 3),
    ("ServerApp stopped mid-run", {"run_id": "7", "mode": "enroll", "status": "running"}, 3),
]


@pytest.mark.parametrize("name, report, code", CASES, ids=[c[0] for c in CASES])
def test_exit_code_from_the_runs_own_verdict(name, report, code):
    line = f"[rpe] {summary_line(report)}\n"  # as it arrives through `flwr log`
    assert "\n" not in summary_line(report)
    summary = parse_summary(line)
    assert summary is not None and summary["run_id"] == "7"
    got, message = fed.exit_code(summary, "finished:completed")
    assert got == code, (summary, message)
    assert "run 7" in message and "\n" not in message
    if code == 1 and summary.get("problems"):
        assert all(site in message for site in summary["problems"])


def test_without_a_verdict_the_run_failed_or_was_lost():
    assert fed.exit_code(None, "finished:failed", "ServerApp failed with exception: boom", "9") == (
        3,
        "run 9 ended failed without a verdict line: ServerApp failed with exception: boom",
    )
    code, message = fed.exit_code(None, "finished:stopped", "", "9")
    assert code == 3 and message.startswith("run 9 was stopped before it finished")
    code, message = fed.exit_code(None, "?", "connection refused", "9")
    assert code == 3 and "lost run 9" in message and "SuperLink" in message
    assert parse_summary("[rpe] RPE-RUN-SUMMARY {not json") is None
    assert parse_summary("[rpe] report: /x/runs/7-enroll.json") is None


# -- a locked registry: one line, which run holds it --------------------------------------------
def test_a_locked_registry_names_the_run_that_holds_it(tmp_path):
    holder = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from server.registry.lock import PathLock, set_holder\n"
        "set_holder('run 4242 (enroll)', '4242')\n"
        "PathLock.acquire(Path(sys.argv[1]))\n"
        "print('held', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", holder, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        from server.registry.errors import RegistryLockedError

        with pytest.raises(RegistryLockedError) as err:
            PathLock.acquire(tmp_path)
        message = str(err.value)
        assert "\n" not in message
        assert f"run 4242 (enroll), pid {proc.pid}, since " in message
        assert "rpe fed stop 4242" in message and "Registry(" not in message
        # the ServerApp's verdict carries exactly that line, marked as the operator's situation
        report = {"run_id": "4243", "mode": "whoami", "status": "failed", "error": message, "operator_error": True}
        summary = parse_summary(summary_line(report))
        assert summary["operator_error"] is True
        code, line = fed.exit_code(summary, "finished:failed")
        assert code == 3 and line == f"run 4243 (whoami) failed: {message}"
    finally:
        proc.kill()
        proc.wait()


def test_a_non_run_holder_and_an_old_lock_file(tmp_path):
    set_holder("rpe compose --registry /r")
    try:
        lock = PathLock.acquire(tmp_path)
        text = (tmp_path / ".lock").read_text()
        rec = json.loads(text)
        assert rec["pid"] == os.getpid() and rec["what"] == "rpe compose --registry /r" and "run_id" not in rec
        assert locked_message(tmp_path, text).endswith("wait for it to finish, or stop that process")
        lock.release()
    finally:
        set_holder("")
    assert describe_holder("1234\n") == "pid 1234"  # a lock file written before holders were named


def test_summarize_is_small_for_a_large_report():
    rows = [{"target": f"s{i}", "method": "sim", "rougeL": 0.5} for i in range(5000)]
    line = summary_line(_report("evaluate", evaluate={"rows": rows, "problems": {}}))
    assert len(line) < 300 and summarize(_report("evaluate", evaluate={"rows": rows}))["outcome"] == "ok"
