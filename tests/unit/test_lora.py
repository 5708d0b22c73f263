"""common/adapters/lora.py: PEFT directories, canonical bytes, wire arrays and (truncated) composition."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from support import make_tiny_llama

import common.adapters.composition as adapter_composition
from common.adapters import (
    FORMAT_TAG,
    LoraAdapter,
    LoraFormatError,
    LoraModule,
    adapter_from_arrays,
    adapter_from_bytes,
    adapter_to_arrays,
    adapter_to_bytes,
    compose,
    delta_dict,
    load_peft_adapter,
    peft_key,
    save_peft_adapter,
    truncation_error,
)
from common.models import load_tokenizer

TEXTS = [
    "Chest X-ray: no acute cardiopulmonary abnormality.",
    "CT head without contrast shows no intracranial hemorrhage.",
    "MRI brain demonstrates a small chronic lacunar infarct.",
]
PROBE = "Findings: the heart size is normal and the lungs are clear."
WEIGHTS = (0.7, -0.2, 0.5)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matrices: one intra-op thread is fastest, and immune to OpenMP stalls on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _fresh_base(model_dir: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    return model


@torch.no_grad()
def _logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids).logits.float()


def _lora_layers(model) -> dict[str, object]:
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


# ---------------------------------------------------------------------------------------------
# 1. Acceptance: real PEFT-trained adapters, composed, saved, loaded by stock PEFT
# ---------------------------------------------------------------------------------------------

SPECS = [
    # r, lora_alpha, target_modules, extra LoraConfig kwargs (pattern keys as users write them)
    (4, 8, ["q_proj", "v_proj"], {"rank_pattern": {"layers.1.self_attn.q_proj": 2}}),
    (8, 4, ["q_proj", "k_proj", "o_proj"], {"use_rslora": True}),
    (16, 32, ["v_proj", "up_proj", "down_proj"], {"alpha_pattern": {"down_proj": 8}}),
]


@pytest.fixture(scope="module")
def trained(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """Three LoRAs trained by gradient descent through PEFT, saved with save_pretrained.

    Returns (dirs, deltas, probe ids): ``deltas[i][module] = scaling · B @ A`` read straight off the
    trained PEFT layers (float64), independent of common.adapters.lora.
    """
    from peft import LoraConfig, get_peft_model

    tok = load_tokenizer(tiny_model_dir)
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    root = tmp_path_factory.mktemp("trained-loras")
    dirs, deltas = [], []
    for i, (r, alpha, targets, extra) in enumerate(SPECS):
        torch.manual_seed(100 + i)
        model = _fresh_base(tiny_model_dir)
        config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, **extra)
        peft_model = get_peft_model(model, config)
        peft_model.train()
        opt = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=2e-2)
        for _ in range(4):
            loss = peft_model(**batch, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
        peft_model.eval()
        layer_deltas = {}
        for name, layer in _lora_layers(peft_model.base_model.model).items():
            A = layer.lora_A["default"].weight.detach().double()
            B = layer.lora_B["default"].weight.detach().double()
            assert B.abs().max() > 1e-3, f"{name}: lora_B is still zero after training"
            layer_deltas[name] = layer.scaling["default"] * (B @ A)
        out = root / f"adapter{i}"
        peft_model.save_pretrained(str(out))
        dirs.append(out)
        deltas.append(layer_deltas)
    probe = tok(PROBE, return_tensors="pt")["input_ids"]
    return dirs, deltas, probe


def test_load_peft_adapter_matches_trained_layers(trained):
    dirs, deltas, _ = trained
    for (_r, _alpha, targets, _extra), d, want in zip(SPECS, dirs, deltas, strict=True):
        adapter = load_peft_adapter(d)
        assert set(adapter.modules) == set(want)
        assert all(any(n.endswith("." + t) for t in targets) for n in adapter.modules)
        assert adapter.base_model is not None
        for name, module in adapter.modules.items():
            torch.testing.assert_close(module.delta(torch.float64), want[name], rtol=1e-6, atol=1e-9)
    a0, a1, a2 = (load_peft_adapter(d) for d in dirs)
    assert a0.modules["model.layers.1.self_attn.q_proj"].rank == 2  # rank_pattern, short key
    assert a0.modules["model.layers.0.self_attn.q_proj"].rank == 4
    assert a1.modules["model.layers.0.self_attn.k_proj"].scale == pytest.approx(4 / math.sqrt(8))  # rsLoRA
    assert a2.modules["model.layers.0.mlp.down_proj"].scale == pytest.approx(8 / 16)  # alpha_pattern
    assert a2.modules["model.layers.0.mlp.up_proj"].scale == pytest.approx(32 / 16)


def test_compose_saved_dir_loads_in_stock_peft_and_matches_hand_merge(trained, tiny_model_dir, tmp_path):
    from peft import PeftModel

    dirs, deltas, probe = trained
    composed = compose([load_peft_adapter(d) for d in dirs], WEIGHTS)
    # module q_proj of layer 0 is in adapters 0 and 1: rank 4 + 8
    assert composed.modules["model.layers.0.self_attn.q_proj"].rank == 12
    assert composed.modules["model.layers.1.self_attn.q_proj"].rank == 10
    assert composed.modules["model.layers.0.self_attn.v_proj"].rank == 20
    out = save_peft_adapter(composed, tmp_path / "composed", base_model_name_or_path=str(tiny_model_dir))
    config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(composed.modules)

    # Ground truth: Σ w_i ΔW_i from the PEFT-trained layers, merged by hand into a fresh base model.
    expected_model = _fresh_base(tiny_model_dir)
    base_logits = _logits(expected_model, probe)
    total: dict[str, torch.Tensor] = {}
    for w, layer_deltas in zip(WEIGHTS, deltas, strict=True):
        for name, d in layer_deltas.items():
            total[name] = total.get(name, 0) + w * d
    with torch.no_grad():
        for name, d in total.items():
            weight = expected_model.get_submodule(name).weight
            weight.copy_((weight.double() + d).float())
    expected = _logits(expected_model, probe)

    ours_model = PeftModel.from_pretrained(_fresh_base(tiny_model_dir), str(out))
    ours = _logits(ours_model, probe)
    layers = _lora_layers(ours_model.base_model.model)
    assert set(layers) == set(composed.modules)
    for name, layer in layers.items():  # PEFT gave every module its own rank, at scale 1
        assert layer.r["default"] == composed.modules[name].rank
        assert layer.scaling["default"] == 1.0
    assert (expected - base_logits).abs().max() > 1e-3  # the adapters really change the model
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)

    # PEFT's own exact composition agrees with ours.
    peft_model = PeftModel.from_pretrained(_fresh_base(tiny_model_dir), str(dirs[0]), adapter_name="a0")
    peft_model.load_adapter(str(dirs[1]), adapter_name="a1")
    peft_model.load_adapter(str(dirs[2]), adapter_name="a2")
    peft_model.add_weighted_adapter(["a0", "a1", "a2"], list(WEIGHTS), "mix", combination_type="cat")
    peft_model.set_adapter("mix")
    torch.testing.assert_close(_logits(peft_model, probe), ours, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# 2. compose maths on random matrices
# ---------------------------------------------------------------------------------------------

# m.s is smaller than its total rank (11 > 6 x 5): QR factors are wide, not tall.
SHAPES = {"m.q": (24, 16), "m.v": (20, 30), "m.o": (16, 24), "m.s": (6, 5)}
RANKS = [
    {"m.q": 3, "m.v": 5, "m.s": 4},
    {"m.q": 4, "m.o": 2, "m.v": 2, "m.s": 4},
    {"m.q": 6, "m.v": 1, "m.o": 3, "m.s": 3},
]
SCALES = [2.0, 0.5, 1.25]
RWEIGHTS = (0.6, -1.3, 0.45)


def _random_adapters(
    dtype: torch.dtype = torch.float32, seed: int = 0, shapes: dict | None = None, ranks: list | None = None
) -> list[LoraAdapter]:
    gen = torch.Generator().manual_seed(seed)
    shapes = shapes or SHAPES
    adapters = []
    for spec, scale in zip(ranks or RANKS, SCALES, strict=True):
        modules = {}
        for name, r in spec.items():
            out, inp = shapes[name]
            A = torch.randn(r, inp, generator=gen).to(dtype)
            B = torch.randn(out, r, generator=gen).to(dtype)
            modules[name] = LoraModule(A, B, scale)
        adapters.append(LoraAdapter(modules, "tiny"))
    return adapters


def _dense_sum(adapters: list[LoraAdapter], weights) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for a, w in zip(adapters, weights, strict=True):
        for name, m in a.modules.items():
            d = w * m.scale * (m.B.double() @ m.A.double())
            total[name] = total[name] + d if name in total else d
    return total


def test_compose_exact_is_weighted_sum_of_deltas():
    adapters = _random_adapters()
    composed = compose(adapters, RWEIGHTS)
    assert composed.base_model == "tiny"
    want = _dense_sum(adapters, RWEIGHTS)
    assert set(composed.modules) == set(want)
    for name, m in composed.modules.items():
        assert m.scale == 1.0
        # ranks concatenate, up to min(out, in): m.s (6x5) gets 4+4+3 = 11 -> 5, still exact
        assert m.rank == min(sum(spec.get(name, 0) for spec in RANKS), *SHAPES[name])
        assert m.A.dtype == m.B.dtype == torch.float32
        torch.testing.assert_close(m.delta(torch.float64), want[name], rtol=1e-5, atol=1e-5)
    # B is the B_i side by side, untouched; the coefficients w_i s_i sit on A's row blocks (as in
    # PEFT's add_weighted_adapter(cat)).
    q0 = adapters[0].modules["m.q"]
    torch.testing.assert_close(composed.modules["m.q"].B[:, :3], q0.B, rtol=0, atol=0)
    torch.testing.assert_close(composed.modules["m.q"].A[:3], q0.A * (RWEIGHTS[0] * q0.scale), rtol=0, atol=0)
    # the sum of deltas also equals delta_dict of the parts
    parts = [delta_dict(a) for a in adapters]
    sq = sum(w * p["m.q"] for w, p in zip(RWEIGHTS, parts, strict=True))
    torch.testing.assert_close(delta_dict(composed)["m.q"], sq, rtol=1e-5, atol=1e-5)


def test_compose_keeps_bf16_and_scales_in_float32():
    adapters = _random_adapters(torch.bfloat16)
    composed = compose(adapters, RWEIGHTS)
    assert composed.dtype == torch.bfloat16
    as_fp32 = compose(adapters, RWEIGHTS, dtype=torch.float32)
    assert as_fp32.dtype == torch.float32
    want = _dense_sum(adapters, RWEIGHTS)  # from the bf16 factors, exactly representable in fp64
    for name, m in as_fp32.modules.items():  # bf16 inputs -> fp32 output: only fp32 rounding
        torch.testing.assert_close(m.delta(torch.float64), want[name], rtol=1e-5, atol=1e-5)
    for name, m in composed.modules.items():  # bf16 output: B rounded once to bf16
        torch.testing.assert_close(m.delta(torch.float64), want[name], rtol=2e-2, atol=5e-2)
    np.testing.assert_array_equal(
        compose(adapters, np.array(RWEIGHTS)).modules["m.v"].B.float().numpy(),
        composed.modules["m.v"].B.float().numpy(),
    )


@pytest.mark.parametrize("max_rank", [1, 2, 4, 5])
def test_compose_max_rank_is_eckart_young_optimal(max_rank):
    adapters = _random_adapters(seed=1)
    approx = compose(adapters, RWEIGHTS, max_rank=max_rank)
    exact = compose(adapters, RWEIGHTS)
    predicted = truncation_error(exact, max_rank)
    for name, dense in _dense_sum(adapters, RWEIGHTS).items():
        total = exact.modules[name].rank
        S = torch.linalg.svdvals(dense)
        tail = float(S[max_rank:].square().sum().sqrt())
        m = approx.modules[name]
        got = m.delta(torch.float64)
        if total <= max_rank:
            assert m.rank == total
            assert torch.equal(m.A, exact.modules[name].A) and torch.equal(m.B, exact.modules[name].B)
            assert tail == pytest.approx(0.0, abs=1e-9)
        else:
            assert m.rank == min(max_rank, *SHAPES[name])
            assert int(torch.linalg.matrix_rank(got)) == min(max_rank, *SHAPES[name])
        floor = 1e-6 * float(torch.linalg.matrix_norm(dense))  # float32 rounding of the exact factors
        err = float(torch.linalg.matrix_norm(dense - got))
        assert err == pytest.approx(tail, rel=1e-4, abs=floor)
        assert predicted[name] == pytest.approx(tail, rel=1e-4, abs=floor)


def test_compose_max_rank_at_least_total_rank_is_exact():
    adapters = _random_adapters(seed=2)
    exact = compose(adapters, RWEIGHTS)
    for max_rank in (13, 40):  # 13 = the largest total rank (m.q)
        same = compose(adapters, RWEIGHTS, max_rank=max_rank)
        for name, m in exact.modules.items():
            assert torch.equal(same.modules[name].A, m.A) and torch.equal(same.modules[name].B, m.B)


def test_compose_max_rank_float32_path_and_output_dtype(monkeypatch):
    monkeypatch.setattr(adapter_composition, "_FLOAT64_LIMIT", 0)  # force the float32 QR/SVD used for large modules
    shapes = {"m.q": (192, 160), "m.v": (96, 200), "m.o": (128, 128)}
    ranks = [{"m.q": 8, "m.v": 8}, {"m.q": 8, "m.o": 4, "m.v": 16}, {"m.q": 16, "m.v": 4, "m.o": 8}]
    adapters = _random_adapters(seed=3, shapes=shapes, ranks=ranks)
    for max_rank in (4, 12):
        approx = compose(adapters, RWEIGHTS, max_rank=max_rank)
        assert approx.dtype == torch.float32
        for name, dense in _dense_sum(adapters, RWEIGHTS).items():
            tail = float(torch.linalg.svdvals(dense)[max_rank:].square().sum().sqrt())
            err = float(torch.linalg.matrix_norm(dense - approx.modules[name].delta(torch.float64)))
            floor = 1e-6 * float(torch.linalg.matrix_norm(dense))  # float32 rounding
            assert err == pytest.approx(tail, rel=1e-4, abs=floor)
            assert approx.modules[name].rank == min(max_rank, sum(r.get(name, 0) for r in ranks))
    half = compose(adapters, RWEIGHTS, max_rank=4, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.modules["m.q"].rank == 4


def test_compose_max_rank_without_geqrf_backend(monkeypatch):
    adapters = _random_adapters(seed=4)
    want = compose(adapters, RWEIGHTS, max_rank=3)

    def unsupported(*args, **kwargs):
        raise NotImplementedError("no geqrf on this backend")

    monkeypatch.setattr(torch, "geqrf", unsupported)
    got = compose(adapters, RWEIGHTS, max_rank=3)
    for name, m in want.modules.items():
        torch.testing.assert_close(got.modules[name].delta(torch.float64), m.delta(torch.float64), rtol=1e-6, atol=1e-6)


def test_adapter_to_casts_every_factor():
    adapter = _random_adapters()[0]
    half = adapter.to(torch.bfloat16)
    assert half.dtype == torch.bfloat16 and adapter.dtype == torch.float32
    assert half.ranks == adapter.ranks and half.base_model == adapter.base_model
    assert half.num_parameters() == adapter.num_parameters()


# ---------------------------------------------------------------------------------------------
# 3. Round trips: canonical bytes, wire arrays, PEFT directories (rank_pattern)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bytes_round_trip_and_deterministic(dtype):
    from safetensors.torch import load

    adapter = _random_adapters(dtype)[1]
    blob = adapter_to_bytes(adapter)
    assert adapter_to_bytes(adapter) == blob
    reordered = LoraAdapter(dict(reversed(list(adapter.modules.items()))), adapter.base_model)
    assert adapter_to_bytes(reordered) == blob  # insertion order does not matter
    back = adapter_from_bytes(blob)
    assert back.base_model == adapter.base_model
    assert set(back.modules) == set(adapter.modules)
    for name, m in adapter.modules.items():
        b = back.modules[name]
        assert b.A.dtype == b.B.dtype == dtype
        assert torch.equal(b.A, m.A) and torch.equal(b.B, m.B) and b.scale == m.scale
    assert adapter_to_bytes(back) == blob
    tensors = load(blob)  # stock safetensors reads it, with PEFT key names
    assert set(tensors) == {peft_key(n, f) for n in adapter.modules for f in "AB"}


def test_bytes_mixed_dtypes_and_metadata():
    m = LoraModule(torch.randn(2, 5), torch.randn(3, 2).to(torch.bfloat16), 0.1)
    y = LoraModule(torch.randn(1, 3).half(), torch.randn(4, 1), 3.0)
    adapter = LoraAdapter({"x.proj": m, "y.proj": y})
    blob = adapter_to_bytes(adapter)
    back = adapter_from_bytes(blob)
    assert back.base_model is None
    assert back.modules["x.proj"].B.dtype == torch.bfloat16
    assert back.modules["y.proj"].A.dtype == torch.float16
    assert back.modules["x.proj"].scale == 0.1
    n = int.from_bytes(blob[:8], "little")
    meta = json.loads(blob[8 : 8 + n])["__metadata__"]
    assert meta["rpe_format"] == FORMAT_TAG and meta["format"] == "pt"
    assert json.loads(meta["rpe_lora"])["modules"]["x.proj"] == {"rank": 2, "scale": 0.1}


def test_arrays_round_trip():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        adapter = _random_adapters(dtype)[2]
        arrays, config = adapter_to_arrays(adapter)
        assert all(isinstance(v, np.ndarray) for v in arrays.values())
        assert set(arrays) == {peft_key(n, f) for n in adapter.modules for f in "AB"}
        assert all(isinstance(v, str) for v in config.values()) and config["format"] == FORMAT_TAG
        if dtype == torch.bfloat16:
            assert all(v.dtype == np.float32 for v in arrays.values())  # numpy has no bf16
        # simulate the wire: bytes and back, read-only arrays
        wire = {k: np.frombuffer(v.tobytes(), dtype=v.dtype).reshape(v.shape) for k, v in arrays.items()}
        back = adapter_from_arrays(wire, json.loads(json.dumps(config)))
        for name, m in adapter.modules.items():
            b = back.modules[name]
            assert b.A.dtype == dtype and b.scale == m.scale
            assert torch.equal(b.A, m.A) and torch.equal(b.B, m.B)
        assert adapter_to_bytes(back) == adapter_to_bytes(adapter)


def _prefix_adapter(hidden: int = 32) -> tuple[LoraAdapter, dict[str, int]]:
    """Modules of layers 1, 10, 11 with different ranks and scales (one name a prefix of another)."""
    gen = torch.Generator().manual_seed(5)
    kv = hidden // 2  # make_tiny_llama: 2 of 4 heads are KV heads
    spec = {  # name: (out, in, rank, scale)
        "model.layers.1.self_attn.q_proj": (hidden, hidden, 2, 2.0),
        "model.layers.11.self_attn.q_proj": (hidden, hidden, 6, 0.75),
        "model.layers.10.self_attn.q_proj": (hidden, hidden, 4, 1.0),
        "model.layers.1.self_attn.v_proj": (kv, hidden, 4, 1.0),
        "model.layers.11.self_attn.v_proj": (kv, hidden, 4, 1.0),
        "model.layers.1.mlp.down_proj": (hidden, 2 * hidden, 4, -0.5),  # negative: folded into B
        "model.layers.0.mlp.up_proj": (2 * hidden, hidden, 3, 1 / 3),
        "model.layers.2.mlp.up_proj": (2 * hidden, hidden, 5, 0.1),
    }
    modules = {
        n: LoraModule(torch.randn(r, i, generator=gen) * 0.1, torch.randn(o, r, generator=gen) * 0.1, s)
        for n, (o, i, r, s) in spec.items()
    }
    return LoraAdapter(modules, "tiny12"), {n: v[2] for n, v in spec.items()}


def _assert_same_deltas(a: LoraAdapter, b: LoraAdapter) -> None:
    assert set(a.modules) == set(b.modules)
    for name, m in a.modules.items():
        assert b.modules[name].rank == m.rank
        torch.testing.assert_close(b.modules[name].delta(torch.float64), m.delta(torch.float64), rtol=1e-6, atol=1e-7)


def test_peft_dir_round_trip_rank_pattern_prefix_names(tmp_path):
    from peft.utils.other import get_pattern_key

    adapter, ranks = _prefix_adapter()
    out = save_peft_adapter(adapter, tmp_path / "a")
    assert out == tmp_path / "a"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(adapter.modules)
    assert config["base_model_name_or_path"] == "tiny12"
    assert config["r"] == 4 and "model.layers.11.self_attn.q_proj" in config["rank_pattern"]
    for name, r in ranks.items():  # PEFT's own matcher resolves every module to its own rank
        key = get_pattern_key(config["rank_pattern"].keys(), name)
        assert config["rank_pattern"].get(key, config["r"]) == r
    back = load_peft_adapter(out)
    assert back.base_model == "tiny12"
    _assert_same_deltas(adapter, back)
    # scales PEFT reproduces exactly are not folded into B: bit-exact round trip
    for name in ("model.layers.1.self_attn.q_proj", "model.layers.11.self_attn.q_proj"):
        assert torch.equal(back.modules[name].B, adapter.modules[name].B)
        assert back.modules[name].scale == adapter.modules[name].scale
    # overwrite in place (existing directory): files replaced, still loadable
    save_peft_adapter(compose([adapter], [2.0]), out)
    _assert_same_deltas(compose([adapter], [2.0]), load_peft_adapter(out))
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # no temporary directories left behind


def test_peft_dir_pattern_keys_that_would_collide_are_escaped(tmp_path):
    from peft.utils.other import get_pattern_key

    gen = torch.Generator().manual_seed(0)
    spec = {"blk.1.q": 2, "blk_1.q": 3, "a.b": 1, "c.a.b": 5, "c.a.c": 3, "x.y": 3}
    adapter = LoraAdapter(
        {
            n: LoraModule(torch.randn(r, 6, generator=gen), torch.randn(4, r, generator=gen), 1.5)
            for n, r in spec.items()
        }
    )
    out = save_peft_adapter(adapter, tmp_path / "weird")
    config = json.loads((out / "adapter_config.json").read_text())
    assert "blk\\.1\\.q" in config["rank_pattern"]  # '.' is a regex wildcard in PEFT's matcher
    for name, r in spec.items():
        key = get_pattern_key(config["rank_pattern"].keys(), name)
        assert config["rank_pattern"].get(key, config["r"]) == r
    _assert_same_deltas(adapter, load_peft_adapter(out))


@pytest.fixture(scope="module")
def tiny12_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny12") / "model", layers=12, hidden=32)


def test_peft_dir_loads_in_stock_peft_with_12_layers(tiny12_dir, tmp_path):
    from peft import PeftModel

    adapter, ranks = _prefix_adapter(hidden=32)
    out = save_peft_adapter(adapter, tmp_path / "a12", base_model_name_or_path=str(tiny12_dir))
    model = PeftModel.from_pretrained(_fresh_base(tiny12_dir), str(out))
    layers = _lora_layers(model.base_model.model)
    assert set(layers) == set(ranks)
    for name, layer in layers.items():
        assert layer.r["default"] == ranks[name], name
        torch.testing.assert_close(
            layer.scaling["default"]
            * layer.lora_B["default"].weight.double()
            @ layer.lora_A["default"].weight.double(),
            adapter.modules[name].delta(torch.float64),
            rtol=1e-6,
            atol=1e-7,
        )
    ids = torch.arange(3, 40).unsqueeze(0)
    merged = _fresh_base(tiny12_dir)
    with torch.no_grad():
        for name, d in delta_dict(adapter).items():
            merged.get_submodule(name).weight += d
    torch.testing.assert_close(_logits(model, ids), _logits(merged, ids), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# 4. Errors
# ---------------------------------------------------------------------------------------------


def test_compose_errors():
    adapters = _random_adapters()
    with pytest.raises(LoraFormatError, match="3 adapters but 2 weights"):
        compose(adapters, [0.5, 0.5])
    with pytest.raises(LoraFormatError, match="finite"):
        compose(adapters, [0.5, float("nan"), 0.5])
    with pytest.raises(LoraFormatError, match="finite"):
        compose(adapters, [0.5, float("inf"), 0.5])
    with pytest.raises(LoraFormatError, match="max_rank"):
        compose(adapters, RWEIGHTS, max_rank=0)
    for bad in (float("nan"), float("inf"), -float("inf"), True, 2.5, np.float64("nan"), "3", -1):
        with pytest.raises(LoraFormatError, match="max_rank must be a positive integer or None"):
            compose(adapters, RWEIGHTS, max_rank=bad)
    want = compose(adapters, RWEIGHTS, max_rank=3)
    for same in (3.0, np.int64(3), np.float32(3)):  # integral values of other numeric types are accepted
        got = compose(adapters, RWEIGHTS, max_rank=same)
        assert got.ranks == want.ranks
    with pytest.raises(LoraFormatError, match="at least one"):
        compose([], [])
    other = LoraAdapter({"m.q": LoraModule(torch.randn(2, 17), torch.randn(24, 2))})
    with pytest.raises(LoraFormatError, match=r"m\.q.*\(24, 16\).*\(24, 17\)"):
        compose([adapters[0], other], [1.0, 1.0])
    with pytest.raises(LoraFormatError, match="rank mismatch"):
        LoraModule(torch.randn(3, 4), torch.randn(4, 2))
    with pytest.raises(LoraFormatError, match="finite"):
        LoraModule(torch.randn(3, 4), torch.randn(4, 3), float("nan"))


def test_decoded_module_errors_name_the_module():
    blob = adapter_to_bytes(LoraAdapter({"m.q": LoraModule(torch.randn(3, 4), torch.randn(4, 3))}))
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    lora = json.loads(header["__metadata__"]["rpe_lora"])
    lora["modules"]["m.q"]["scale"] = float("inf")
    header["__metadata__"]["rpe_lora"] = json.dumps(lora)
    raw = json.dumps(header).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    with pytest.raises(LoraFormatError, match=r"^adapter blob: module m\.q: LoRA scale must be finite"):
        adapter_from_bytes(len(raw).to_bytes(8, "little") + raw + blob[8 + n :])
    arrays, config = adapter_to_arrays(LoraAdapter({"m.q": LoraModule(torch.randn(3, 4), torch.randn(4, 3))}))
    arrays[peft_key("m.q", "B")] = np.zeros((4, 2), np.float32)
    with pytest.raises(LoraFormatError, match=r"^adapter arrays: module m\.q: LoRA rank mismatch"):
        adapter_from_arrays(arrays, config)


def test_real_dora_adapter_is_rejected(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)
    model = get_peft_model(_fresh_base(tiny_model_dir), config)
    model.save_pretrained(str(tmp_path / "dora"))
    with pytest.raises(LoraFormatError, match="DoRA.*use_dora=False"):
        load_peft_adapter(tmp_path / "dora")


@pytest.fixture()
def plain_dir(tmp_path) -> Path:
    adapter, _ = _prefix_adapter()
    return save_peft_adapter(adapter, tmp_path / "plain")


def _edit_config(directory: Path, **changes) -> None:
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"bias": "all"}, "bias='none'"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out"),
        ({"init_lora_weights": "pissa_niter_4"}, "path_initial_model_for_weight_conversion"),
        ({"peft_type": "IA3"}, "not LORA"),
        ({"r": 5}, "rank 4 in the tensors"),
    ],
)
def test_non_plain_configs_are_rejected(plain_dir, changes, message):
    assert load_peft_adapter(plain_dir).modules  # valid before the edit
    _edit_config(plain_dir, **changes)
    with pytest.raises(LoraFormatError, match=message):
        load_peft_adapter(plain_dir)


def _edit_tensors(directory: Path, edit) -> None:
    path = directory / "adapter_model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_bad_tensors_are_rejected(plain_dir):
    q11 = "base_model.model.model.layers.11.self_attn.q_proj"
    cases = [
        (lambda t: t.pop(f"{q11}.lora_B.weight"), "no lora_B"),
        (lambda t: t.pop(f"{q11}.lora_A.weight"), "no lora_A"),
        (lambda t: t.__setitem__(f"{q11}.lora_A.weight", torch.zeros(5, 32)), "rank 5 but lora_B"),
        (
            lambda t: t.__setitem__("base_model.model.model.embed_tokens.lora_embedding_A", torch.zeros(2, 9)),
            "embedding LoRA",
        ),
        (lambda t: t.__setitem__(f"{q11}.lora_magnitude_vector", torch.zeros(32)), "DoRA"),
        (
            lambda t: t.__setitem__("base_model.model.lm_head.modules_to_save.weight", torch.zeros(2, 2)),
            "modules_to_save",
        ),
        (lambda t: t.__setitem__(f"{q11}.lora_B.bias", torch.zeros(32)), "unexpected tensor"),
    ]
    original = load_file(str(plain_dir / "adapter_model.safetensors"))
    for edit, message in cases:
        save_file(dict(original), str(plain_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
        _edit_tensors(plain_dir, edit)
        with pytest.raises(LoraFormatError, match=message):
            load_peft_adapter(plain_dir)


def test_bad_blobs_are_rejected(tmp_path):
    from safetensors.torch import save

    with pytest.raises(LoraFormatError, match=FORMAT_TAG):
        adapter_from_bytes(save({"x": torch.zeros(2)}))
    with pytest.raises(LoraFormatError):
        adapter_from_bytes(b"\x01")
    with pytest.raises(LoraFormatError, match="no adapter_config.json"):
        load_peft_adapter(tmp_path)
    arrays, config = adapter_to_arrays(_random_adapters()[0])
    arrays.pop(next(iter(arrays)))
    with pytest.raises(LoraFormatError, match="missing"):
        adapter_from_arrays(arrays, config)


def test_blob_is_sha256_stable_for_registry():
    adapter = _random_adapters()[0]
    digest = hashlib.sha256(adapter_to_bytes(adapter)).hexdigest()
    again = adapter_to_bytes(adapter_from_bytes(adapter_to_bytes(adapter)))
    assert digest == hashlib.sha256(again).hexdigest()


def test_write_safetensors_round_trips_through_the_safetensors_reader(tmp_path) -> None:
    """Our zero-copy writer produces files the stock reader loads bit for bit (every float dtype,
    empty and non-contiguous tensors), and refuses a dtype an adapter cannot hold."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from common.adapters.peft_io import write_safetensors

    g = torch.Generator().manual_seed(3)
    ts = {
        "b.w": torch.randn(3, 5, generator=g),
        "a.x": torch.randn(7, generator=g).to(torch.bfloat16),
        "empty": torch.zeros(0, 4),
        "h": torch.randn(2, 2, generator=g).half(),
        "d": torch.randn(3, generator=g, dtype=torch.float64),
        "t": torch.randn(4, 6, generator=g).t(),
    }
    write_safetensors(tmp_path / "o.safetensors", ts, {"format": "pt"})
    got = load_file(str(tmp_path / "o.safetensors"))
    assert set(got) == set(ts)
    for k, v in ts.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    with safe_open(str(tmp_path / "o.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    with pytest.raises(LoraFormatError, match="dtype torch.int64"):
        write_safetensors(tmp_path / "bad.safetensors", {"i": torch.arange(3)}, {})
