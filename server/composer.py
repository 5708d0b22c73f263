"""Retrieve → weigh → compose: the one code path the CLI and the ServerApp use to build a target's
adapter from the registry, so every composition is computed and audited the same way.

For a target embedding ``z_target`` the registry returns the exact k nearest adapters (squared
L2, optionally restricted to a task and excluding the target's own site; one adapter per site
unless asked otherwise), a weighting strategy from ``server.strategies`` turns their embeddings
into weights, and ``common.adapters.lora.compose`` builds ``Σ w_i s_i B_i A_i`` (exact rank concatenation, or the best rank-``max_rank``
approximation). Adapters whose weight is exactly zero (``nearest``, sparse ``lin-l1``) are left
out of the sum: they change nothing but would add rank.

Audit: a ``query.embedding`` entry for the retrieval (target, z hash, k, filters) and a
``composition`` entry with the retrieved ids, their distances, weights and blob hashes, the
strategy and its parameters and the sha256 of the composed adapter's canonical bytes, so an
auditor can re-run the composition from the registry and compare hashes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.adapters.normalise import DEFAULT_UPDATE_NORM, UpdateNormError, check_update_norm, norm_scaling
from common.protocol.wire import encode_adapter
from server.bounds import NormBoundError, adapter_norms
from server.nearness import DEFAULT_FAR_RATIO, FarRatioError, check_far_ratio
from server.nearness import check as nearness_check
from server.outdir import check_replaceable, output_dir
from server.registry import Hit, QueryError, Registry
from server.strategies import MAX_L1_DEFAULT, compute_weights


class CompositionError(QueryError):
    """The composition cannot be built as asked (e.g. several bases and none chosen)."""


@dataclass
class CompositionResult:
    """What was composed and from what (``weights[i]`` belongs to ``ids[i]``, nearest first)."""

    ids: list[str]
    distances: list[float]
    weights: list[float]
    adapter: Any  # common.adapters.lora.LoraAdapter
    output_sha256: str
    out_dir: Path | None = None
    strategy: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    adapter_sha256: list[str] = field(default_factory=list)
    sites: list[str] = field(default_factory=list)
    hits: list[Hit] = field(default_factory=list)
    z_sha256: str = ""
    base_fingerprint: str = ""
    #: the "nothing close enough" check (``server/nearness.py``): ratio, threshold, warning
    nearness: dict[str, Any] = field(default_factory=dict)
    #: the update-norm normalisation (``common/adapters/normalise.py``): mode, and for frobenius the
    #: reference norm, each retrieved adapter's norm and scale c_i (the composition is Σ w_i c_i δ_i)
    normalisation: dict[str, Any] = field(default_factory=lambda: {"mode": DEFAULT_UPDATE_NORM})


def _pick_base(registry: Registry, base: str | None, task: str | None) -> str | None:
    """Adapters of different base models must never be mixed: choose the base to retrieve from."""
    if base is not None:
        if base not in registry.bases:
            raise CompositionError(
                f"base {base} is not known to registry {registry.path} (known: "
                f"{', '.join(sorted(registry.bases))}); pass one of them or omit base"
            )
        return base
    in_use = sorted(registry.distinct("base", task=task))
    if len(in_use) > 1:
        raise CompositionError(
            f"the registry holds adapters for {len(in_use)} base models ({', '.join(in_use)}); pass base=... "
            "to choose the one the target runs"
        )
    return None


#: the most adapters one composition may combine (issue 26 class 9: ``--k 5000`` on 100,000 records
#: grew past 9.8 GB). Every retrieved adapter is loaded into memory and the composed adapter has rank
#: k·r, so memory grows with k; compositions here use k <= 16, and 256 leaves ample room.
MAX_COMPOSE_K = 256


def check_k(k: Any) -> None:
    """Refuse a k above :data:`MAX_COMPOSE_K` before any query, audit entry or load, naming the limit
    and why (a non-integer or k < 1 is left to ``Registry.query``, which names it)."""
    if isinstance(k, (int, np.integer)) and not isinstance(k, bool) and k > MAX_COMPOSE_K:
        raise CompositionError(
            f"k={int(k)} is above the composition limit {MAX_COMPOSE_K}: a composition loads every retrieved "
            f"adapter into memory and the composed adapter has rank k × r (k={int(k)} at rank 8 is rank "
            f"{int(k) * 8}), which would exhaust the coordinator's memory; choose k <= {MAX_COMPOSE_K} "
            "(compositions here use 2-16)"
        )


class CompositionNormError(CompositionError):
    """The composed adapter is far larger than the registry's own adapters: refused before delivery."""


