"""The ``compress`` job kind: build a shared subspace from adapters and save it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...progress import CancelLike, ProgressFn, StagedProgress, tick
from ...registry import Param
from ..base import JobKind, JobOutput
from ..params import ADAPTERS, EXCLUDE, FORCE, default_compress_method, method_choices, method_kwargs, method_params, output_param
from ..reports import ModuleRow, SubspaceStats, module_rows, ratio_words
from ..results import Result


@dataclass(frozen=True)
class CompressResult(Result):
    """``compress``: the subspace written, its stats (fidelity included) and its modules."""

    path: str = ""
    tasks: list[str] = field(default_factory=list)
    method: str | None = None
    streaming: bool = False
    stats: SubspaceStats = field(default_factory=SubspaceStats)
    modules: list[ModuleRow] = field(default_factory=list)


@dataclass(frozen=True)
class GroupedCompressResult(Result):
    """``compress --group-by compat``: one subspace per compatible set, ``OUTPUT/<set name>``.

    ``sets``: per set its :meth:`CompatSet.to_dict` plus ``path``, ``tasks`` and ``stats`` (compression_stats()).
    """

    path: str = ""
    grouped: bool = True
    layout: str = "OUTPUT/<set name>"
    method: str | None = None
    streaming: bool = False
    tasks: list[str] = field(default_factory=list)
    sets: list[dict[str, Any]] = field(default_factory=list)


class Compressed:
    """The ``compress`` kind's result: :class:`CompressResult`, or :class:`GroupedCompressResult` (``grouped``)."""

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> CompressResult | GroupedCompressResult:
        return (GroupedCompressResult if d.get("grouped") else CompressResult).from_dict(d)


_COMPRESS_FIXED = ("adapters", "output", "method", "task_ids", "force", "exclude", "group_by", "engine", "scheduler")


def build_params(params: dict[str, Any]) -> tuple[Any, bool]:
    """The job's :class:`~engine.methods.build_params.BuildParams` (with the job's default k rule,
    :meth:`BuildParams.for_job`) and whether it streams; ``ValueError`` naming a bad parameter. Torch-free."""
    from ...methods.build_params import BuildParams

    kwargs = method_kwargs("compress", params["method"], params, _COMPRESS_FIXED)
    streaming = bool(kwargs.pop("streaming", False))
    return BuildParams.for_job(params["method"], **kwargs), streaming


def _check(params: dict[str, Any]) -> None:
    build_params(params)


def run_compress(params: dict[str, Any], *, progress: ProgressFn | None = None, cancel: CancelLike | None = None) -> JobOutput:
    """Build a shared subspace from adapters with a registered method and save it (temp folder, then rename).

    The method's own parameters (``num_components``, ``variance_threshold``, ``max_error``,
    ``adaptive_k``, ``dtype``, ``streaming``, ``refine``, ``hybrid``…) make one
    :class:`~engine.methods.build_params.BuildParams` (:func:`build_params`: no k rule given,
    ``max_error`` 0.05 and ``precision`` auto); one the method does not take is refused.

    data: ``{"path", "tasks": [task id…], "method", "streaming": bool,
    "stats": SharedSubspace.compression_stats(), "modules": [as in ``info``]}`` — ``stats`` holds
    ``disk`` (the ratio printed: the inputs' files on disk / every file of the saved folder,
    :func:`engine.subspace.size.size_on_disk`), ``storage`` (shared or per task, per module, and
    its ``summary`` line), ``original_bytes``, ``stored_bytes``, ``ratio``, ``ratio_vs_fp16``
    (tensors in memory, seed-compatible), ``k`` {module: k}, ``module_kinds``,
    ``dtype``, ``quantization``, ``error`` {``mean``, ``max``, ``per_task`` {task: {mean, max}},
    ``per_module`` {module: {mean, max}}, ``is_bound``} and ``fidelity`` {task: {module: error}}
    (errors are relative ‖ΔW−ΔŴ‖/‖ΔW‖, measured after rounding to the storage dtype).
    """
    from ...subspace import SharedSubspace
    from ..common import load_adapters, resolve_local_paths

    if params["task_ids"] is not None:
        from ...io.scan import validate_task_id

        for t in params["task_ids"]:
            validate_task_id(t)
    from ...errors import IncompatibleAdaptersError
    from ...io.local import describe_sets, partition_compatible

    bp, streaming = build_params(params)
    engine_kw = _engine_kwargs(params)
    if engine_kw.get("executor") == "dask":
        streaming = True  # workers read their shard's tensors from the paths
    grouped = params.get("group_by") == "compat"
    stages = StagedProgress(progress, {"load": 1, "build": 4, "save": 1})
    inputs: list[Any]
    exclude = params.get("exclude")
    if streaming:
        pairs = resolve_local_paths(params["adapters"], progress=stages.stage("load"), cancel=cancel, exclude=exclude)
        names, inputs = [n for n, _ in pairs], [p for _, p in pairs]
    else:
        inputs = load_adapters(params["adapters"], progress=stages.stage("load"), cancel=cancel, exclude=exclude)
        names = [a.name for a in inputs]
    ids = params["task_ids"] or names
    _check_ids(ids, len(inputs))
    sets = partition_compatible(inputs, names=ids)  # headers only when streaming
    if grouped:
        return _compress_groups(params, bp, inputs, ids, sets, stages, streaming, cancel, engine_kw)
    if len(sets) > 1:
        raise IncompatibleAdaptersError(
            f"adapters: one subspace needs adapters with the same target modules and shapes, these form {describe_sets(sets)}. "
            "Compress one set with --exclude PATTERN, or each set into its own subspace with --group-by compat"
        )
    # the folder is written as the build goes (each chunk of modules when done): it holds one chunk's result
    sub = SharedSubspace.from_params(inputs, bp, ids, streaming=streaming, progress=stages.stage("build"), cancel=cancel,
                                     output=params["output"], force=params["force"], **engine_kw)
    out = sub.saved_path
    tick(stages.stage("save"), None, 1, 1, f"written {out}")
    stages.done()
    stats = sub.compression_stats()
    err = stats["error"]
    modules = module_rows(sub, stats["storage"], stats["fidelity"], sub.explained_variance())
    result = CompressResult(path=str(out), tasks=sub.task_ids, method=sub.method, streaming=streaming,
                            stats=SubspaceStats.from_dict(stats), modules=modules)
    return JobOutput(
        summary=(f"compressed {len(sub.tasks)} adapters into {out} ({stats['method']}): {ratio_words(stats['disk'])}, "
                 f"ΔW error mean {err['mean']:.3g} max {err['max']:.3g}; {stats['storage']['summary']}"),
        outputs=[str(out)],
        data=result.to_dict(),
    )


