"""Shared fixtures, visible to every test under ``tests/`` (see ``tests/README.md``).

Defined here: ``tiny_model_dir`` (a tiny random Llama with the real SmolLM2 tokenizer, built once
per session). Imported here from ``tests/support/`` so that every test sees them (a test file never
imports a fixture from another test file): ``task_identity`` (:mod:`support.grid`, not autouse),
``tiny_sam_dir`` and ``local`` (:mod:`support.seg`: the in-process two-family federation),
``toy`` (:mod:`support.toy`), ``clean`` (:mod:`support.auditor`), ``browser`` (:mod:`support.console`).

pytest loads this file from ``tests/`` in its default (prepend) import mode and puts ``tests/`` on
``sys.path`` first, so ``import support`` works from ``tests/unit/`` and ``tests/integration/``.
"""

from __future__ import annotations

import ctypes
import os
import signal
from pathlib import Path

import pytest
from support import make_tiny_llama
from support.auditor import clean
from support.console import browser
from support.grid import task_identity
from support.seg import local, tiny_sam_dir
from support.toy import toy

__all__ = ["browser", "clean", "local", "task_identity", "tiny_model_dir", "tiny_sam_dir", "toy"]


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
