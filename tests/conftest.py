"""Shared fixtures: a tiny random Llama (with the real SmolLM2 tokenizer) built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import make_tiny_llama


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "model")
