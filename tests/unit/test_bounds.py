"""Update-norm bounds relative to the registry's own adapters (server/bounds.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.adapters import LoraAdapter, LoraModule, compose
from server.bounds import NormBound, NormBoundError, adapter_norms, module_norm


def _adapter(seed, scale=1.0, modules=("m.q", "m.v")):
    g = torch.Generator().manual_seed(seed)
    return LoraAdapter(
        {
            m: LoraModule(
                A=torch.randn(4, 16, generator=g) * 0.1, B=torch.randn(16, 4, generator=g) * 0.1 * scale, scale=2.0
            )
            for m in modules
        }
    )


def test_module_norm_equals_the_dense_frobenius_norm():
    a = _adapter(0)
    for m in a.modules.values():
        dense = float(torch.linalg.norm(m.scale * m.B.double() @ m.A.double()))
        assert module_norm(m) == pytest.approx(dense, rel=1e-12)


def test_no_bound_until_enough_reference_adapters():
    assert NormBound.from_reference([adapter_norms(_adapter(i)) for i in range(2)]) is None


def test_the_9990_attack_is_refused_naming_site_and_bound_and_honest_adapters_pass():
    reference = [adapter_norms(_adapter(i)) for i in range(5)]
    bound = NormBound.from_reference(reference)
    bound.check(adapter_norms(_adapter(11)), "site 'f'")  # an honest newcomer
    huge = _adapter(12, scale=9990.0)
    with pytest.raises(NormBoundError, match=r"site 'e'.*10 × the median of the 5 adapters"):
        bound.check(adapter_norms(huge), "site 'e'")


def test_a_composed_adapter_is_checked_against_the_same_bound():
    sources = [_adapter(i) for i in range(4)]
    bound = NormBound.from_reference([adapter_norms(a) for a in sources])
    bound.check(adapter_norms(compose(sources, np.full(4, 0.25))), "composition for 'c'")
    with pytest.raises(NormBoundError, match="composition for 'c'"):
        bound.check(adapter_norms(compose(sources[:2], [674.0, -673.0])), "composition for 'c'")


def test_nan_norm_never_passes():
    bound = NormBound.from_reference([{"__total__": 1.0}] * 3)
    with pytest.raises(NormBoundError):
        bound.check({"__total__": float("nan")}, "site 'x'")
