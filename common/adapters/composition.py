"""Exact composition of LoRA adapters and its best rank-r truncation (``θ = θ0 + Σ w_i s_i B_i A_i``).

Split from ``common/adapters/lora.py``: this file changes when the maths does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from common.adapters.lora import (
    _FLOAT64_LIMIT,
    _PRECISION,
    LoraAdapter,
    LoraFormatError,
    LoraModule,
    factors_dtype,
)
from common.files.buffers import empty_bytes

# --------------------------------------------------------------------------------------------
# Composition
# --------------------------------------------------------------------------------------------


def work_dtype(parts: Sequence[tuple[LoraModule, float]], factor: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype to stack in: the output's, an input's when that one is more precise, fp32 for fp16 with bf16
    (so the product is rounded once, as before the coefficients moved to A)."""
    work = dtype
    for m, _ in parts:
        src = getattr(m, factor).dtype
        if _PRECISION[src] > _PRECISION[work]:
            work = src
        elif src != work and _PRECISION[src] == _PRECISION[work]:  # fp16 <-> bf16: meet in fp32
            work = torch.promote_types(src, work)
    return work


def scale_rows_into(block: torch.Tensor, src: torch.Tensor, c: float, work: torch.dtype) -> None:
    """``block = c · src`` with the product formed in ``work`` (the more precise of input and
    output dtype) and rounded once into ``block``'s dtype; ``src`` may be ``block`` itself."""
    if src.dtype == work == block.dtype:
        torch.mul(src, c, out=block)  # one pass: read, write the product in place
    elif work == block.dtype:  # widen into the output, then scale there
        block.copy_(src).mul_(c)
    else:  # a more precise input: the product in ``work``, rounded once into the output
        block.copy_(torch.mul(src if src.dtype == work else src.to(work), c))


def join_columns_into(out: torch.Tensor, blocks: Sequence[torch.Tensor]) -> torch.Tensor:
    """``out = [b_1, b_2, ...]`` side by side (a copy, and a cast where dtypes differ)."""
    if all(b.dtype == out.dtype for b in blocks):
        return torch.cat(list(blocks), dim=1, out=out)
    col = 0
    for b in blocks:
        out[:, col : col + b.shape[1]].copy_(b)
        col += b.shape[1]
    return out


