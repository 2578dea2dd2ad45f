"""``SharedSubspace``: one shared basis per module plus small per-task coefficients."""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import ops
from ..errors import AdapterFormatError, ErrorTargetError, IncompatibleAdaptersError, UnknownTaskError
from ..io.scan import validate_task_id
from ..progress import CancelLike, ProgressFn, tick
from ..types import LoRAWeights
from .chunks import DEFAULT_MEMORY_BUDGET_MB, build_in_chunks
from .common import (
    DEFAULT_METHOD,
    METHODS,
    AdapterSource,
    ModuleBasis,
    TaskProjection,
    check_finite,
    check_shapes,
    config_template,
    dtype_name,
    effective_factors,
    nbytes,
    parse_dtype,
    vllm_rank,
)
from .joint import (
    JointParams,
    encode_joint,
    encode_separate,
    error_target,
    extend_for_task,
    joint_factors,
)
from .pca import PCAParams, encode_pca, pca_factors
from .precision import check_build_precision
from .quant import QuantizedTensor, quantize_tensor
from .rule import RuleBreak, breaks_message, complete_params, k_rule, rule_breaks, tolerance


def resolve_method(method: str | None, max_error: float | None, mean_error: float | None) -> str:
    """The method a build uses when ``method`` is not given.

    The seed's call, ``from_adapters(adapters, num_components=k)`` (or with
    ``variance_threshold``/``adaptive_k``), keeps the seed's meaning: ``pca`` of the
    flattened factors with k components. With an error target (``max_error`` /
    ``mean_error``, this project's parameters) the build is ``joint``. The job layer,
    the CLI and the TUI always pass ``method`` explicitly.
    """
    if method is not None:
        return method
    return DEFAULT_METHOD if (max_error is not None or mean_error is not None) else "pca"


def resolve_dtype(dtype: Any, method: str) -> Any:
    """Storage precision when ``dtype`` is not given: float32 for ``pca`` (the seed stores the
    factors' own precision), float16 for the others."""
    if dtype is not None:
        return dtype
    return torch.float32 if method == "pca" else torch.float16


