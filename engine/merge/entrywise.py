"""The entry-wise methods, TIES and DARE: one module's dense updates at a time (as PEFT's ``merge_utils``)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..types import LoRAWeights
from .lowrank import _dense_delta

# -- entry-wise methods (TIES, DARE) ---------------------------------------------


def _mix_seed(seed: int, module_index: int, adapter_index: int) -> int:
    # splitmix-style mixing: distinct, reproducible streams per (module, adapter)
    x = (seed * 0x9E3779B97F4A7C15 + module_index * 0xBF58476D1CE4E5B9 + adapter_index * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) & (2**64 - 1)
    x ^= x >> 32
    return x & (2**63 - 1)


def dare_mask(shape: Sequence[int], drop_rate: float, seed: int, module_index: int, adapter_index: int) -> Tensor:
    """DARE's keep-mask for one adapter in one module (``True`` = kept).

    Each entry is kept with probability ``1 − drop_rate``, from a generator seeded
    by ``(seed, module_index, adapter_index)``, so a merge is reproducible and a
    second pass over the same module regenerates the same mask.
    """
    g = torch.Generator().manual_seed(_mix_seed(int(seed), int(module_index), int(adapter_index)))
    return torch.rand(tuple(shape), generator=g) >= drop_rate


def magnitude_threshold(delta: Tensor, density: float) -> float:
    """The magnitude at or above which TIES keeps ``int(density · numel)`` entries.

    Returns ``inf`` when nothing is kept and ``0.0`` when everything is (PEFT's
    ``magnitude_based_pruning`` keeps the top ``int(density · numel)`` by |value|).
    """
    n = delta.numel()
    k = int(density * n)
    if k <= 0:
        return math.inf
    if k >= n:
        return 0.0
    return float(torch.kthvalue(delta.abs().reshape(-1), n - k + 1).values)


def _ties_trim(delta: Tensor, threshold: float) -> Tensor:
    if threshold == 0.0:
        return delta
    if math.isinf(threshold):
        return torch.zeros_like(delta)
    return torch.where(delta.abs() >= threshold, delta, torch.zeros((), dtype=delta.dtype))


def _elected_merge(contribs, n: int) -> Tensor:
    """Sign election and disjoint mean over weighted task tensors produced by ``contribs(i)``.

    Pass 1 sums the weighted tensors to elect a sign per entry (``+`` on ties, as
    PEFT); pass 2 averages the tensors that agree with it. Only a few dense
    buffers of one module live at a time; ``contribs`` recomputes on demand.
    """
    total: Tensor | None = None
    for i in range(n):
        t = contribs(i)
        total = t if total is None else total.add_(t)
    assert total is not None
    elected = total >= 0
    del total
    num: Tensor | None = None
    count: Tensor | None = None
    for i in range(n):
        t = contribs(i)
        agree = torch.where(elected, t > 0, t < 0)
        part = torch.where(agree, t, torch.zeros((), dtype=t.dtype))
        num = part if num is None else num.add_(part)
        count = agree.to(torch.int32) if count is None else count.add_(agree)
    assert num is not None and count is not None
    return num.div_(count.clamp_(min=1))


def _ties_module(adapters: Sequence[LoRAWeights], weights: Sequence[float], module: str, density: float) -> Tensor:
    thresholds: list[float | None] = [None] * len(adapters)

    def contrib(i: int) -> Tensor:
        d = _dense_delta(adapters[i], module)
        if thresholds[i] is None:  # first pass: found while electing, reused by the second
            thresholds[i] = magnitude_threshold(d, density)
        return _ties_trim(d, thresholds[i]).mul_(weights[i])

    return _elected_merge(contrib, len(adapters))


def _dare_module(
    adapters: Sequence[LoRAWeights],
    weights: Sequence[float],
    module: str,
    module_index: int,
    drop_rate: float,
    seed: int,
    elect_sign: bool,
) -> Tensor:
    keep = 1.0 - drop_rate

    def contrib(i: int) -> Tensor:
        d = _dense_delta(adapters[i], module)
        if drop_rate > 0.0:
            mask = dare_mask(d.shape, drop_rate, seed, module_index, i)
            d = torch.where(mask, d, torch.zeros((), dtype=d.dtype)).div_(keep)
        return d.mul_(weights[i])

    if elect_sign:
        return _elected_merge(contrib, len(adapters))
    out = contrib(0)
    for i in range(1, len(adapters)):
        out.add_(contrib(i))
    return out