def _check_composed(
    registry: Registry, composed: Any, base: str, task: str | None, strategy: str, target: str
) -> dict[str, float]:
    """Check the composed update against the same bound as a single adapter (``server.bounds``);
    returns its norms. A composition can exceed it only through weights that cancel (``lin``) or
    a stored adapter that slipped in before the bound existed: either way it is not delivered."""
    norms = adapter_norms(composed)
    bound = registry.norm_bound(base, task)
    if bound is not None:
        try:
            bound.check(norms, f"the {strategy!r} composition for target {target!r}")
        except NormBoundError as exc:
            raise CompositionNormError(f"{exc} (nothing was delivered; try strategy sim, or a lower max-l1)") from None
    return norms


def compose_for_target(
    registry: Registry,
    z_target: Any,
    *,
    strategy: str = "sim",
    k: int = 4,
    exclude_site: str | None = None,
    task: str | None = None,
    max_rank: int | None = None,
    strategy_params: Mapping[str, Any] | None = None,
    out_dir: str | Path | None = None,
    target: str = "?",
    base: str | None = None,
    modality: str | None = None,
    lam1: float | None = None,
    lam2: float | None = None,
    base_model_name_or_path: str | None = None,
    audit_query: bool = True,
    wire_form: bool = False,
    force: bool = False,
    one_per_site: bool = True,
    far_ratio: float = DEFAULT_FAR_RATIO,
    update_norm: str = DEFAULT_UPDATE_NORM,
) -> CompositionResult:
    """Compose the adapter for one target embedding; optionally write it as a PEFT directory.

    ``strategy`` is a name from ``server.strategies.STRATEGIES`` (``sim``, ``lin``, ``lin-l1``,
    ``avg``, ``nearest``); its parameters come from ``strategy_params`` (e.g. ``{"max_l1": 3}``,
    the ‖w‖₁ bound of ``lin`` / ``lin-l1``, default ``MAX_L1_DEFAULT``) or the ``lam1``/``lam2``
    shortcuts. The composed adapter is checked against the registry's update-norm bound for the
    base and task before it is written or returned (``CompositionNormError`` names the strategy,
    target and bound); the composition audit entry records ``max_l1``, ‖w‖₁ and the update norm.
    ``exclude_site`` keeps a site's own adapter out (leave-one-site-out). ``one_per_site`` (default):
    the k nearest *sites*, each by its nearest adapter, so a site that kept several adapters
    (``keep-previous``) never fills two places; ``False`` retrieves adapters, whoever holds them.
    ``far_ratio``: the "nothing close enough" threshold (``server/nearness.py``; 0 = off); the
    check is in ``result.nearness`` and in the ``composition`` audit entry.
    ``update_norm``: ``none`` (default) or ``frobenius`` (``common/adapters/normalise.py``: every
    retrieved adapter's update rescaled to the median norm of the k retrieved before weighting, so the
    composition is ``Σ w_i c_i δ_i``); recorded as ``normalisation`` in the result and the audit entry,
    ``weights`` stay the strategy's ``w_i``.
    ``out_dir`` receives ``adapter_config.json`` + ``adapter_model.safetensors`` whose
    ``base_model_name_or_path`` is ``base_model_name_or_path``, else the base's registered name;
    it is written whole into a temporary directory and swapped into place, and a non-empty
    ``out_dir`` that is not an earlier composition is refused (``OutputDirError``) unless ``force``.
    ``audit_query=False`` skips the ``query.embedding`` entry when the caller already logged the
    embedding it received. ``wire_form=True`` (the ServerApp) puts the result in its wire form
    (``common.protocol.wire.encode_adapter``: float32, the retrieved adapters' base) *before* it is hashed,
    so the hash in the ``composition`` entry is the one the site receives and logs.
    Raises ``NotEnoughRecordsError`` when fewer than k adapters match.
    """
    from common.adapters import adapter_to_bytes, compose, save_peft_adapter  # lazy: torch

    check_k(k)
    try:
        norm_mode = check_update_norm(update_norm)
        far_ratio = check_far_ratio(far_ratio)  # before any work: inf/NaN cannot be audited afterwards
    except (UpdateNormError, FarRatioError) as exc:
        raise CompositionError(str(exc)) from None
    if out_dir is not None:
        check_replaceable(Path(out_dir).absolute(), "composition", force)  # refuse before any work or audit
    params: dict[str, Any] = dict(strategy_params or {})
    for name, value in (("lam1", lam1), ("lam2", lam2)):
        if value is not None:
            params[name] = value
    chosen_base = _pick_base(registry, base, task)
    z = registry.check_z(z_target, f"the target {target!r}")
    z_sha = hashlib.sha256(z.astype("<f4").tobytes()).hexdigest()
    hits = registry.query(
        z, k, task=task, modality=modality, base=chosen_base, exclude_site=exclude_site, one_per_site=one_per_site
    )
    if audit_query:
        registry.audit.append(
            "query.embedding",
            site=target,
            target=target,
            z_sha256=z_sha,
            k=int(k),
            task=task,
            modality=modality,
            base=chosen_base,
            exclude_site=exclude_site,
            one_per_site=one_per_site,
            retrieved=[h.record.id for h in hits],
        )
    Z = np.stack([h.record.z for h in hits])
    weights = np.asarray(compute_weights(strategy, z, Z, **params), dtype=np.float64)
    if weights.shape != (len(hits),) or not np.all(np.isfinite(weights)):
        raise CompositionError(f"strategy {strategy!r} returned weights {weights!r} for {len(hits)} adapters")
    if norm_mode == "none":  # today's composition: only the adapters with a weight are loaded
        scaling = norm_scaling([None] * len(hits), norm_mode)
        loaded: dict[int, Any] = {}
    else:  # the scales need every retrieved adapter's norm, those weighted 0 included
        loaded = {i: registry.load_adapter(h.record.id) for i, h in enumerate(hits)}
        scaling = norm_scaling([loaded[i] for i in range(len(hits))], norm_mode)
    coefs = scaling.apply([float(w) for w in weights])
    used = [i for i, c in enumerate(coefs) if c != 0.0]
    adapters = [loaded[i] if i in loaded else registry.load_adapter(hits[i].record.id) for i in used]
    composed = compose(adapters, [coefs[i] for i in used], max_rank=max_rank)
    base_fp = hits[0].record.meta.base_fingerprint
    composed_norms = _check_composed(registry, composed, base_fp, task, strategy, target)
    if wire_form:
        encoded = encode_adapter(composed, base_model=base_fp)
        composed, output_sha = encoded.adapter, encoded.sha256
    else:
        output_sha = hashlib.sha256(adapter_to_bytes(composed)).hexdigest()
    written: Path | None = None
    if out_dir is not None:  # whole or not at all: a temp dir swapped in; never over a foreign directory
        name = base_model_name_or_path or registry.bases.get(base_fp, {}).get("name") or composed.base_model
        with output_dir(out_dir, "composition", force=force) as tmp:
            save_peft_adapter(composed, tmp, name)
        written = Path(out_dir).absolute()
    result = CompositionResult(
        ids=[h.record.id for h in hits],
        distances=[float(h.distance) for h in hits],
        weights=[float(w) for w in weights],
        adapter=composed,
        output_sha256=output_sha,
        out_dir=written,
        strategy=strategy,
        params=params,
        adapter_sha256=[h.record.blob_sha256 for h in hits],
        sites=[h.record.meta.site for h in hits],
        hits=hits,
        z_sha256=z_sha,
        base_fingerprint=base_fp,
        nearness=nearness_check(
            registry,
            [float(h.distance) for h in hits],
            far_ratio,
            task=task,
            base=chosen_base,
            exclude_site=exclude_site,
        ),
        normalisation=scaling.record(),
    )
    registry.audit.append(
        "composition",
        target=target,
        site=target,
        strategy=strategy,
        params=params,
        retrieved=result.ids,
        distances=result.distances,
        weights=result.weights,
        adapter_sha256=result.adapter_sha256,
        output_sha256=output_sha,
        z_sha256=z_sha,
        k=int(k),
        max_rank=max_rank,
        task=task,
        exclude_site=exclude_site,
        one_per_site=one_per_site,
        base_fingerprint=base_fp,
        out_dir=str(written) if written else None,
        max_l1=params.get("max_l1", MAX_L1_DEFAULT) if strategy in ("lin", "lin-l1") else None,
        weights_l1=float(np.abs(weights).sum()),
        update_norm=composed_norms.get("__total__"),
        nearness=result.nearness,
        normalisation=result.normalisation,
    )
    return result
