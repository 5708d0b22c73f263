"""deploy/README.md "One machine": the block run as written, command by command.

The commands are read from the document (tests/support/doc_commands.py), not copied. The only
rewrites, each a plain string replacement: the tiny test model for ``smollm2-135m-instruct``, the
test's site folders for ``data/sites/``, a free port for the SuperLink (``up --port``; other tests
run beside this one), ``rpe`` / ``python`` as this interpreter. Every command must exit 0, and what
the guide says each one does must be so (sites answer, enrol, a composition reaches site c, the
evaluation writes its table, a stopped site comes back).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.doc_commands import section_commands
from support.federation import make_site_data

from deploy import launch, warm_clientapp

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
GUIDE = REPO / "deploy" / "README.md"


def test_the_one_machine_block_runs_as_written(tmp_path: Path, tiny_model_dir: Path) -> None:
    cmds = section_commands(GUIDE, "One machine")
    assert cmds[0].startswith("python -m deploy.launch up") and cmds[-1].startswith("python -m deploy.launch down")
    make_site_data(tmp_path / "data" / "sites", n=24, n_eval=10)  # 10 held-out: the default release policy
    port = launch.free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.pop("FLWR_HOME", None)
    workdir = tmp_path / "runs" / "fed"
    outputs: list[str] = []
    try:
        for cmd in cmds:
            line = (
                cmd.replace("smollm2-135m-instruct", str(tiny_model_dir))
                .replace("launch up ", f"launch up --port {port} ")
                .replace("data/sites/", str(tmp_path / "data" / "sites") + "/")
            )
            argv = shlex.split(line, comments=True)
            if argv[0] == "rpe":
                argv = [sys.executable, "-m", "deploy.cli", *argv[1:]]
            elif argv[0] == "python":
                argv = [sys.executable, *argv[1:]]
            t0 = time.monotonic()
            res = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
            print(f"{time.monotonic() - t0:6.1f} s  {cmd}")  # where the time goes (pytest -s)
            assert res.returncode == 0, f"{cmd}\n-> exit {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
            outputs.append(res.stdout + res.stderr)
    finally:
        if (workdir / "launch-state.json").exists():
            launch.down(workdir, timeout=15.0)
    said = "\n".join(outputs)
    for site in "abc":
        assert f"enroll {site}: accepted" in said, said[-4000:]
    registry = tmp_path / "runs" / "registry"
    assert (registry / "records.jsonl").read_text().count("\n") >= 3
    assert list((registry / "evaluations").glob("*/results.md")), "the evaluation wrote no table"
    delivered = list((workdir / "sites" / "c" / "adapters").glob("rpe-lin-l1-k2-run*"))
    assert len(delivered) == 1 and (delivered[0] / "adapter_config.json").is_file(), "no composition reached site c"
    # every site's ClientApps ran in forks of its warm starter (deploy/warm_clientapp.py), but the
    # first one and those started while it imported (each logged as a cold start); none was
    # declined for its environment
    for site in "abc":
        log = (workdir / "logs" / f"supernode-{site}.log").read_text()
        forks, cold = log.count(warm_clientapp.FORK_LINE), log.count(warm_clientapp.COLD_LINE)
        assert forks >= 1 and forks + cold == log.count("Start `flwr-clientapp` process"), log[-3000:]
        assert "environment differs" not in log, log[-3000:]
