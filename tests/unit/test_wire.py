"""The fixed message vocabulary: what may cross the wire, and that anything else is refused."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from common.adapters import LoraAdapter, LoraModule, adapter_to_bytes
from common.protocol import wire
from common.protocol.wire import WireError

MODULES = {"model.layers.0.self_attn.q_proj": (64, 64, 4), "model.layers.1.mlp.down_proj": (64, 128, 2)}


def make_adapter(seed: int = 0, scale: float = 2.0) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for name, (out, inp, r) in MODULES.items():
        mods[name] = LoraModule(torch.randn(r, inp, generator=g), torch.randn(out, r, generator=g), scale)
    return LoraAdapter(mods, "sha256:" + "0" * 64)


def enroll_meta(lora_config: dict, blob: str, dim: int = 16, **over) -> dict:
    meta = {
        "schema": wire.WIRE_SCHEMA,
        "site": "a",
        "task": "report-text",
        "modality": "ct",
        "group": "ct-head",
        "base_fingerprint": "sha256:" + "0" * 64,
        "sample_count": 10,
        "token_count": 1234,
        "lora_config": wire.canonical_json(lora_config),
        "blob_sha256": blob,
        "embedding_spec": wire.canonical_json({"representation": "hidden-mean", "layer": 2, "dim": dim}),
        "privacy": wire.canonical_json({"dp_sgd": False}),
        "train_stats": wire.canonical_json({"steps": 3, "lr": 1e-3, "loss_last": 2.5}),
        "nonce": "n1",
        "created_at": 1.0,
        "signer": "",
        "signature": "",
    }
    meta.update(over)
    return meta


def enroll_content(**over) -> tuple[RecordDict, LoraAdapter, np.ndarray]:
    adapter = wire.wire_normalized(make_adapter())
    arrays, cfg = wire.adapter_to_wire(adapter)
    z = np.linspace(-1, 1, 16, dtype=np.float32)
    blob = hashlib.sha256(adapter_to_bytes(adapter)).hexdigest()
    return wire.build_enroll_reply(arrays, z, enroll_meta(cfg, blob, **over)), adapter, z


def test_enroll_reply_round_trips_adapter_z_and_meta():
    content, adapter, z = enroll_content()
    assert set(content.keys()) == set(wire.ALLOWED_REPLY_KEYS[wire.ENROLL]) == {"adapter", "embedding", "meta"}
    payload = wire.parse_enroll_reply(content)
    np.testing.assert_array_equal(payload.z, z)
    assert set(payload.meta) == set(wire.ENROLL_META_KEYS)
    rebuilt = wire.adapter_from_wire(payload.arrays, payload.lora_config, adapter.base_model)
    assert hashlib.sha256(adapter_to_bytes(rebuilt)).hexdigest() == payload.meta["blob_sha256"]
    assert payload.lora_config["modules"]["model.layers.1.mlp.down_proj"] == {"r": 2, "alpha": 4.0, "shape": [64, 128]}
    for key, arr in payload.arrays.items():
        assert key.startswith("base_model.model.") and arr.dtype == np.float32


def test_wire_normalized_is_a_fixed_point():
    a = wire.wire_normalized(make_adapter(scale=1 / 3))
    b = wire.wire_normalized(a)
    assert adapter_to_bytes(a) == adapter_to_bytes(b)


@pytest.mark.parametrize("extra", ["raw_data", "examples"])
def test_reply_with_an_extra_record_is_refused(extra):
    content, _, _ = enroll_content()
    content[extra] = ConfigRecord({"text": "Findings: ..."})
    with pytest.raises(WireError, match=extra) as err:
        wire.check_reply(wire.ENROLL, content)
    assert err.value.record == extra


def test_meta_with_an_unknown_or_missing_key_is_refused():
    content, _, _ = enroll_content()
    meta = dict(content["meta"])
    meta["report_text"] = "no effusion"
    content["meta"] = ConfigRecord(meta)
    with pytest.raises(WireError) as err:
        wire.parse_enroll_reply(content)
    assert (err.value.record, err.value.key) == ("meta", "report_text")
    del meta["report_text"], meta["token_count"]
    content["meta"] = ConfigRecord(meta)
    with pytest.raises(WireError) as err:
        wire.parse_enroll_reply(content)
    assert err.value.key == "token_count"


def _factors(content: RecordDict) -> dict[str, np.ndarray]:
    """The enrol reply's factors by PEFT key (copies, free to edit)."""
    cfg = wire.parse_lora_config(content["meta"]["lora_config"])
    return {k: v.copy() for k, v in wire.parse_adapter(content["adapter"], cfg).items()}