def _task_ids(n: int, task_ids: Sequence[str] | None, names: Sequence[str | None]) -> list[str]:
    if task_ids is not None:
        ids = [str(t) for t in task_ids]
        if len(ids) != n:
            raise ValueError(f"task_ids has {len(ids)} entries for {n} adapters")
    else:
        ids = []
        for i, nm in enumerate(names):
            try:
                ids.append(validate_task_id(str(nm)) if nm else f"task_{i}")
            except ValueError:
                ids.append(f"task_{i}")
        if len(set(ids)) != len(ids):
            ids = [f"task_{i}" for i in range(n)]
    for t in ids:
        validate_task_id(t)
    dup = sorted({t for t in ids if ids.count(t) > 1})
    if dup:
        raise ValueError(f"duplicate task ids: {', '.join(dup)}")
    return ids


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
        return float(self.params.get("variance_threshold") or 0.6)

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
        return self.tasks[task_id]

    # -- building -----------------------------------------------------------
    @classmethod
    def from_adapters(
        cls,
        adapters: Sequence[LoRAWeights],
        task_ids: Sequence[str] | None = None,
        num_components: int | None = None,
        variance_threshold: float = 0.6,
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
                ``joint`` when ``max_error``/``mean_error`` is given (see :func:`resolve_method`).
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
                stored tensor (fp16, int8…int3 per ``block_size`` values with fp16 scales) are chosen
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
        from ..io.local import check_compatible

        method = resolve_method(method, max_error, mean_error)
        dtype = resolve_dtype(dtype, method)
        if not adapters:
            raise ValueError("from_adapters: no adapters given")
        ids = _task_ids(len(adapters), task_ids, [a.name for a in adapters])
        report = check_compatible(list(adapters))
        for i, a in enumerate(adapters):
            check_finite(a, f"adapter {ids[i]!r}")
        if method == "pca" and report.mixed_ranks:
            raise IncompatibleAdaptersError(report.warnings[0] + "; method 'pca' needs one rank, use method='joint'")
        source = AdapterSource(ids, adapters=adapters)
        return cls._build(source, report.shapes, method, num_components, variance_threshold, adaptive_k, max_error,
                          mean_error, refine, hybrid, dtype, sketch_rank, progress, cancel, ranks=report.ranks,
                          memory_budget_mb=memory_budget_mb, prior=_prior, precision=precision, block_size=block_size,
                          executor=executor, scheduler=scheduler, n_workers=n_workers)

    @classmethod
    def from_adapters_streaming(
        cls,
        paths: Sequence[str | Path],
        task_ids: Sequence[str] | None = None,
        num_components: int | None = None,
        variance_threshold: float = 0.6,
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
    ) -> SharedSubspace:
        """Build from adapter folders, holding one adapter in memory at a time (plus basis and statistics).

        Same arguments and result as :meth:`from_adapters`; the adapters are read
        in three passes (joint/share; pca: 2–3) per chunk of modules, each reading only
        that chunk's tensors, so time is O(N) and memory is one adapter plus one
        chunk's statistics (``memory_budget_mb``) plus the result. With ``executor="dask"``
        each worker reads only its shard's tensors of the chunk from the paths.
        """
        from ..io.header import (
            read_config,
            read_safetensors_header,
            resolve_adapter_files,
            strip_prefix,
        )

        method = resolve_method(method, max_error, mean_error)
        dtype = resolve_dtype(dtype, method)
        if not paths:
            raise ValueError("from_adapters_streaming: no adapter paths given")
        _return_freed_memory()
        ps = [Path(p) for p in paths]
        ids = _task_ids(len(ps), task_ids, [p.name for p in ps])
        # validate every file's header up front (cheap, no tensors), collecting the problems
        shapes: dict[str, tuple[int, int]] | None = None
        ranks: set[int] = set()
        module_ranks: dict[str, list[int]] = {}
        problems: list[str] = []
        base: str | None = None
        for p in ps:
            cfg_path, w_path = resolve_adapter_files(p)
            cfg = read_config(cfg_path)
            hdr = read_safetensors_header(w_path)
            mods: dict[str, dict[str, Any]] = {}
            for key, info in hdr.items():
                for side in ("A", "B"):
                    tag = f".lora_{side}."
                    if tag in key and key.endswith(".weight"):
                        mods.setdefault(strip_prefix(key.split(tag)[0]), {})[side] = info["shape"]
            sh = {m: (int(v["B"][0]), int(v["A"][1])) for m, v in mods.items() if "A" in v and "B" in v}
            ranks |= {int(v["A"][0]) for v in mods.values() if "A" in v}
            for m, v in mods.items():
                if "A" in v:
                    module_ranks.setdefault(m, []).append(int(v["A"][0]))
            b = cfg.get("base_model_name_or_path")
            if shapes is None:
                shapes, base = sh, b
            elif sh != shapes:
                diff = sorted(set(sh) ^ set(shapes)) or sorted(m for m in sh if sh[m] != shapes.get(m))
                problems.append(f"{p}: modules or shapes differ from {ps[0]} (e.g. '{diff[0]}')")
            elif base and b and b != base:
                problems.append(f"{p}: base model {b!r} differs from {base!r}")
        if problems:
            raise IncompatibleAdaptersError("; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else ""))
        if method == "pca" and len(ranks) > 1:
            raise IncompatibleAdaptersError(f"adapters have different ranks ({', '.join(map(str, sorted(ranks)))}); "
                                            "method 'pca' needs one rank, use method='joint'")
        assert shapes is not None
        source = AdapterSource(ids, paths=ps)
        return cls._build(source, shapes, method, num_components, variance_threshold, adaptive_k, max_error,
                          mean_error, refine, hybrid, dtype, sketch_rank, progress, cancel, ranks=module_ranks,
                          memory_budget_mb=memory_budget_mb, precision=precision, block_size=block_size,
                          executor=executor, scheduler=scheduler, n_workers=n_workers)

    @classmethod
    def _build(cls, source: AdapterSource, shapes: dict[str, tuple[int, int]], method: str,
               num_components: int | None, variance_threshold: float, adaptive_k: bool, max_error: float | None,
               mean_error: float | None, refine: int, hybrid: bool, dtype: Any, sketch_rank: int, progress: Any, cancel: Any, *,
               ranks: dict[str, list[int]], memory_budget_mb: float | None = DEFAULT_MEMORY_BUDGET_MB,
               prior: dict[str, dict[str, tuple[float, float]]] | None = None, precision: str = "fp16",
               block_size: int = 64, executor: Any = None, scheduler: str | None = None,
               n_workers: int | None = None) -> SharedSubspace:
        if method not in METHODS:
            raise ValueError(f"unknown compression method {method!r}; choose from {', '.join(METHODS)}")
        if num_components is not None and num_components < 1:
            raise ValueError(f"num_components must be >= 1, got {num_components}")
        if not 0.0 < variance_threshold <= 1.0:
            raise ValueError(f"variance_threshold must be in (0, 1], got {variance_threshold}")
        if max_error is not None and not 0.0 <= max_error < 1.0:
            raise ValueError(f"max_error must be in [0, 1), got {max_error}")
        if mean_error is not None and not 0.0 <= mean_error < 1.0:
            raise ValueError(f"mean_error must be in [0, 1), got {mean_error}")
        if sketch_rank < 1:
            raise ValueError(f"sketch_rank must be >= 1, got {sketch_rank}")
        if refine < 0:
            raise ValueError(f"refine must be >= 0, got {refine}")
        if memory_budget_mb is not None and not memory_budget_mb > 0:
            raise ValueError(f"memory_budget_mb must be > 0 (or None for no limit), got {memory_budget_mb}")
        dt = parse_dtype(dtype)
        check_build_precision(precision, block_size, method, dt)
        params = {"num_components": num_components, "variance_threshold": variance_threshold, "adaptive_k": adaptive_k,
                  "max_error": max_error, "mean_error": mean_error, "refine": refine, "hybrid": hybrid, "sketch_rank": sketch_rank,
                  "precision": precision, "block_size": block_size,
                  # mean_error per task over its modules where the build spends a budget (precision auto), else per module
                  "mean_over": "task" if precision == "auto" and method != "pca" else "module"}
        bp: JointParams | PCAParams
        if method == "pca":
            bp = PCAParams(num_components, variance_threshold, adaptive_k, max_error, dt, mean_error, prior=prior)
        else:
            bp = JointParams(basis="factors" if method == "share" else "delta", num_components=num_components,
                             variance_threshold=variance_threshold, adaptive_k=adaptive_k, max_error=max_error,
                             mean_error=mean_error, refine=refine if method == "joint" else 0, hybrid=hybrid and method != "svd",
                             sketch_rank=sketch_rank, dtype=dt, separate_only=method == "svd", prior=prior,
                             precision=precision, block_size=block_size)
        bases, tasks = build_in_chunks(source, shapes, method, bp, ranks=ranks, memory_budget_mb=memory_budget_mb,
                                       checked=_CheckedSource, progress=progress, cancel=cancel,
                                       executor=executor, scheduler=scheduler, n_workers=n_workers)
        srcs: list[Any] = list(source.paths) if source.paths is not None else [a.source for a in source.adapters or []]
        for tid, src in zip(source.task_ids, srcs):
            if tid in tasks:
                _record_input(tasks[tid], src)
        sub = cls(method, bases, tasks, params, dt)
        sub.quantized.update(getattr(bp, "quantized_out", {}))
        return sub

    # -- tasks ----------------------------------------------------------------
    def _check_adapter(self, adapter: LoRAWeights, label: str) -> None:
        check_shapes(adapter, label, self.shapes, self.base_model)
        check_finite(adapter, label)
        if self.method == "pca":
            bad = [m for m, b in self.modules.items() if adapter.module_rank(m) != b.rank]
            if bad:
                raise IncompatibleAdaptersError(f"{label}: module '{bad[0]}' has rank {adapter.module_rank(bad[0])}, "
                                                f"the pca subspace has rank {self.modules[bad[0]].rank}")

    def _target(self) -> float | None:
        """The build's per-task error target: the stricter of ``max_error`` and ``mean_error`` (``None``: no target)."""
        return error_target(self.params.get("max_error"), self.params.get("mean_error"))

    def _encode(self, m: str, adapter: LoRAWeights, template: LoRAWeights) -> tuple[dict[str, Tensor], float]:
        b = self.modules[m]
        sb, a = effective_factors(adapter, m)
        if b.kind == "pca":
            return encode_pca(b, adapter.lora_a[m], adapter.lora_b[m], sb, template, m, self.dtype)
        if b.kind == "separate":
            me = self._target()
            if me is None:
                me = max((t.fidelity.get(m, 0.0) for t in self.tasks.values()), default=0.0)
            return encode_separate(sb, a, me, None, self.dtype)
        return encode_joint(b.tensors["U"], b.tensors["V"], sb, a, adapter.module_rank(m), self.dtype)

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
        validate_task_id(task_id)
        label = f"adapter {task_id!r}"
        self._check_adapter(adapter, label)
        tmpl = config_template(adapter, task_id)
        proj = TaskProjection(task_id, {}, ranks=adapter.ranks, template=tmpl,
                              original_bytes=sum(nbytes(adapter.lora_a[m]) + nbytes(adapter.lora_b[m]) for m in self.modules))
        _record_input(proj, adapter.source)
        mods = sorted(self.modules)
        for j, m in enumerate(mods):
            tick(progress, cancel, j, len(mods), f"projecting {m}")
            sb, a = effective_factors(adapter, m)
            proj.norms[m] = float(ops.lowrank_sqnorm(sb, a)) ** 0.5
            proj.coeffs[m], proj.fidelity[m] = self._encode(m, adapter, tmpl)
        if warn_threshold is not None:
            cov = self._coverage(adapter, proj)
            if cov < warn_threshold:
                import warnings

                warnings.warn(f"Low subspace coverage ({cov:.1%}) for adapter '{task_id}'. Reconstruction quality "
                              "may be poor. Consider absorb() to expand the basis.", stacklevel=2)
        return proj

    def _coverage(self, adapter: LoRAWeights, proj: TaskProjection) -> float:
        """Mean coverage over modules (and, for pca, sides): see :meth:`project`."""
        vals: list[float] = []
        for m, b in sorted(self.modules.items()):
            if b.kind != "pca":
                vals.append(1.0 - min(1.0, float(proj.fidelity[m])))
                continue
            for side, x in (("a", adapter.lora_a[m]), ("b", adapter.lora_b[m])):
                c = x.double().reshape(-1) - b.tensors[f"mean_{side}"].double()
                n = float(c.norm())
                if n < 1e-8:
                    vals.append(1.0)
                    continue
                comp = b.tensors[f"comp_{side}"].double()
                vals.append(1.0 - float((c - (c @ comp.T) @ comp).norm()) / n)
        return sum(vals) / len(vals) if vals else 1.0

    def add_task(self, projection: TaskProjection) -> None:
        """Store a projection made by :meth:`project` (replaces a task of the same id)."""
        validate_task_id(projection.task_id)
        missing = sorted(set(self.modules) - set(projection.coeffs))
        if missing:
            raise ValueError(f"projection {projection.task_id!r} lacks module '{missing[0]}'")
        self.tasks[projection.task_id] = projection
        self.saved_path = None

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
        validate_task_id(new_task_id)
        self._check_adapter(adapter, f"adapter {new_task_id!r}")
        before = self.fidelity()
        olds = {t: self.reconstruct(t, pad_to_vllm=False) for t in self.tasks if t != new_task_id}
        adapters = list(olds.values()) + [adapter]
        ids = list(olds) + [new_task_id]
        p = self.params
        new = SharedSubspace.from_adapters(
            adapters, ids, p["num_components"], p["variance_threshold"], p["adaptive_k"], p["max_error"], self.method,
            mean_error=p.get("mean_error"), refine=p["refine"], hybrid=p["hybrid"], dtype=self.dtype, sketch_rank=p["sketch_rank"],
            precision=p.get("precision", "fp16"), block_size=p.get("block_size", 64),
            progress=progress, cancel=cancel, _prior=self._absorb_prior(olds))
        for tid, old_w in olds.items():
            prev = self.tasks[tid]
            proj = new.tasks[tid]
            for m in proj.fidelity:
                drift = proj.fidelity[m] * (proj.norms[m] / prev.norms[m]) if prev.norms.get(m) else 0.0
                proj.fidelity[m] = prev.fidelity[m] + drift
                proj.norms[m] = prev.norms[m]
            proj.ranks, proj.template, proj.original_bytes = prev.ranks, prev.template, prev.original_bytes
            proj.input_bytes, proj.input_bytes_fp16 = prev.input_bytes, prev.input_bytes_fp16
            proj.error_is_bound = True
        self._refuse_breaks(f"absorbing {new_task_id!r}", before, new.fidelity(), allow_worse)
        self.modules, self.tasks = new.modules, new.tasks
        self.quantized, self.quantization = new.quantized, None
        self.saved_path = None

    def _absorb_prior(self, olds: dict[str, LoRAWeights]) -> dict[str, dict[str, tuple[float, float]]] | None:
        """Each stored task's ``(offset, scale)`` per module for a rebuild from reconstructions (``None``: no error target).

        offset: the task's stored error (at most ``max_error``; unknown: 0), less half the
        storage epsilon, so that a task at the target may still move by rounding;
        scale: ‖reconstruction‖/‖original‖, which turns an error relative to the
        reconstruction into one relative to the original.
        """
        if self._target() is None:
            return None
        mx = self.params.get("max_error")
        allow = float(torch.finfo(self.dtype).eps) / 2
        prior: dict[str, dict[str, tuple[float, float]]] = {}
        for tid, w in olds.items():
            prev = self.tasks[tid]
            pm: dict[str, tuple[float, float]] = {}
            for m in self.modules:
                e = prev.fidelity.get(m, math.nan)
                e = e if math.isfinite(e) else 0.0
                if mx is not None:
                    e = min(e, mx)
                norig = prev.norms.get(m, 0.0)
                sb, a = effective_factors(w, m)
                nrec = float(ops.lowrank_sqnorm(sb, a)) ** 0.5
                pm[m] = (max(0.0, e - allow), nrec / norig if norig > 0 else 1.0)
            prior[tid] = pm
        return prior

    def _refuse_breaks(self, what: str, before: dict[str, dict[str, float]], after: dict[str, dict[str, float]],
                       allow_worse: bool) -> list[RuleBreak]:
        """The places where ``after`` breaks the error target; ``ErrorTargetError`` unless ``allow_worse``."""
        rule = self.k_rule
        breaks = rule_breaks(rule, before, after, tolerance(self.dtype), self._norms())
        if breaks and not allow_worse:
            raise ErrorTargetError(breaks_message(what, rule, breaks, before, after)
                                   + "; nothing was changed (allow_worse=True / --allow-worse accepts it)")
        return breaks

    def target_breaks(self, before: dict[str, dict[str, float]],
                      after: dict[str, dict[str, float]] | None = None) -> list[RuleBreak]:
        """Where ``after`` (default: the current :meth:`fidelity`) breaks the k rule's error target that ``before`` met."""
        return rule_breaks(self.k_rule, before, self.fidelity() if after is None else after, tolerance(self.dtype),
                           self._norms())

    def _norms(self) -> dict[str, dict[str, float]]:
        """Task → module → ‖ΔW‖ of the original (the weights of a per-task ``mean_error``)."""
        return {t: dict(p.norms) for t, p in self.tasks.items()}

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
        validate_task_id(task_id)
        label = f"adapter {task_id!r}"
        self._check_adapter(adapter, label)
        tmpl = config_template(adapter, task_id)
        proj = TaskProjection(task_id, {}, ranks=adapter.ranks, template=tmpl,
                              original_bytes=sum(nbytes(adapter.lora_a[m]) + nbytes(adapter.lora_b[m]) for m in self.modules))
        _record_input(proj, adapter.source)
        pending: dict[str, dict[str, Tensor]] = {}  # module → its grown tensors, applied once the task is accepted
        mods = sorted(self.modules)
        for j, m in enumerate(mods):
            tick(progress, cancel, j, len(mods), f"absorbing {m}")
            b = self.modules[m]
            sb, a = effective_factors(adapter, m)
            proj.norms[m] = float(ops.lowrank_sqnorm(sb, a)) ** 0.5
            target = self._target()
            if target is None:
                target = max((t.fidelity.get(m, 0.0) for t in self.tasks.values() if t.task_id != task_id), default=0.0)
            if b.kind == "joint":
                u, v, c, e = extend_for_task(b.tensors["U"], b.tensors["V"], sb, a, adapter.module_rank(m), target, self.dtype)
                if u is not b.tensors["U"] or v is not b.tensors["V"]:
                    pending[m] = {"U": u, "V": v}
                proj.coeffs[m], proj.fidelity[m] = c, e
            elif b.kind == "pca":
                c, e = encode_pca(b, adapter.lora_a[m], adapter.lora_b[m], sb, tmpl, m, self.dtype)
                if e > target:
                    t = dict(b.tensors)
                    for side, x in (("a", adapter.lora_a[m]), ("b", adapter.lora_b[m])):
                        resid = x.double().reshape(1, -1) - t[f"mean_{side}"].double()
                        t[f"comp_{side}"] = ops.gram_schmidt(t[f"comp_{side}"].double(), resid).to(self.dtype)
                        t[f"sv_{side}"] = torch.cat([t[f"sv_{side}"], t[f"sv_{side}"].new_zeros(
                            t[f"comp_{side}"].shape[0] - t[f"sv_{side}"].shape[0])])
                    grown = ModuleBasis(b.kind, b.shape, t, rank=b.rank, explained=b.explained)
                    c, e = encode_pca(grown, adapter.lora_a[m], adapter.lora_b[m], sb, tmpl, m, self.dtype)
                    pending[m] = {f"comp_{side}": t[f"comp_{side}"] for side in ("a", "b")}
                    pending[m].update({f"sv_{side}": t[f"sv_{side}"] for side in ("a", "b")})
                proj.coeffs[m], proj.fidelity[m] = c, e
            else:
                proj.coeffs[m], proj.fidelity[m] = encode_separate(sb, a, target, None, self.dtype)
        before = self.fidelity()
        after = {**before, task_id: dict(proj.fidelity)}
        self._refuse_breaks(f"adding {task_id!r}", before, after, allow_worse)
        for m, grown_tensors in pending.items():
            self.modules[m].tensors.update(grown_tensors)
            for key in grown_tensors:
                self.quantized.pop((m, key), None)
        self.tasks[task_id] = proj
        self.saved_path = None
        return proj

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

    # -- training helpers ---------------------------------------------------------------
    def get_trainable_params(self, task_id: str, num_expand: int = 0) -> dict[str, Tensor]:
        """The task's coefficients as float32 leaf tensors with ``requires_grad`` (bases stay frozen).

        ``num_expand`` > 0 first appends that many random orthonormal directions to every
        shared basis (in place; other tasks are unaffected: their coefficients are zero there).
        Names: ``<module>.sigma`` (joint/share), ``<module>.loadings_a``/``loadings_b`` (pca),
        ``<module>.lora_B``/``lora_A`` (modules stored per task).
        """
        proj = self._task(task_id)
        if num_expand < 0:
            raise ValueError(f"num_expand must be >= 0, got {num_expand}")
        g = torch.Generator().manual_seed(len(self.tasks) * 7919 + num_expand)
        if num_expand:
            self.saved_path = None
            for m, b in self.modules.items():
                t = b.tensors
                if b.kind == "joint":
                    for key in ("U", "V"):
                        base = t[key].double().T
                        t[key] = ops.gram_schmidt(base, torch.randn(num_expand, base.shape[1], generator=g, dtype=torch.float64)).T.to(self.dtype)
                        self.quantized.pop((m, key), None)
                elif b.kind == "pca":
                    for side in ("a", "b"):
                        base = t[f"comp_{side}"].double()
                        t[f"comp_{side}"] = ops.gram_schmidt(base, torch.randn(num_expand, base.shape[1], generator=g, dtype=torch.float64)).to(self.dtype)
                        t[f"sv_{side}"] = torch.cat([t[f"sv_{side}"], t[f"sv_{side}"].new_zeros(t[f"comp_{side}"].shape[0] - t[f"sv_{side}"].shape[0])])
                        self.quantized.pop((m, f"comp_{side}"), None)
        params: dict[str, Tensor] = {}
        for m, b in self.modules.items():
            c = proj.coeffs[m]
            if b.kind == "joint":
                sig = c["c"].float() @ c["d"].float() if "c" in c else c["sigma"].float()
                full = torch.zeros(b.tensors["U"].shape[1], b.tensors["V"].shape[1])
                full[: sig.shape[0], : sig.shape[1]] = sig
                params[f"{m}.sigma"] = full.requires_grad_(True)
            elif b.kind == "pca":
                for side, key in (("a", "la"), ("b", "lb")):
                    k = b.tensors[f"comp_{side}"].shape[0]
                    full = torch.zeros(k)
                    full[: c[key].shape[0]] = c[key].float()
                    params[f"{m}.loadings_{side}"] = full.requires_grad_(True)
            else:
                params[f"{m}.lora_B"] = c["b"].float().clone().requires_grad_(True)
                params[f"{m}.lora_A"] = c["a"].float().clone().requires_grad_(True)
        return params

    def set_trainable_params(self, task_id: str, params: dict[str, Tensor]) -> None:
        """Write coefficients from :meth:`get_trainable_params` back into the task (errors become unknown: NaN)."""
        proj = self._task(task_id)
        names = {"sigma": ("sigma",), "loadings_a": ("la",), "loadings_b": ("lb",), "lora_B": ("b",), "lora_A": ("a",)}
        self.saved_path = None
        for key, value in params.items():
            m, _, part = key.rpartition(".")
            if m not in self.modules or part not in names:
                raise ValueError(f"unknown trainable parameter {key!r}")
            c = proj.coeffs[m]
            if part == "sigma":
                c.pop("c", None)
                c.pop("d", None)
            c[names[part][0]] = value.detach().to(self.dtype).clone()
            proj.fidelity[m] = float("nan")

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
        if max_error is not None or mean_error is not None:
            from .requantize import requantize

            self.last_quantize = requantize(self, max_error=max_error, mean_error=mean_error, adapters=adapters,
                                            block_size=block_size, progress=progress, cancel=cancel)
            return self
        if method == "nf4":
            bits = 4
        probe = torch.zeros(2)
        quantize_tensor(probe, bits=bits, method=method, block_size=block_size)  # validates the arguments
        originals: dict[str, LoRAWeights] = {}
        if adapters is not None:
            originals = dict(adapters) if isinstance(adapters, dict) else dict(zip(self.tasks, adapters))
        mods = sorted(self.modules)
        kw = dict(bits=bits, method=method, block_size=block_size, double_quant=double_quant)
        for j, m in enumerate(mods):
            tick(progress, cancel, j, len(mods), f"quantizing {m}")
            b = self.modules[m]
            old = ModuleBasis(b.kind, b.shape, dict(b.tensors), rank=b.rank, explained=b.explained)
            old_coeffs: dict[str, dict[str, Tensor]] = {}
            # pca: the components, as the seed (its means stay at storage precision: they carry the factors' scale)
            keys = {"joint": ("U", "V"), "pca": ("comp_a", "comp_b")}.get(b.kind, ())
            for key in keys:
                if b.tensors[key].numel():
                    qt = quantize_tensor(b.tensors[key], **kw)
                    self.quantized[(m, key)] = qt
                    b.tensors[key] = qt.dequantize(torch.float32)
            if quantize_loadings or b.kind == "separate":
                for tid, proj in self.tasks.items():
                    old_coeffs[tid] = dict(proj.coeffs[m])
                    for key, val in proj.coeffs[m].items():
                        if val.numel():
                            qt = quantize_tensor(val, **kw)
                            self.quantized[(tid, m, key)] = qt
                            proj.coeffs[m][key] = qt.dequantize(torch.float32)
            # each task's new error in this module, one task at a time (memory O(1) in N)
            for tid, proj in self.tasks.items():
                after = _module_factors(b, proj.coeffs[m], proj, m)
                orig = originals.get(tid)
                if orig is not None:
                    sb, a = effective_factors(orig, m)
                    proj.fidelity[m] = ops.lowrank_rel_error(sb, a, *after)
                    continue
                b0, a0 = _module_factors(old, old_coeffs.get(tid, proj.coeffs[m]), proj, m)
                n0 = float(ops.lowrank_sqnorm(b0, a0)) ** 0.5
                change = ops.lowrank_rel_error(b0, a0, *after) * n0
                norm = proj.norms.get(m, 0.0)
                proj.fidelity[m] = proj.fidelity[m] + (change / norm if norm > 0 else 0.0)
                proj.error_is_bound = True
        for tid, proj in self.tasks.items():
            if tid in originals:
                proj.error_is_bound = False
        self.quantization = {"bits": bits, "method": method, "double_quant": double_quant,
                             "quantize_loadings": quantize_loadings, "block_size": block_size}
        self.saved_path = None
        return self

    # -- accounting -------------------------------------------------------------------
    def _tensor_bytes(self) -> tuple[int, int]:
        """(bytes stored for bases and coefficients, float parameters they represent)."""
        total, params = 0, 0
        for m, b in self.modules.items():
            for key, t in b.tensors.items():
                if key.startswith("sv_"):
                    continue  # statistics, not needed to reconstruct
                qt = self.quantized.get((m, key))
                total += qt.nbytes if qt is not None else t.numel() * _elem(t, self.dtype)
                params += t.numel()
        for tid, proj in self.tasks.items():
            for m, c in proj.coeffs.items():
                for key, t in c.items():
                    qt = self.quantized.get((tid, m, key))
                    total += qt.nbytes if qt is not None else t.numel() * _elem(t, self.dtype)
                    params += t.numel()
        return total, params

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
        mods: dict[str, dict[str, Any]] = {}
        for m, b in sorted(self.modules.items()):
            if b.kind == "separate":
                rs = [int(p.coeffs[m]["b"].shape[1]) for p in self.tasks.values() if "b" in p.coeffs.get(m, {})]
                lo, hi = (min(rs), max(rs)) if rs else (0, 0)
                mods[m] = {"shared": False, "kind": b.kind, "k_u": 0, "k_v": 0, "rank": [lo, hi],
                           "form": f"per task, rank {lo}" if lo == hi else f"per task, rank {lo}–{hi}"}
                continue
            ku = int(b.tensors["U"].shape[1]) if b.kind == "joint" else b.k
            kv = int(b.tensors["V"].shape[1]) if b.kind == "joint" else b.k
            mods[m] = {"shared": True, "kind": b.kind, "k_u": ku, "k_v": kv, "rank": None,
                       "form": f"shared {ku}×{kv}" if b.kind == "joint" else f"shared k={b.k}"}
        total = len(mods)
        sep = sum(1 for v in mods.values() if not v["shared"])
        if total and sep == total:
            if self.method == "svd":
                summary = f"{sep} of {total} modules stored per task (method svd: each task alone, the baseline)"
            else:
                target = self._target_text()
                summary = (f"{sep} of {total} modules stored per task, nothing shared: these adapters share too little"
                           f"{' at ' + target if target else ''} to gain from a shared basis; a looser target "
                           "(--max-error, --mean-error) or quantize stores less")
        elif sep:
            summary = (f"{total - sep} of {total} modules shared, {sep} stored per task "
                       "(there a shared basis would be larger)")
        else:
            summary = f"{total} of {total} modules shared"
        return {"modules": mods, "shared": total - sep, "per_task": sep, "total": total, "summary": summary}

    def _components_per_layer(self) -> dict[str, tuple[int, int]]:
        out: dict[str, tuple[int, int]] = {}
        for m, b in sorted(self.modules.items()):
            if b.kind == "pca":
                out[m] = (int(b.tensors["comp_a"].shape[0]), int(b.tensors["comp_b"].shape[0]))
            elif b.kind == "joint":
                out[m] = (int(b.tensors["V"].shape[1]), int(b.tensors["U"].shape[1]))
            else:
                out[m] = (0, 0)  # stored per task: nothing shared
        return out

    def _target_text(self) -> str:
        """The build's error target in words (``a 5 % max ΔW error``), or ``""``."""
        parts = [f"{float(self.params[k]) * 100:g} % {w}" for k, w in (("max_error", "max"), ("mean_error", "mean"))
                 if self.params.get(k) is not None]
        return f"a {' and '.join(parts)} ΔW error" if parts else ""

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
        from .size import size_on_disk

        stored, stored_params = self._tensor_bytes()
        orig = sum(p.original_bytes for p in self.tasks.values())
        orig_params = sum(sum(p.ranks.get(m, 0) * (b.shape[0] + b.shape[1]) for m, b in self.modules.items())
                          for p in self.tasks.values())
        per_task = {t: {"mean": p.mean_error, "max": p.max_error} for t, p in self.tasks.items()}
        per_module: dict[str, dict[str, float]] = {}
        for m in sorted(self.modules):
            v = [p.fidelity[m] for p in self.tasks.values() if m in p.fidelity]
            per_module[m] = {"mean": float(sum(v) / len(v)) if v else 0.0, "max": float(max(v)) if v else 0.0}
        allv = [e for p in self.tasks.values() for e in p.fidelity.values()]
        return {
            "method": self.method,
            "num_tasks": len(self.tasks),
            "num_modules": len(self.modules),
            "num_layers": len(self.modules),
            "dtype": dtype_name(self.dtype),
            "quantization": self.quantization,
            "precision": self.params.get("precision", "fp16"),
            "k": self.k_per_module,
            # the seed's (k_a, k_b): basis rows of the A side (row space V) and the B side (column space U)
            "components_per_layer": self._components_per_layer(),
            "module_kinds": {m: b.kind for m, b in sorted(self.modules.items())},
            "original_bytes": int(orig),
            "stored_bytes": int(stored),
            "ratio": orig / stored if stored else 0.0,
            "compression_ratio": orig / stored if stored else 0.0,
            "ratio_vs_fp16": 2 * orig_params / stored if stored else 0.0,
            "original_params": int(orig_params),
            "stored_params": int(stored_params),
            "total_params_original": int(orig_params),
            "total_params_compressed": int(stored_params),
            "disk": size_on_disk(self.saved_path) if self.saved_path is not None and Path(self.saved_path).is_dir() else None,
            "storage": self.storage(),
            "error": {
                "mean": float(sum(allv) / len(allv)) if allv else 0.0,
                "max": float(max(allv)) if allv else 0.0,
                "per_task": per_task,
                "per_module": per_module,
                "is_bound": any(p.error_is_bound for p in self.tasks.values()),
            },
            "fidelity": self.fidelity(),
        }

    def full_stack_compression(self, base_model_params: int, base_model_bits: int = 16, quantized_bits: int = 4) -> dict[str, Any]:
        """Memory of base model + all adapters, before and after (base quantised to ``quantized_bits``, adapters as stored)."""
        if base_model_params < 0:
            raise ValueError(f"base_model_params must be >= 0, got {base_model_params}")
        stats = self.compression_stats()
        base_before = base_model_params * base_model_bits / 8
        base_after = base_model_params * quantized_bits / 8
        before = base_before + stats["original_bytes"]
        after = base_after + stats["stored_bytes"]
        return {
            "base_model_bytes": int(base_before), "base_model_quantized_bytes": int(base_after),
            "adapters_bytes": stats["original_bytes"], "subspace_bytes": stats["stored_bytes"],
            "total_before_bytes": int(before), "total_after_bytes": int(after),
            "ratio": before / after if after else 0.0, "adapter_ratio": stats["ratio"], "num_tasks": stats["num_tasks"],
        }

    def to(self, device: Any = None, dtype: Any = None) -> SharedSubspace:
        """Move bases and coefficients to ``device`` and/or cast them to ``dtype`` (then the storage precision). Returns ``self``."""
        dt = parse_dtype(dtype) if dtype is not None else None

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
        """A deep copy."""
        return copy.deepcopy(self)

    # -- persistence ------------------------------------------------------------------
    def save(self, path: str | Path, force: bool = False) -> Path:
        """Write the subspace folder (see :mod:`engine.subspace.storage`); quantised tensors are written as codes."""
        from .storage import save_subspace

        out = save_subspace(self, Path(path), force=force)
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
    def load(cls, path: str | Path) -> SharedSubspace:
        """Read a subspace folder (float or quantised; detected from the manifest), verifying checksums."""
        from .storage import load_subspace

        return load_subspace(Path(path))


def _record_input(proj: TaskProjection, source: Any) -> None:
    """Measure the input adapter's files on disk into ``proj`` (``None`` when it has none)."""
    from .size import adapter_input_bytes

    got = adapter_input_bytes(source)
    proj.input_bytes, proj.input_bytes_fp16 = got if got is not None else (None, None)


def _elem(t: Tensor, dtype: torch.dtype) -> int:
    return t.element_size() if not t.is_floating_point() else torch.empty(0, dtype=dtype).element_size()


def _module_factors(b: ModuleBasis, coeffs: dict[str, Tensor], proj: TaskProjection, m: str) -> tuple[Tensor, Tensor]:
    """One task's effective factors ``(B_eff, A)`` in module ``m`` (float64)."""
    if b.kind == "pca":
        return pca_factors(b, coeffs, proj.template, m)
    if b.kind == "separate":
        return coeffs["b"].double(), coeffs["a"].double()
    return joint_factors(b.tensors["U"], b.tensors["V"], coeffs, proj.ranks.get(m, b.k))


def _return_freed_memory() -> None:
    """glibc: serve every allocation of 1 MiB or more by mmap, so that freed sketches and buffers go back to the OS.

    glibc raises its mmap threshold (up to 32 MiB) each time a large block is freed,
    after which the build's buffers come from the heap, which fragments and keeps
    them: on N=100 7B-shaped adapters the peak RSS was 1.1–1.7 GB with the default,
    0.76 GB with a fixed 1 MiB threshold in the same time (0.62 GB at 128 KiB, but
    45 % slower: the per-adapter temporaries then page-fault on every read).
    Process-wide, set once, as ``MALLOC_MMAP_THRESHOLD_=1048576`` would.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to do
        pass


class _CheckedSource(AdapterSource):
    """Wraps a source: checks modules, shapes and finiteness of each adapter as it is read (first pass only).

    ``check=False``: these modules were checked already (by an earlier round over the same chunk).
    """

    def __init__(self, inner: AdapterSource, shapes: dict[str, tuple[int, int]], check: bool = True) -> None:
        super().__init__(inner.task_ids, inner.adapters, inner.paths, inner.modules)
        self.inner = inner
        self.shapes_ = shapes
        self.checked = not check

    def __iter__(self):  # type: ignore[override]
        for i, t, a in self.inner:
            if not self.checked:
                check_shapes(a, self.inner.label(i), self.shapes_, None)
                try:
                    check_finite(a, self.inner.label(i))
                except ValueError as exc:
                    if self.inner.paths is None:
                        raise
                    raise AdapterFormatError(str(exc)) from exc  # a file holding NaN/Inf: as load_adapter says it
            yield i, t, a
        self.checked = True
