"""Composer: retrieval, weights, exact composition, PEFT output and the audit trail it leaves."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from common.adapters import LoraAdapter, LoraModule, adapter_to_bytes, delta_dict, load_peft_adapter
from server.audit import verify
from server.composer import CompositionError, compose_for_target
from server.registry import AdapterMeta, NotEnoughRecordsError, Registry
from server.strategies import compute_weights

BASE = "sha256:" + "12" * 32
SHAPES = {
    "model.layers.0.self_attn.q_proj": (12, 10),
    "model.layers.0.self_attn.v_proj": (6, 10),
    "model.layers.1.mlp.up_proj": (14, 10),
}
DIM = 8


def adapter(seed: int) -> LoraAdapter:
    """Ranks, scales and target modules differ between adapters (all must still compose exactly)."""
    g = torch.Generator().manual_seed(seed)
    names = sorted(SHAPES)[: 2 + seed % 2]
    r = 1 + seed % 3
    return LoraAdapter(
        {
            n: LoraModule(
                torch.randn(r, SHAPES[n][1], generator=g, dtype=torch.float64).float(),
                torch.randn(SHAPES[n][0], r, generator=g, dtype=torch.float64).float(),
                0.5 * (1 + seed % 4),
            )
            for n in names
        },
        base_model="tiny-base",
    )


@pytest.fixture(scope="module")
def reg(tmp_path_factory):
    rng = np.random.default_rng(0)
    registry = Registry.init(
        tmp_path_factory.mktemp("composer") / "reg",
        base_fingerprint=BASE,
        module_shapes=SHAPES,
        embedding_dim=DIM,
        base_name="/models/tiny-base",
    )
    registry.add_many(
        [
            (
                adapter(i),
                rng.standard_normal(DIM),
                AdapterMeta(
                    site=f"s{i}", task="xray" if i < 6 else "ct", modality="xray", base_fingerprint=BASE, sample_count=5
                ),
            )
            for i in range(8)
        ]
    )
    yield registry
    registry.close()


def dense_sum(adapters, weights):
    out = {}
    for a, w in zip(adapters, weights, strict=True):
        for n, d in delta_dict(a, torch.float64).items():
            out[n] = out.get(n, 0) + w * d
    return out


def test_compose_matches_retrieval_weights_and_exact_sum(reg, tmp_path):
    z = reg.get(reg.ids()[2]).z + 0.3
    res = compose_for_target(
        reg, z, strategy="sim", k=3, exclude_site="s2", task="xray", out_dir=tmp_path / "out", target="s2", lam1=2.0
    )
    hits = reg.query(z, 3, task="xray", exclude_site="s2")
    assert res.ids == [h.record.id for h in hits] and "s2" not in res.sites
    np.testing.assert_allclose(res.distances, [h.distance for h in hits])
    want_w = compute_weights("sim", z.astype(np.float32), np.stack([h.record.z for h in hits]), lam1=2.0)
    np.testing.assert_allclose(res.weights, want_w, rtol=1e-12)
    assert abs(sum(res.weights) - 1) < 1e-9
    expected = dense_sum([reg.load_adapter(i) for i in res.ids], res.weights)
    got = delta_dict(res.adapter, torch.float64)
    assert set(got) == set(expected)
    for n in got:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-5, atol=1e-5)
    assert res.output_sha256 == hashlib.sha256(adapter_to_bytes(res.adapter)).hexdigest()
    assert res.adapter_sha256 == [reg.get(i).blob_sha256 for i in res.ids]
    # a standard PEFT directory naming the registered base
    config = json.loads((res.out_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "/models/tiny-base"
    reloaded = delta_dict(load_peft_adapter(res.out_dir), torch.float64)
    for n in got:
        torch.testing.assert_close(reloaded[n], got[n], rtol=1e-5, atol=1e-6)
    # the audit trail: query + composition, chained and verifiable
    entries = [json.loads(line) for line in (reg.path / "audit.jsonl").read_text().splitlines()]
    q, c = entries[-2], entries[-1]
    assert q["event"] == "query.embedding" and q["target"] == "s2" and q["retrieved"] == res.ids
    assert c["event"] == "composition" and c["retrieved"] == res.ids and c["weights"] == res.weights
    assert c["distances"] == res.distances and c["adapter_sha256"] == res.adapter_sha256
    assert c["output_sha256"] == res.output_sha256 and c["strategy"] == "sim" and c["params"] == {"lam1": 2.0}
    assert c["z_sha256"] == q["z_sha256"] == hashlib.sha256(z.astype("<f4").tobytes()).hexdigest()
    assert verify(reg.path / "audit.jsonl") == []


@pytest.mark.parametrize("strategy", ["sim", "lin", "lin-l1", "avg", "nearest"])
def test_every_strategy_composes(reg, strategy):
    z = np.linspace(-1, 1, DIM)
    res = compose_for_target(reg, z, strategy=strategy, k=4, task="xray", target="t")
    assert len(res.weights) == 4 and abs(sum(res.weights) - 1) < 1e-9
    used = [i for i, w in zip(res.ids, res.weights, strict=True) if w != 0]
    expected = dense_sum([reg.load_adapter(i) for i in used], [w for w in res.weights if w != 0])
    for n, d in delta_dict(res.adapter, torch.float64).items():
        torch.testing.assert_close(d, expected[n], rtol=1e-5, atol=1e-5)


def test_nearest_is_the_nearest_adapter_only(reg):
    z = reg.get(reg.ids()[4]).z
    res = compose_for_target(reg, z, strategy="nearest", k=3, target="t")
    assert res.ids[0] == reg.ids()[4] and res.weights[0] == 1.0
    only = reg.load_adapter(res.ids[0])
    assert res.adapter.ranks == only.ranks  # zero-weight adapters add no rank
    for n, d in delta_dict(res.adapter, torch.float64).items():
        torch.testing.assert_close(d, delta_dict(only, torch.float64)[n], rtol=1e-6, atol=1e-6)


def test_max_rank_and_errors(reg):
    z = np.zeros(DIM)
    res = compose_for_target(reg, z, strategy="avg", k=5, max_rank=2, target="t")
    assert max(res.adapter.ranks.values()) <= 2
    with pytest.raises(NotEnoughRecordsError, match="only 2"):
        compose_for_target(reg, z, k=3, task="ct")
    with pytest.raises(ValueError, match="unknown weighting strategy"):
        compose_for_target(reg, z, strategy="bogus", k=2)
    reg.add_base("sha256:other", {"x": (2, 2)})
    with pytest.raises(CompositionError, match="not known"):
        compose_for_target(reg, z, base="sha256:nope", k=2)


def test_a_composition_from_bf16_sources_has_one_hash_in_wire_form(tmp_path):
    """The ServerApp composes in wire form: the hash in the composition entry is the hash the site
    computes from what it receives (before, bf16 sources gave two different hashes)."""
    from common.protocol import wire

    rng = np.random.default_rng(1)
    registry = Registry.init(
        tmp_path / "reg", base_fingerprint=BASE, module_shapes=SHAPES, embedding_dim=DIM, base_name="/models/tiny-base"
    )
    try:
        for i in range(3):
            registry.add(
                adapter(i).to(torch.bfloat16),
                rng.standard_normal(DIM),
                AdapterMeta(site=f"b{i}", task="xray", modality="xray", base_fingerprint=BASE, sample_count=5),
            )
        z = rng.standard_normal(DIM)
        plain = compose_for_target(registry, z, strategy="sim", k=3, task="xray", target="t")
        res = compose_for_target(registry, z, strategy="sim", k=3, task="xray", target="t", wire_form=True)
        arrays, cfg = wire.adapter_to_wire(res.adapter)  # what travels
        at_site = wire.adapter_from_wire(arrays, cfg, base_model=BASE)  # what the site rebuilds
        assert wire.adapter_sha256(at_site) == res.output_sha256 == wire.encode_adapter(plain.adapter, BASE).sha256
        assert plain.output_sha256 != res.output_sha256  # the library form (bf16) is a different object
        entries = [json.loads(x) for x in (registry.path / "audit.jsonl").read_text().splitlines()]
        assert [e["output_sha256"] for e in entries if e["event"] == "composition"][-1] == res.output_sha256
    finally:
        registry.close()
