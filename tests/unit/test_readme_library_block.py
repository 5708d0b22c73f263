"""The README's "As a library" Python block runs as written (it once imported from a module that
no longer exported the function)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from support.registry import DIM, SITES, make_adapter, make_meta, new_registry

from common.adapters import save_peft_adapter

README = Path(__file__).resolve().parents[2] / "README.md"


def _library_block() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("As a library (")
    m = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert m, "the README's 'As a library' paragraph has no ```python block"
    return m.group(1)


def test_the_library_block_runs_and_composes_exactly(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    with new_registry(tmp_path / "reg") as reg:
        for i in range(len(SITES)):  # sites a..e: k = 4 once a is left out
            reg.add(make_adapter(i), rng.normal(size=DIM).astype(np.float32), make_meta(i, task="t"))
    for i, name in enumerate("abc"):
        save_peft_adapter(make_adapter(10 + i), tmp_path / name)
    ns: dict = {"z_target": rng.normal(size=DIM).astype(np.float32)}
    exec(compile(_library_block(), str(README), "exec"), ns)  # noqa: S102 - the document's own code
    assert len(ns["res"].ids) == 4 and abs(sum(ns["res"].weights) - 1) < 1e-6
    for out in ("composed", "out", "out-norm"):
        assert (tmp_path / out / "adapter_config.json").is_file(), out
    rec = ns["scaling"].record()
    assert rec["mode"] == "frobenius" and len(rec["scales"]) == 3