def _compress_groups(params: dict[str, Any], bp: Any, inputs: list[Any], ids: list[str],
                     sets: list[Any], stages: StagedProgress, streaming: bool, cancel: CancelLike | None,
                     engine_kw: dict[str, Any]) -> JobOutput:
    """``compress --group-by compat``: one subspace per compatible set, written as ``OUTPUT/<set name>``."""
    from ...io.local import atomic_dir
    from ...subspace import SharedSubspace

    out = Path(params["output"])
    build = stages.stage("build")
    written: list[dict[str, Any]] = []
    with atomic_dir(out, force=params["force"]) as tmp:  # every subspace appears at once, or none
        for si, cs in enumerate(sets):
            tick(build, cancel, si, len(sets), f"set {cs.name}: {len(cs.members)} adapter(s)")
            sub = SharedSubspace.from_params([inputs[i] for i in cs.indices], bp, [ids[i] for i in cs.indices],
                                             streaming=streaming, cancel=cancel, output=tmp / cs.name, **engine_kw)
            stats = sub.compression_stats()
            written.append({**cs.to_dict(), "path": str(out / cs.name), "tasks": sub.task_ids, "stats": stats})
        tick(build, cancel, len(sets), len(sets), "saving")
        tick(stages.stage("save"), cancel, 0, 1, f"writing {out}")
    stages.done()
    worst = max((w["stats"]["error"]["max"] for w in written), default=0.0)
    return JobOutput(
        summary=(f"compressed {len(inputs)} adapters into {len(written)} subspace(s) under {out} "
                 f"({', '.join(w['name'] for w in written)}), ΔW error max {worst:.3g}"),
        outputs=[w["path"] for w in written],
        data=GroupedCompressResult(path=str(out), method=bp.method, streaming=streaming,
                                   tasks=[t for w in written for t in w["tasks"]], sets=written).to_dict(),
    )


def _engine_kwargs(params: dict[str, Any]) -> dict[str, Any]:
    """``executor``/``scheduler`` for the build from the job's ``engine``/``scheduler`` (nothing for the default)."""
    engine, scheduler = params.get("engine") or "inprocess", params.get("scheduler") or None
    if scheduler and engine != "dask":
        raise ValueError(f"scheduler: {scheduler!r} needs engine dask (--engine dask)")
    if scheduler and not scheduler.startswith(("tcp://", "tls://", "inproc://", "ucx://")):
        raise ValueError(f"scheduler: {scheduler!r} is not a scheduler address; use tcp://HOST:PORT")
    if engine == "inprocess":
        return {}
    from ...executors import _import_distributed

    _import_distributed()  # the install hint before any adapter is read
    return {"executor": engine, "scheduler": scheduler}


def _check_ids(ids: list[str], n: int) -> None:
    if len(ids) != n:
        raise ValueError(f"task_ids: got {len(ids)} id(s) for {n} adapter(s)")
    dup = sorted({t for t in ids if ids.count(t) > 1})
    if dup:
        raise ValueError(f"task_ids: duplicate id {dup[0]!r}")


KIND = JobKind(
    "compress", "Compress adapters", "build a shared subspace from adapters and save it",
    (
        ADAPTERS,
        output_param("folder to write the subspace into"),
        Param("method", "choice", default_compress_method(), "compression method", method_choices("compress")),
        *method_params("compress", _COMPRESS_FIXED),
        Param("task_ids", "strs", None, "one task id per adapter (default: folder or repo names)"),
        EXCLUDE,
        Param("engine", "choice", "inprocess", "where the build runs: inprocess, or dask (a LocalCluster of the "
              "CPU cores, or --scheduler's cluster; workers read the adapters from their paths; "
              "pip install 'vlora-tui[dask]')", ("inprocess", "dask")),
        Param("scheduler", "str", None, "with engine dask: a running Dask scheduler's address tcp://HOST:PORT "
              "(default: start a LocalCluster)"),
        Param("group_by", "choice", "none", "compat: one subspace per set of adapters with the same target "
              "modules and shapes, written as OUTPUT/<set name>; none: refuse adapters that differ", ("none", "compat")),
        FORCE,
    ),
    writes=("output",), func=run_compress, check=_check,
    positionals=("adapters",), process=True, min_adapters=2, form_rank=0, view="subspace_written",
    result=Compressed,
)
