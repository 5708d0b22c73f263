"""The demo's workdir (``deploy/demo.py``): a second demo on the same folder is refused with the
holder's pid and changes nothing; the previous run is kept as ``<workdir>.1`` (one generation)
unless ``--fresh``; a folder that is not a demo's is never moved or deleted; a run whose delivery
failed is not a complete main job; the command that tries a delivery is one shell line. Both
families' demo recipes name a target and a command to try the delivery with. (The whole demo with
its delivery and the printed commands run: tests/integration/test_demo_delivery.py.)
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from deploy import demo

REPO = Path(__file__).resolve().parents[2]


def _demo_folder(path: Path, tag: str) -> Path:
    (path / "registry").mkdir(parents=True)
    (path / demo.MARKER).write_text("demo\n")
    (path / "registry" / "audit.jsonl").write_text(f"{tag}\n")
    return path


def _tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): p.read_text() for p in sorted(path.rglob("*")) if p.is_file()}


def test_a_second_demo_on_the_same_workdir_is_refused_naming_the_holder_and_changes_nothing(tmp_path, capsys):
    work = _demo_folder(tmp_path / "demo", "live run")
    before = _tree(work)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from deploy.demo import workdir_lock\n"
            f"with workdir_lock({str(work)!r}):\n    print('held', flush=True); time.sleep(60)",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        rc = demo.main(["--workdir", str(work), "--families", "report"])
        err = capsys.readouterr().err
        assert rc == 2
        assert f"another demo (pid {holder.pid}) is running in {work}" in err and f"kill {holder.pid}" in err
        assert "Traceback" not in err
        assert _tree(work) == before and not (tmp_path / "demo.1").exists()
    finally:
        holder.kill()
        holder.wait(timeout=10)
    # the kernel released the lock with its holder: the workdir can be taken again
    with demo.workdir_lock(work) as lock:
        assert lock == tmp_path / ".demo.lock"


def test_the_previous_run_is_kept_as_dot_1_and_only_one_generation(tmp_path):
    work = tmp_path / "demo"
    assert demo.set_aside(work) is None  # nothing there yet
    _demo_folder(work, "run 1")
    assert demo.set_aside(work) == tmp_path / "demo.1"
    assert not work.exists() and (tmp_path / "demo.1" / "registry" / "audit.jsonl").read_text() == "run 1\n"
    _demo_folder(work, "run 2")
    demo.set_aside(work)
    assert (tmp_path / "demo.1" / "registry" / "audit.jsonl").read_text() == "run 2\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.1"]


def test_fresh_deletes_the_previous_run_and_keeps_the_one_before(tmp_path):
    _demo_folder(tmp_path / "demo.1", "run 1")
    work = _demo_folder(tmp_path / "demo", "run 2")
    assert demo.set_aside(work, fresh=True) is None
    assert not work.exists() and (tmp_path / "demo.1" / "registry" / "audit.jsonl").read_text() == "run 1\n"


def test_an_older_demos_folder_without_the_marker_is_still_kept(tmp_path):
    work = tmp_path / "demo"
    for name in ("data", "deploy", "registry"):
        (work / name).mkdir(parents=True)
    assert demo.set_aside(work) == tmp_path / "demo.1" and (tmp_path / "demo.1" / "registry").is_dir()


@pytest.mark.parametrize("kind", ["not a demo", "a file", "dot-1 not a demo"])
def test_a_folder_that_is_not_a_demos_is_refused_untouched(tmp_path, capsys, kind):
    work = tmp_path / "work"
    if kind == "a file":
        work.write_text("precious\n")
    elif kind == "not a demo":
        work.mkdir()
        (work / "thesis.tex").write_text("precious\n")
    else:
        _demo_folder(work, "run")
        (tmp_path / "work.1").mkdir()
        (tmp_path / "work.1" / "thesis.tex").write_text("precious\n")
    before = {str(p.relative_to(tmp_path)): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    rc = demo.main(["--workdir", str(work), "--families", "report"])
    err = capsys.readouterr().err
    assert rc == 2 and str(work) in err and "Traceback" not in err
    assert ("--fresh" in err) if kind == "dot-1 not a demo" else ("name a" in err)
    after = {str(p.relative_to(tmp_path)): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert {k: v for k, v in after.items() if not k.endswith(".lock")} == before


def test_an_empty_folder_is_used_as_it_is(tmp_path):
    (tmp_path / "demo").mkdir()
    assert demo.set_aside(tmp_path / "demo") is None and not (tmp_path / "demo.1").exists()


def test_a_target_that_received_nothing_fails_the_main_job():
    ok = {"run_status": "finished:completed", "status": "delivered", "target": "HK"}
    result = {"families": {}, "deliveries": {"segmentation": ok}}
    assert demo.failures(result) == []
    refused = {**ok, "status": "undelivered", "reason": "no-coordinator-key"}
    assert demo.failures({**result, "deliveries": {"segmentation": refused}}) == [
        "segmentation: nothing was delivered to HK (undelivered: no-coordinator-key)"
    ]
    crashed = {**ok, "run_status": "finished:failed", "run_details": "ServerApp exception"}
    assert demo.failures({**result, "deliveries": {"report-text": crashed}}) == [
        "report-text: the delivery run ended 'finished:failed' (ServerApp exception)"
    ]


def test_the_try_command_is_one_quoted_shell_line_relative_to_here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    adapter = tmp_path / "runs" / "demo" / "deploy" / "sites" / "new site" / "adapters" / "compose-7-sim"
    argv = ("generate", "--adapter", "{adapter}", "--data", "/data/u.jsonl", "--out", "{out}.jsonl")
    cmd = demo.try_command(argv, adapter, tmp_path / "runs" / "demo" / "try" / "report-text")
    words = shlex.split(cmd)
    assert words[0].endswith("rpe") and words[1:] == [
        "generate",
        "--adapter",
        "runs/demo/deploy/sites/new site/adapters/compose-7-sim",
        "--data",
        "/data/u.jsonl",
        "--out",
        "runs/demo/try/report-text.jsonl",
    ]


def test_the_deliveries_are_printed_and_written_to_a_script(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    dlv = {
        "status": "delivered",
        "target": "HK",
        "sites": ["UCL", "BMC"],
        "weights": [0.6, 0.4],
        "metrics": {"dice": 0.5},
        "adapter": str(tmp_path / "a"),
        "try": "rpe segment --adapter a --images i --out o",
    }
    demo.print_deliveries({"workdir": str(tmp_path), "deliveries": {"segmentation": dlv}})
    out = capsys.readouterr().out
    assert "HK received a composition of UCL 0.60, BMC 0.40" in out and "dice 0.5000" in out
    assert "  rpe segment --adapter a --images i --out o" in out
    assert (tmp_path / "try-delivery.sh").read_text().endswith("rpe segment --adapter a --images i --out o\n")


def test_each_family_recipe_names_a_target_and_a_command_to_try_its_delivery(tmp_path):
    from common.families.report import demo as report_demo
    from common.families.report.family import load_site_examples
    from common.families.segmentation import demo as seg_demo

    # the report target: a new site whose findings carry no impression (nothing to train on)
    path = report_demo.prepare_target(tmp_path / report_demo.TARGET_SITE, 12)
    rows = path.read_text().splitlines()
    assert len(rows) == 12 and all('"target"' not in r for r in rows)
    data = load_site_examples(path.parent)
    assert (len(data.train), len(data.eval), len(data.unlabeled)) == (0, 0, 12)
    assert report_demo.TARGET_SITE not in report_demo.DEFAULT_SITES

    plan = seg_demo.demo_plan(tmp_path, "quick", "litemedsam")
    assert plan.target is not None and plan.target.site in [s.site for s in plan.sites]
    assert plan.try_argv[0] == "segment" and "{adapter}" in plan.try_argv and "{out}" in plan.try_argv
    images = Path(plan.try_argv[plan.try_argv.index("--images") + 1])
    assert images.is_dir() and any(images.glob("*.png"))


def test_the_main_job_benchmark_reads_every_phase_line_the_demo_prints():
    """benchmarks/main_job.py times the demo by its ``[demo] <phase> [<family>]`` lines; family
    names have hyphens (``report-text``), which its pattern once missed, and the delivery is a phase."""
    import inspect

    from benchmarks.main_job import PHASE_RE

    source = inspect.getsource(demo)
    for phase in ("enroll", "evaluate", "deliver"):
        assert f'f"{phase} [{{family}}]: ' in source, phase  # the demo prints this line per family
        for family in demo.demo_families():
            m = PHASE_RE.match(f"[demo] {phase} [{family}]: ...")
            assert m and m.groups() == (phase, family)


def test_a_deployment_that_fails_stops_the_demo_with_one_message_and_every_process(tmp_path, monkeypatch, capsys):
    """A SuperLink that does not come up, or a flwr call that times out on an overloaded machine
    (seen: ``flwr supernode ls`` > 60 s at a load average of 26), is one message naming the logs and
    exit 1, not a traceback; whatever started is stopped. (The fault is injected: it cannot be
    produced on demand.)"""
    stopped = []

    def fail_up(*args, **kwargs):
        raise subprocess.TimeoutExpired(["flwr", "supernode", "ls"], 60.0)

    monkeypatch.setattr(demo.launch, "up", fail_up)
    monkeypatch.setattr(demo.launch, "down", lambda workdir, *a, **k: stopped.append(Path(workdir)) or {})
    work = tmp_path / "demo"
    rc = demo.main(["--workdir", str(work), "--families", "segmentation"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert "[demo] the main job stopped: Command '['flwr', 'supernode', 'ls']' timed out after 60.0 seconds" in err
    assert f"Logs: {work}/deploy/logs/" in err and "demo.1" in err
    assert stopped == [work / "deploy"]


def test_a_status_poll_that_times_out_does_not_end_a_run_that_goes_on(tmp_path, monkeypatch):
    """``launch.run_app`` polls ``flwr ls`` while the demo's runs go on; on an overloaded machine
    (load average 26-43 here) one poll took over 60 s and its TimeoutExpired ended the whole demo
    mid-enrolment. A poll that times out is asked again, as one that fails. (The slow CLI is
    injected: it cannot be produced on demand.)"""
    from deploy.launch import runs

    polls = []

    def flwr_cli(args, flwr_home, *a, **k):
        polls.append(args)
        if len(polls) == 1:
            raise subprocess.TimeoutExpired(["flwr", *args], 60.0)
        return {"runs": [{"status": "finished:completed", "status-details": ""}]}

    submitted = subprocess.CompletedProcess([], 0, stdout='{"success": true, "run-id": "7"}', stderr="")
    monkeypatch.setattr(runs.subprocess, "run", lambda *a, **k: submitted)
    monkeypatch.setattr(runs, "flwr_cli", flwr_cli)
    (tmp_path / "registry" / "runs").mkdir(parents=True)
    (tmp_path / "registry" / "runs" / "7-enroll.json").write_text('{"status": "completed"}')
    (tmp_path / "flwr-home").mkdir()
    out = runs.run_app(tmp_path / "flwr-home", REPO, {"mode": "enroll"}, tmp_path / "registry", 60.0, poll_s=0.0)
    assert out["status"] == "finished:completed" and out["report"] == {"status": "completed"} and len(polls) == 2
