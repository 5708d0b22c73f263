"""The fixed Flower message vocabulary between the coordinator and a site: names, keys, limits.

Everything that crosses the wire is described here, once, and checked on both sides: the site
refuses to *send* anything that does not match (``check_reply``), the coordinator refuses to
*accept* anything that does not match (the ``parse_*`` functions of ``messages.py`` and
``arms.py``), and a site's auditor can read this file to know what can ever leave the hospital.
How the checks are made is in ``checks.py``; the adapter's packed form in ``adapter_record.py``;
the messages in ``messages.py`` and ``arms.py``; ``wire.py`` is the one name callers import.

Message types (``message_type`` of the Flower message) and what each side may put in them:

===================  =========================================  ===========================================
message type         request (coordinator -> site)              reply (site -> coordinator)
===================  =========================================  ===========================================
``query.whoami``     ``config``                                 ``whoami`` (site id, tasks, counts)
``train``            ``config`` (task, steps, LoRA spec, ...)   ``adapter``, ``embedding``, ``meta``
``query.embed``      ``config``                                 ``embedding``, ``meta``
``train.apply``      ``adapter``, ``config``                    ``metrics``, ``receipt``
``train.evaluate``   ``config`` (arms), ``adapter-<i>`` per arm  ``metrics`` (``a<i>_*``, ``base_*``), ``receipt``
===================  =========================================  ===========================================

Records:

- ``adapter``: ArrayRecord with exactly one 1-D float32 array ``lora_factors``: every LoRA factor
  of the LoRA config, finite, flattened (row-major) and joined in the sorted order of their PEFT
  key names (``base_model.model.<module>.lora_A.weight`` of shape ``[r, in]``, then
  ``...lora_B.weight`` of shape ``[out, r]``, module by module). The LoRA config alone fixes the
  layout, so the vector has exactly Σ r·(in + out) values. Why one array and not one per factor:
  Flower 1.41 moves every array as its own objects through the SuperLink's sqlite state, each with
  several round trips; a 30-layer q/v adapter was ~240 objects, and a ``train.evaluate`` with six
  arms kept the SuperLink CPU-bound for a minute on the local main job.
- ``embedding``: ArrayRecord with exactly one 1-D float32 array ``z``.
- ``meta``: ConfigRecord with exactly the keys of ``ENROLL_META_KEYS`` (enrolment) or
  ``EMBED_META_KEYS`` (embedding query); nested values (LoRA config, privacy settings, training
  statistics, embedding spec) are canonical JSON strings with their own fixed key sets.

The LoRA config on the wire (``lora_config``, canonical JSON)::

    {"peft_type": "LORA",
     "modules": {"model.layers.0.self_attn.q_proj": {"r": 8, "alpha": 16.0, "shape": [out, in]}, ...}}

The scale of a module is ``alpha / r`` (no rsLoRA), the ``targets`` of PEFT are the module names'
last components. Any violation raises :class:`WireError`, which names the record and the key.

``train.evaluate`` (every arm of one target in one message) is described in ``arms.py``; its
names, keys and limits are in the tables below with the others.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

WIRE_SCHEMA = "rpe-wire/2"  # 2: the adapter travels as one packed array (lora_factors)

WHOAMI = "query.whoami"
ENROLL = "train"
EMBED = "query.embed"
APPLY = "train.apply"
EVALUATE = "train.evaluate"
MESSAGE_TYPES = (WHOAMI, ENROLL, EMBED, APPLY, EVALUATE)
#: Flower ``Error.code`` of a site's refusal (request outside the vocabulary) and of a failure.
ERROR_REFUSED = 4100
ERROR_FAILED = 4101

#: record name -> record kind ("array" | "config" | "metric"), per message type, for replies.
ALLOWED_REPLY_KEYS: dict[str, dict[str, str]] = {
    WHOAMI: {"whoami": "config"},
    ENROLL: {"adapter": "array", "embedding": "array", "meta": "config"},
    EMBED: {"embedding": "array", "meta": "config"},
    APPLY: {"metrics": "metric", "receipt": "config"},
    EVALUATE: {"metrics": "metric", "receipt": "config"},
}
#: record name -> kind, per message type, for requests.
ALLOWED_REQUEST_RECORDS: dict[str, dict[str, str]] = {
    WHOAMI: {"config": "config"},
    ENROLL: {"config": "config"},
    EMBED: {"config": "config"},
    APPLY: {"adapter": "array", "config": "config"},
    #: plus exactly one ``adapter-<i>`` ArrayRecord per arm the config describes (``arms.arm_records``)
    EVALUATE: {"config": "config"},
}

# -- request config keys (name -> accepted Python types); "nonce" is always required ---------------
_INT = (int,)
_NUM = (int, float)
_STR = (str,)
_BOOL = (bool,)
REQUEST_CONFIG_KEYS: dict[str, dict[str, tuple[type, ...]]] = {
    WHOAMI: {"nonce": _STR, "challenge": _STR},
    ENROLL: {
        "nonce": _STR,
        "task": _STR,
        "steps": _INT,
        "lr": _NUM,
        "batch_size": _INT,
        "max_length": _INT,
        "seed": _INT,
        "lora_r": _INT,
        "lora_alpha": _NUM,
        "lora_targets": _STR,
        "lora_dropout": _NUM,
        "embed_layer": _INT,
        "max_examples": _INT,
        "options": _STR,
    },
    EMBED: {"nonce": _STR, "task": _STR, "embed_layer": _INT, "max_examples": _INT, "options": _STR},
    APPLY: {
        "nonce": _STR,
        "task": _STR,
        "name": _STR,
        "lora_config": _STR,
        "blob_sha256": _STR,
        "base_fingerprint": _STR,
        "strategy": _STR,
        "sources": _STR,
        "weights": _STR,
        "evaluate": _BOOL,
        "max_eval": _INT,
        "store": _BOOL,
        "with_base": _BOOL,
        "delivery": _STR,
        "options": _STR,
        #: the "nothing close enough" check of this composition (JSON text; server/nearness.py)
        "nearness": _STR,
        #: the update-norm normalisation of this composition (JSON text; common/adapters/normalise.py)
        "normalisation": _STR,
    },
    EVALUATE: {
        "nonce": _STR,
        "task": _STR,
        "arms": _STR,
        "max_eval": _INT,
        "with_base": _BOOL,
        "delivery": _STR,
        "options": _STR,
    },
}
#: ``options`` (every request that names a task): the task family's own settings in ONE key, a flat
#: JSON object (``checks.parse_options``), so that a new family never widens this vocabulary; which
#: names and types it takes is the family's check (``common.families.base.Family.option_keys``)
MAX_OPTIONS = 16
REQUEST_REQUIRED: dict[str, frozenset[str]] = {
    WHOAMI: frozenset({"nonce"}),
    ENROLL: frozenset({"nonce", "task"}),
    EMBED: frozenset({"nonce"}),
    APPLY: frozenset({"nonce", "name", "lora_config", "blob_sha256", "base_fingerprint"}),
    EVALUATE: frozenset({"nonce", "arms"}),
}

# -- reply key sets -------------------------------------------------------------------------------
WHOAMI_KEYS: dict[str, tuple[type, ...]] = {
    "schema": _STR,
    "site": _STR,
    "tasks": _STR,
    "groups": _STR,
    "n_examples": _INT,
    "n_labeled": _INT,
    "n_unlabeled": _INT,
    "n_eval": _INT,
    "data_ok": _BOOL,
    "signer": _STR,
    "nonce": _STR,
    # a signed ``identity`` statement (``common/trust/statements.py``) as canonical JSON; "" = the site has no key
    "identity": _STR,
}
ENROLL_META_KEYS: dict[str, tuple[type, ...]] = {
    "schema": _STR,
    "site": _STR,
    "task": _STR,
    "modality": _STR,
    "group": _STR,
    "base_fingerprint": _STR,
    "sample_count": _INT,
    "token_count": _INT,
    "lora_config": _STR,
    "blob_sha256": _STR,
    "embedding_spec": _STR,
    "privacy": _STR,
    "train_stats": _STR,
    "nonce": _STR,
    "created_at": _NUM,
    "signer": _STR,
    "signature": _STR,
}
EMBED_META_KEYS: dict[str, tuple[type, ...]] = {
    "schema": _STR,
    "site": _STR,
    "task": _STR,
    "base_fingerprint": _STR,
    "sample_count": _INT,
    "token_count": _INT,
    "embedding_spec": _STR,
    "privacy": _STR,
    "nonce": _STR,
}
RECEIPT_KEYS: dict[str, tuple[type, ...]] = {
    "schema": _STR,
    "site": _STR,
    "name": _STR,
    "blob_sha256": _STR,
    "evaluated": _BOOL,
    "nonce": _STR,
}
#: keys inside the JSON-valued meta fields
#: ``common.privacy.release_record``: DP-SGD's parameters and ε, the z mechanism's, and the total
PRIVACY_KEYS = frozenset(
    {
        "dp_sgd",
        "epsilon",
        "delta",
        "max_grad_norm",
        "noise_multiplier",
        "sample_rate",
        "steps",
        "z_mechanism",
        "z_clip",
        "z_noise_multiplier",
        "z_epsilon",
        "z_delta",
        "epsilon_total",
        "delta_total",
        "z_repeat",
    }
)
TRAIN_STATS_KEYS = frozenset(
    {
        "steps",
        "lr",
        "batch_size",
        "max_length",
        "seed",
        "loss_first",
        "loss_last",
        "seconds",
        "n_train",
        "compute_dtype",
    }
)
#: the dtypes a site may train in (``train_stats.compute_dtype``; ``common.models.compute_dtype``)
TRAIN_DTYPES = ("float32", "bfloat16")
#: what a site's node config ``compute-dtype`` may name (``auto``: the hardware decides)
COMPUTE_DTYPES = ("auto", *TRAIN_DTYPES)
EMBEDDING_SPEC_KEYS = frozenset({"representation", "layer", "dim"})
#: metric names a site may return after applying an adapter (numbers only, never text)
METRIC_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,40}$")
MAX_METRICS = 32
#: ``train.evaluate``: arms per message, metrics per reply (``a<i>_*`` per arm and ``base_*``)
MAX_ARMS = 16
MAX_EVALUATE_METRICS = 8 * (MAX_ARMS + 1)
#: the keys of one arm's description in an evaluate request's ``arms``
ARM_KEYS = frozenset({"arm", "blob_sha256", "base_fingerprint", "lora_config"})

PEFT_PREFIX = "base_model.model."
#: the one array of an ``adapter`` record (the module docstring says why one)
PACKED_KEY = "lora_factors"
PEFT_KEY_RE = re.compile(r"^base_model\.model\.(?P<module>[A-Za-z0-9_.]+)\.lora_(?P<ab>[AB])\.weight$")
MODULE_RE = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
SITE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
MAX_ADAPTER_BYTES = 512 * 1024 * 1024
MAX_EMBEDDING_DIM = 65536
MAX_STR = 4096  # no free-text field may carry a report's worth of text
MAX_LORA_CONFIG_STR = 1 << 20


class WireError(ValueError):
    """A message does not match the fixed vocabulary; ``record``/``key`` say where."""

    def __init__(self, message: str, record: str | None = None, key: str | None = None) -> None:
        where = record if key is None else f"{record}[{key!r}]"
        super().__init__(f"{where}: {message}" if where else message)
        self.record = record
        self.key = key


# -- what a parsed message is ---------------------------------------------------------------------
@dataclass
class Request:
    """A validated request: its config and, for ``train.apply``, the adapter factors."""

    message_type: str
    config: dict[str, Any]
    adapter: dict[str, np.ndarray] | None = None
    lora_config: dict[str, Any] | None = None
    #: ``train.evaluate``: one ``(arm description, adapter factors)`` per arm
    arms: list[tuple[dict[str, Any], dict[str, np.ndarray]]] | None = None


@dataclass
class EnrollPayload:
    """What a site sends when it enrols: the adapter factors, z and the metadata."""

    arrays: dict[str, np.ndarray]
    lora_config: dict[str, Any]
    z: np.ndarray
    meta: dict[str, Any]
    embedding_spec: dict[str, Any] = field(default_factory=dict)
    privacy: dict[str, Any] = field(default_factory=dict)
    train_stats: dict[str, Any] = field(default_factory=dict)
