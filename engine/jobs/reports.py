"""What the subspace jobs (``info``, ``compress``, ``add``, ``export``) report on a subspace, shared:
the figures and their typed tables (:class:`SubspaceStats`, :class:`ModuleRow`, …). Torch-free at import."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..progress import CancelLike, ProgressFn, tick
from .results import Result, optional


@dataclass(frozen=True)
class DiskFigures(Result):
    """The one ratio on disk (:func:`engine.subspace.size.size_on_disk`)."""

    bytes: int = 0
    input_bytes: int | None = None
    input_bytes_fp16: int | None = None
    inputs_fp32: bool = False
    ratio: float | None = None
    ratio_vs_fp16: float | None = None
    note: str | None = None
    text: str = "n/a"


@dataclass(frozen=True)
class Storage(Result):
    """How the modules are stored: shared or per task (:func:`engine.subspace.accounting.storage`)."""

    modules: dict[str, dict[str, Any]] = field(default_factory=dict)
    shared: int = 0
    per_task: int = 0
    total: int = 0
    summary: str = ""


@dataclass(frozen=True)
class ErrorSummary(Result):
    """Relative ΔW errors over every task and module, per task and per module."""

    mean: float = 0.0
    max: float = 0.0
    per_task: dict[str, dict[str, float]] = field(default_factory=dict)
    per_module: dict[str, dict[str, float]] = field(default_factory=dict)
    is_bound: bool = False


@dataclass(frozen=True)
class SubspaceStats(Result):
    """``SharedSubspace.compression_stats()`` (``fidelity`` left out where the result holds it beside)."""

    method: str | None = None
    num_tasks: int | None = None
    num_modules: int | None = None
    num_layers: int | None = None
    dtype: str | None = None
    quantization: dict[str, Any] | None = None
    precision: str | None = None
    k: dict[str, int] = field(default_factory=dict)
    components_per_layer: Any = None
    module_kinds: dict[str, str] = field(default_factory=dict)
    original_bytes: int = 0
    stored_bytes: int = 0
    ratio: float = 0.0
    compression_ratio: float = 0.0
    ratio_vs_fp16: float = 0.0
    original_params: int = 0
    stored_params: int = 0
    total_params_original: int = 0
    total_params_compressed: int = 0
    disk: DiskFigures | None = None
    storage: Storage = field(default_factory=Storage)
    error: ErrorSummary = field(default_factory=ErrorSummary)
    fidelity: dict[str, dict[str, float]] | None = optional()


@dataclass(frozen=True)
class ModuleRow(Result):
    """One module of a subspace: how it is stored (shared k_u×k_v or per task at a rank), bits, shape, errors."""

    name: str = ""
    kind: str | None = None
    k: int | None = None
    k_u: int | None = None
    k_v: int | None = None
    shared: bool = True
    stored: str = ""
    rank: Any = None
    bits: dict[str, list[int]] | None = None
    bytes: int | None = None
    out_features: int | None = None
    in_features: int | None = None
    explained_at_k: float | None = None
    mean_error: float | None = None
    max_error: float | None = None


@dataclass(frozen=True)
class TaskRow(Result):
    """One task of a saved subspace (``info``)."""

    task_id: str = ""
    mean_error: float | None = None
    max_error: float | None = None
    error_is_bound: bool = False
    rank: int | None = None
    original_bytes: int | None = None
    input_bytes: int | None = None


@dataclass(frozen=True)
class TaskReport(Result):
    """One task's errors after a job wrote it (``add``, ``export``, ``train``)."""

    task_id: str = ""
    mean_error: float = 0.0
    max_error: float = 0.0
    error_is_bound: bool = False
    fidelity: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ErrorPair(Result):
    """Mean and max relative ΔW error of a set of tasks."""

    mean: float | None = None
    max: float | None = None


@dataclass(frozen=True)
class TaskChange(Result):
    """One task's error before → after a job changed the subspace (:func:`engine.subspace.rule.change_report`)."""

    task_id: str = ""
    before: ErrorPair | None = None
    after: ErrorPair = field(default_factory=ErrorPair)
    error_is_bound: bool = False
    breaks_target: bool = False


