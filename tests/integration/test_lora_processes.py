"""Canonical adapter bytes are the same in another Python process (a fresh interpreter, another hash
seed) as in this one. (The adapter code in this process: tests/unit/test_lora.py.)
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from common.models import PROJECT_ROOT

_BYTES_SNIPPET = """
import hashlib, torch
from common.adapters import LoraAdapter, LoraModule, adapter_to_bytes
g = torch.Generator().manual_seed(7)
mods = {f"model.layers.{i}.self_attn.q_proj": LoraModule(torch.randn(3, 8, generator=g),
        torch.randn(8, 3, generator=g), 0.5 + i) for i in range(3)}
print(hashlib.sha256(adapter_to_bytes(LoraAdapter(mods, "base"))).hexdigest())
"""


@pytest.mark.integration
def test_bytes_identical_across_processes():
    ns: dict = {}
    exec(_BYTES_SNIPPET.replace("print(", "digest = ("), ns)  # the same code, in this process
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        there = subprocess.run(
            [sys.executable, "-c", _BYTES_SNIPPET],
            cwd=PROJECT_ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert there == ns["digest"]
