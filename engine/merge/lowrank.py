"""Low-rank math of merging: the stacked factors of a weighted sum, and truncation to rank k.

A weighted sum of low-rank updates is truncated through two thin QRs and the SVD
of a ``Σr × Σr`` core (never ``out × in``); a dense merged module (TIES, DARE) by
a full or seeded randomized SVD.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .. import ops
from ..types import LoRAWeights

#: Below this ``min(out, in)`` a dense module is truncated with a full SVD; above
#: it with a seeded randomized SVD (the error reported is measured either way).
_FULL_SVD_MAX_DIM = 1024
_COMPUTE_DTYPE = torch.float32


# -- low-rank math ---------------------------------------------------------------


def _effective_factors(adapters: Sequence[LoRAWeights], weights: Sequence[float], module: str) -> tuple[Tensor, Tensor]:
    """Stacked ``(B_eff, A)`` with ``B_eff @ A = Σ w_i ΔW_i`` (scale folded into B)."""
    bs = [a.lora_b[module].to(_COMPUTE_DTYPE) * (w * a.scale(module)) for a, w in zip(adapters, weights)]
    as_ = [a.lora_a[module].to(_COMPUTE_DTYPE) for a in adapters]
    return torch.cat(bs, dim=1), torch.cat(as_, dim=0)


def _pad_rank(b: Tensor, a: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Zero-pad factors to exactly rank ``k`` (as PEFT does) so every module has the asked rank."""
    r = a.shape[0]
    if r >= k:
        return b, a
    b = torch.cat([b, b.new_zeros(b.shape[0], k - r)], dim=1)
    a = torch.cat([a, a.new_zeros(k - r, a.shape[1])], dim=0)
    return b, a


def truncate_factors(b: Tensor, a: Tensor, rank: int) -> tuple[Tensor, Tensor, float, float]:
    """Best rank-``rank`` approximation of ``b @ a`` without forming it.

    ``b = Q_b R_b`` and ``aᵀ = Q_a R_a`` (thin QR), so ``b @ a = Q_b (R_b R_aᵀ) Q_aᵀ``
    and the SVD of the small core gives the SVD of the product (Eckart–Young).

    Returns:
        ``(B_k, A_k, relative_error, norm)`` with ``B_k @ A_k`` the truncation,
        ``relative_error = ‖b a − B_k A_k‖_F / ‖b a‖_F`` from the discarded
        singular values, and ``norm = ‖b a‖_F``. Factors are zero-padded to
        ``rank`` when the product has lower rank.
    """
    if b.shape[1] <= rank:
        norm = ops.lowrank_norm(b, a)
        pb, pa = _pad_rank(b, a, rank)
        return pb, pa, 0.0, norm
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    k = min(rank, s.numel())
    s2 = s.double() ** 2
    total = float(s2.sum())
    tail = float(s2[k:].sum())
    b_k = qb @ (u[:, :k] * s[:k])
    a_k = vh[:k] @ qa.T
    b_k, a_k = _pad_rank(b_k, a_k, rank)
    err = math.sqrt(tail / total) if total > 0 else 0.0
    return b_k, a_k, err, math.sqrt(total)


def _dense_delta(adapter: LoRAWeights, module: str) -> Tensor:
    # Same op order as PEFT's get_delta_weight, so TIES' top-k picks the same entries.
    return (adapter.lora_b[module].to(_COMPUTE_DTYPE) @ adapter.lora_a[module].to(_COMPUTE_DTYPE)) * adapter.scale(module)


def svd_truncate_dense(delta: Tensor, rank: int, *, seed: int = 0, niter: int = 4) -> tuple[Tensor, Tensor, float, float]:
    """Rank-``rank`` factors of a dense update and the relative error they cost.

    A full SVD when ``min(out, in) <= 1024`` (optimal); above that a seeded
    randomized SVD (range finder with ``niter`` power iterations, oversampling
    ``max(10, rank)``), which is near-optimal for decaying spectra. The error
    returned is measured, ``‖ΔW − B A‖_F / ‖ΔW‖_F``, whichever path ran.

    Returns:
        ``(B, A, relative_error, norm)``, factors zero-padded to ``rank``.
    """
    out_f, in_f = delta.shape
    n = min(out_f, in_f)
    norm = float(torch.linalg.vector_norm(delta))
    if norm == 0.0:
        return delta.new_zeros(out_f, rank), delta.new_zeros(rank, in_f), 0.0, 0.0
    k = min(rank, n)
    if n <= _FULL_SVD_MAX_DIM or k + max(10, k) >= n:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        b = u[:, :k] * s[:k]
        a = vh[:k]
        s2 = s.double() ** 2
        err = math.sqrt(float(s2[k:].sum()) / float(s2.sum())) if float(s2.sum()) > 0 else 0.0
    else:
        q = min(n, k + max(10, k))
        g = torch.Generator().manual_seed(seed)
        omega = torch.randn(in_f, q, generator=g, dtype=delta.dtype)
        basis = torch.linalg.qr(delta @ omega).Q
        for _ in range(niter):
            z = torch.linalg.qr(delta.T @ basis).Q
            basis = torch.linalg.qr(delta @ z).Q
        uc, s, vh = torch.linalg.svd(basis.T @ delta, full_matrices=False)
        b = (basis @ uc[:, :k]) * s[:k]
        a = vh[:k]
        resid = delta - b @ a
        err = float(torch.linalg.vector_norm(resid)) / norm
        del resid
    b, a = _pad_rank(b, a, rank)
    return b, a, err, norm
