"""Exact composition of LoRA adapters and its best rank-r truncation (``θ = θ0 + Σ w_i s_i B_i A_i``).

Split from ``common/lora.py``: this file changes when the maths does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from common.lora import (
    _FLOAT64_LIMIT,
    _PRECISION,
    LoraAdapter,
    LoraFormatError,
    LoraModule,
)

# --------------------------------------------------------------------------------------------
# Composition
# --------------------------------------------------------------------------------------------

def _work_dtype(parts: Sequence[tuple[LoraModule, float]], factor: str, dtype: torch.dtype) -> torch.dtype:
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


def _scaled_rows(parts: Sequence[tuple[LoraModule, float]], dtype: torch.dtype) -> torch.Tensor:
    """``[c_1 A_1; c_2 A_2; ...]`` (``Σr x in``) in ``dtype``: the coefficients go on A, as PEFT's
    ``add_weighted_adapter(cat)`` puts them.

    Each ``c_i A_i`` is a contiguous block of rows, so the scaling runs on contiguous memory; on
    B's interleaved ``r``-wide column blocks the same multiplication took 3-4x as long (issue 14).
    The product is formed in the more precise of input and output dtype and rounded once.
    """
    work = _work_dtype(parts, "A", dtype)
    if len(parts) == 1:
        src = parts[0][0].A
        return torch.mul(src if src.dtype == work else src.to(work), parts[0][1]).to(dtype)
    out = torch.empty((sum(m.rank for m, _ in parts), parts[0][0].A.shape[1]), dtype=work)
    row = 0
    for m, c in parts:
        block = out[row:row + m.rank]
        if m.A.dtype == work:
            torch.mul(m.A, c, out=block)  # one pass: read A_i, write c_i A_i in place
        else:  # widen first, so the product is formed in ``work`` and rounded once
            block.copy_(m.A).mul_(c)
        row += m.rank
    return out.to(dtype)


def _joined_columns(parts: Sequence[tuple[LoraModule, float]], dtype: torch.dtype) -> torch.Tensor:
    """``[B_1, B_2, ...]`` (``out x Σr``) in ``dtype``: a copy (and cast), no arithmetic."""
    return torch.cat([m.B for m, _ in parts], dim=1).to(dtype)


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
    ok = False
    if isinstance(max_rank, (bool, np.bool_)):
        pass
    elif isinstance(max_rank, (int, np.integer)):
        ok = max_rank >= 1
    elif isinstance(max_rank, (float, np.floating)):
        ok = math.isfinite(max_rank) and float(max_rank).is_integer() and max_rank >= 1
    if not ok:
        raise LoraFormatError(f"max_rank must be a positive integer or None, got {max_rank!r}")
    return int(max_rank)


def compose(adapters: Sequence[LoraAdapter], weights: Sequence[float] | np.ndarray | torch.Tensor,
            max_rank: int | None = None, dtype: torch.dtype | None = None) -> LoraAdapter:
    """The weighted sum ``Σ w_i s_i B_i A_i`` of LoRA adapters, per module, as one LoRA (scale 1).

    Exact by default: a module's ``A`` is the ``w_i s_i A_i`` of every adapter that has it stacked
    row-wise and its ``B`` the ``B_i`` side by side (rank ``Σ r_i``; the coefficients sit on A, as
    in PEFT's ``add_weighted_adapter(cat)``). Adapters may differ
    in rank, scale and target modules; weights may be negative. With ``max_rank=r`` a module
    whose total rank exceeds r is replaced by its best rank-r approximation (Eckart–Young, split
    ``B' = Q_B U_r √S_r``, ``A' = √S_r V_r^T Q_A^T``) computed in float32 (float64 when small)
    without forming the dense update. ``dtype`` is the output dtype (default: the inputs'
    common dtype). ``base_model`` is kept when all adapters that name one agree, else None.
    """
    adapters = list(adapters)
    if isinstance(weights, torch.Tensor):
        weights = weights.detach().cpu().tolist()
    w = [float(x) for x in np.asarray(weights, dtype=np.float64).reshape(-1)]
    if not adapters:
        raise LoraFormatError("compose needs at least one adapter")
    if len(w) != len(adapters):
        raise LoraFormatError(
            f"compose got {len(adapters)} adapters but {len(w)} weights; pass one weight per adapter"
        )
    bad = [i for i, x in enumerate(w) if not math.isfinite(x)]
    if bad:
        raise LoraFormatError(
            f"compose weights must be finite; weight(s) at index {bad} are {[w[i] for i in bad]}"
        )
    if max_rank is not None:
        max_rank = _check_max_rank(max_rank)

    if dtype is None:
        dtype = adapters[0].dtype
        for a in adapters[1:]:
            dtype = torch.promote_types(dtype, a.dtype)
    names = list(dict.fromkeys(n for a in adapters for n in a.modules))
    bases = {a.base_model for a in adapters if a.base_model}
    modules: dict[str, LoraModule] = {}
    for name in names:
        parts = [
            (a.modules[name], wi * a.modules[name].scale)
            for a, wi in zip(adapters, w, strict=True)
            if name in a.modules
        ]
        shapes = {m.shape for m, _ in parts}
        if len(shapes) > 1:
            detail = ", ".join(f"adapter {i}: {a.modules[name].shape}" for i, a in enumerate(adapters)
                               if name in a.modules)
            raise LoraFormatError(f"module {name} has different (out, in) shapes across adapters ({detail}); "
                                  "the adapters were trained on different base models")
        out, inp = shapes.pop()
        total = sum(m.rank for m, _ in parts)
        if max_rank is None or total <= max_rank:
            modules[name] = LoraModule(_scaled_rows(parts, dtype), _joined_columns(parts, dtype), 1.0)
            continue
        cd = _compute_dtype(out, inp, total, dtype)
        B_new, A_new = _truncate(_joined_columns(parts, cd), _scaled_rows(parts, cd), int(max_rank))
        modules[name] = LoraModule(A_new.to(dtype).contiguous(), B_new.to(dtype), 1.0)
    return LoraAdapter(modules, bases.pop() if len(bases) == 1 else None)


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
