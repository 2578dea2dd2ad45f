"""The vlora-style merge functions, each returning the merged :class:`~engine.types.LoRAWeights`, and the seed's registry."""

from __future__ import annotations

from collections.abc import Sequence

from ..progress import CancelLike, ProgressFn
from ..types import LoRAWeights
from .driver import merge_adapters

# -- vlora-style functions ----------------------------------------------------------


def task_arithmetic(
    adapters: Sequence[LoRAWeights],
    weights: Sequence[float] | None = None,
    *,
    rank: int | str | None = "exact",
    name: str | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelLike | None = None,
) -> LoRAWeights:
    """``Σ w_i ΔW_i``, weights used as given; by default ``1/N`` each: the mean update (the seed's meaning).

    ``rank="exact"`` concatenates (PEFT's ``cat``); an int truncates by SVD (PEFT's
    ``svd``, same definition). See :func:`merge_adapters` for the errors. Unlike the
    seed, the updates ΔW are merged, not A and B separately (docs/MIGRATING.md).

    Raises:
        ValueError: no adapters (``"need at least one adapter"``) or a weight count
            that does not match (``"weights length"``).
    """
    return merge_adapters(
        adapters, "task_arithmetic", weights=weights, rank=rank, name=name, progress=progress, cancel=cancel
    ).weights


def linear_merge(
    adapters: Sequence[LoRAWeights],
    weights: Sequence[float] | None = None,
    *,
    rank: int | str | None = "exact",
    name: str | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelLike | None = None,
) -> LoRAWeights:
    """Weighted mean ``Σ w_i ΔW_i / Σ w_i`` of the updates (default: the plain mean).

    Unlike PEFT's ``combination_type="linear"``, which averages A and B
    separately (only right when all but one factor agree), this averages ΔW.
    """
    return merge_adapters(
        adapters, "linear", weights=weights, rank=rank, name=name, progress=progress, cancel=cancel
    ).weights


def cat_merge(
    adapters: Sequence[LoRAWeights],
    weights: Sequence[float] | None = None,
    *,
    name: str | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelLike | None = None,
) -> LoRAWeights:
    """Exact ``Σ w_i ΔW_i`` at rank ``Σ r_i``: PEFT's ``combination_type="cat"``."""
    return merge_adapters(adapters, "cat", weights=weights, name=name, progress=progress, cancel=cancel).weights


def ties_merge(
    adapters: Sequence[LoRAWeights],
    density: float = 0.5,
    weights: Sequence[float] | None = None,
    *,
    rank: int | str | None = None,
    name: str | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelLike | None = None,
) -> LoRAWeights:
    """TIES: trim each ΔW to its top ``density`` entries by magnitude, elect a sign, disjoint mean.

    Per entry: ``τ_i = w_i · trim(ΔW_i)``, the elected sign is that of ``Σ τ_i``
    (``+`` on a tie), and the result is the mean of the ``τ_i`` that carry it.
    Then truncated to ``rank`` (default: the largest input rank) by SVD.

    Where this differs from PEFT's ``ties_svd``: PEFT elects the sign from the
    *unweighted* trimmed tensors and applies the weights afterwards; we weight
    first (as the TIES paper and mergekit do), so a negative weight really
    flips a task. With equal positive weights the two agree exactly.
    """
    return merge_adapters(
        adapters, "ties", weights=weights, rank=rank, density=density, name=name, progress=progress, cancel=cancel
    ).weights


def dare_merge(
    adapters: Sequence[LoRAWeights],
    drop_rate: float = 0.5,
    weights: Sequence[float] | None = None,
    seed: int | None = None,
    *,
    rank: int | str | None = None,
    elect_sign: bool = False,
    name: str | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelLike | None = None,
) -> LoRAWeights:
    """DARE: drop each entry of each ΔW with probability ``drop_rate``, rescale, then sum.

    ``τ_i = w_i · mask_i ⊙ ΔW_i / (1 − drop_rate)`` with ``w_i = 1/N`` by default (the
    seed's weighted average); the result is ``Σ τ_i``
    (DARE-linear, PEFT's ``dare_linear_svd``) or, with ``elect_sign``, TIES' sign
    election and disjoint mean (DARE-TIES, PEFT's ``dare_ties_svd``; the same
    weighting caveat as :func:`ties_merge`). The expectation over masks equals
    task arithmetic. Masks come from per-(module, adapter) generators seeded by
    ``seed`` (:func:`dare_mask`), not from torch's global RNG as in PEFT.
    """
    return merge_adapters(
        adapters,
        "dare",
        weights=weights,
        rank=rank,
        drop_rate=drop_rate,
        seed=seed,
        elect_sign=elect_sign,
        name=name,
        progress=progress,
        cancel=cancel,
    ).weights


#: The seed's registry: name → merge function (``"average"`` is task arithmetic's weighted average).
MERGE_METHODS = {
    "average": task_arithmetic,
    "ties": ties_merge,
    "dare": dare_merge,
}
