"""The demo ends with one real delivery per family, and the commands it prints to try them work.

``python -m deploy.demo`` runs as a person runs it (a subprocess, real SuperLink and SuperNodes on
loopback with TLS and node auth, both families), without the evaluation (``--no-evaluate``) and
with the tiny test models through the demo's own ``--model FAMILY=MODEL`` option (the tiny Llama for
the report sites, the tiny SAM of tests/support/seg.py for the prostate sites: the journey is under
test here, not the models; five rank-4 adapters on its 16-wide modules compose at full rank since
4f4836d), to stay near two minutes: the report family's unlabelled target ``new-ct-thorax``
and the segmentation family's ``HK`` each receive a composition, installed in their site folder;
the ``rpe generate`` / ``rpe segment`` lines the demo prints are the lines of the script it writes,
``<workdir>/try-delivery.sh``. Then every command of the README's role sections ("A hospital site"
runs that script, "The coordinator", "The privacy auditor") runs as the README gives it, read from
the README, with ONE rewrite: the README's ``runs/demo`` becomes this test's workdir. (The workdir
lock and the previous run kept as ``<workdir>.1``: tests/unit/test_demo_workdir.py; the README's first screen and links: tests/unit/test_readme.py.)
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from support.doc_commands import section_commands

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
#: the README sections whose commands run on the demo's output, in this order
README_SECTIONS = ("A hospital site", "The coordinator", "The privacy auditor")


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "ANONYMIZED_TELEMETRY": "False",
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def printed_try_commands(stdout: str) -> list[str]:
    """The indented lines under the demo's "Try the delivered adapters" line."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Try the delivered adapters"))
    out = []
    for line in lines[start + 1 :]:
        if not line.startswith("  "):
            break
        out.append(line.strip())
    return out


def test_the_demo_delivers_per_family_and_its_printed_commands_work(tmp_path, tiny_model_dir, tiny_sam_dir):
    work = tmp_path / "demo"
    cmd = [
        sys.executable,
        "-m",
        "deploy.demo",
        "--workdir",
        str(work),
        "--no-evaluate",
        "--model",
        f"report-text={tiny_model_dir}",
        "--model",
        f"segmentation={tiny_sam_dir}",
    ]
    run = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    assert "delivered [report-text]: new-ct-thorax received a composition of " in run.stdout
    assert "delivered [segmentation]: HK received a composition of " in run.stdout
    tries = printed_try_commands(run.stdout)
    assert [shlex.split(c)[1] for c in tries] == ["generate", "segment"], run.stdout
    sites = work / "deploy" / "sites"
    for site, family in (("new-ct-thorax", "report-text"), ("HK", "segmentation")):
        received = [d for d in (sites / site / "adapters").iterdir() if not d.name.startswith("own-")]
        assert len(received) == 1 and (received[0] / "adapter_config.json").is_file(), (site, received)
        provenance = json.loads((received[0] / "rpe-provenance.json").read_text())
        assert provenance["task"] == family and site not in str(provenance.get("sites", ""))
    assert not (sites / "new-ct-thorax" / "adapters" / "own-report-text").exists()  # it enrolled nothing

    script = (work / "try-delivery.sh").read_text().splitlines()
    assert script[-2:] == tries and script[-3] == f"cd {tmp_path}"  # the printed lines, from where they were printed

    ran = []
    for section in README_SECTIONS:
        commands = section_commands(README, section)
        assert commands, section
        for line in commands:
            line = line.replace("runs/demo", str(work))
            res = subprocess.run(line, shell=True, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
            assert res.returncode == 0, (section, line, res.stdout[-2000:], res.stderr[-4000:])
            ran.append(line)
    assert any("try-delivery.sh" in c for c in ran) and any(" audit verify " in c for c in ran)
    predictions = [json.loads(p) for p in (work / "try" / "report-text.jsonl").read_text().splitlines()]
    assert len(predictions) == 16 and all(p.get("prediction") is not None for p in predictions), predictions[:2]
    masks = sorted((work / "try" / "segmentation").glob("*.png"))
    assert len(masks) == 3, masks
    assert (work / "audit-report.html").is_file()
