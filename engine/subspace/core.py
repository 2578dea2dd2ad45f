"""``SharedSubspace``: one shared basis per module plus small per-task coefficients.

The class holds the subspace's state, its facts, reconstruction, quantisation,
accounting and persistence. Building lives in :mod:`.build` (the registered method
builds: ``engine.methods.compress``), task operations (project, absorb, add, train) in
:mod:`.tasks`, accounting (bytes, ratios, storage) in :mod:`.accounting`; the methods
here of those names delegate to them. Above ~450 lines because it is the public API: the
seed-compatible attributes and every public method with its docstring (the reference).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import UnknownTaskError
from ..methods.build_params import SEED_VARIANCE_THRESHOLD, BuildParams
from ..progress import CancelLike, ProgressFn
from ..types import LoRAWeights
from . import accounting as _accounting
from . import tasks as _tasks
from .build import from_params as _from_params
from .chunks import DEFAULT_MEMORY_BUDGET_MB
from .common import ModuleBasis, TaskProjection, dtype_name, parse_dtype, vllm_rank
from .joint import joint_factors
from .pca import pca_factors
from .quant import QuantizedTensor
from .rule import RuleBreak, complete_params, k_rule


class SharedSubspace:
    """A collection of LoRA adapters stored as shared per-module bases plus per-task coefficients.

    Build with :meth:`from_adapters` or :meth:`from_adapters_streaming`; get any
    task back as a PEFT adapter with :meth:`reconstruct`. ``method`` picks the
    representation (see :data:`METHODS`): ``joint`` (default, ours), ``share``,
    ``pca`` (the seed) or ``svd`` (each task alone, the honest baseline).

    Attributes:
        method: The method name.
        modules: Module name → :class:`ModuleBasis`.
        tasks: Task id → :class:`TaskProjection`.
        params: The build parameters (kept so that ``absorb`` rebuilds alike).
        dtype: Storage precision of bases and coefficients.
        quantized: ``(module, tensor)`` / ``(task, module, tensor)`` → :class:`QuantizedTensor` after :meth:`quantize`.
    """

    def __init__(self, method: str, modules: dict[str, ModuleBasis], tasks: dict[str, TaskProjection],
                 params: dict[str, Any], dtype: torch.dtype = torch.float16) -> None:
        self.method = method
        self.modules = modules
        self.tasks = tasks
        self.params = complete_params(params, {t: p.fidelity for t, p in tasks.items()},
                                      max((b.k for b in modules.values()), default=0))
        self.dtype = dtype
        self.quantized: dict[tuple[str, ...], QuantizedTensor] = {}
        self.quantization: dict[str, Any] | None = None
        self.base_model: str | None = next((t.template.base_model_name_or_path for t in tasks.values()
                                            if t.template is not None and t.template.base_model_name_or_path), None)
        #: The folder this subspace was last saved to or loaded from, while unchanged since
        #: (``None`` after any change in memory): :meth:`compression_stats` reports its size on disk.
        self.saved_path: Path | None = None
        #: Loaded with ``lazy=True``: where the tasks not read yet are (:mod:`engine.subspace.ondisk`).
        self.on_disk: Any = None

    # -- facts --------------------------------------------------------------
    @property
    def task_ids(self) -> list[str]:
        return list(self.tasks)

    @property
    def layer_names(self) -> list[str]:
        return sorted(self.modules)

    @property
    def num_components(self) -> int:
        """Largest k over modules (seed-compatible)."""
        return max((b.k for b in self.modules.values()), default=0)

    @property
    def k_per_module(self) -> dict[str, int]:
        return {m: b.k for m, b in sorted(self.modules.items())}

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        return {m: b.shape for m, b in self.modules.items()}

    def __repr__(self) -> str:
        return (f"SharedSubspace(method={self.method!r}, layers={len(self.modules)}, k={self.num_components}, "
                f"rank={self.rank}, tasks={len(self.tasks)}, dtype={dtype_name(self.dtype)})")

    # -- the seed's attributes ----------------------------------------------------
    @property
    def rank(self) -> int:
        """The adapters' LoRA rank (the largest module rank of the stored tasks), as the seed's ``rank``."""
        rs = [r for p in self.tasks.values() for r in p.ranks.values()]
        rs += [b.rank for b in self.modules.values() if b.kind == "pca" and b.rank]
        return max(rs, default=0)

    @property
    def adaptive_k(self) -> bool:
        return bool(self.params.get("adaptive_k", False))

    @property
    def variance_threshold(self) -> float:
        return float(self.params.get("variance_threshold") or SEED_VARIANCE_THRESHOLD)

    def _pca_view(self, key: str, what: str) -> dict[str, Tensor]:
        """The seed's per-module tensors of a ``pca`` subspace (module → tensor, storage precision)."""
        if self.method != "pca":
            raise AttributeError(
                f"{what} exists on method='pca' subspaces (the seed's flattened-factor PCA); this one is "
                f"{self.method!r}: its bases are .modules[m].tensors (U, V)")
        return {m: self.modules[m].tensors[key] for m in self.layer_names if self.modules[m].kind == "pca"}

    @property
    def components_a(self) -> dict[str, Tensor]:
        """Module → ``(k, r·in)`` orthonormal rows spanning the flattened A factors (pca)."""
        return self._pca_view("comp_a", "components_a")

    @property
    def components_b(self) -> dict[str, Tensor]:
        """Module → ``(k, out·r)`` orthonormal rows spanning the flattened B factors (pca)."""
        return self._pca_view("comp_b", "components_b")

    @property
    def means_a(self) -> dict[str, Tensor]:
        """Module → mean flattened A over the build's adapters (pca)."""
        return self._pca_view("mean_a", "means_a")

    @property
    def means_b(self) -> dict[str, Tensor]:
        """Module → mean flattened B over the build's adapters (pca)."""
        return self._pca_view("mean_b", "means_b")

    @property
    def singular_values_a(self) -> dict[str, Tensor]:
        return self._pca_view("sv_a", "singular_values_a")

    @property
    def singular_values_b(self) -> dict[str, Tensor]:
        return self._pca_view("sv_b", "singular_values_b")

    @property
    def shapes_a(self) -> dict[str, tuple[int, int]]:
        """Module → shape of A, ``(r, in)`` (pca: the basis rank; else the largest task rank)."""
        return {m: (self._module_rank(m), b.shape[1]) for m, b in sorted(self.modules.items())}

    @property
    def shapes_b(self) -> dict[str, tuple[int, int]]:
        """Module → shape of B, ``(out, r)``."""
        return {m: (b.shape[0], self._module_rank(m)) for m, b in sorted(self.modules.items())}

    def _module_rank(self, m: str) -> int:
        b = self.modules[m]
        if b.kind == "pca" and b.rank:
            return int(b.rank)
        return max((p.ranks.get(m, 0) for p in self.tasks.values()), default=0)

    def _task(self, task_id: str) -> TaskProjection:
        if task_id not in self.tasks:
            known = ", ".join(list(self.tasks)[:5]) + (" …" if len(self.tasks) > 5 else "")
            raise UnknownTaskError(f"unknown task {task_id!r}; the subspace holds: {known or '(none)'}")
        if self.on_disk is not None:
            from .ondisk import read_task

            read_task(self, task_id)
        return self.tasks[task_id]

    def materialize(self) -> SharedSubspace:
        """Read every task's coefficients of a subspace loaded with ``lazy=True`` (a no-op otherwise). Returns ``self``."""
        from .ondisk import materialize

        materialize(self)
        return self


    # -- building -----------------------------------------------------------
    @classmethod
    def from_adapters(
        cls,
        adapters: Sequence[LoRAWeights],
        task_ids: Sequence[str] | None = None,
        num_components: int | None = None,
        variance_threshold: float = SEED_VARIANCE_THRESHOLD,
        adaptive_k: bool = False,
        max_error: float | None = None,
        method: str | None = None,
        *,
        mean_error: float | None = None,
        refine: int = 1,
        hybrid: bool = True,
        dtype: Any = None,
        sketch_rank: int = 256,
        memory_budget_mb: float | None = DEFAULT_MEMORY_BUDGET_MB,
        precision: str = "fp16",
        block_size: int = 64,
        progress: ProgressFn | None = None,
        cancel: CancelLike | None = None,
        executor: Any = "inprocess",
        scheduler: str | None = None,
        n_workers: int | None = None,
        _prior: dict[str, dict[str, tuple[float, float]]] | None = None,
    ) -> SharedSubspace:
        """Build a subspace from adapters in memory.

        Args:
            adapters: LoRA adapters of one base model with the same modules and shapes.
            task_ids: One id per adapter; defaults to the adapters' names (else ``task_<i>``).
            num_components: k for every module.
            variance_threshold: Share of variance (ΔW energy for joint) that k must explain.
            adaptive_k: Choose k per module by ``variance_threshold``.
            max_error: Choose per module the smallest k whose worst task error
                ‖ΔW−ΔŴ‖/‖ΔW‖ is at most this (overrides the others). With ``hybrid``,
                a module is stored per task (truncated SVD) when that is smaller.
            mean_error: Like ``max_error`` for the mean error over tasks (per module,
                so the overall mean meets it too); with both, k meets both.
            method: ``joint``, ``share``, ``pca`` or ``svd``. Not given: ``pca`` (the seed's
                meaning of ``num_components``/``variance_threshold``/``adaptive_k``), or
                ``joint`` when ``max_error``/``mean_error`` is given (see :func:`engine.methods.build_params.resolve_method`).
            refine: Alternating refinement rounds of the joint basis.
            hybrid: See ``max_error``.
            dtype: Storage precision (default float32 for pca, as the seed, float16 for the
                others); errors are measured after rounding.
            sketch_rank: Width of the randomized range sketch of each module's column
                and row space, hence the largest k (joint/share). Exact while the summed
                ranks of the adapters fit in it; above, the leading directions are found
                to sketch accuracy and every error is still measured exactly.
            memory_budget_mb: Modules are built in chunks whose statistics (sketches,
                components) are estimated to stay under this many MiB; each chunk reads
                only its modules' tensors. The result is the same as one build over all
                modules (``None``), which holds every module's statistics at once.
            precision: ``fp16`` (every tensor at ``dtype``) or ``auto``: with an error target, each
                module's rank (per-task form) or core and basis (shared form) and the precision of every
                stored tensor (fp16, int8…int3 or nf4 per ``block_size`` values with fp16 scales) are chosen
                together: the fewest bytes whose error after rounding meets the target
                (:mod:`engine.subspace.precision`). joint, share and svd; needs ``dtype`` float16.
            block_size: Values per scale of the integer precisions.
            progress: Called with ``Progress`` once per adapter per pass and per module.
            cancel: ``is_set()`` → ``JobCancelled``.
            executor: Where the passes run (joint, share, svd): ``"inprocess"``, ``"dask"`` (a
                ``dask.distributed`` cluster; the extra ``vlora-tui[dask]``) or an
                :class:`engine.executors.Executor`. Results agree to float tolerance.
            scheduler: With ``"dask"``: ``tcp://HOST:PORT`` of a running scheduler; ``None`` starts
                a ``LocalCluster`` of ``n_workers`` (default: the CPU cores) for the build.
            n_workers: Workers of that ``LocalCluster``.

        Raises:
            ValueError: bad arguments, NaN/Inf, k too large, invalid task ids.
            IncompatibleAdaptersError: different modules/shapes/base models (or ranks for pca).
        """
        params = BuildParams(method, num_components, variance_threshold, adaptive_k, max_error, mean_error, refine, hybrid,
                             sketch_rank, dtype, precision, block_size)
        return cls.from_params(adapters, params, task_ids, memory_budget_mb=memory_budget_mb, prior=_prior,
                               progress=progress, cancel=cancel, executor=executor, scheduler=scheduler, n_workers=n_workers)

    @classmethod
    def from_adapters_streaming(
        cls,
        paths: Sequence[str | Path],
        task_ids: Sequence[str] | None = None,
        num_components: int | None = None,
        variance_threshold: float = SEED_VARIANCE_THRESHOLD,
        adaptive_k: bool = False,
        max_error: float | None = None,
        method: str | None = None,
        *,
        mean_error: float | None = None,
        refine: int = 1,
        hybrid: bool = True,
        dtype: Any = None,
        sketch_rank: int = 256,
        memory_budget_mb: float | None = DEFAULT_MEMORY_BUDGET_MB,
        precision: str = "fp16",
        block_size: int = 64,
        progress: ProgressFn | None = None,
        cancel: CancelLike | None = None,
        executor: Any = "inprocess",
        scheduler: str | None = None,
        n_workers: int | None = None,
        output: str | Path | None = None,
        force: bool = False,
    ) -> SharedSubspace:
        """Build from adapter folders, holding one adapter in memory at a time (plus basis and statistics).

        Same arguments and result as :meth:`from_adapters`; the adapters are read
        in three passes (joint/share; pca: 2–3) per chunk of modules, each reading only
        that chunk's tensors, so time is O(N) and memory is one adapter plus one
        chunk's statistics (``memory_budget_mb``) plus the result. With ``executor="dask"``
        each worker reads only its shard's tensors of the chunk from the paths. With
        ``output``, the folder is written as the build goes (each chunk's coefficients when
        it is done; refused if it exists, unless ``force``) and the result is that folder
        loaded with ``lazy=True``: the build holds one chunk's result, not the collection's.
        """
        params = BuildParams(method, num_components, variance_threshold, adaptive_k, max_error, mean_error, refine, hybrid,
                             sketch_rank, dtype, precision, block_size)
        return cls.from_params(paths, params, task_ids, streaming=True, memory_budget_mb=memory_budget_mb,
                               progress=progress, cancel=cancel, executor=executor, scheduler=scheduler, n_workers=n_workers,
                               output=output, force=force)

    @classmethod
    def from_params(cls, adapters: Sequence[Any], params: BuildParams, task_ids: Sequence[str] | None = None, *,
                    streaming: bool = False, memory_budget_mb: float | None = DEFAULT_MEMORY_BUDGET_MB,
                    prior: dict[str, dict[str, tuple[float, float]]] | None = None,
                    progress: ProgressFn | None = None, cancel: CancelLike | None = None, executor: Any = "inprocess",
                    scheduler: str | None = None, n_workers: int | None = None, output: str | Path | None = None,
                    force: bool = False) -> SharedSubspace:
        """Build from checked :class:`~engine.methods.build_params.BuildParams` (what the ``compress`` job does).

        ``adapters``: ``LoRAWeights``, or adapter folders with ``streaming``; see :meth:`from_adapters`,
        :meth:`from_adapters_streaming` and :func:`engine.subspace.build.from_params`.
        """
        return _from_params(cls, adapters, params, task_ids, streaming=streaming, memory_budget_mb=memory_budget_mb,
                            prior=prior, progress=progress, cancel=cancel, executor=executor, scheduler=scheduler,
                            n_workers=n_workers, output=output, force=force)

    # -- tasks (engine.subspace.tasks) ----------------------------------------
    def project(self, adapter: LoRAWeights, task_id: str, warn_threshold: float | None = None, *,
                progress: ProgressFn | None = None, cancel: CancelLike | None = None) -> TaskProjection:
        """Coefficients of ``adapter`` in the current bases (they do not change), with its measured error.

        Modules stored per task (``separate``) keep the adapter's truncated SVD at the subspace's error target.

        Args:
            adapter: The adapter to project.
            task_id: Its id.
            warn_threshold: As the seed: warn (``UserWarning``, "Low subspace coverage") when the
                mean coverage is below this. Coverage is the seed's ``1 − ‖residual‖/‖x‖`` of the
                centred flattened factors for ``pca`` modules, ``1 −`` the ΔW error for the others.
        """
        return _tasks.project(self, adapter, task_id, warn_threshold, progress=progress, cancel=cancel)

    def add_task(self, projection: TaskProjection) -> None:
        """Store a projection made by :meth:`project` (replaces a task of the same id)."""
        return _tasks.add_task(self, projection)

    def absorb(self, adapter: LoRAWeights, new_task_id: str, *, allow_worse: bool = False,
               progress: ProgressFn | None = None, cancel: CancelLike | None = None) -> None:
        """Add a task and recompute the bases from the stored tasks' reconstructions plus the new adapter.

        The originals of the stored tasks are not read (their files may be gone): they
        enter as their reconstructions, so their reported errors become upper bounds
        (old error + change of reconstruction). The subspace's own k rule
        (:attr:`k_rule`) holds for every task, old and new: with an error target, k is
        chosen so that these bounds meet it (a stored task already at the target keeps
        its directions). A result that still breaks the target (see
        :func:`~engine.subspace.rule.rule_breaks`) is refused, the subspace unchanged.

        Raises:
            ErrorTargetError: the result breaks the error target and not ``allow_worse``.
        """
        return _tasks.absorb(self.materialize(), adapter, new_task_id, allow_worse=allow_worse, progress=progress, cancel=cancel)

    def _refuse_breaks(self, what: str, before: dict[str, dict[str, float]], after: dict[str, dict[str, float]],
                       allow_worse: bool) -> list[RuleBreak]:
        """The places where ``after`` breaks the error target; ``ErrorTargetError`` unless ``allow_worse``."""
        return _tasks.refuse_breaks(self, what, before, after, allow_worse)

    def target_breaks(self, before: dict[str, dict[str, float]],
                      after: dict[str, dict[str, float]] | None = None) -> list[RuleBreak]:
        """Where ``after`` (default: the current :meth:`fidelity`) breaks the k rule's error target that ``before`` met."""
        return _tasks.target_breaks(self, before, after)

    @property
    def k_rule(self) -> dict[str, Any]:
        """The k rule the subspace was built with: ``{"rule", "max_error", "mean_error", "num_components",
        "variance_threshold", "inferred"}`` (see :mod:`engine.subspace.rule`)."""
        return k_rule(self.params)

    def absorb_incremental(self, adapter: LoRAWeights, task_id: str, *, allow_worse: bool = False,
                           progress: ProgressFn | None = None, cancel: CancelLike | None = None) -> TaskProjection:
        """Add a task in O(1) of N: stored tasks are not touched; bases grow by the few directions it needs.

        The target is the build's ``max_error``/``mean_error`` (the stricter), else the worst error already stored in that module.
        A new task that breaks the error target is refused (the subspace unchanged) unless ``allow_worse``.

        Returns:
            The new task's projection (its errors measured).

        Raises:
            ErrorTargetError: the new task breaks the error target and not ``allow_worse``.
        """
        return _tasks.absorb_incremental(self, adapter, task_id, allow_worse=allow_worse, progress=progress, cancel=cancel)

    def get_trainable_params(self, task_id: str, num_expand: int = 0) -> dict[str, Tensor]:
        """The task's coefficients as float32 leaf tensors with ``requires_grad`` (bases stay frozen).

        ``num_expand`` > 0 first appends that many random orthonormal directions to every
        shared basis (in place; other tasks are unaffected: their coefficients are zero there).
        Names: ``<module>.sigma`` (joint/share), ``<module>.loadings_a``/``loadings_b`` (pca),
        ``<module>.lora_B``/``lora_A`` (modules stored per task).
        """
        return _tasks.get_trainable_params(self, task_id, num_expand)

    def set_trainable_params(self, task_id: str, params: dict[str, Tensor]) -> None:
        """Write coefficients from :meth:`get_trainable_params` back into the task (errors become unknown: NaN)."""
        return _tasks.set_trainable_params(self, task_id, params)

    # -- reconstruction -------------------------------------------------------------
    def task_factors(self, task_id: str) -> dict[str, tuple[Tensor, Tensor]]:
        """Effective factors ``(B_eff, A)`` per module (``B_eff @ A = ΔŴ``, scale included), float64."""
        proj = self._task(task_id)
        out: dict[str, tuple[Tensor, Tensor]] = {}
        for m, b in self.modules.items():
            out[m] = _module_factors(b, proj.coeffs[m], proj, m)
        return out

    def reconstruct(self, task_id: str, *, pad_to_vllm: bool = False, dtype: torch.dtype = torch.float32) -> LoRAWeights:
        """The task as a PEFT-ready ``LoRAWeights`` with its original alpha, rsLoRA, targets, base model and extras.

        Module ranks are at most the original's (the seed's meaning: a rank-r adapter comes
        back at rank r, or lower where a module is stored truncated); with ``pad_to_vllm``
        every module is padded with zero rows/columns to one rank vLLM accepts (export does
        this through :func:`engine.io.targets.for_target`).
        """
        proj = self._task(task_id)
        factors = self.task_factors(task_id)
        rank = max((a.shape[0] for _, a in factors.values()), default=1)
        target = vllm_rank(max(rank, 1)) if pad_to_vllm else None
        out: dict[str, tuple[Tensor, Tensor]] = {}
        for m, (b, a) in factors.items():
            q = a.shape[0]
            want = target if target is not None else max(q, 1)
            if q < want:
                b = torch.cat([b, b.new_zeros(b.shape[0], want - q)], dim=1)
                a = torch.cat([a, a.new_zeros(want - q, a.shape[1])], dim=0)
            out[m] = (b.to(dtype), a.to(dtype))
        template = proj.template or LoRAWeights(layer_names=[], lora_a={}, lora_b={}, rank=rank, name=task_id)
        w = template.replace_factors(out, rank=target, name=task_id)
        return w

    # -- quantisation -----------------------------------------------------------------
    def quantize(self, bits: int = 8, method: str = "symmetric", double_quant: bool = False,
                 quantize_loadings: bool = False, *, block_size: int = 64,
                 adapters: dict[str, LoRAWeights] | Sequence[LoRAWeights] | None = None,
                 max_error: float | None = None, mean_error: float | None = None,
                 progress: ProgressFn | None = None, cancel: CancelLike | None = None) -> SharedSubspace:
        """Quantise the bases (and optionally the per-task coefficients) per block, in place.

        Errors are re-measured after rounding: exactly against ``adapters`` (by task id,
        or in task order) when given, else as ``old error + change of the reconstruction``
        (an upper bound; the change itself is exact). With ``max_error``/``mean_error``
        (``bits``/``method`` ignored): each module at the cheapest rank and precision that
        meets the target (:mod:`engine.subspace.requantize`; its report in :attr:`last_quantize`).

        Returns:
            ``self``.
        """
        self.materialize()
        if max_error is not None or mean_error is not None:
            from .requantize import requantize

            self.last_quantize = requantize(self, max_error=max_error, mean_error=mean_error, adapters=adapters,
                                            block_size=block_size, progress=progress, cancel=cancel)
            return self
        from .requantize import quantize_fixed

        return quantize_fixed(self, bits, method, double_quant, quantize_loadings, block_size=block_size, adapters=adapters,
                              progress=progress, cancel=cancel)

    # -- accounting -------------------------------------------------------------------
    def _tensor_bytes(self) -> tuple[int, int]:
        """(bytes stored for bases and coefficients, float parameters they represent)."""
        return _accounting.tensor_bytes(self)

    def explained_variance(self) -> dict[str, list[float]]:
        """Module → cumulative explained variance for k = 1, 2, … (ΔW energy for joint/share)."""
        return {m: list(b.explained) for m, b in sorted(self.modules.items())}

    def fidelity(self) -> dict[str, dict[str, float]]:
        """Task → module → relative ΔW error."""
        return {t: dict(p.fidelity) for t, p in self.tasks.items()}

    def storage(self) -> dict[str, Any]:
        """How each module is stored: shared by the tasks, or per task (nothing shared), with a one-line summary.

        Returns:
            ``{"modules": {module: {"shared": bool, "kind", "k_u", "k_v", "rank": [lo, hi] of the
            per-task factors (modules stored per task) or None, "form": "shared 3×4" | "per task, rank 4"}},
            "shared": n, "per_task": n, "total": n, "summary": str}``.
        """
        return _accounting.storage(self)

    def compression_stats(self) -> dict[str, Any]:
        """Bytes, ratio and fidelity.

        ``disk`` holds the honest figures every front end prints: while the subspace is
        unchanged since it was saved or loaded (:attr:`saved_path`), the bytes of every file of
        its folder and ``ratio`` = the inputs' files on disk / those bytes (see
        :func:`engine.subspace.size.size_on_disk`); otherwise ``None``. The seed-compatible
        ``ratio`` (= ``compression_ratio``) counts tensors in memory only: bytes of the original
        adapters' LoRA factors (at their dtype) / bytes of bases and coefficients (at storage
        precision, or quantised), without file headers, manifest or the inputs' configs;
        ``ratio_vs_fp16`` compares with the originals at fp16. ``storage`` says per module
        whether it is shared or stored per task (:meth:`storage`). Errors are relative
        ‖ΔW−ΔŴ‖_F/‖ΔW‖_F.
        """
        return _accounting.compression_stats(self)

    def full_stack_compression(self, base_model_params: int, base_model_bits: int = 16, quantized_bits: int = 4) -> dict[str, Any]:
        """Memory of base model + all adapters, before and after (base quantised to ``quantized_bits``, adapters as stored)."""
        return _accounting.full_stack_compression(self, base_model_params, base_model_bits, quantized_bits)

    def to(self, device: Any = None, dtype: Any = None) -> SharedSubspace:
        """Move bases and coefficients to ``device`` and/or cast them to ``dtype`` (then the storage precision). Returns ``self``."""
        dt = parse_dtype(dtype) if dtype is not None else None
        self.materialize()

        def mv(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dt if t.is_floating_point() and dt is not None else t.dtype)

        for b in self.modules.values():
            b.tensors = {k: mv(v) for k, v in b.tensors.items()}
        for p in self.tasks.values():
            p.coeffs = {m: {k: mv(v) for k, v in c.items()} for m, c in p.coeffs.items()}
        if dt is not None:
            self.dtype = dt
            self.saved_path = None
        return self

    def copy(self) -> SharedSubspace:
        """A deep copy (every task read, if loaded lazily)."""
        return copy.deepcopy(self.materialize())

    # -- persistence ------------------------------------------------------------------
    def save(self, path: str | Path, force: bool = False) -> Path:
        """Write the subspace folder (see :mod:`engine.subspace.storage`); quantised tensors are written as codes."""
        from .storage import save_subspace

        out = save_subspace(self.materialize(), Path(path), force=force)
        self.saved_path = out
        return out

    def save_quantized(self, path: str | Path, force: bool = False, *, bits: int = 4, method: str = "nf4",
                       double_quant: bool = True) -> Path:
        """Write a quantised copy (4-bit codes packed two a byte); ``self`` is quantised already or left as it is."""
        sub = self
        if self.quantization is None:
            sub = self.copy().quantize(bits=bits, method=method, double_quant=double_quant)
        return sub.save(path, force=force)

    @classmethod
    def load(cls, path: str | Path, *, lazy: bool = False) -> SharedSubspace:
        """Read a subspace folder (float or quantised; detected from the manifest), verifying checksums.

        ``lazy``: read each task's coefficients on its first use (:mod:`engine.subspace.ondisk`); every
        checksum is verified at load all the same.
        """
        from .storage import load_subspace

        return load_subspace(Path(path), cls, lazy=lazy)



def _module_factors(b: ModuleBasis, coeffs: dict[str, Tensor], proj: TaskProjection, m: str) -> tuple[Tensor, Tensor]:
    """One task's effective factors ``(B_eff, A)`` in module ``m`` (float64)."""
    if b.kind == "pca":
        return pca_factors(b, coeffs, proj.template, m)
    if b.kind == "separate":
        return coeffs["b"].double(), coeffs["a"].double()
    return joint_factors(b.tensors["U"], b.tensors["V"], coeffs, proj.ranks.get(m, b.k))
