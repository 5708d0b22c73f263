"""``train.evaluate``: every arm of one leave-one-site-out target in ONE message (part of the
vocabulary: its names, keys and limits are in ``vocabulary.py`` with the others; ``messages.py``
dispatches to it).

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

from common.protocol.adapter_record import adapter_record, adapter_to_wire, parse_adapter, parse_lora_config
from common.protocol.checks import (
    check_config,
    check_records,
    get_record,
    load_json,
    parse_metrics_and_receipt,
    parse_options,
)
from common.protocol.vocabulary import (
    ALLOWED_REPLY_KEYS,
    ARM_KEYS,
    EVALUATE,
    MAX_ARMS,
    MAX_EVALUATE_METRICS,
    MAX_LORA_CONFIG_STR,
    REQUEST_CONFIG_KEYS,
    REQUEST_REQUIRED,
    SHA256_RE,
    Request,
    WireError,
)
from common.trust.digests import canonical_json

if TYPE_CHECKING:
    from common.adapters import LoraAdapter


def arms_digest(hashes: list[str]) -> str:
    """One sha256 naming an evaluate request's adapters, in order (receipt and egress log)."""
    return hashlib.sha256("\n".join(hashes).encode()).hexdigest()


def arm_records(n: int) -> dict[str, str]:
    """The records of an evaluate request of ``n`` arms: ``config`` and ``adapter-<i>`` per arm."""
    return {"config": "config", **{f"adapter-{i}": "array" for i in range(n)}}


def build_evaluate_request(config: Mapping[str, Any], arms: list[tuple[dict[str, Any], LoraAdapter]]) -> RecordDict:
    """``train.evaluate`` content: ``arms`` is ``[({"arm": name, "blob_sha256": ...}, adapter in wire form)]``."""
    if not 0 < len(arms) <= MAX_ARMS:
        raise WireError(f"{len(arms)} arms; one evaluate request carries 1 to {MAX_ARMS}", "config", "arms")
    described, records = [], {}
    for i, (info, adapter) in enumerate(arms):
        arrays, lora_config = adapter_to_wire(adapter)
        described.append(
            {
                "arm": str(info["arm"]),
                "blob_sha256": str(info["blob_sha256"]),
                "base_fingerprint": adapter.base_model or "",
                "lora_config": lora_config,
            }
        )
        records[f"adapter-{i}"] = adapter_record(arrays)
    cfg = {**config, "arms": canonical_json(described)}
    content = RecordDict({"config": ConfigRecord(cfg), **records})
    parse_evaluate_request(content)
    return content


def _evaluate_config(values: dict[str, Any]) -> dict[str, Any]:
    """The config of an evaluate request; ``arms`` holds one LoRA config per arm, so its length limit
    is that of ``MAX_ARMS`` LoRA configs rather than of a short text field."""
    arms = values.pop("arms", None)
    config = check_config(
        values, REQUEST_CONFIG_KEYS[EVALUATE], "config", REQUEST_REQUIRED[EVALUATE] - {"arms"}, exact=False
    )
    if not isinstance(arms, str):
        raise WireError("missing, or not a string", "config", "arms")
    if len(arms) > MAX_ARMS * MAX_LORA_CONFIG_STR:
        limit = MAX_ARMS * MAX_LORA_CONFIG_STR
        raise WireError(f"string of {len(arms)} characters exceeds the limit of {limit}", "config", "arms")
    if "options" in config:
        parse_options(config["options"])
    return {**config, "arms": arms}


def parse_evaluate_request(content: RecordDict) -> Request:
    """Site side: exactly ``config`` + one ``adapter-<i>`` per described arm, each adapter as specified."""
    config = _evaluate_config(dict(get_record(content, "config", "config")))
    described = load_json(config["arms"], "config", "arms")
    if not isinstance(described, list) or not 0 < len(described) <= MAX_ARMS:
        raise WireError(f"expected a list of 1 to {MAX_ARMS} arms", "config", "arms")
    check_records(content, arm_records(len(described)), f"a {EVALUATE} request")
    arms = []
    for i, arm in enumerate(described):
        if not isinstance(arm, dict) or set(arm) != ARM_KEYS:
            raise WireError(f"arm {i} must have exactly the keys {sorted(ARM_KEYS)}", "config", "arms")
        if not SHA256_RE.match(str(arm["blob_sha256"])):
            raise WireError(f"arm {i}: blob_sha256 must be 64 lowercase hex digits", "config", "arms")
        lora_config = parse_lora_config(canonical_json(arm["lora_config"]), "config", "arms")
        arrays = parse_adapter(get_record(content, f"adapter-{i}", "array"), lora_config, record=f"adapter-{i}")
        arms.append(({**arm, "lora_config": lora_config}, arrays))
    return Request(EVALUATE, config, arms=arms)


def parse_evaluate_reply(content: RecordDict) -> tuple[dict[str, float], dict[str, Any]]:
    """(metrics, receipt) of a ``train.evaluate`` reply: numbers only, at most ``MAX_EVALUATE_METRICS``."""
    check_records(content, ALLOWED_REPLY_KEYS[EVALUATE], f"a {EVALUATE} reply")
    return parse_metrics_and_receipt(content, MAX_EVALUATE_METRICS)


def build_evaluate_reply(metrics: Mapping[str, float], receipt: Mapping[str, Any]) -> RecordDict:
    """The reply to ``train.evaluate``: per-arm metrics (numbers only) and the receipt, validated."""
    content = RecordDict(
        {"metrics": MetricRecord({k: float(v) for k, v in metrics.items()}), "receipt": ConfigRecord(dict(receipt))}
    )
    parse_evaluate_reply(content)
    return content
