"""common/adapters/stream_compose.py: PEFT dirs -> PEFT dir, streamed, byte for byte what the in-memory path writes.

Inputs are written by stock PEFT (``get_peft_model`` + ``save_pretrained``) on the tiny Llama; the
reference is ``save_peft_adapter(compose(load_peft_adapters(dirs), w), out)``. Faults are real: a
file truncated between its check and its read, a full tmpfs (``tests/support/tmpfs.py``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from support.tmpfs import run_in_tmpfs

import common.adapters.stream_compose as pc
from common.adapters import (
    LoraFormatError,
    compose,
    compose_peft_dirs,
    delta_dict,
    load_peft_adapter,
    load_peft_adapters,
    save_peft_adapter,
)
from common.adapters.peft_io import safetensors_head
from common.files.buffers import empty_bytes

WEIGHTS = (0.7, -0.2, 0.5)
FILES = ("adapter_model.safetensors", "adapter_config.json")


@pytest.fixture(scope="module")
def peft_dirs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three stock-PEFT adapters that differ in rank, alpha, rsLoRA, rank_pattern, targets and dtype."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("peft-inputs")
    specs = [
        (dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), torch.float32),
        (
            dict(r=6, lora_alpha=3, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
            torch.bfloat16,
        ),
        (
            dict(
                r=2,
                lora_alpha=4,
                target_modules=["q_proj", "o_proj"],
                rank_pattern={"model.layers.1.self_attn.o_proj": 5},
            ),
            torch.float32,
        ),
    ]
    dirs = []
    for i, (kw, dtype) in enumerate(specs):
        torch.manual_seed(i)
        base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=dtype)
        model = get_peft_model(base, LoraConfig(init_lora_weights=False, lora_dropout=0.0, **kw))
        out = root / f"a{i}"
        model.save_pretrained(str(out))
        dirs.append(out)
    return dirs


def _reference(dirs: list[Path], w, out: Path, **kw) -> Path:
    dtype, max_rank = kw.get("dtype"), kw.get("max_rank")
    return save_peft_adapter(
        compose(load_peft_adapters(dirs), w, max_rank=max_rank, dtype=dtype), out, kw.get("base_model_name_or_path")
    )


def _same_files(a: Path, b: Path) -> bool:
    return all((a / f).read_bytes() == (b / f).read_bytes() for f in FILES)


@pytest.mark.parametrize("dtype", [None, torch.float32, torch.bfloat16, torch.float16])
def test_streamed_output_is_byte_identical_to_the_in_memory_path(peft_dirs, tmp_path, dtype):
    ref = _reference(peft_dirs, WEIGHTS, tmp_path / "ref", dtype=dtype)
    got = compose_peft_dirs(peft_dirs, WEIGHTS, tmp_path / "got", dtype=dtype)
    assert got == tmp_path / "got"
    assert _same_files(ref, got)
    # the union of modules, each of rank Σ r_i, exactly Σ w_i s_i B_i A_i
    want = {n: sum(w * d for w, d in zip(WEIGHTS, ds, strict=True)) for n, ds in _stacked_deltas(peft_dirs).items()}
    back = delta_dict(load_peft_adapter(got), torch.float64)
    assert set(back) == set(want)
    tol = 1e-6 if dtype in (None, torch.float32) else 3e-2
    for n, d in want.items():
        assert torch.allclose(back[n], d, atol=tol * d.abs().max().item()), n
    assert [p.name for p in tmp_path.iterdir()] == sorted(["ref", "got"]) or set(
        p.name for p in tmp_path.iterdir()
    ) == {"ref", "got"}  # no temporary directory left


def _stacked_deltas(dirs: list[Path]) -> dict[str, list[torch.Tensor]]:
    deltas = [delta_dict(load_peft_adapter(d), torch.float64) for d in dirs]
    names = sorted({n for d in deltas for n in d})
    return {n: [d.get(n, torch.zeros_like(next(x[n] for x in deltas if n in x))) for d in deltas] for n in names}


def test_streamed_output_loads_in_stock_peft(peft_dirs, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = compose_peft_dirs(peft_dirs, WEIGHTS, tmp_path / "c", dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    with torch.inference_mode():
        plain = base(input_ids=ids).logits
    model = PeftModel.from_pretrained(base, str(out))
    with torch.inference_mode():
        adapted = model(input_ids=ids).logits
    # PEFT applies exactly the composed ΔW: compare with merging it by hand
    merged = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    state = merged.state_dict()
    for name, d in delta_dict(load_peft_adapter(out), torch.float32).items():
        state[f"{name}.weight"] += d
    merged.load_state_dict(state)
    with torch.inference_mode():
        want = merged(input_ids=ids).logits
    assert not torch.allclose(plain, adapted)
    assert torch.allclose(adapted, want, atol=1e-4)


def test_chunked_path_and_factors_stored_apart_give_the_same_bytes(peft_dirs, tmp_path, monkeypatch):
    """Every module streamed in row chunks (tiny chunk sizes), and an input whose B factors all come
    before its A factors (no single read per module): still the reference bytes."""
    src = peft_dirs[1]
    from safetensors.torch import load_file

    tensors = load_file(str(src / FILES[0]))
    order = sorted(tensors, key=lambda k: (".lora_A." in k, k))  # every B, then every A
    head = safetensors_head([(k, tensors[k].dtype, tuple(tensors[k].shape)) for k in order], {"format": "pt"})
    apart = tmp_path / "apart"
    apart.mkdir()
    with open(apart / FILES[0], "wb") as fh:
        fh.write(head)
        for k in order:
            fh.write(tensors[k].contiguous().view(torch.uint8).numpy().tobytes())
    (apart / FILES[1]).write_bytes((src / FILES[1]).read_bytes())
    dirs = [peft_dirs[0], apart, peft_dirs[2]]
    ref = _reference(dirs, WEIGHTS, tmp_path / "ref")
    assert _same_files(ref, compose_peft_dirs(dirs, WEIGHTS, tmp_path / "whole"))
    monkeypatch.setattr(pc, "CHUNK_BYTES", 96)
    monkeypatch.setattr(pc, "FLUSH_BYTES", 40)
    assert _same_files(ref, compose_peft_dirs(dirs, WEIGHTS, tmp_path / "chunked"))


def test_max_rank_and_base_name_follow_the_in_memory_path(peft_dirs, tmp_path):
    ref = _reference(peft_dirs, WEIGHTS, tmp_path / "ref", max_rank=3, base_model_name_or_path="tiny/base")
    got = compose_peft_dirs(peft_dirs, WEIGHTS, tmp_path / "got", max_rank=3, base_model_name_or_path="tiny/base")
    assert _same_files(ref, got)
    assert json.loads((got / FILES[1]).read_text())["base_model_name_or_path"] == "tiny/base"


def _listing(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_bad_input_is_refused_before_anything_is_written(peft_dirs, tmp_path):
    out = tmp_path / "out"
    compose_peft_dirs(peft_dirs[:2], [0.5, 0.5], out)
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / FILES[1]).write_bytes((peft_dirs[0] / FILES[1]).read_bytes())
    (cut / FILES[0]).write_bytes((peft_dirs[0] / FILES[0]).read_bytes()[:-10])  # header promises more
    before = _listing(tmp_path)
    cases = [
        ([peft_dirs[0], cut], [0.5, 0.5], "not a valid safetensors file"),
        (peft_dirs, [0.5, 0.5], "3 adapters but 2 weights"),
        (peft_dirs[:2], [0.5, float("nan")], "must be finite"),
        ([peft_dirs[0], tmp_path / "missing"], [0.5, 0.5], "no adapter_config.json"),
    ]
    for dirs, w, message in cases:
        with pytest.raises(LoraFormatError, match=message):
            compose_peft_dirs(dirs, w, out)
        assert _listing(tmp_path) == before  # the earlier output untouched, no temporary directory
    with pytest.raises(LoraFormatError, match="not a valid safetensors file"):  # the in-memory loader too
        load_peft_adapter(cut)


def test_shapes_from_different_bases_are_refused(peft_dirs, tmp_path):
    other = save_peft_adapter(compose(load_peft_adapters([peft_dirs[0]]), [1.0]), tmp_path / "other")
    adapter = load_peft_adapter(other)
    name = sorted(adapter.modules)[0]
    m = adapter.modules[name]
    adapter.modules[name] = type(m)(torch.randn(m.rank, m.A.shape[1] + 1), m.B, m.scale)
    save_peft_adapter(adapter, other)
    with pytest.raises(LoraFormatError, match="different base models"):
        compose_peft_dirs([peft_dirs[0], other], [0.5, 0.5], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_input_cut_short_while_it_is_read_is_an_error_not_a_crash(peft_dirs, tmp_path, monkeypatch):
    """pread, not mmap: a file truncated after its header was checked raises LoraFormatError."""
    victim = tmp_path / "victim"
    victim.mkdir()
    for f in FILES:
        (victim / f).write_bytes((peft_dirs[0] / f).read_bytes())
    real_open = pc._open_input

    def open_then_truncate(directory, config, weights_path):
        opened = real_open(directory, config, weights_path)
        if directory == victim:
            os.truncate(weights_path, os.path.getsize(weights_path) // 2)  # a real, concurrent-style cut
        return opened

    monkeypatch.setattr(pc, "_open_input", open_then_truncate)
    with pytest.raises(LoraFormatError, match="became shorter while it was read"):
        compose_peft_dirs([peft_dirs[1], victim], [0.5, 0.5], tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim"]


FULL_DISK_CHILD = r"""
import errno, json, os, sys
from pathlib import Path
import torch
from common.adapters import compose_peft_dirs
mnt = Path(sys.argv[1]); dirs = sys.argv[2:]
keep = compose_peft_dirs(dirs[:1], [1.0], mnt / "out", dtype=torch.bfloat16)
before = {p.name: p.read_bytes() for p in keep.iterdir()}
# fill the rest of the tmpfs but a little: the composition's output cannot fit
with open(mnt / "filler", "wb", buffering=0) as fh:
    try:
        while True:
            fh.write(b"\0" * 4096)
    except OSError:
        pass
