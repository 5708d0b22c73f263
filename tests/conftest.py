"""Shared fixtures: a tiny random Llama (with the real SmolLM2 tokenizer) built once per session."""

from __future__ import annotations

import ctypes
import os
import signal
from pathlib import Path

import pytest
from support import make_tiny_llama


def pytest_configure(config: pytest.Config) -> None:
    """A worker of `pytest -n` (scripts/test.sh) dies with the pytest that started it, even when that
    one is SIGKILLed: the servers a test starts are tied to the worker (PR_SET_PDEATHSIG, own
    process group), so nothing outlives a killed run."""
    if hasattr(config, "workerinput"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before the line above
            os._exit(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "model")
