"""How much one site may contribute: update-norm bounds relative to the registry's own adapters.

The attack this closes (issue 10): the old per-module cap was an absolute 1e4 while real adapters
have ‖ΔW‖ below 1, so an adapter at 9,990 with its z at the centroid took 99.9994 % of a ``sim``
composition. Norms are therefore judged against the adapters the registry already holds for the
same base and task: a new adapter may be at most ``factor`` × the median norm of those (per module
and in total), and a composed adapter is checked against the same reference before it is delivered.
Until ``min_reference`` adapters exist there is nothing to compare with, and the absolute cap of the
validation step applies alone.

Issue 26 class 6 (one lying site controlled the bound): the registry passes one reference per site
(its latest live adapter, ``server.registry.writer.reference_bound``), so repeated enrolments of one
site count once, and every limit is at least ``floor`` (``update_norm_floor``), so near-zero
adapters cannot make honest ones refused.

‖ΔW‖_F of a LoRA module is computed from the factors without forming ΔW:
‖s·B·A‖_F² = s² · trace((BᵀB)(AAᵀ)), two r × r products.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

DEFAULT_FACTOR = 10.0
DEFAULT_MIN_REFERENCE = 3


class NormBoundError(ValueError):
    """An adapter's update is far larger than the registry's adapters of the same base and task."""


#: float64 elements one step of a norm computation may hold (32 MiB): memory stays bounded for any rank
NORM_BLOCK_ELEMS = 1 << 22


def module_norm(module: Any) -> float:
    """‖scale · B @ A‖_F of a ``common.adapters.lora.LoraModule`` (float64), in bounded memory.

    Low rank: trace((BᵀB)(AAᵀ)), the r × r Gram products taken a block of columns at a time. A
    high-rank module (a composition of k adapters has rank k·r; ``--k 5000`` formed 40,000² Grams,
    issue 26 class 9) is summed over row blocks of B @ A instead, whichever costs fewer operations;
    either way no step holds more than about ``NORM_BLOCK_ELEMS`` values."""
    A = np.asarray(module.A.detach().double().cpu().numpy() if hasattr(module.A, "detach") else module.A, np.float64)
    B = np.asarray(module.B.detach().double().cpu().numpy() if hasattr(module.B, "detach") else module.B, np.float64)
    r, n_out, n_in = A.shape[0], B.shape[0], A.shape[1]
    if r * (n_out + n_in) <= n_out * n_in:  # the Gram products are cheaper: (BᵀB)∘(AAᵀ), column blocks
        cols = max(1, NORM_BLOCK_ELEMS // max(r, 1))
        value = 0.0
        for s in range(0, r, cols):
            value += float(np.einsum("ij,ij->", B.T @ B[:, s : s + cols], A @ A[s : s + cols].T))
    else:
        rows = max(1, NORM_BLOCK_ELEMS // max(n_in, 1))
        value = 0.0
        for s in range(0, n_out, rows):
            block = B[s : s + rows] @ A
            value += float(np.einsum("ij,ij->", block, block))
    value *= float(module.scale) ** 2
    return float(np.sqrt(max(value, 0.0)))


def adapter_norms(adapter: Any) -> dict[str, float]:
    """Per-module update norms of a ``common.adapters.lora.LoraAdapter``, plus ``"__total__"`` (root sum of squares)."""
    norms = {name: module_norm(m) for name, m in adapter.modules.items()}
    norms["__total__"] = float(np.sqrt(sum(v * v for v in norms.values())))
    return norms


@dataclass(frozen=True)
class NormBound:
    """The limits for one (base, task): ``factor`` × the median of the reference adapters' norms."""

    limits: dict[str, float]
    factor: float
    n_reference: int

    @classmethod
    def from_reference(
        cls,
        reference: Iterable[Mapping[str, float]],
        factor: float = DEFAULT_FACTOR,
        min_reference: int = DEFAULT_MIN_REFERENCE,
        floor: float = 0.0,
    ) -> NormBound | None:
        """The bound from the stored adapters' norms (the registry passes one per site), or None while
        fewer than ``min_reference`` exist. No limit is below ``floor``: reference adapters near zero
        cannot drag the bound under what an honest adapter needs."""
        if not factor > 1.0:
            raise ValueError(f"the norm factor must be > 1; got {factor!r}")
        if not (floor >= 0.0 and np.isfinite(floor)):
            raise ValueError(f"the norm floor must be a finite number >= 0; got {floor!r}")
        refs = [dict(r) for r in reference]
        if len(refs) < min_reference:
            return None
        keys = set().union(*refs)
        limits = {}
        for key in keys:
            values = [r[key] for r in refs if key in r]
            if len(values) >= min_reference:
                limits[key] = max(factor * float(np.median(values)), floor)
        return cls(limits=limits, factor=factor, n_reference=len(refs))

    def check(self, norms: Mapping[str, float], who: str) -> None:
        """Raise ``NormBoundError`` naming ``who``, the module and the bound if any norm exceeds its limit."""
        for key, value in sorted(norms.items(), key=lambda kv: kv[0] != "__total__"):
            limit = self.limits.get(key)
            if limit is not None and not value <= limit:  # NaN fails too
                what = "the whole update" if key == "__total__" else f"module {key}"
                raise NormBoundError(
                    f"{who}: {what} has ‖ΔW‖ = {value:.4g}, more than {self.factor:g} × the median of the "
                    f"{self.n_reference} adapters of this base and task (each site's latest; bound {limit:.4g}); an honest adapter is "
                    "never this large — retrain with a lower learning rate, or ask the coordinator"
                )
