"""Adapter maths on plain tensors: types and canonical bytes, PEFT directories, exact composition.

- ``lora``: ``LoraAdapter`` / ``LoraModule`` and the canonical byte codec (what is hashed, sent, stored)
- ``peft_io``: PEFT adapter directories <-> ``LoraAdapter``
- ``composition``: exact composition θ = θ0 + Σ w_i s_i B_i A_i and its best rank-r truncation
- ``normalise``: the ``update-norm`` option, each retrieved update rescaled to the set's median norm
  (``from common.adapters.normalise import norm_scaling``; torch-free until a norm is computed)
- ``stream_compose``: PEFT dirs -> PEFT dir, streamed (the same bytes as compose + save), with the
  ``update-norm`` scaling measured from the files (``peft_dirs_scaling``); ``stream_inputs`` its inputs
- ``safetensors_header``: the hardened header parser

The names below are the package's public API; import them from here. They load on first use
(``_WHERE``), so the torch-free parts stay importable without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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
    from common.adapters.stream_compose import compose_peft_dirs, peft_dirs_scaling

#: public name -> the module that defines it. Loaded on first use (PEP 562), so importing a
#: torch-free part (``common.adapters.safetensors_header``, which the registry's validation uses)
#: does not import torch (seconds) through this package: ``rpe registry ls`` never needs it.
_WHERE = {
    **dict.fromkeys(("compose", "singular_values", "truncation_error"), "composition"),
    **dict.fromkeys(
        (
            "FORMAT_TAG",
            "LoraAdapter",
            "LoraFormatError",
            "LoraModule",
            "adapter_from_arrays",
            "adapter_from_bytes",
            "adapter_to_arrays",
            "adapter_to_bytes",
            "canonical_head",
            "delta_dict",
            "peft_key",
        ),
        "lora",
    ),
    **dict.fromkeys(("load_peft_adapter", "load_peft_adapters", "save_peft_adapter"), "peft_io"),
    **dict.fromkeys(("compose_peft_dirs", "peft_dirs_scaling"), "stream_compose"),
}


def __getattr__(name: str) -> Any:
    """A public name from its module, imported on first use (and cached in this module)."""
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{where}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})


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
    "peft_dirs_scaling",
    "peft_key",
    "save_peft_adapter",
    "singular_values",
    "truncation_error",
]