def test_the_adapter_travels_as_one_packed_vector_the_lora_config_lays_out():
    """One array, not one per factor: Flower moves every array through the SuperLink as objects of
    their own, and per-factor records made each adapter hundreds of them."""
    content, adapter, _ = enroll_content()
    rec = content["adapter"]
    assert list(rec.keys()) == [wire.PACKED_KEY]
    cfg = wire.parse_lora_config(content["meta"]["lora_config"])
    layout = wire.factor_layout(cfg)
    assert [k for k, _ in layout] == sorted(k for k, _ in layout)
    assert tuple(rec[wire.PACKED_KEY].shape) == (sum(r * c for _, (r, c) in layout),)
    arrays, _ = wire.adapter_to_wire(adapter)
    flat = rec[wire.PACKED_KEY].numpy()
    np.testing.assert_array_equal(flat, np.concatenate([arrays[k].ravel() for k, _ in layout]))
    for key, arr in _factors(content).items():
        np.testing.assert_array_equal(arr, arrays[key])


def test_adapter_shapes_must_match_the_lora_config():
    content, _, _ = enroll_content()
    arrays = _factors(content)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    arrays[key] = np.zeros((5, 64), np.float32)  # rank 5, config says 4
    content["adapter"] = wire.adapter_record(arrays)
    with pytest.raises(WireError, match="does not match the LoRA config") as err:
        wire.parse_enroll_reply(content)
    assert (err.value.record, err.value.key) == ("adapter", wire.PACKED_KEY)


def test_adapter_tensors_outside_the_config_or_missing_are_refused():
    content, _, _ = enroll_content()
    arrays = _factors(content)
    arrays["base_model.model.model.embed_tokens.weight"] = np.zeros((4, 4), np.float32)
    content["adapter"] = wire.adapter_record(arrays)
    with pytest.raises(WireError, match="does not match the LoRA config"):
        wire.parse_enroll_reply(content)
    del arrays["base_model.model.model.embed_tokens.weight"]
    arrays.pop("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight")
    content["adapter"] = wire.adapter_record(arrays)
    with pytest.raises(WireError, match="does not match the LoRA config"):
        wire.parse_enroll_reply(content)
    # one array per factor (wire schema 1) is not this vocabulary
    content["adapter"] = ArrayRecord({k: wire.to_array(v) for k, v in _factors(enroll_content()[0]).items()})
    with pytest.raises(WireError, match="exactly one array 'lora_factors'"):
        wire.parse_enroll_reply(content)


def test_non_finite_or_non_float32_tensors_are_refused():
    content, _, _ = enroll_content()
    arrays = _factors(content)
    key = sorted(arrays)[-1]
    arrays[key][0, 0] = np.nan
    content["adapter"] = wire.adapter_record(arrays)
    with pytest.raises(WireError, match=f"NaN or inf \\(factor {key}\\)"):
        wire.parse_enroll_reply(content)
    flat = wire.adapter_record(_factors(enroll_content()[0]))[wire.PACKED_KEY].numpy()
    content["adapter"] = ArrayRecord({wire.PACKED_KEY: wire.to_array(flat.astype(np.float64))})
    with pytest.raises(WireError, match="float32"):
        wire.parse_enroll_reply(content)


def test_embedding_is_exactly_one_vector_of_the_declared_dimension():
    content, _, _ = enroll_content()
    content["embedding"] = ArrayRecord({"z": wire.to_array(np.zeros(8, np.float32))})
    with pytest.raises(WireError, match="dim=16"):
        wire.parse_enroll_reply(content)
    content["embedding"] = ArrayRecord({"z": wire.to_array(np.zeros((2, 16), np.float32))})
    with pytest.raises(WireError, match="1-D"):
        wire.parse_enroll_reply(content)
    content["embedding"] = ArrayRecord(
        {"z": wire.to_array(np.zeros(16, np.float32)), "z_per_example": wire.to_array(np.zeros(16, np.float32))}
    )
    with pytest.raises(WireError, match="exactly one array"):
        wire.parse_enroll_reply(content)


def test_json_fields_cannot_smuggle_text():
    long_text = "x" * 200
    for key, value in [("train_stats", {"steps": 3, "sample": long_text}), ("privacy", {"notes": "hi"})]:
        with pytest.raises(WireError) as err:
            enroll_content(**{key: wire.canonical_json(value)})
        assert err.value.key == key


