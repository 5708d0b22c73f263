"""Update-norm normalisation: each retrieved adapter's update rescaled to a common norm before weighting.

Sites train with different steps, learning rates and ranks, so their updates ``δ_i = s_i B_i A_i``
differ in size for reasons that have nothing to do with what they learned (issue 28 item 2): in a
weighted sum the adapter trained longest or fastest dominates whatever weight it gets. The option
``update-norm`` (run-config key; ``rpe compose --update-norm``) says what to do about it:

- ``none`` (default): nothing, the composition is ``Σ w_i δ_i`` as before.
- ``frobenius``: every retrieved adapter's whole update is rescaled to the *median* total Frobenius
  norm of the retrieved set, ``c_i = median_j ‖δ_j‖_F / ‖δ_i‖_F``, and the composition is
  ``Σ w_i c_i δ_i``. ``‖δ_i‖_F = sqrt(Σ_modules ‖s B A‖_F²)`` over all of the adapter's modules (its
  modules keep their relative sizes); the median is over all k retrieved adapters, those the
  strategy gives weight 0 included, so ``nearest`` delivers its adapter at the set's median norm. An
  adapter whose update is exactly zero keeps ``c_i = 1`` and is left out of the median.

The weights ``w_i`` are the strategy's (from the z's alone); the scales ``c_i`` multiply them, so the
composition is still exact: ``θ = θ0 + Σ w_i c_i s_i B_i A_i`` (``common.adapters.composition.compose``
with coefficients ``w_i c_i``). :meth:`NormScaling.record` is what the coordinator records in the
``composition`` audit entry, the compose reply and the delivered adapter's provenance.

Torch is imported only to compute norms, so the names the CLI and ``rpe fed run`` check values
against (:data:`UPDATE_NORMS`, :func:`check_update_norm`) import without it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

#: the values of ``update-norm``, default first
UPDATE_NORMS = ("none", "frobenius")
DEFAULT_UPDATE_NORM = "none"
#: one line per value, for --help and error messages
UPDATE_NORM_HELP = (
    "none = the strategy's weights as they are (default); frobenius = each retrieved adapter's update "
    "s·B·A (all modules together) rescaled to the median total Frobenius norm of the k retrieved adapters "
    "before weighting"
)


class UpdateNormError(ValueError):
    """An ``update-norm`` value that is not one of :data:`UPDATE_NORMS`."""


def check_update_norm(value: object, where: str = "update-norm") -> str:
    """``value`` as one of :data:`UPDATE_NORMS` (surrounding blanks and case ignored), else
    :class:`UpdateNormError` naming ``where`` (when not empty), the value and the allowed list."""
    text = value.strip().lower() if isinstance(value, str) else None
    if text not in UPDATE_NORMS:
        said = f"{where}={value!r}" if where else repr(value)
        raise UpdateNormError(
            f"{said} is not a known update normalisation; expected one of: {', '.join(UPDATE_NORMS)} "
            f"({UPDATE_NORM_HELP})"
        )
    return text


def module_norm_sq(A: Any, B: Any, scale: float) -> float:
    """``‖s B A‖_F² = s² trace((BᵀB)(AAᵀ))`` of one module's factors (torch tensors), in float64,
    without forming ``B A`` (two r × r products). The one formula both :func:`update_norm` and the
    streamed composition (``common.adapters.stream_compose``) use, so their norms agree bit for bit."""
    import torch

    # fresh float64 copies: the same kernels on the same (aligned, contiguous) memory whatever the
    # factors were read into, so a norm never depends on where the bytes came from
    A = A.detach().to(torch.float64, copy=True)
    B = B.detach().to(torch.float64, copy=True)
    return float(scale) ** 2 * float(((B.mT @ B) * (A @ A.mT)).sum())


def total_norm(squares: Sequence[float]) -> float:
    """``sqrt(Σ squares)`` summed in the order given (the modules' order), never NaN for a -0 sum."""
    total = 0.0
    for sq in squares:
        total += sq
    return math.sqrt(max(total, 0.0))


def update_norm(adapter: Any) -> float:
    """``‖δ‖_F = sqrt(Σ_modules s² trace((BᵀB)(AAᵀ)))`` of a ``LoraAdapter``, in float64, without
    forming any ``B A`` (two r × r products per module)."""
    return total_norm([module_norm_sq(m.A, m.B, m.scale) for m in adapter.modules.values()])


@dataclass
class NormScaling:
    """The scales ``c_i`` of one composition (``scales[i]`` belongs to the i-th retrieved adapter)."""

    mode: str
    scales: list[float]
    norms: list[float] = field(default_factory=list)
    reference: float | None = None

    def record(self) -> dict[str, Any]:
        """What the audit entry, the compose reply and the site's provenance keep (JSON-able)."""
        if self.mode == "none":
            return {"mode": "none"}
        return {"mode": self.mode, "reference": self.reference, "norms": list(self.norms), "scales": list(self.scales)}

    def apply(self, weights: Sequence[float]) -> list[float]:
        """The composition's coefficients ``w_i c_i``."""
        if len(weights) != len(self.scales):
            raise ValueError(f"{len(weights)} weights for {len(self.scales)} scales")
        return [float(w) * c for w, c in zip(weights, self.scales, strict=True)]


def norm_scaling(adapters: Sequence[Any], mode: str = DEFAULT_UPDATE_NORM) -> NormScaling:
    """The :class:`NormScaling` of the retrieved ``adapters`` under ``mode`` (checked). ``none``
    computes nothing (scales 1); ``frobenius`` rescales every non-zero update to the median norm."""
    mode = check_update_norm(mode)
    if mode == "none":
        return NormScaling("none", [1.0] * len(adapters))
    return scaling_from_norms([update_norm(a) for a in adapters], mode)


def scaling_from_norms(norms: Sequence[float], mode: str = "frobenius") -> NormScaling:
    """The :class:`NormScaling` of retrieved updates whose total norms are ``norms`` (``mode``
    checked; ``none`` ignores them): what :func:`norm_scaling` computes once the norms are known
    (the streamed composition measures them from the files)."""
    mode = check_update_norm(mode)
    if mode == "none":
        return NormScaling("none", [1.0] * len(norms))
    norms = [float(n) for n in norms]
    live = sorted(n for n in norms if n > 0.0)
    if not live:
        return NormScaling(mode, [1.0] * len(norms), norms, 0.0)
    mid = len(live) // 2
    reference = live[mid] if len(live) % 2 else 0.5 * (live[mid - 1] + live[mid])
    scales = [reference / n if n > 0.0 else 1.0 for n in norms]
    return NormScaling(mode, scales, norms, reference)


def _finite(value: Any) -> float | None:
    return (
        float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        else None
    )


def describe_record(record: Any, n: int) -> dict[str, Any]:
    """What a ``composition`` audit entry's ``normalisation`` (:meth:`NormScaling.record`) says, ready
    for a page or a report over its ``n`` retrieved adapters: ``{"mode", "reference", "rows": [{"norm",
    "scale"}] (n of them, None where not recorded), "text"}``. An entry older than the option (no
    record) says so; a record that is not what the coordinator writes (hand-edited, forged) is shown
    as it is, never as a clean ``none``."""
    rows: list[dict[str, float | None]] = [{"norm": None, "scale": None} for _ in range(n)]
    if record is None:
        return {
            "mode": None,
            "reference": None,
            "rows": rows,
            "text": "update-norm not recorded (an entry older than the option)",
        }
    mode = record.get("mode") if isinstance(record, dict) else None
    if record == {"mode": "none"}:
        return {
            "mode": "none",
            "reference": None,
            "rows": rows,
            "text": "update-norm none (the strategy's weights as they are)",
        }
    norms, scales = (record.get(k) if isinstance(record, dict) else None for k in ("norms", "scales"))
    if (
        mode == "none"
        or mode not in UPDATE_NORMS
        or not isinstance(norms, list)
        or not isinstance(scales, list)
        or not (len(norms) == len(scales) == n)
    ):
        return {"mode": mode, "reference": None, "rows": rows, "text": f"update-norm record not understood: {record!r}"}
    reference = _finite(record.get("reference"))
    for row, norm, scale in zip(rows, norms, scales, strict=True):
        row["norm"], row["scale"] = _finite(norm), _finite(scale)
    ref = f"{reference:.4g}" if reference is not None else repr(record.get("reference"))
    return {
        "mode": mode,
        "reference": reference,
        "rows": rows,
        "text": f"update-norm {mode}: each retrieved update s·B·A rescaled by c_i to the median total norm "
        f"‖δ‖_F = {ref} before weighting (the composition is Σ w_i c_i δ_i)",
    }
