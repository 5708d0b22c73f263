"""Adapter maths on plain tensors: types and canonical bytes, PEFT directories, exact composition.

- ``lora``: ``LoraAdapter`` / ``LoraModule`` and the canonical byte codec (what is hashed, sent, stored)
- ``peft_io``: PEFT adapter directories <-> ``LoraAdapter``
- ``composition``: exact composition θ = θ0 + Σ w_i s_i B_i A_i and its best rank-r truncation
- ``stream_compose``: PEFT dirs -> PEFT dir, streamed (the same bytes as compose + save)
- ``safetensors_header``: the hardened header parser

The names below are the package's public API; import them from here.
"""

from common.adapters.composition import compose, singular_values, truncation_error
from common.adapters.lora import (
    FORMAT_TAG,
    LoraAdapter,
    LoraFormatError,
    LoraModule,
    adapter_from_arrays,
    adapter_from_bytes,
    adapter_to_arrays,
    adapter_to_bytes,
    canonical_head,
    delta_dict,
    peft_key,
)
from common.adapters.peft_io import load_peft_adapter, load_peft_adapters, save_peft_adapter
from common.adapters.stream_compose import compose_peft_dirs

__all__ = [
    "FORMAT_TAG",
    "LoraAdapter",
    "LoraFormatError",
    "LoraModule",
    "adapter_from_arrays",
    "adapter_from_bytes",
    "adapter_to_arrays",
    "adapter_to_bytes",
    "canonical_head",
    "compose",
    "compose_peft_dirs",
    "delta_dict",
    "load_peft_adapter",
    "load_peft_adapters",
    "peft_key",
    "save_peft_adapter",
    "singular_values",
    "truncation_error",
]
