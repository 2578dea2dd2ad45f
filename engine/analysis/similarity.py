"""Similarity of adapters: the per-module Gram matrix of their updates and the cosine matrix.

The N×N Gram matrix of one module is the block sums of ``(BᵀB) ∘ (AAᵀ)`` (R×R,
R = Σr) with ``B = [s_1B_1 … s_NB_N]`` and ``A = [A_1; …; A_N]``; no ``out × in``
update is formed. The small helpers here are shared by the other analysis modules.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..io.compat import check_compatible
from ..progress import CancelLike, ProgressFn
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
    adapters: Sequence[LoRAWeights | str | Path],
    *,
    progress: ProgressFn | None = None,
    cancel: CancelLike | None = None,
    executor: Any = None,
    scheduler: str | None = None,
    memory_budget_mb: float | None = None,
) -> Tensor:
    """The seed's call: the N×N cosine similarity of the adapters (a float32 tensor).

    The cosine is of the updates ΔW (all modules as one vector), not of the
    flattened factors as in the seed (docs/MIGRATING.md); :func:`similarity_report`
    returns the same matrix with names, norms and per-module matrices, and
    describes ``executor``/``scheduler``/``memory_budget_mb`` and adapters given as paths.

    Raises:
        ValueError: fewer than 2 adapters.
        IncompatibleAdaptersError: different base models, modules or shapes.
    """
    adapters = list(adapters)
    if len(adapters) < 2:
        raise ValueError(f"Need at least 2 adapters for similarity, got {len(adapters)}")
    return similarity_report(adapters, progress=progress, cancel=cancel, executor=executor, scheduler=scheduler,
                             per_module=False, memory_budget_mb=memory_budget_mb).matrix.to(torch.float32)


def similarity_report(
    adapters: Sequence[LoRAWeights | str | Path],
    *,
    progress: ProgressFn | None = None,
    cancel: CancelLike | None = None,
    executor: Any = None,
    scheduler: str | None = None,
    names: Sequence[str] | None = None,
    modules: Sequence[str] | None = None,
    per_module: bool = True,
    memory_budget_mb: float | None = None,
) -> SimilarityResult:
    """Cosine similarity of the adapters' updates ΔW, per module and overall.

    The overall similarity treats all modules of an adapter as one vector
    (``Σ_m ⟨ΔW_i^m, ΔW_j^m⟩`` over the product of norms). An all-zero update has
    similarity 0 with everything (and 0 on the diagonal).

    The Gram matrix is a map-reduce over blocks of adapters (:mod:`.gram`) run by
    ``executor`` (``"inprocess"``/``None``, ``"dask"`` with an optional ``scheduler``
    address, or an :class:`~engine.executors.Executor`).

    Args:
        adapters: ``LoRAWeights``, or adapter paths (folders or ``.safetensors``
            files), read block by block and one chunk of modules at a time
            (on Dask, by the workers); the driver never holds them all.
        names: Names of the adapters (default: their names, or folder names of paths).
        modules: Compare only these modules (default: all; adapters must then have the same ones).
        per_module: Also the per-module matrices and norms (``per_module``/``module_norms``).
        memory_budget_mb: Bound on the adapter factors one map reads at once (default 1024).

    Raises:
        IncompatibleAdaptersError: different base models, modules or shapes.
        AdapterFormatError: an unreadable adapter file (named).
        ValueError: no adapters.
    """
    from ..executors import make_executor
    from ..subspace.common import AdapterSource
    from .gram import adapter_names, gram_map_reduce

    adapters = list(adapters)
    if not adapters:
        raise ValueError("no adapters given")
    as_paths = [isinstance(a, (str, Path)) for a in adapters]
    if any(as_paths) and not all(as_paths):
        raise ValueError("adapters: give LoRAWeights or paths, not both")
    paths = [Path(a) for a in adapters] if all(as_paths) else None
    if names is None:
        names = adapter_names(paths) if paths is not None else [_label(a, i) for i, a in enumerate(adapters)]
    names = list(names)
    if len(names) != len(adapters):
        raise ValueError(f"names: got {len(names)} for {len(adapters)} adapter(s)")
    if modules is not None:
        mods = list(modules)
        if paths is None:
            from ..subspace.common import restrict_modules

            adapters = [restrict_modules(a, mods) for a in adapters]
    report = check_compatible(adapters if paths is None or modules is None else
                              [_restricted_summary(p, mods) for p in paths])
    module_bytes = {m: 8 * max(report.ranks[m], default=0) * sum(report.shapes[m]) for m in report.modules}
    source = AdapterSource(names, None if paths is not None else adapters, paths)
    ex, owned = make_executor(executor, scheduler)
    try:
        total, per = gram_map_reduce(source, report.modules, module_bytes, per_module=per_module, executor=ex,
                                     memory_budget_mb=memory_budget_mb, progress=progress, cancel=cancel)
    finally:
        if owned:
            ex.close()
    return SimilarityResult(
        names=names,
        matrix=_cosine_from_gram(total),
        per_module={m: _cosine_from_gram(g) for m, g in per.items()},
        norms=[float(v) for v in total.diagonal().clamp(min=0).sqrt()],
        module_norms={m: [float(v) for v in g.diagonal().clamp(min=0).sqrt()] for m, g in per.items()},
    )


def _restricted_summary(path: Path, modules: Sequence[str]) -> Any:
    """The header summary of the adapter at ``path`` with only ``modules`` (for the compatibility check)."""
    from dataclasses import replace

    from ..io.header import read_adapter_summary

    s = read_adapter_summary(path)
    return replace(s, modules=[m for m in s.modules if m.name in set(modules)])


def _as_matrix(sim: SimilarityResult | Tensor | Any) -> tuple[Tensor, list[str]]:
    if isinstance(sim, SimilarityResult):
        return sim.matrix.to(_DTYPE), list(sim.names)
    t = torch.as_tensor(sim, dtype=_DTYPE) if not isinstance(sim, Tensor) else sim.to(_DTYPE)
    if t.ndim != 2 or t.shape[0] != t.shape[1]:
        raise ValueError(f"sim: expected a square similarity matrix, got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError("sim: the similarity matrix holds NaN or Inf")
    return t, [f"adapter #{i}" for i in range(t.shape[0])]
