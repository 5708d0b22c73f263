"""Test helper for tests/integration/test_registry_crash.py (not a test module).

Imports torch/chromadb once, then for each JSON command on stdin forks a *child process* that
opens the registry and submits the deterministic item list in a loop (re-submitting what is
already there, which must be a no-op). The test SIGKILLs the child by pid after a delay, or the
child kills itself at a registry crash point (``RPE_CRASH_AT``). Forking from an importer that
never opened Chroma keeps each round well under a second instead of ~5 s of imports.

Protocol (stdout, one line each): ``pid P``, ``ready P`` (registry open), ``added P I ID``,
``exit P CODE`` (negative = killed by that signal).
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

import chromadb  # noqa: E402,F401  - imported before forking so children start fast
import numpy as np  # noqa: E402
import torch  # noqa: E402

from common.adapters import LoraAdapter, LoraModule, adapter_to_bytes  # noqa: E402
from server.registry import AdapterMeta, Registry  # noqa: E402

BASE = "sha256:" + "5e" * 32
SHAPES = {"model.layers.0.self_attn.q_proj": (16, 12), "model.layers.0.mlp.up_proj": (20, 12)}
DIM = 16


def items(n: int) -> list[tuple[object, np.ndarray, AdapterMeta]]:
    """Deterministic submissions; every 4th reuses the previous adapter (two records, one blob),
    every 3rd is sent as canonical bytes instead of a LoraAdapter."""
    out = []
    rng = np.random.default_rng(1234)
    for i in range(n):
        seed = i - 1 if i % 4 == 3 else i
        g = torch.Generator().manual_seed(seed)
        adapter = LoraAdapter(
            {
                name: LoraModule(torch.randn(2, inp, generator=g), torch.randn(o, 2, generator=g), 2.0)
                for name, (o, inp) in SHAPES.items()
            }
        )
        payload = adapter_to_bytes(adapter) if i % 3 == 0 else adapter
        meta = AdapterMeta(
            site=f"site{i % 4}", task=f"task{i % 2}", modality="text", base_fingerprint=BASE, sample_count=i + 1
        )
        out.append((payload, rng.standard_normal(DIM).astype(np.float32), meta))
    return out


def child(path: str, n: int) -> None:
    faulthandler.register(signal.SIGUSR1)  # the test dumps our stacks if we seem to hang
    pid = os.getpid()
    reg = Registry(path)
    print(f"ready {pid}", flush=True)
    for i, (payload, z, meta) in enumerate(items(n)):
        rec = reg.add(payload, z, meta)
        print(f"added {pid} {i} {rec.id}", flush=True)
    reg.close()


def main() -> None:
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("crash_at"):
            os.environ["RPE_CRASH_AT"] = cmd["crash_at"]
        else:
            os.environ.pop("RPE_CRASH_AT", None)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                child(cmd["path"], int(cmd["n"]))
            except BaseException:  # noqa: BLE001 - report and exit non-zero
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            os._exit(code)
        print(f"pid {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"exit {pid} {os.waitstatus_to_exitcode(status)}", flush=True)


if __name__ == "__main__":
    main()
