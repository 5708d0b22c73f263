"""Issue 26 class 6: one lying site must not control the update-norm bound.

Before: the bound was 10 × the median of the latest adapters of a (base, task) and each of a site's
repeated enrolments counted. Four near-zero adapters from one site made honest enrolments refused;
enrolling just under the moving limit ratcheted it 0.38 → 258 in 40 steps. Now each site counts
once (its latest adapter) and no limit is below ``update_norm_floor``. Real registry, real adds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from support.trust import adapter, make, meta, z

from server.bounds import NormBound, NormBoundError, adapter_norms
from server.composer import compose_for_target
from server.registry import Registry
from server.registry.errors import UpdateNormBoundError


def test_four_near_zero_adapters_of_one_site_do_not_refuse_honest_enrolments(tmp_path: Path) -> None:
    root, _ = make(tmp_path, 2)  # honest sites s0, s1
    with Registry(root, chroma="off") as reg:
        for i in range(4):  # one lying site, four near-zero adapters (‖ΔW‖ ~ 1e-8)
            reg.add(adapter(100 + i, scale=1e-7), z(100 + i), meta("liar"))
        bound = reg.norm_bound(next(iter(reg.bases)), "t")
        assert bound is not None and bound.n_reference == 3  # s0, s1, liar: one each
        honest = adapter(2)
        assert adapter_norms(honest)["__total__"] <= bound.limits["__total__"]
        reg.add(honest, z(2), meta("s2"))  # refused before (the median was the liar's 1e-8)
        res = compose_for_target(reg, z(0), strategy="sim", k=3, target="x")  # the task composes
        assert len(res.weights) == 3


def test_ratcheting_one_site_cannot_raise_the_bound_beyond_the_honest_sites(tmp_path: Path) -> None:
    root, _ = make(tmp_path, 3)  # honest s0, s1, s2
    with Registry(root, chroma="off") as reg:
        base = next(iter(reg.bases))
        honest_max = max(reg._cols.meta[r]["update_norms"]["__total__"] for r in range(3))  # noqa: SLF001
        for step in range(40):  # each step just under the limit in force
            bound = reg.norm_bound(base, "t")
            assert bound is not None
            norms = adapter_norms(adapter(200 + step))
            f = 0.99 * min(bound.limits[k] / v for k, v in norms.items() if k in bound.limits)
            reg.add(adapter(200 + step, scale=f), z(200 + step), meta("liar"))
        final = reg.norm_bound(base, "t")
        assert final is not None and final.n_reference == 4
        # the median of four sites, of which one lies: at most the largest honest site's norm
        assert final.limits["__total__"] <= final.factor * honest_max * (1 + 1e-9)
        with pytest.raises(UpdateNormBoundError, match="each site's latest"):
            reg.add(adapter(300, scale=50.0), z(300), meta("liar"))


def test_a_floor_keeps_near_zero_references_from_refusing_honest_adapters() -> None:
    tiny = [{"__total__": 4e-8, "m": 3e-8}] * 5
    with pytest.raises(NormBoundError):
        NormBound.from_reference(tiny).check({"__total__": 0.046, "m": 0.04}, "site 'h'")
    bound = NormBound.from_reference(tiny, floor=0.05)
    assert bound is not None and bound.limits == {"__total__": 0.05, "m": 0.05}
    bound.check({"__total__": 0.046, "m": 0.04}, "site 'h'")
    with pytest.raises(ValueError, match="floor"):
        NormBound.from_reference(tiny, floor=float("nan"))


def test_the_registry_applies_its_floor(tmp_path: Path) -> None:
    root = tmp_path / "reg"
    from support.trust import BASE, DIM, SHAPES

    Registry.init(
        root, base_fingerprint=BASE, module_shapes=SHAPES, embedding_dim=DIM, limits={"update_norm_floor": 1e3}
    ).close()
    with Registry(root, chroma="off") as reg:
        for i in range(3):  # three sites, all near zero: the median alone would refuse anything larger
            reg.add(adapter(i, scale=1e-7), z(i), meta(f"s{i}"))
        bound = reg.norm_bound(BASE, "t")
        assert bound is not None and min(bound.limits.values()) == 1e3
        reg.add(adapter(9), z(9), meta("honest"))
    assert np.isfinite(bound.limits["__total__"])