def _scaled_rows(
    parts: Sequence[tuple[LoraModule, float]], dtype: torch.dtype, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``[c_1 A_1; c_2 A_2; ...]`` (``Σr x in``) in ``dtype``, into ``out`` when given: the
    coefficients go on A, as PEFT's ``add_weighted_adapter(cat)`` puts them.

    Each ``c_i A_i`` is a contiguous block of rows, so the scaling runs on contiguous memory; on
    B's interleaved ``r``-wide column blocks the same multiplication took 3-4x as long (issue 14).
    """
    work = work_dtype(parts, "A", dtype)
    if out is None:
        out = torch.empty((sum(m.rank for m, _ in parts), parts[0][0].A.shape[1]), dtype=dtype)
    row = 0
    for m, c in parts:
        scale_rows_into(out[row : row + m.rank], m.A, c, work)
        row += m.rank
    return out


def _joined_columns(
    parts: Sequence[tuple[LoraModule, float]], dtype: torch.dtype, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``[B_1, B_2, ...]`` (``out x Σr``) in ``dtype``, into ``out`` when given: a copy (and
    cast), no arithmetic."""
    if out is None:
        return torch.cat([m.B for m, _ in parts], dim=1).to(dtype)
    return join_columns_into(out, [m.B for m, _ in parts])


def _exact_factors(
    plan: Sequence[tuple[str, Sequence[tuple[LoraModule, float]], int, int, int]], dtype: torch.dtype
) -> dict[str, LoraModule]:
    """The exact (rank-concatenated) modules of ``plan`` (``(name, parts, out, in, total rank)``),
    every factor a view into one buffer (``common.files.buffers.empty_bytes``): the output is fresh
    memory on every composition, and one huge-page-backed block is far cheaper to fault in than
    many ordinary ones (issue 14, goal 5)."""
    size = dtype.itemsize
    spans = []
    nbytes = 0
    for _, _, out, inp, total in plan:
        for count in (total * inp, out * total):  # A, then B
            spans.append((nbytes, count))
            nbytes += count * size + (-(count * size) % 64)
    arena = empty_bytes(nbytes)
    modules: dict[str, LoraModule] = {}
    for i, (name, parts, out, inp, total) in enumerate(plan):
        (a_off, a_n), (b_off, b_n) = spans[2 * i], spans[2 * i + 1]
        A = arena[a_off : a_off + a_n * size].view(dtype).view(total, inp)
        B = arena[b_off : b_off + b_n * size].view(dtype).view(out, total)
        modules[name] = LoraModule(_scaled_rows(parts, dtype, A), _joined_columns(parts, dtype, B), 1.0)
    return modules


def _compute_dtype(out: int, inp: int, rank: int, dtype: torch.dtype) -> torch.dtype:
    if dtype == torch.float64 or (out + inp) * rank <= _FLOAT64_LIMIT:
        return torch.float64
    return torch.float32


def _householder(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Householder QR of a tall ``M`` (``n x R``): (reflectors, tau, R factor ``min(n, R) x R``).

    Q is never formed: :func:`torch.ormqr` applies it to the few columns we keep, which costs
    far less than building the explicit ``n x R`` Q (about half the time of ``linalg.qr``).
    """
    a, tau = torch.geqrf(M)
    k = min(M.shape)
    return a[:, :k], tau, a[:k].triu()


def _truncate(B: torch.Tensor, A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors ``(B', A')`` of ``B @ A`` with balanced ``√S`` on each side.

    ``B = Q_B R_B`` and ``A^T = Q_A R_A`` give ``B A = Q_B (R_B R_A^T) Q_A^T``; with the small SVD
    ``R_B R_A^T = U S V^T``: ``B' = Q_B U_r √S_r`` and ``A' = √S_r V_r^T Q_A^T``.
    """
    try:
        a_B, tau_B, R_B = _householder(B)
        a_A, tau_A, R_A = _householder(A.mT)
    except NotImplementedError:  # a backend without geqrf/ormqr: explicit Q
        Q_B, R_B = torch.linalg.qr(B)
        Q_A, R_A = torch.linalg.qr(A.mT)
        U, S, Vh = torch.linalg.svd(R_B @ R_A.mT, full_matrices=False)
        r = min(rank, S.shape[0])
        root = S[:r].sqrt()
        return Q_B @ (U[:, :r] * root), (Vh[:r] * root[:, None]) @ Q_A.mT
    U, S, Vh = torch.linalg.svd(R_B @ R_A.mT, full_matrices=False)
    r = min(rank, S.shape[0])
    root = S[:r].sqrt()
    left = B.new_zeros((B.shape[0], r))
    left[: U.shape[0]] = U[:, :r] * root
    right = A.new_zeros((A.shape[1], r))
    right[: Vh.shape[1]] = Vh[:r].mT * root
    return torch.ormqr(a_B, tau_B, left), torch.ormqr(a_A, tau_A, right).mT


def _check_max_rank(max_rank: object) -> int:
    """``max_rank`` as an int >= 1: an int / np.integer (not bool) or a finite integral float.

    Checked before any ``int()`` call, so NaN, Inf, bools and strings raise LoraFormatError (not a
    bare ValueError / OverflowError / TypeError).
    """
    rank: int | None = None
    if isinstance(max_rank, (bool, np.bool_)):
        pass
    elif isinstance(max_rank, (int, np.integer)):
        rank = int(max_rank)
    elif isinstance(max_rank, (float, np.floating)) and math.isfinite(max_rank) and float(max_rank).is_integer():
        rank = int(max_rank)
    if rank is None or rank < 1:
        raise LoraFormatError(f"max_rank must be a positive integer or None, got {max_rank!r}")
    return rank


#: one retrieved adapter's module in a composition: (adapter index, module, coefficient w_i s_i)
Part = tuple[int, LoraModule, float]


@dataclass
class CompositionPlan:
    """What :func:`compose` computes, decided from the factors' shapes and dtypes alone (they may
    be header entries, as in ``common.adapters.stream_compose``): every output module in order with its
    parts, the output dtype and base."""

    modules: list[tuple[str, list[Part], int, int, int]]  # (name, parts, out, in, total rank)
    dtype: torch.dtype
    base_model: str | None


def check_weights(n_adapters: int, weights: Sequence[float] | np.ndarray | torch.Tensor) -> list[float]:
    """``weights`` as floats, one finite weight per adapter (``LoraFormatError`` otherwise)."""
    if isinstance(weights, torch.Tensor):
        weights = weights.detach().cpu().tolist()
    w = [float(x) for x in np.asarray(weights, dtype=np.float64).reshape(-1)]
    if not n_adapters:
        raise LoraFormatError("compose needs at least one adapter")
    if len(w) != n_adapters:
        raise LoraFormatError(f"compose got {n_adapters} adapters but {len(w)} weights; pass one weight per adapter")
    bad = [i for i, x in enumerate(w) if not math.isfinite(x)]
    if bad:
        raise LoraFormatError(f"compose weights must be finite; weight(s) at index {bad} are {[w[i] for i in bad]}")
    return w


def plan_composition(
    adapters: Sequence[LoraAdapter], w: Sequence[float], dtype: torch.dtype | None = None
) -> CompositionPlan:
    """The :class:`CompositionPlan` of ``Σ w_i s_i B_i A_i`` (``w`` from :func:`check_weights`):
    modules in first-seen order, each with the ``(i, module, w_i s_i)`` of every adapter that has
    it; different ``(out, in)`` shapes for one module raise ``LoraFormatError``."""
    if dtype is None:
        dtype = factors_dtype(adapters[0].modules.values())
        for a in adapters[1:]:
            dtype = torch.promote_types(dtype, factors_dtype(a.modules.values()))
    names = list(dict.fromkeys(n for a in adapters for n in a.modules))
    bases = {a.base_model for a in adapters if a.base_model}
    modules: list[tuple[str, list[Part], int, int, int]] = []
    for name in names:
        parts = [
            (i, a.modules[name], wi * a.modules[name].scale)
            for i, (a, wi) in enumerate(zip(adapters, w, strict=True))
            if name in a.modules
        ]
        shapes = {m.shape for _, m, _ in parts}
        if len(shapes) > 1:
            detail = ", ".join(f"adapter {i}: {m.shape}" for i, m, _ in parts)
            raise LoraFormatError(
                f"module {name} has different (out, in) shapes across adapters ({detail}); "
                "the adapters were trained on different base models"
            )
        out, inp = shapes.pop()
        modules.append((name, parts, out, inp, sum(m.rank for _, m, _ in parts)))
    return CompositionPlan(modules, dtype, bases.pop() if len(bases) == 1 else None)


def compose(
    adapters: Sequence[LoraAdapter],
    weights: Sequence[float] | np.ndarray | torch.Tensor,
    max_rank: int | None = None,
    dtype: torch.dtype | None = None,
) -> LoraAdapter:
    """The weighted sum ``Σ w_i s_i B_i A_i`` of LoRA adapters, per module, as one LoRA (scale 1).

    Exact by default: a module's ``A`` is the ``w_i s_i A_i`` of every adapter that has it stacked
    row-wise and its ``B`` the ``B_i`` side by side (rank ``Σ r_i``; the coefficients sit on A, as
    in PEFT's ``add_weighted_adapter(cat)``). Adapters may differ
    in rank, scale and target modules; weights may be negative. A module whose total rank would
    exceed ``min(out, in)`` gets exactly that rank (same ΔW; a LoRA may not be wider). With ``max_rank=r`` a module
    whose total rank exceeds r is replaced by its best rank-r approximation (Eckart–Young, split
    ``B' = Q_B U_r √S_r``, ``A' = √S_r V_r^T Q_A^T``) computed in float32 (float64 when small)
    without forming the dense update. ``dtype`` is the output dtype (default: the inputs'
    common dtype). ``base_model`` is kept when all adapters that name one agree, else None.
    ``common.adapters.stream_compose.compose_peft_dirs`` computes the same from PEFT directories to a PEFT
    directory, streaming. The exact factors are views into one buffer (fresh memory is the cost
    that matters here, and one huge-page block is the cheapest to fault in): ``.clone()`` them
    before handing them to something that refuses shared storage (``safetensors.torch.save_file``).
    """
    adapters = list(adapters)
    w = check_weights(len(adapters), weights)
    if max_rank is not None:
        max_rank = _check_max_rank(max_rank)
    plan = plan_composition(adapters, w, dtype)
    dtype = plan.dtype
    truncated: dict[str, LoraModule] = {}
    exact: list[tuple[str, list[tuple[LoraModule, float]], int, int, int]] = []
    for name, parts3, out, inp, total in plan.modules:
        parts = [(m, c) for _, m, c in parts3]
        # rank(ΔW) <= min(out, in): a concatenation wider than that is rewritten at that rank,
        # which is still exact (the "best approximation" of full rank is ΔW itself), so the result
        # is a valid LoRA (PEFT and the wire refuse r > min(out, in))
        limit = min(out, inp) if max_rank is None else min(int(max_rank), out, inp)
        if total <= limit:
            exact.append((name, parts, out, inp, total))
            continue
        cd = _compute_dtype(out, inp, total, dtype)
        B_new, A_new = _truncate(_joined_columns(parts, cd), _scaled_rows(parts, cd), limit)
        truncated[name] = LoraModule(A_new.to(dtype).contiguous(), B_new.to(dtype), 1.0)
    built = {**truncated, **(_exact_factors(exact, dtype) if exact else {})}
    return LoraAdapter({name: built[name] for name, *_ in plan.modules}, plan.base_model)


def singular_values(module: LoraModule) -> torch.Tensor:
    """Singular values (descending) of ``scale · B @ A``, without forming it (float64 when small)."""
    out, inp = module.shape
    cd = _compute_dtype(out, inp, module.rank, torch.float32)
    R_B = torch.linalg.qr(module.B.to(cd), mode="r").R
    R_A = torch.linalg.qr(module.A.to(cd).mT, mode="r").R
    return torch.linalg.svdvals(R_B @ R_A.mT) * abs(module.scale)


def truncation_error(adapter: LoraAdapter, max_rank: int) -> dict[str, float]:
    """Per module, the Frobenius error ``sqrt(Σ_{j>r} σ_j²)`` of the best rank-``max_rank`` approximation."""
    errors: dict[str, float] = {}
    for name, m in adapter.modules.items():
        s = singular_values(m)
        errors[name] = float(s[max_rank:].square().sum().sqrt()) if m.rank > max_rank else 0.0
    return errors
