"""Issue 26 class 9 (parsers and compose): a hostile ``adapter_config.json`` is a clear
``LoraFormatError`` naming the field, in bounded time; a composition's memory is bounded.

Before: ``common/adapters/peft_io.py`` read the config with plain ``json.loads`` (a 200,000-deep
file was a ``RecursionError``), matched ``rank_pattern`` keys as regular expressions (``(.|.)*Z``
hung ``rpe registry add``), and did arithmetic on unchecked values (``lora_alpha: "8"``,
``r: 1e400``, ``r: 0`` were TypeError / OverflowError / ZeroDivisionError); ``rpe compose --k 5000``
formed k·r × k·r Gram matrices (past 9.8 GB).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tracemalloc
import types
from pathlib import Path

import numpy as np
import pytest
from support.registry import DIM, make_adapter, make_meta, new_registry

from common.adapters import LoraFormatError, load_peft_adapter, save_peft_adapter
from server.bounds import module_norm
from server.composer import MAX_COMPOSE_K, CompositionError, compose_for_target

ROOT = Path(__file__).resolve().parents[2]
MODULE = "model.layers.0.self_attn.q_proj"


@pytest.fixture
def alarm():
    """Fail (instead of hanging the suite) if a parse takes more than 20 s."""

    def boom(*_: object) -> None:
        raise TimeoutError("the parse did not finish in 20 s (catastrophic regex backtracking?)")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _peft(tmp: Path, edit=None, raw: str | None = None) -> Path:
    d = save_peft_adapter(make_adapter(1), tmp / "peft", "tiny-base")
    cfg_path = d / "adapter_config.json"
    if raw is not None:
        cfg_path.write_text(raw)
    else:
        cfg = json.loads(cfg_path.read_text())
        edit(cfg)
        cfg_path.write_text(json.dumps(cfg))
    return d


def test_a_deep_config_is_a_clear_error_not_recursion(tmp_path: Path) -> None:
    d = _peft(tmp_path, raw="[" * 200_000 + "]" * 200_000)
    with pytest.raises(LoraFormatError, match="nested deeper than 64"):
        load_peft_adapter(d)


def test_a_backtracking_pattern_key_is_refused_fast(tmp_path: Path, alarm: None) -> None:
    evil = {"(.|.)*Z": 4, "(a+)+$": 2}
    for key, value in evil.items():
        d = _peft(
            tmp_path / key.replace("/", "_").replace("|", "_"), lambda c, k=key, v=value: c.update(rank_pattern={k: v})
        )
        with pytest.raises(LoraFormatError, match="pattern key .* regular expressions are refused"):
            load_peft_adapter(d)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("lora_alpha", "8", r"lora_alpha is '8'; expected a finite number"),
        ("r", 1e400, r"JSON holds Infinity"),  # json.dumps writes Infinity; 1e400 itself: the case below
        ("r", 0, r"\br is 0; expected a rank from 1"),
        ("r", 2.5, r"\br is 2.5; expected a whole number"),
        ("r", True, r"\br is True"),
        ("lora_alpha", None, r"lora_alpha is None"),
        ("rank_pattern", {MODULE: "2"}, r"rank_pattern\[.*\] is '2'"),
        ("alpha_pattern", {MODULE: 1e308 * 10}, r"JSON holds Infinity"),
        ("rank_pattern", [1, 2], r"rank_pattern is list; expected an object"),
    ],
)
def test_bad_numbers_name_the_field(tmp_path: Path, field: str, value: object, match: str) -> None:
    d = _peft(tmp_path, lambda c: c.update({field: value}))
    with pytest.raises(LoraFormatError, match=match):
        load_peft_adapter(d)


def test_r_1e400_as_written_in_the_file(tmp_path: Path) -> None:
    d = _peft(tmp_path, lambda c: None)
    cfg = (d / "adapter_config.json").read_text()
    cfg = json.dumps({**json.loads(cfg), "r": 7}).replace('"r": 7', '"r": 1e400')
    (d / "adapter_config.json").write_text(cfg)
    with pytest.raises(LoraFormatError, match=r"\br is inf"):
        load_peft_adapter(d)


def test_escaped_module_names_as_peft_io_writes_them_still_load(tmp_path: Path) -> None:
    import re

    d = _peft(tmp_path, lambda c: c.update(rank_pattern={re.escape(MODULE): 2}))
    assert load_peft_adapter(d).modules[MODULE].rank == 2


def test_rpe_registry_add_refuses_a_regex_key_quickly_and_stores_nothing(tmp_path: Path) -> None:
    reg_dir = tmp_path / "reg"
    new_registry(reg_dir).close()
    before = {p.name: p.read_bytes() for p in reg_dir.iterdir() if p.is_file()}
    d = _peft(tmp_path, lambda c: c.update(rank_pattern={"(.|.)*Z": 4}))
    emb = tmp_path / "z.npy"
    np.save(emb, np.ones(DIM, dtype=np.float32))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "deploy.cli", "registry", "add", "--registry", str(reg_dir), "--adapter", str(d)]
        + ["--embedding", str(emb), "--site", "a", "--task", "t", "--samples", "5"],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert out.returncode != 0
    assert "regular expressions are refused" in out.stderr + out.stdout and "Traceback" not in out.stderr
    after = {p.name: p.read_bytes() for p in reg_dir.iterdir() if p.is_file() and p.name in before}
    assert after["records.jsonl"] == before["records.jsonl"]


def test_compose_k_above_the_limit_is_refused_before_any_work(tmp_path: Path) -> None:
    with new_registry(tmp_path / "reg") as reg:
        reg.add(make_adapter(0), np.ones(DIM, np.float32), make_meta(0))
        audit = (reg.path / "audit.jsonl").read_bytes()
        with pytest.raises(CompositionError, match=rf"k=5000 is above the composition limit {MAX_COMPOSE_K}.*memory"):
            compose_for_target(reg, np.ones(DIM, np.float32), k=5000, target="x")
        assert (reg.path / "audit.jsonl").read_bytes() == audit  # no query entry, nothing loaded


def test_a_high_rank_norm_stays_in_bounded_memory() -> None:
    rng = np.random.default_rng(0)
    r, n = 6000, 64  # a composition of k=750 rank-8 adapters of a 64 x 64 module: a Gram is 6000² (288 MB)
    A, B = rng.standard_normal((r, n)), rng.standard_normal((n, r))
    m = types.SimpleNamespace(A=A, B=B, scale=0.5)
    want = float(np.linalg.norm(0.5 * (B @ A)))
    tracemalloc.start()
    got = module_norm(m)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert got == pytest.approx(want, rel=1e-9)
    assert peak < 64 << 20, f"the norm held {peak / 2**20:.0f} MiB at once"


def test_rpe_generate_and_site_status_name_a_deep_config(tmp_path: Path) -> None:
    from client.use import format_status, site_status
    from common.families.base import CommandError
    from common.families.report.commands import base_model_of

    site = tmp_path / "site"
    d = site / "adapters" / "evil"
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(CommandError, match="nested deeper than 64"):
        base_model_of(d, None)
    status = site_status(site)
    (row,) = status["adapters"]
    assert "nested deeper than 64" in str(row["rank"])
    format_status(status)
