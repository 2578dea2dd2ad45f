"""Compression methods for the registry: names, help and parameters, importable without torch.

Each registered function has the signature
``func(adapters, *, task_ids=None, progress=None, cancel=None, **params) -> engine.subspace.SharedSubspace``
(``adapters``: ``LoRAWeights`` in memory, or paths with ``streaming=True``) and
imports the tensor code only when called.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..registry import Param, register

#: The default compression method (the winner on ratio at equal ΔW error; see the README).
DEFAULT_COMPRESS_METHOD = "joint"
#: ΔW error target used when a job names no k rule: a fidelity promise, not a variance share.
DEFAULT_MAX_ERROR = 0.05

_K = (
    Param("num_components", "int", None, "k for every module (overridden by max_error / adaptive_k)", minimum=1),
    Param("variance_threshold", "float", None, "share of variance k must explain (0.6 when set alone)",
          minimum=0.0, maximum=1.0),
    Param("adaptive_k", "bool", False, "choose k per module by variance_threshold"),
    Param("max_error", "float", None,
          f"choose per module the smallest k with every task's ‖ΔW−ΔŴ‖/‖ΔW‖ ≤ this "
          f"(default {DEFAULT_MAX_ERROR} when no other k rule is given)", minimum=0.0, maximum=0.999),
    Param("mean_error", "float", None,
          "choose per module the smallest k with the mean over tasks of ‖ΔW−ΔŴ‖/‖ΔW‖ ≤ this (with max_error: both)",
          minimum=0.0, maximum=0.999),
    Param("dtype", "choice", "float16", "storage precision (errors measured after rounding)",
          choices=("float16", "bfloat16", "float32")),
    Param("streaming", "bool", False, "read adapters from paths one at a time (memory: one adapter + basis)"),
)


#: rank and precision chosen together (``auto``) or every tensor at ``dtype`` (``fp16``); joint, share and svd
PRECISION = Param("precision", "choice", None,
                  "auto (default with an error target and float16 storage): each module's rank and each tensor's "
                  "precision (fp16, int8…int3 per 64 values) chosen together, the fewest bytes meeting the target "
                  "after rounding; fp16: every tensor at dtype",
                  choices=("fp16", "auto"))


def _run(method: str, adapters: Sequence[Any], task_ids: Sequence[str] | None, progress: Any, cancel: Any,
         params: dict[str, Any]) -> Any:
    from ..subspace import SharedSubspace

    params = {k: v for k, v in params.items() if v is not None}
    if params.get("adaptive_k") is False:
        params.pop("adaptive_k")
    if not params.keys() & {"num_components", "variance_threshold", "adaptive_k", "max_error", "mean_error"}:
        params["max_error"] = DEFAULT_MAX_ERROR
    if params.get("precision") is None and method != "pca":
        # measured: auto stores 1.6-1.9x less at the same error target (demo 3.74x -> 5.93x; 32 real MiniLM
        # adapters 2.97x -> 5.64x at max 5 %); it needs an error target and float16 storage
        target = params.keys() & {"max_error", "mean_error"}
        params["precision"] = "auto" if target and params.get("dtype", "float16") == "float16" else "fp16"
    streaming = bool(params.pop("streaming", False))
    build = SharedSubspace.from_adapters_streaming if streaming else SharedSubspace.from_adapters
    return build(adapters, task_ids, method=method, progress=progress, cancel=cancel, **params)


@register(
    "compress",
    "joint",
    "Ours: per module one column basis U and one row basis V shared by all tasks, ΔW_i ≈ U·Σ_i·Vᵀ; "
    "blind to LoRA's r×r rotation; with max_error, modules stored per task when that is smaller.",
    (*_K,
     Param("refine", "int", 1, "alternating refinement rounds of U and V (inside the sketched spaces)", minimum=0, maximum=10),
     Param("sketch_rank", "int", 256, "width of the column/row range sketch per module: the largest k "
           "(exact while the summed ranks fit)", minimum=1, maximum=8192),
     Param("hybrid", "bool", True, "with max_error, store a module per task (truncated SVD) when smaller"), PRECISION),
)
def joint(adapters: Sequence[Any], *, task_ids: Sequence[str] | None = None, progress: Any = None,
          cancel: Any = None, **params: Any) -> Any:
    """Shared row and column bases per module."""
    return _run("joint", adapters, task_ids, progress, cancel, params)


@register(
    "compress",
    "share",
    "Per-side column spaces (the Share paper's form): U from the stacked B_i, V from the stacked A_i; "
    "coefficients as in joint.",
    (*_K, Param("hybrid", "bool", True, "with max_error, store a module per task when smaller"),
     Param("sketch_rank", "int", 256, "width of the column/row range sketch per module: the largest k", minimum=1,
           maximum=8192), PRECISION),
)
def share(adapters: Sequence[Any], *, task_ids: Sequence[str] | None = None, progress: Any = None,
          cancel: Any = None, **params: Any) -> Any:
    """Per-side factor bases."""
    return _run("share", adapters, task_ids, progress, cancel, params)


@register(
    "compress",
    "pca",
    "The seed (vlora): per module and side, PCA of the flattened factors with the mean stored; "
    "k ≤ N−1; needs one rank.",
    _K,
)
def pca(adapters: Sequence[Any], *, task_ids: Sequence[str] | None = None, progress: Any = None,
        cancel: Any = None, **params: Any) -> Any:
    """Seed PCA of flattened factors."""
    return _run("pca", adapters, task_ids, progress, cancel, params)


@register(
    "compress",
    "svd",
    "Honest baseline: each task alone, each module's ΔW as its truncated SVD (rank by max_error, "
    "num_components or variance_threshold).",
    (*_K, PRECISION),
)
def svd(adapters: Sequence[Any], *, task_ids: Sequence[str] | None = None, progress: Any = None,
        cancel: Any = None, **params: Any) -> Any:
    """Per-task truncated SVD."""
    return _run("svd", adapters, task_ids, progress, cancel, params)
