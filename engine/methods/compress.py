"""Compression methods: registry entries that own their build (after mergekit's merge methods).

Each is a :class:`CompressMethod` with a name, help and parameters (importable without
torch, so the TUI and ``--batch`` list them before torch loads) and a ``build(params,
source, shapes, …)`` that imports the tensor code when called. ``func`` (the registry's
entry point) is :meth:`CompressMethod.run`:
``func(adapters, *, task_ids=None, progress=None, cancel=None, streaming=False, **params) -> SharedSubspace``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..registry import MethodInfo, Param, register_method
from .build_params import DEFAULT_MAX_ERROR, SEED_VARIANCE_THRESHOLD, BuildParams

#: The default compression method (the winner on ratio at equal ΔW error; see the README).
DEFAULT_COMPRESS_METHOD = "joint"

_K = (
    Param("num_components", "int", None, "k for every module (overridden by max_error / adaptive_k)", minimum=1),
    Param("variance_threshold", "float", None, f"share of variance k must explain ({SEED_VARIANCE_THRESHOLD} when set alone)",
          minimum=0.0, maximum=1.0, exclusive_minimum=True),
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
                  "precision (fp16, int8…int3 or nf4 per 64 values) chosen together, the fewest bytes meeting the target "
                  "after rounding; fp16: every tensor at dtype",
                  choices=("fp16", "auto"))


@dataclass(frozen=True)
class CompressMethod(MethodInfo, ABC):
    """A registered compression method: its name, help and parameters, and its build.

    :meth:`build` turns checked :class:`BuildParams` and the adapters (an
    ``engine.subspace.common.AdapterSource``) into per-module bases and per-task
    coefficients; :meth:`run` (also ``func``, as the registry's other methods) is the
    job's entry: the job's defaults, then a build. Subclasses say how their chunked
    build is parameterised (:meth:`chunk_params`) and which adapters they refuse (:meth:`check`).
    """

    def __post_init__(self) -> None:
        object.__setattr__(self, "func", self.run)

    def run(self, adapters: Sequence[Any], *, task_ids: Sequence[str] | None = None, progress: Any = None,
            cancel: Any = None, streaming: bool = False, **given: Any) -> Any:
        """Build a subspace as the ``compress`` job does (:meth:`BuildParams.for_job`'s defaults).

        ``adapters``: ``LoRAWeights`` in memory, or adapter paths with ``streaming`` (one adapter at a time).
        """
        from ..subspace import SharedSubspace

        params = BuildParams.for_job(self.name, **given)
        return SharedSubspace.from_params(adapters, params, task_ids, streaming=bool(streaming), progress=progress,
                                          cancel=cancel)

    def check(self, report: Any) -> None:
        """Refuse adapters this method cannot build from, given their ``CompatibilityReport`` (default: none)."""

    @abstractmethod
    def chunk_params(self, params: BuildParams, prior: Any) -> Any:
        """The parameters of the chunked build (``JointParams`` or ``PCAParams``)."""

    def build(self, params: BuildParams, source: Any, shapes: dict[str, tuple[int, int]], *,
              ranks: dict[str, Sequence[int]], memory_budget_mb: float | None, checked: Any,
              prior: Any = None, progress: Any = None, cancel: Any = None, executor: Any = "inprocess",
              scheduler: str | None = None, n_workers: int | None = None,
              sink: Any = None) -> tuple[dict[str, Any], dict[str, Any], dict[Any, Any]]:
        """``(bases by module, projections by task, quantised tensors)`` of ``source``'s adapters.

        Args:
            params: Checked parameters of this method (``params.method == self.name``).
            source: The adapters (an ``AdapterSource``); ``checked(source, shapes, check)`` validates them as read.
            shapes: Module → (out, in).
            ranks: Module → the adapters' ranks there (the memory estimate).
            memory_budget_mb: Bound on one chunk's statistics (``None``: one chunk); the result does not depend on it.
            prior: Task → module → ``(offset, scale)`` of tasks entering as reconstructions (``absorb``).
            executor, scheduler, n_workers: Where the passes run (:mod:`engine.executors`; pca runs in this process).
            sink: Each chunk's task records as they are built (see :func:`engine.subspace.chunks.build_in_chunks`).
        """
        from ..subspace.chunks import build_in_chunks

        bp = self.chunk_params(params, prior)
        bases, tasks = build_in_chunks(source, shapes, self.name, bp, ranks=ranks, memory_budget_mb=memory_budget_mb,
                                       checked=checked, progress=progress, cancel=cancel, executor=executor,
                                       scheduler=scheduler, n_workers=n_workers, sink=sink)
        return bases, tasks, dict(getattr(bp, "quantized_out", {}))


@dataclass(frozen=True)
class _SharedBases(CompressMethod):
    """joint, share and svd: the chunked build of :mod:`engine.subspace.joint`."""

    basis: str = "delta"
    refined: bool = True
    separate_only: bool = False

    def chunk_params(self, params: BuildParams, prior: Any) -> Any:
        from ..subspace.common import parse_dtype
        from ..subspace.joint import JointParams

        return JointParams(basis=self.basis, num_components=params.num_components,
                           variance_threshold=params.variance_threshold, adaptive_k=params.adaptive_k,
                           max_error=params.max_error, mean_error=params.mean_error,
                           refine=params.refine if self.refined else 0, hybrid=params.hybrid and not self.separate_only,
                           sketch_rank=params.sketch_rank, dtype=parse_dtype(params.dtype),
                           separate_only=self.separate_only, prior=prior, precision=params.precision,
                           block_size=params.block_size)


@dataclass(frozen=True)
class _SeedPCA(CompressMethod):
    """pca: the seed's PCA of the flattened factors (:mod:`engine.subspace.pca`); one rank only."""

    def check(self, report: Any) -> None:
        from ..errors import IncompatibleAdaptersError

        if report.mixed_ranks:
            raise IncompatibleAdaptersError(report.warnings[0] + "; method 'pca' needs one rank, use method='joint'")

    def chunk_params(self, params: BuildParams, prior: Any) -> Any:
        from ..subspace.common import parse_dtype
        from ..subspace.pca import PCAParams

        return PCAParams(params.num_components, params.variance_threshold, params.adaptive_k, params.max_error,
                         parse_dtype(params.dtype), params.mean_error, prior=prior)


register_method(_SharedBases(
    "compress", "joint",
    "Ours: per module one column basis U and one row basis V shared by all tasks, ΔW_i ≈ U·Σ_i·Vᵀ; "
    "blind to LoRA's r×r rotation; with max_error, modules stored per task when that is smaller.",
    (*_K,
     Param("refine", "int", 1, "alternating refinement rounds of U and V (inside the sketched spaces)", minimum=0, maximum=10),
     Param("sketch_rank", "int", 256, "width of the column/row range sketch per module: the largest k "
           "(exact while the summed ranks fit)", minimum=1, maximum=8192),
     Param("hybrid", "bool", True, "with max_error, store a module per task (truncated SVD) when smaller"), PRECISION),
    basis="delta",
))

register_method(_SharedBases(
    "compress", "share",
    "Per-side column spaces (the Share paper's form): U from the stacked B_i, V from the stacked A_i; "
    "coefficients as in joint.",
    (*_K, Param("hybrid", "bool", True, "with max_error, store a module per task when smaller"),
     Param("sketch_rank", "int", 256, "width of the column/row range sketch per module: the largest k", minimum=1,
           maximum=8192), PRECISION),
    basis="factors", refined=False,
))

register_method(_SeedPCA(
    "compress", "pca",
    "The seed (vlora): per module and side, PCA of the flattened factors with the mean stored; "
    "k ≤ N−1; needs one rank.",
    _K,
))

register_method(_SharedBases(
    "compress", "svd",
    "Honest baseline: each task alone, each module's ΔW as its truncated SVD (rank by max_error, "
    "num_components or variance_threshold).",
    (*_K, PRECISION),
    refined=False, separate_only=True,
))
