"""Quantisation methods for the registry, importable without torch.

Each registered function has the signature
``func(subspace, *, progress=None, cancel=None, **params) -> subspace`` (quantised in place).
"""

from __future__ import annotations

from typing import Any

from ..registry import Param, register

_COMMON = (
    Param("block_size", "int", 64, "elements per scale block", minimum=2, maximum=4096),
    Param("quantize_loadings", "bool", False, "also quantise the per-task coefficients"),
)


@register(
    "quantize",
    "symmetric",
    "Symmetric absmax int8 or int4 per block (4-bit packed two a byte on disk); error re-measured after rounding.",
    (Param("bits", "choice", 8, "bits per value", choices=(8, 4)),
     Param("double_quant", "bool", False, "quantise the block scales to int8 too"), *_COMMON),
)
def symmetric(subspace: Any, *, progress: Any = None, cancel: Any = None, **params: Any) -> Any:
    """Block int8/int4."""
    params = {k: v for k, v in params.items() if v is not None}
    return subspace.quantize(method="symmetric", progress=progress, cancel=cancel, **params)


@register(
    "quantize",
    "nf4",
    "NF4 (QLoRA's 16 levels) per block, packed two a byte; optional double quantisation of the block scales.",
    (Param("double_quant", "bool", True, "quantise the block scales to int8 per 256 (QLoRA)"), *_COMMON),
)
def nf4(subspace: Any, *, progress: Any = None, cancel: Any = None, **params: Any) -> Any:
    """NF4 with optional double quantisation."""
    params = {k: v for k, v in params.items() if v is not None}
    params.pop("bits", None)
    return subspace.quantize(bits=4, method="nf4", progress=progress, cancel=cancel, **params)
