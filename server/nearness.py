"""The "nothing close enough" check: how far a target's z is from the library it is composed from (issue 28).

Composition helps a target only where the library holds its kind of data (``benchmarks/ZERO_SHOT.md``:
the far target, whose report group no library site holds, gained nothing; on prostate the targets
whose scanner is unlike every other site fell below the pretrained model). The coordinator cannot
score a composition before it delivers it, but it knows how far the retrieved adapters' z are from
the target's, and how far apart the library's own adapters usually are. So each composition says

    ratio = d_nearest / spacing

where ``d_nearest`` is the squared L2 distance from the target's z to the nearest retrieved adapter
(the registry's own distance) and ``spacing`` the median, over the eligible library adapters, of each
one's squared distance to its nearest *other* eligible adapter. The ratio has no unit: a z space
whose distances are 100 times larger (another base model, another family's representation) gives
the same ratio, so one threshold serves both task families. ``ratio > threshold`` sets
``warning = "nothing close enough"``: the composed adapter is still delivered (the operator decides),
and the reply, the run report and the ``composition`` audit entry carry the check.

The threshold is the run-config key ``far-ratio`` (default :data:`DEFAULT_FAR_RATIO`; ``0`` turns the
check off). How the default was chosen is in ``benchmarks/ZERO_SHOT.md`` ("The "nothing close
enough" warning", table ``benchmarks/zero_shot/nearness/nearness.md``): over 16 (target, library)
cases of both families, every target that composition helped was at 1.04 or below except one
(BIDMC, 3.56, which stayed far below its own LoRA), and the far targets it did not help were at
1.41 (the reduced profile's far target, N = 4), 1.81 and 4.34. The library spacing is computed over at most :data:`MAX_SPACING_SAMPLE` adapters
(an evenly spaced subset in record order, so the same registry gives the same spacing).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

#: ``far-ratio`` when the run config does not set it (benchmarks/ZERO_SHOT.md says how it was calibrated)
DEFAULT_FAR_RATIO = 1.25
#: at most this many library adapters enter the spacing (an O(n²) pass)
MAX_SPACING_SAMPLE = 2000
WARNING = "nothing close enough"


class FarRatioError(ValueError):
    """A ``far-ratio`` that is not a finite number >= 0."""


def check_far_ratio(value: Any) -> float:
    """``value`` (a number or its text, as a run config or a command line gives it) as the threshold,
    or :class:`FarRatioError` saying what is expected. A negative, NaN or infinite threshold is refused
    before anything is composed: NaN or infinity would never warn and cannot be written to the audit
    log, and a negative one would silently turn the check off (``0`` does that, on purpose)."""
    try:
        ratio = float(value)
    except (TypeError, ValueError):
        ratio = float("nan")
    if isinstance(value, bool) or not math.isfinite(ratio) or ratio < 0:
        raise FarRatioError(
            f"far-ratio must be a finite number >= 0 (0 turns the check off; default {DEFAULT_FAR_RATIO:g}), "
            f"not {value!r}"
        )
    return ratio


def library_spacing(Z: np.ndarray) -> float | None:
    """The median over rows of each row's squared L2 distance to its nearest other row; None with
    fewer than two rows. Exact in float64; rows beyond :data:`MAX_SPACING_SAMPLE` are subsampled evenly."""
    import numpy as np  # lazy: `rpe --help` imports this module for its default

    Z = np.asarray(Z, dtype=np.float64)
    if Z.ndim != 2 or Z.shape[0] < 2:
        return None
    if Z.shape[0] > MAX_SPACING_SAMPLE:
        Z = Z[np.linspace(0, Z.shape[0] - 1, MAX_SPACING_SAMPLE).round().astype(int)]
    sq = np.einsum("ij,ij->i", Z, Z)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (Z @ Z.T)
    np.fill_diagonal(d2, np.inf)
    return float(np.median(np.maximum(d2.min(axis=1), 0.0)))


def assess(distances: Sequence[float], spacing: float | None, threshold: float) -> dict[str, Any]:
    """The check a composition carries: ``{"nearest_distance", "library_spacing", "ratio",
    "threshold", "warning"}``; ``warning`` is :data:`WARNING` or None. Without a spacing (a library
    of one adapter) or with ``threshold <= 0`` (switched off) there is no ratio and no warning, and
    ``reason`` says why."""
    nearest = float(min(distances)) if len(distances) else None
    out: dict[str, Any] = {
        "nearest_distance": nearest,
        "library_spacing": spacing,
        "ratio": None,
        "threshold": float(threshold),
        "warning": None,
    }
    if threshold <= 0:
        out["reason"] = "far-ratio is 0: the check is off"
        return out
    if nearest is None or spacing is None:
        out["reason"] = "fewer than two library adapters: no spacing to compare with"
        return out
    if spacing <= 0.0:  # half the library are exact duplicates of another adapter: any distance is far
        ratio = float("inf") if nearest > 0.0 else 0.0
    else:
        ratio = nearest / spacing
    out["ratio"] = ratio if math.isfinite(ratio) else None
    if ratio > threshold:
        out["warning"] = WARNING
        out["reason"] = (
            f"the nearest adapter is {ratio:.3g}x the library's usual spacing away (far-ratio {threshold:g}): "
            "the library holds nothing like this target; expect no gain over the base model"
        )
    return out


def check(registry: Any, distances: Sequence[float], threshold: float, **filters: Any) -> dict[str, Any]:
    """:func:`assess` against the spacing of the registry's live adapters matching ``filters``
    (``task``, ``base``; ``exclude_site`` leaves the target's own adapter out, as retrieval does)."""
    import numpy as np

    if threshold <= 0:
        return assess(distances, None, threshold)
    exclude = filters.pop("exclude_site", None)
    records = [r for r in registry.list(**filters) if exclude is None or r.meta.site != exclude]
    records = list({r.meta.site: r for r in records}.values())  # one per site, its latest, as retrieval sees them
    if len(records) < 2:
        return assess(distances, None, threshold)
    if len(records) > MAX_SPACING_SAMPLE:
        records = [records[i] for i in np.linspace(0, len(records) - 1, MAX_SPACING_SAMPLE).round().astype(int)]
    Z = np.stack([np.asarray(r.z, dtype=np.float64) for r in records])
    return assess(distances, library_spacing(Z), threshold)


def summary(result: dict[str, Any] | None) -> str:
    """One line for a person (``rpe compose``, the console): the Flower compose reply's
    ``WARNING nothing close enough: <reason>`` when warned, else how near the target is, or why the
    check has no ratio; ``""`` for a composition recorded before the check existed."""
    if not result:
        return ""
    if result.get("warning"):
        return f"WARNING {result['warning']}: {result.get('reason', '')}".rstrip(": ")
    if result.get("ratio") is None:
        return f"nearness: no ratio ({result.get('reason') or 'not computed'})"
    return (
        f"nearness: the nearest adapter is {result['ratio']:.3g}x the library's usual spacing away "
        f"(far-ratio {result['threshold']:g}): no warning"
    )
