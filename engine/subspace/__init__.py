"""The shared subspace: per-module shared bases plus per-task coefficients (``SharedSubspace``)."""

from __future__ import annotations

from .common import DEFAULT_METHOD, METHODS, ModuleBasis, TaskProjection
from .core import SharedSubspace
from .quant import QUANT_METHODS, QuantizedTensor, quantize_tensor

__all__ = [
    "DEFAULT_METHOD",
    "METHODS",
    "QUANT_METHODS",
    "ModuleBasis",
    "QuantizedTensor",
    "SharedSubspace",
    "TaskProjection",
    "quantize_tensor",
]