def test_requests_outside_the_vocabulary_are_refused():
    with pytest.raises(WireError, match="unknown message type"):
        wire.parse_request("query.raw_data", RecordDict({"config": ConfigRecord({"nonce": "x"})}))
    bad_key = RecordDict({"config": ConfigRecord({"nonce": "x", "task": "report-text", "send": "raw data"})})
    with pytest.raises(WireError) as err:
        wire.parse_request(wire.ENROLL, bad_key)
    assert (err.value.record, err.value.key) == ("config", "send")
    extra_record = RecordDict({"config": ConfigRecord({"nonce": "x"}), "include": ConfigRecord({"raw": True})})
    with pytest.raises(WireError) as err:
        wire.parse_request(wire.EMBED, extra_record)
    assert err.value.record == "include"
    wrong_type = RecordDict({"config": ConfigRecord({"nonce": "x", "task": "report-text", "steps": "10"})})
    with pytest.raises(WireError, match="expected int"):
        wire.parse_request(wire.ENROLL, wrong_type)


def test_apply_request_round_trip_and_reply():
    adapter = wire.wire_normalized(make_adapter(scale=1.0))
    arrays, cfg = wire.adapter_to_wire(adapter)
    blob = hashlib.sha256(adapter_to_bytes(adapter)).hexdigest()
    config = {
        "nonce": "n",
        "name": "compose-1",
        "lora_config": wire.canonical_json(cfg),
        "blob_sha256": blob,
        "base_fingerprint": adapter.base_model,
        "evaluate": True,
        "weights": json.dumps([1.0]),
    }
    req = wire.parse_request(wire.APPLY, wire.build_request(wire.APPLY, config, arrays))
    rebuilt = wire.adapter_from_wire(req.adapter, req.lora_config, adapter.base_model)
    assert hashlib.sha256(adapter_to_bytes(rebuilt)).hexdigest() == blob
    receipt = {
        "schema": wire.WIRE_SCHEMA,
        "site": "b",
        "name": "compose-1",
        "blob_sha256": blob,
        "evaluated": True,
        "nonce": "n",
    }
    metrics, got = wire.parse_apply_reply(wire.build_apply_reply({"rouge_l": 0.25, "n": 4}, receipt))
    assert metrics == {"rouge_l": 0.25, "n": 4.0} and got == receipt
    bad = RecordDict({"metrics": MetricRecord({"Predictions": 1.0}), "receipt": ConfigRecord(receipt)})
    with pytest.raises(WireError) as err:
        wire.parse_apply_reply(bad)
    assert err.value.key == "Predictions"


def test_whoami_reply_carries_counts_only():
    info = {
        "schema": wire.WIRE_SCHEMA,
        "site": "a",
        "tasks": '["report-text"]',
        "groups": '["ct-head"]',
        "n_examples": 12,
        "n_labeled": 10,
        "n_unlabeled": 2,
        "n_eval": 4,
        "data_ok": True,
        "signer": "",
        "nonce": "n",
        "identity": "",
    }
    parsed = wire.parse_whoami_reply(wire.build_whoami_reply(info))
    assert parsed["tasks"] == ["report-text"]
    with pytest.raises(WireError):
        wire.build_whoami_reply({**info, "first_report": "no acute findings"})


def test_every_message_type_has_an_allow_list_and_describe_never_shows_tensor_values():
    assert set(wire.ALLOWED_REPLY_KEYS) == set(wire.MESSAGE_TYPES) == set(wire.ALLOWED_REQUEST_RECORDS)
    content, _, z = enroll_content()
    desc = wire.describe(content)
    text = json.dumps(desc)
    assert {d["record"] for d in desc} == {"adapter", "embedding", "meta"}
    assert str(float(z[1]))[:6] not in text
    emb = next(d for d in desc if d["record"] == "embedding")
    assert emb["tensors"] == [{"key": "z", "dtype": "float32", "shape": [16], "bytes": 64}]
    assert emb["digest"] == wire.record_digest(content["embedding"])


def test_encode_adapter_makes_the_one_form_the_coordinator_rebuilds_and_hashes():
    """The site encodes once: the arrays it sends, the config it describes them with, and the hash
    of the bytes the coordinator will rebuild and store all come from one call."""
    enc = wire.encode_adapter(make_adapter(scale=1 / 3).to(torch.bfloat16), base_model="sha256:" + "0" * 64)
    content = wire.build_enroll_reply(enc.arrays, np.zeros(16, np.float32), enroll_meta(enc.lora_config, enc.sha256))
    payload = wire.parse_enroll_reply(content)
    rebuilt = wire.adapter_from_wire(payload.arrays, payload.lora_config, payload.meta["base_fingerprint"])
    assert adapter_to_bytes(rebuilt) == enc.blob
    assert hashlib.sha256(enc.blob).hexdigest() == enc.sha256 == wire.adapter_sha256(enc.adapter)
    assert all(m.A.dtype == torch.float32 for m in enc.adapter.modules.values())


def test_wire_canonical_json_is_the_digests_one():
    from common.trust import digests

    assert wire.canonical_json is digests.canonical_json
