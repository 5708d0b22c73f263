"""``train.evaluate``: every arm of one leave-one-site-out target in ONE message (part of the
vocabulary of ``common/protocol/wire.py``, which registers it in its tables; kept here for size).

Request: ``config`` (``arms``: canonical JSON list of ``ARM_KEYS`` objects, one per arm) and one
ArrayRecord ``adapter-<i>`` per arm (the same factors ``train.apply`` carries). Reply: ``metrics``
(``a<i>_<metric>`` per arm, ``base_<metric>`` for the base model) and a ``receipt`` whose
``blob_sha256`` is :func:`arms_digest` of the arms' hashes. Nothing is stored at the site. Why one
message: each message starts a fresh ClientApp process that loads the model, so one per arm cost
most of the evaluation's time.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, MetricRecord, RecordDict

from common.protocol import wire
from common.trust.digests import canonical_json

if TYPE_CHECKING:
    from common.adapters import LoraAdapter

EVALUATE = "train.evaluate"
MAX_ARMS = 16
MAX_EVALUATE_METRICS = 8 * (MAX_ARMS + 1)
ARM_KEYS = frozenset({"arm", "blob_sha256", "base_fingerprint", "lora_config"})


def arms_digest(hashes: list[str]) -> str:
    """One sha256 naming an evaluate request's adapters, in order (receipt and egress log)."""
    return hashlib.sha256("\n".join(hashes).encode()).hexdigest()


def _arm_records(n: int) -> dict[str, str]:
    return {"config": "config", **{f"adapter-{i}": "array" for i in range(n)}}


def build_evaluate_request(config: Mapping[str, Any], arms: list[tuple[dict[str, Any], LoraAdapter]]) -> RecordDict:
    """``train.evaluate`` content: ``arms`` is ``[({"arm": name, "blob_sha256": ...}, adapter in wire form)]``."""
    if not 0 < len(arms) <= MAX_ARMS:
        raise wire.WireError(f"{len(arms)} arms; one evaluate request carries 1 to {MAX_ARMS}", "config", "arms")
    described, records = [], {}
    for i, (info, adapter) in enumerate(arms):
        arrays, lora_config = wire.adapter_to_wire(adapter)
        described.append(
            {
                "arm": str(info["arm"]),
                "blob_sha256": str(info["blob_sha256"]),
                "base_fingerprint": adapter.base_model or "",
                "lora_config": lora_config,
            }
        )
        records[f"adapter-{i}"] = wire.adapter_record(arrays)
    cfg = {**config, "arms": canonical_json(described)}
    content = RecordDict({"config": ConfigRecord(cfg), **records})
    parse_evaluate_request(content)
    return content


def _evaluate_config(values: dict[str, Any]) -> dict[str, Any]:
    """The config of an evaluate request; ``arms`` holds one LoRA config per arm, so its length limit
    is that of ``MAX_ARMS`` LoRA configs rather than of a short text field."""
    arms = values.pop("arms", None)
    config = wire._check_config(
        values, wire.REQUEST_CONFIG_KEYS[EVALUATE], "config", wire.REQUEST_REQUIRED[EVALUATE] - {"arms"}, exact=False
    )
    if not isinstance(arms, str):
        raise wire.WireError("missing, or not a string", "config", "arms")
    if len(arms) > MAX_ARMS * wire.MAX_LORA_CONFIG_STR:
        limit = MAX_ARMS * wire.MAX_LORA_CONFIG_STR
        raise wire.WireError(f"string of {len(arms)} characters exceeds the limit of {limit}", "config", "arms")
    return {**config, "arms": arms}


def parse_evaluate_request(content: RecordDict) -> wire.Request:
    """Site side: exactly ``config`` + one ``adapter-<i>`` per described arm, each adapter as specified."""
    config = _evaluate_config(dict(wire._record(content, "config", "config")))
    described = wire._load_json(config["arms"], "config", "arms")
    if not isinstance(described, list) or not 0 < len(described) <= MAX_ARMS:
        raise wire.WireError(f"expected a list of 1 to {MAX_ARMS} arms", "config", "arms")
    wire.check_records(content, _arm_records(len(described)), f"a {EVALUATE} request")
    arms = []
    for i, arm in enumerate(described):
        if not isinstance(arm, dict) or set(arm) != ARM_KEYS:
            raise wire.WireError(f"arm {i} must have exactly the keys {sorted(ARM_KEYS)}", "config", "arms")
        if not wire._SHA256_RE.match(str(arm["blob_sha256"])):
            raise wire.WireError(f"arm {i}: blob_sha256 must be 64 lowercase hex digits", "config", "arms")
        lora_config = wire.parse_lora_config(canonical_json(arm["lora_config"]), "config", "arms")
        arrays = wire.parse_adapter(wire._record(content, f"adapter-{i}", "array"), lora_config, record=f"adapter-{i}")
        arms.append(({**arm, "lora_config": lora_config}, arrays))
    return wire.Request(EVALUATE, config, arms=arms)


def parse_evaluate_reply(content: RecordDict) -> tuple[dict[str, float], dict[str, Any]]:
    """(metrics, receipt) of a ``train.evaluate`` reply: numbers only, at most ``MAX_EVALUATE_METRICS``."""
    wire.check_records(content, wire.ALLOWED_REPLY_KEYS[EVALUATE], f"a {EVALUATE} reply")
    return wire.parse_metrics_and_receipt(content, MAX_EVALUATE_METRICS)


def build_evaluate_reply(metrics: Mapping[str, float], receipt: Mapping[str, Any]) -> RecordDict:
    content = RecordDict(
        {"metrics": MetricRecord({k: float(v) for k, v in metrics.items()}), "receipt": ConfigRecord(dict(receipt))}
    )
    parse_evaluate_reply(content)
    return content