os.truncate(mnt / "filler", os.path.getsize(mnt / "filler") - 3 * 4096)
err = None
try:
    compose_peft_dirs(dirs, [0.4, 0.6], mnt / "out")
except OSError as exc:
    err = exc.errno
after = {p.name: p.read_bytes() for p in (mnt / "out").iterdir()}
print(json.dumps({"errno": err, "unchanged": after == before,
                  "left": sorted(p.name for p in mnt.iterdir())}))
"""


@pytest.mark.integration
def test_a_full_disk_raises_and_leaves_the_previous_output(peft_dirs):
    """The writer thread's ENOSPC reaches the caller; the staged directory is removed and the
    earlier composition at ``out`` is left as it was (a real 256 KiB tmpfs)."""
    res = run_in_tmpfs(FULL_DISK_CHILD, size_kib=256, args=[str(d) for d in peft_dirs[:2]])
    assert res["errno"] == 28  # ENOSPC
    assert res["unchanged"] is True
    assert res["left"] == ["filler", "out"]


def test_buffers():
    big = empty_bytes(5 << 20)  # huge-page backed where the kernel offers it; aligned either way
    assert big.numel() == 5 << 20 and big.dtype == torch.uint8
    big.fill_(7)
    assert int(big[-1]) == 7
    assert empty_bytes(10).numel() == 10
    with pytest.raises(ValueError, match=">= 0"):
        empty_bytes(-1)
    assert pc._torch_dtype("BF16", "x") == torch.bfloat16
    with pytest.raises(ValueError, match="dtype F8_E4M3 is not supported"):
        pc._torch_dtype("F8_E4M3", "x")


def test_concurrent_compositions_share_the_writer_thread_and_buffers(peft_dirs, tmp_path, monkeypatch):
    """Four threads composing at once (every chunk through the shared writer thread, buffers from
    the shared pool) each write exactly the reference bytes."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr(pc, "THREAD_MIN_BYTES", 0)
    monkeypatch.setattr(pc, "CHUNK_BYTES", 4096)
    monkeypatch.setattr(pc, "FLUSH_BYTES", 1024)
    weights = [(0.7, -0.2, 0.5), (0.1, 0.2, 0.7), (1.0, 0.0, -1.0), (0.3, 0.3, 0.4)]
    refs = [_reference(peft_dirs, w, tmp_path / f"ref{i}") for i, w in enumerate(weights)]
    with ThreadPoolExecutor(4) as ex:
        outs = list(
            ex.map(lambda iw: compose_peft_dirs(peft_dirs, iw[1], tmp_path / f"got{iw[0]}"), enumerate(weights))
        )
    assert all(_same_files(r, o) for r, o in zip(refs, outs, strict=True))