@dataclass(frozen=True)
class SubspaceInfo(Result):
    """What ``info`` reports on a saved subspace (see :func:`engine.jobs.kinds.info.run_info`)."""

    type: str = "subspace"
    path: str = ""
    format_version: Any = None
    method: str | None = None
    dtype: str | None = None
    base_model: str | None = None
    quantization: dict[str, Any] | None = None
    stats: SubspaceStats = field(default_factory=SubspaceStats)
    tasks: list[TaskRow] = field(default_factory=list)
    modules: list[ModuleRow] = field(default_factory=list)
    fidelity: dict[str, dict[str, float]] = field(default_factory=dict)
    variance: dict[str, list[float]] = field(default_factory=dict)


def ratio_words(disk: dict[str, Any] | None) -> str:
    """The one ratio (:func:`engine.subspace.size.size_on_disk`) as job summaries print it."""
    if not disk:
        return "ratio n/a"
    return f"{disk['text']} on disk ({disk['bytes']} bytes" + (
        f" from {disk['input_bytes']})" if disk.get("input_bytes") is not None else "; the inputs' size is not recorded)")


def subspace_info(path: Path, *, progress: ProgressFn | None = None, cancel: CancelLike | None = None) -> SubspaceInfo:
    """What ``info`` reports on a saved subspace (see :func:`run_info`)."""
    import json

    from ..constants import SUBSPACE_MANIFEST_NAME
    from ..subspace import SharedSubspace

    tick(progress, cancel, 0, 2, f"loading {path}")
    sub = SharedSubspace.load(path, lazy=True)  # every checksum verified; the tasks' tensors not held
    tick(progress, cancel, 1, 2, "measuring")
    stats = sub.compression_stats()
    fidelity = stats.pop("fidelity")
    try:
        manifest = json.loads((Path(path) / SUBSPACE_MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = {}
    tasks = [TaskRow(task_id=tid, mean_error=proj.mean_error, max_error=proj.max_error,
                     error_is_bound=proj.error_is_bound, rank=max(proj.ranks.values(), default=0),
                     original_bytes=proj.original_bytes, input_bytes=proj.input_bytes)
             for tid, proj in sub.tasks.items()]
    variance = sub.explained_variance()
    modules = module_rows(sub, stats["storage"], fidelity, variance)
    tick(progress, cancel, 2, 2, "done")
    return SubspaceInfo(
        path=str(path), format_version=manifest.get("format_version", manifest.get("version")), method=sub.method,
        dtype=stats["dtype"], base_model=sub.base_model, quantization=sub.quantization,
        stats=SubspaceStats.from_dict(stats), tasks=tasks, modules=modules, fidelity=fidelity, variance=variance,
    )


def module_rows(sub: Any, storage: dict[str, Any], fidelity: dict[str, dict[str, float]],
                 variance: dict[str, list[float]]) -> list[ModuleRow]:
    """Per module: how it is stored (shared k_u×k_v, or per task at a rank), bits and bytes, shape, variance and errors."""
    from ..subspace.precision import module_breakdown

    sizes = module_breakdown(sub)
    modules = []
    for m in sub.layer_names:
        b = sub.modules[m]
        how = storage["modules"][m]
        errs = [f[m] for f in fidelity.values() if m in f]
        modules.append(ModuleRow.from_dict({
            "name": m,
            "kind": b.kind,
            "k": b.k,
            "k_u": how["k_u"] if how["shared"] else 0,
            "k_v": how["k_v"] if how["shared"] else 0,
            "shared": how["shared"],
            "stored": how["form"],
            "rank": how["rank"],
            "bits": sizes[m]["bits"],
            "bytes": sizes[m]["bytes"],
            "out_features": b.shape[0],
            "in_features": b.shape[1],
            "explained_at_k": (variance[m][b.k - 1] if b.k and len(variance[m]) >= b.k else None),
            "mean_error": sum(errs) / len(errs) if errs else 0.0,
            "max_error": max(errs) if errs else 0.0,
        }))
    return modules


def task_report(sub: Any, task_id: str) -> TaskReport:
    proj = sub.tasks[task_id]
    return TaskReport(task_id=task_id, mean_error=proj.mean_error, max_error=proj.max_error,
                      error_is_bound=proj.error_is_bound, fidelity=dict(proj.fidelity))
