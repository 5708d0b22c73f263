"""Console test helpers: ``python -m server.console`` as its own process (``Console``), a headless
chromium through Playwright (the ``browser`` fixture, module-scoped; skips without chromium or
playwright), a click that waits for the next page (``_go``) and a small registry's base, module
shapes and adapters (``test_console*.py``)."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from common.adapters import LoraAdapter, LoraModule

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
BROWSER_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
BASE = "sha256:" + "34" * 32
SHAPES = {"model.layers.0.self_attn.q_proj": (12, 10), "model.layers.0.self_attn.v_proj": (6, 10)}
DIM = 8


def _adapter(seed: int) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    r = 1 + seed % 3
    return LoraAdapter(
        {
            n: LoraModule(torch.randn(r, s[1], generator=g), torch.randn(s[0], r, generator=g), 2.0)
            for n, s in SHAPES.items()
        },
        base_model="tiny-base",
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Console:
    """``python -m server.console`` in its own process group, stopped by PID."""

    def __init__(self, registry: Path, log: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
        self.log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server.console", "--registry", str(registry), "--port", str(self.port), *extra],
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"console exited with {self.proc.returncode}: {log.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"console did not listen within 90 s: {log.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.log.close()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.skip(
            f"no chromium at {CHROMIUM}: install it with `apt-get install -y chromium` "
            "(scripts/setup.sh does this as root)"
        )
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS, headless=True)
        yield b
        b.close()


def _go(page, selector: str) -> None:
    """Click a link or submit button and wait for the new page to load."""
    with page.expect_navigation(wait_until="load"):
        page.click(selector)
