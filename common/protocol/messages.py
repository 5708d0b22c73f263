"""The messages of the vocabulary (``vocabulary.py``): each request and reply built and parsed with
the same rules on both sides, the dispatch by message type (``parse_request``, ``check_reply``) and
``describe``, what a message carries for the egress and audit logs. ``train.evaluate``'s own
build/parse functions are in ``arms.py``; the dispatch here covers it with the others.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from common.protocol.adapter_record import (
    adapter_record,
    embedding_record,
    parse_adapter,
    parse_embedding,
    parse_lora_config,
)
from common.protocol.arms import parse_evaluate_reply, parse_evaluate_request
from common.protocol.checks import (
    check_common,
    check_config,
    check_records,
    get_record,
    load_json,
    parse_json_object,
    parse_metrics_and_receipt,
    parse_options,
)
from common.protocol.vocabulary import (
    ALLOWED_REPLY_KEYS,
    ALLOWED_REQUEST_RECORDS,
    APPLY,
    EMBED,
    EMBED_META_KEYS,
    EMBEDDING_SPEC_KEYS,
    ENROLL,
    ENROLL_META_KEYS,
    EVALUATE,
    MAX_ADAPTER_BYTES,
    MAX_METRICS,
    MESSAGE_TYPES,
    PRIVACY_KEYS,
    REQUEST_CONFIG_KEYS,
    REQUEST_REQUIRED,
    SHA256_RE,
    TRAIN_DTYPES,
    TRAIN_STATS_KEYS,
    WHOAMI,
    WHOAMI_KEYS,
    EnrollPayload,
    Request,
    WireError,
)
from common.trust.digests import record_digest


# -- requests -------------------------------------------------------------------------------------
def build_request(
    message_type: str, config: Mapping[str, Any], adapter: Mapping[str, np.ndarray] | None = None
) -> RecordDict:
    """Request content for ``message_type`` (validated with the same rules the site applies)."""
    if message_type not in MESSAGE_TYPES:
        raise WireError(f"unknown message type {message_type!r}; known: {list(MESSAGE_TYPES)}")
    check_config(config, REQUEST_CONFIG_KEYS[message_type], "config", REQUEST_REQUIRED[message_type], exact=False)
    records: dict[str, Any] = {"config": ConfigRecord(dict(config))}
    if message_type == APPLY:
        if adapter is None:
            raise WireError("train.apply needs the composed adapter", "adapter")
        records["adapter"] = adapter_record(adapter)
    elif adapter is not None:
        raise WireError(f"{message_type} carries no adapter", "adapter")
    content = RecordDict(records)
    parse_request(message_type, content)
    return content


def parse_request(message_type: str, content: RecordDict) -> Request:
    """Site side: refuse unknown message types, records or config keys (the site sends nothing then)."""
    if message_type == EVALUATE:
        return parse_evaluate_request(content)
    if message_type not in MESSAGE_TYPES:
        raise WireError(f"unknown message type {message_type!r}; this site answers only {list(MESSAGE_TYPES)}")
    check_records(content, ALLOWED_REQUEST_RECORDS[message_type], f"a {message_type} request")
    config = check_config(
        dict(get_record(content, "config", "config")),
        REQUEST_CONFIG_KEYS[message_type],
        "config",
        REQUEST_REQUIRED[message_type],
        exact=False,
    )
    if "options" in config:
        parse_options(config["options"])
    req = Request(message_type, config)
    if message_type == APPLY:
        if not SHA256_RE.match(config["blob_sha256"]):
            raise WireError("expected 64 lowercase hex digits", "config", "blob_sha256")
        req.lora_config = parse_lora_config(config["lora_config"], "config", "lora_config")
        req.adapter = parse_adapter(get_record(content, "adapter", "array"), req.lora_config)
    return req


# -- replies --------------------------------------------------------------------------------------
def build_whoami_reply(info: Mapping[str, Any]) -> RecordDict:
    """``whoami`` ConfigRecord with exactly ``WHOAMI_KEYS`` (counts only, never data)."""
    values = check_config(info, WHOAMI_KEYS, "whoami")
    content = RecordDict({"whoami": ConfigRecord(values)})
    parse_whoami_reply(content)
    return content


def parse_whoami_reply(content: RecordDict) -> dict[str, Any]:
    """Coordinator side: the ``whoami`` record, its ``tasks``/``groups`` decoded to lists of short strings."""
    check_records(content, ALLOWED_REPLY_KEYS[WHOAMI], "a query.whoami reply")
    info = check_config(dict(get_record(content, "whoami", "config")), WHOAMI_KEYS, "whoami")
    check_common(info, "whoami")
    for key in ("tasks", "groups"):
        value = load_json(info[key], "whoami", key)
        if not isinstance(value, list) or not all(isinstance(v, str) and len(v) <= 64 for v in value):
            raise WireError("expected a JSON list of short strings", "whoami", key)
        info[key] = value
    return info


def build_enroll_reply(
    arrays: Mapping[str, np.ndarray], z: np.ndarray, meta: Mapping[str, Any], check: bool = True
) -> RecordDict:
    """The three records of an enrolment reply, validated exactly as the coordinator will.

    ``check=False`` skips that validation for a caller that validates the reply itself right
    after (the ClientApp's gate, ``check_reply``), so the site decodes the adapter once, not twice.
    """
    content = RecordDict(
        {
            "adapter": adapter_record(arrays),
            "embedding": embedding_record(z),
            "meta": ConfigRecord(dict(meta)),
        }
    )
    if check:
        parse_enroll_reply(content)
    return content


def parse_enroll_reply(content: RecordDict, max_adapter_bytes: int = MAX_ADAPTER_BYTES) -> EnrollPayload:
    """Coordinator side: exactly adapter + embedding + meta, every key and shape as specified."""
    check_records(content, ALLOWED_REPLY_KEYS[ENROLL], "a train (enrol) reply")
    meta = check_config(dict(get_record(content, "meta", "config")), ENROLL_META_KEYS, "meta")
    check_common(meta, "meta")
    if not SHA256_RE.match(meta["blob_sha256"]):
        raise WireError("expected 64 lowercase hex digits", "meta", "blob_sha256")
    lora_config = parse_lora_config(meta["lora_config"])
    spec = parse_json_object(meta["embedding_spec"], EMBEDDING_SPEC_KEYS, "meta", "embedding_spec", exact=True)
    privacy = parse_json_object(meta["privacy"], PRIVACY_KEYS, "meta", "privacy")
    stats = parse_json_object(meta["train_stats"], TRAIN_STATS_KEYS, "meta", "train_stats")
    if stats.get("compute_dtype", "float32") not in TRAIN_DTYPES:
        raise WireError(f"compute_dtype must be one of {list(TRAIN_DTYPES)}", "meta", "train_stats")
    if not isinstance(spec["dim"], int):
        raise WireError("embedding_spec.dim must be an integer", "meta", "embedding_spec")
    arrays = parse_adapter(get_record(content, "adapter", "array"), lora_config, max_bytes=max_adapter_bytes)
    z = parse_embedding(get_record(content, "embedding", "array"), spec["dim"])
    return EnrollPayload(arrays, lora_config, z, meta, spec, privacy, stats)


def build_embed_reply(z: np.ndarray, meta: Mapping[str, Any]) -> RecordDict:
    """``embedding`` (z alone) and its small ``meta`` record."""
    content = RecordDict({"embedding": embedding_record(z), "meta": ConfigRecord(dict(meta))})
    parse_embed_reply(content)
    return content


def parse_embed_reply(content: RecordDict) -> tuple[np.ndarray, dict[str, Any]]:
    """Coordinator side: (z, meta) of a ``query.embed`` reply, ``meta.embedding_spec`` decoded."""
    check_records(content, ALLOWED_REPLY_KEYS[EMBED], "a query.embed reply")
    meta = check_config(dict(get_record(content, "meta", "config")), EMBED_META_KEYS, "meta")
    check_common(meta, "meta")
    spec = parse_json_object(meta["embedding_spec"], EMBEDDING_SPEC_KEYS, "meta", "embedding_spec", exact=True)
    parse_json_object(meta["privacy"], PRIVACY_KEYS, "meta", "privacy")
    z = parse_embedding(get_record(content, "embedding", "array"), spec["dim"])
    meta["embedding_spec"] = spec
    return z, meta


def build_apply_reply(metrics: Mapping[str, float], receipt: Mapping[str, Any]) -> RecordDict:
    """Metrics (numbers only) and a receipt naming what was stored."""
    content = RecordDict(
        {"metrics": MetricRecord({k: float(v) for k, v in metrics.items()}), "receipt": ConfigRecord(dict(receipt))}
    )
    parse_apply_reply(content)
    return content


def parse_apply_reply(content: RecordDict) -> tuple[dict[str, float], dict[str, Any]]:
    """Coordinator side: (metrics, receipt) of a ``train.apply`` reply."""
    check_records(content, ALLOWED_REPLY_KEYS[APPLY], "a train.apply reply")
    return parse_metrics_and_receipt(content, MAX_METRICS)


_PARSERS: dict[str, Callable[[RecordDict], Any]] = {
    WHOAMI: parse_whoami_reply,
    ENROLL: parse_enroll_reply,
    EMBED: parse_embed_reply,
    APPLY: parse_apply_reply,
    EVALUATE: parse_evaluate_reply,
}


def check_reply(message_type: str, content: RecordDict) -> None:
    """Site side, last gate before anything leaves: the reply matches the vocabulary exactly."""
    if message_type not in _PARSERS:
        raise WireError(f"unknown message type {message_type!r}; a site replies only to {list(MESSAGE_TYPES)}")
    _PARSERS[message_type](content)


def describe(content: RecordDict) -> list[dict[str, Any]]:
    """What a message carries, for egress and audit logs: names, kinds, keys, shapes, bytes, sha256.

    Never the values of arrays; config values verbatim when they are scalars or strings up to 256
    characters, else their length and sha256. ``digest`` is ``common.trust.digests.record_digest`` of the
    record, the hash the site's egress log and the coordinator's audit log both record.
    """
    out: list[dict[str, Any]] = []
    for name, rec in content.items():
        entry: dict[str, Any] = {"record": name}
        if isinstance(rec, ArrayRecord):
            tensors = []
            total = 0
            for key in sorted(rec.keys()):
                arr = rec[key]
                n = int(np.prod(arr.shape)) * np.dtype(arr.dtype).itemsize
                total += n
                tensors.append({"key": key, "dtype": arr.dtype, "shape": list(arr.shape), "bytes": n})
            entry.update(kind="array", tensors=tensors, bytes=total)
        elif isinstance(rec, ConfigRecord):
            keys: dict[str, Any] = {}
            for key in sorted(rec.keys()):
                value = rec[key]
                if isinstance(value, (bool, int, float)):
                    keys[key] = value
                elif isinstance(value, str) and len(value) <= 256:
                    keys[key] = value
                elif isinstance(value, str):
                    keys[key] = {"chars": len(value), "sha256": hashlib.sha256(value.encode()).hexdigest()}
                else:
                    keys[key] = type(value).__name__
            entry.update(kind="config", keys=keys)
        elif isinstance(rec, MetricRecord):
            entry.update(kind="metric", keys={k: rec[k] for k in sorted(rec.keys())})
        else:
            entry.update(kind=type(rec).__name__)
        entry["digest"] = record_digest(rec)
        out.append(entry)
    return out
