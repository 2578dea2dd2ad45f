"""Merge methods for the registry: names, help and parameters, importable without torch.

Each registered function has the signature
``func(adapters, *, progress=None, cancel=None, **params) -> engine.merge.MergeResult``
and imports the tensor code only when called.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..registry import Param, register

# One help text for every method: the job layer shows the first method's text for all of them.
_WEIGHTS = Param(
    "weights",
    "floats",
    None,
    "one weight per adapter, negative subtracts; linear normalizes them to sum 1; the others use them as given; "
    "default 1/N each (the mean) for linear, task_arithmetic and dare, 1 each for cat and ties",
)
_RANK_EXACT = Param(
    "rank",
    "str",
    "exact",
    "output rank: 'exact' (sum of input ranks, no error) or an integer (truncated SVD, error reported)",
)
_RANK_DENSE = Param(
    "rank",
    "str",
    "auto",
    "output rank: an integer, or 'auto' (largest input rank); the SVD error is reported per module",
)


def _run(method: str, adapters: Sequence[Any], progress: Any, cancel: Any, params: dict[str, Any]) -> Any:
    from ..merge import merge_adapters

    return merge_adapters(adapters, method, progress=progress, cancel=cancel, **params)


@register(
    "merge",
    "linear",
    "Weighted mean of the updates ΔW (weights normalized to sum 1; default the plain mean).",
    (
        _WEIGHTS,
        _RANK_EXACT,
    ),
)
def linear(adapters: Sequence[Any], *, progress: Any = None, cancel: Any = None, **params: Any) -> Any:
    """Weighted mean of ΔW."""
    return _run("linear", adapters, progress, cancel, params)


@register(
    "merge",
    "task_arithmetic",
    "Task arithmetic: Σ w_i ΔW_i (default w_i = 1/N: the mean); exact by concatenation or truncated by SVD.",
    (_WEIGHTS, _RANK_EXACT),
)
def task_arithmetic(adapters: Sequence[Any], *, progress: Any = None, cancel: Any = None, **params: Any) -> Any:
    """Σ w_i ΔW_i."""
    return _run("task_arithmetic", adapters, progress, cancel, params)


@register(
    "merge",
    "cat",
    "Concatenate the LoRAs: exact Σ w_i ΔW_i at rank Σ r_i (PEFT's 'cat').",
    (_WEIGHTS,),
)
def cat(adapters: Sequence[Any], *, progress: Any = None, cancel: Any = None, **params: Any) -> Any:
    """Exact concatenation."""
    return _run("cat", adapters, progress, cancel, params)


@register(
    "merge",
    "ties",
    "TIES: keep each ΔW's largest entries, elect a sign per entry, average those that agree.",
    (
        Param("density", "float", 0.5, "fraction of each update's entries kept by magnitude", minimum=0.0, maximum=1.0,
              exclusive_minimum=True),
        _WEIGHTS,
        _RANK_DENSE,
    ),
)
def ties(adapters: Sequence[Any], *, progress: Any = None, cancel: Any = None, **params: Any) -> Any:
    """TIES merge."""
    return _run("ties", adapters, progress, cancel, params)


@register(
    "merge",
    "dare",
    "DARE: drop random entries of each ΔW, rescale the rest, then sum (or TIES-elect signs).",
    (
        Param("drop_rate", "float", 0.5, "probability of dropping each entry", minimum=0.0, maximum=0.99),
        _WEIGHTS,
        Param("seed", "int", None, "seed of the drop masks (default: drawn and reported)"),
        Param("elect_sign", "bool", False, "combine with TIES sign election (DARE-TIES)"),
        _RANK_DENSE,
    ),
)
def dare(adapters: Sequence[Any], *, progress: Any = None, cancel: Any = None, **params: Any) -> Any:
    """DARE merge."""
    return _run("dare", adapters, progress, cancel, params)