def test_a_composition_wider_than_its_module_keeps_the_exact_update_at_full_rank(tmp_path):
    """Five rank-4 adapters of a 16x12 module concatenate to rank 20 > min(16, 12): a LoRA may not be
    that wide (PEFT and the wire refuse it), so both paths rewrite the module at rank 12, exactly."""
    from common.adapters import LoraAdapter, LoraModule

    gen = torch.Generator().manual_seed(7)
    dirs, adapters = [], []
    for i in range(5):
        m = LoraModule(torch.randn(4, 12, generator=gen), torch.randn(16, 4, generator=gen), 0.5)
        adapters.append(LoraAdapter({"model.layers.0.self_attn.q_proj": m}, "tiny"))
        dirs.append(save_peft_adapter(adapters[-1], tmp_path / f"in{i}"))
    w = (0.3, -0.1, 0.2, 0.4, 0.2)
    want = sum(wi * a.modules["model.layers.0.self_attn.q_proj"].delta(torch.float64) for wi, a in zip(w, adapters))
    composed = compose(adapters, w).modules["model.layers.0.self_attn.q_proj"]
    assert composed.rank == 12
    torch.testing.assert_close(composed.delta(torch.float64), want, rtol=1e-5, atol=1e-5)
    got = compose_peft_dirs(dirs, w, tmp_path / "got")
    assert _same_files(_reference(dirs, w, tmp_path / "ref"), got)
    assert json.loads((got / "adapter_config.json").read_text())["r"] == 12
