"""Similarity of adapters: the per-module Gram matrix of their updates and the cosine matrix.

The N×N Gram matrix of one module is the block sums of ``(BᵀB) ∘ (AAᵀ)`` (R×R,
R = Σr) with ``B = [s_1B_1 … s_NB_N]`` and ``A = [A_1; …; A_N]``; no ``out × in``
update is formed. The small helpers here are shared by the other analysis modules.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..io.compat import check_compatible
from ..progress import CancelLike, ProgressFn, tick
from ..types import LoRAWeights

_DTYPE = torch.float64


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _matrix_list(t: Tensor) -> list[list[float]]:
    return [[float(v) for v in row] for row in t.tolist()]


def _label(a: LoRAWeights, i: int) -> str:
    return a.name or a.source or f"adapter #{i}"


def _cosine_from_gram(gram: Tensor) -> Tensor:
    norms = gram.diagonal().clamp(min=0).sqrt()
    denom = norms[:, None] * norms[None, :]
    cos = torch.where(denom > 0, gram / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(gram))
    cos = cos.clamp(-1.0, 1.0)
    idx = torch.arange(gram.shape[0])
    cos[idx, idx] = (norms > 0).to(cos.dtype)
    return cos


def module_gram(adapters: Sequence[LoRAWeights], module: str, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """N×N Gram matrix ``⟨ΔW_i, ΔW_j⟩_F`` of one module, through the Gram matrices of the stacked factors.

    Entry ``(i, j)`` is the sum of block ``(i, j)`` of ``(BᵀB) ∘ (AAᵀ)`` with the
    stacked factors ``B = [s_iB_i]``, ``A = [A_i]``. Only the upper block triangle
    is computed, in row chunks of about 512 factor columns (half the work of the
    full R×R products, and a bounded buffer). ``dtype`` is the dtype of the big
    products (float32 keeps 100 7B-shaped adapters fast); block sums are float64.
    """
    n = len(adapters)
    b = torch.cat([a.lora_b[module].to(dtype) * a.scale(module) for a in adapters], dim=1)
    a = torch.cat([ad.lora_a[module].to(dtype) for ad in adapters], dim=0)
    ranks = [ad.module_rank(module) for ad in adapters]
    offs = [0]
    for r in ranks:
        offs.append(offs[-1] + r)
    owner = torch.repeat_interleave(torch.arange(n), torch.tensor(ranks))
    gram = torch.zeros(n, n, dtype=_DTYPE)
    step = max(1, 512 // max(1, max(ranks)))
    for start in range(0, n, step):
        stop = min(n, start + step)
        i0, i1 = offs[start], offs[stop]
        h = ((b[:, i0:i1].T @ b[:, i0:]) * (a[i0:i1] @ a[i0:].T)).to(_DTYPE)
        # block sums: rows by owning adapter, then columns
        by_row = torch.zeros(stop - start, h.shape[1], dtype=_DTYPE).index_add_(0, owner[i0:i1] - start, h)
        gram[start:stop, start:] = torch.zeros(stop - start, n - start, dtype=_DTYPE).index_add_(1, owner[i0:] - start, by_row)
    upper = torch.triu(gram)
    return upper + torch.triu(gram, 1).T


# -- similarity -------------------------------------------------------------------


@dataclass
class SimilarityResult:
    """Cosine similarity of adapters' updates, overall and per module.

    Attributes:
        names: Adapter names, in input order.
        matrix: N×N cosine of the full updates (all modules as one vector).
        per_module: Module → N×N cosine of that module's ΔW.
        norms: ``‖ΔW‖_F`` of each adapter over all modules.
        module_norms: Module → ``‖ΔW‖_F`` per adapter.
    """

    names: list[str]
    matrix: Tensor
    per_module: dict[str, Tensor] = field(default_factory=dict)
    norms: list[float] = field(default_factory=list)
    module_norms: dict[str, list[float]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.names)

    def to_dict(self, *, modules: bool = True) -> dict[str, Any]:
        """JSON-ready: ``names``, ``matrix`` (list of rows), ``norms``, and per-module matrices when ``modules``."""
        out: dict[str, Any] = {"names": list(self.names), "matrix": _matrix_list(self.matrix), "norms": list(self.norms)}
        if modules:
            out["modules"] = {
                m: {"matrix": _matrix_list(t), "norms": list(self.module_norms.get(m, []))} for m, t in self.per_module.items()
            }
        return out


def compute_similarity_matrix(
    adapters: Sequence[LoRAWeights],
    *,
    progress: ProgressFn | None = None,
    cancel: CancelLike | None = None,
) -> Tensor:
    """The seed's call: the N×N cosine similarity of the adapters (a float32 tensor).

    The cosine is of the updates ΔW (all modules as one vector), not of the
    flattened factors as in the seed (docs/MIGRATING.md); :func:`similarity_report`
    returns the same matrix with names, norms and per-module matrices.

    Raises:
        ValueError: fewer than 2 adapters.
        IncompatibleAdaptersError: different base models, modules or shapes.
    """
    adapters = list(adapters)
    if len(adapters) < 2:
        raise ValueError(f"Need at least 2 adapters for similarity, got {len(adapters)}")
    return similarity_report(adapters, progress=progress, cancel=cancel).matrix.to(torch.float32)


def similarity_report(
    adapters: Sequence[LoRAWeights],
    *,
    progress: ProgressFn | None = None,
    cancel: CancelLike | None = None,
) -> SimilarityResult:
    """Cosine similarity of the adapters' updates ΔW, per module and overall.

    The overall similarity treats all modules of an adapter as one vector
    (``Σ_m ⟨ΔW_i^m, ΔW_j^m⟩`` over the product of norms). An all-zero update has
    similarity 0 with everything (and 0 on the diagonal).

    Raises:
        IncompatibleAdaptersError: different base models, modules or shapes.
        ValueError: no adapters.
    """
    adapters = list(adapters)
    report = check_compatible(adapters)
    n = len(adapters)
    total = torch.zeros(n, n, dtype=_DTYPE)
    per_module: dict[str, Tensor] = {}
    module_norms: dict[str, list[float]] = {}
    for i, m in enumerate(report.modules):
        tick(progress, cancel, i, len(report.modules), f"similarity: {m}")
        g = module_gram(adapters, m)
        total += g
        per_module[m] = _cosine_from_gram(g)
        module_norms[m] = [float(v) for v in g.diagonal().clamp(min=0).sqrt()]
    tick(progress, cancel, len(report.modules), len(report.modules), "similarity: done")
    return SimilarityResult(
        names=[_label(a, i) for i, a in enumerate(adapters)],
        matrix=_cosine_from_gram(total),
        per_module=per_module,
        norms=[float(v) for v in total.diagonal().clamp(min=0).sqrt()],
        module_norms=module_norms,
    )


def _as_matrix(sim: SimilarityResult | Tensor | Any) -> tuple[Tensor, list[str]]:
    if isinstance(sim, SimilarityResult):
        return sim.matrix.to(_DTYPE), list(sim.names)
    t = torch.as_tensor(sim, dtype=_DTYPE) if not isinstance(sim, Tensor) else sim.to(_DTYPE)
    if t.ndim != 2 or t.shape[0] != t.shape[1]:
        raise ValueError(f"sim: expected a square similarity matrix, got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError("sim: the similarity matrix holds NaN or Inf")
    return t, [f"adapter #{i}" for i in range(t.shape[0])]
