"""A writer SIGKILLed in the middle of writing an output directory leaves the old output whole.
(Safe writes in this process: tests/unit/test_safeio.py.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from server.outdir import output_dir

WRITER = r"""
import sys, time
from pathlib import Path
from server.outdir import output_dir
with output_dir(Path(sys.argv[1]), "composition") as tmp:
    (tmp / "adapter_config.json").write_text("new config")
    (tmp / "adapter_model.safetensors").write_bytes(b"new weights" * 1000)
    print("written", flush=True)
    time.sleep(60)
"""


@pytest.mark.integration
def test_sigkill_mid_write_leaves_the_old_output_whole(tmp_path):
    out = tmp_path / "composed"
    with output_dir(out, "composition") as tmp:
        (tmp / "adapter_config.json").write_text("old config")
        (tmp / "adapter_model.safetensors").write_bytes(b"old weights")
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(out)], stdout=subprocess.PIPE, env=env, start_new_session=True
    )
    try:
        assert proc.stdout.readline().strip() == b"written"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (out / "adapter_config.json").read_text() == "old config"
    assert (out / "adapter_model.safetensors").read_bytes() == b"old weights"
