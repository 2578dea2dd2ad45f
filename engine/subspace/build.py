"""Building a :class:`~engine.subspace.core.SharedSubspace` from adapters, in memory or streamed from their folders.

One path for both: check the :class:`~engine.methods.build_params.BuildParams` (done
when they are made), check the adapters' compatibility (:func:`engine.io.local.check_compatible`,
from tensors or from headers), let the registered method refuse what it cannot build
from, then the method builds (``CompressMethod.build``) and the result is assembled
here. The class is passed in (``cls``), so this module does not import the class's.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

from ..errors import AdapterFormatError
from ..io.scan import validate_task_id
from ..memory import return_freed_memory
from ..methods.build_params import BuildParams
from ..progress import CancelLike, ProgressFn
from ..types import LoRAWeights
from .chunks import DEFAULT_MEMORY_BUDGET_MB
from .common import AdapterSource, TaskProjection, check_finite, check_shapes, parse_dtype
from .manifest import task_file

Prior = dict[str, dict[str, tuple[float, float]]]


def from_params(cls: Any, inputs: Sequence[Any], params: BuildParams, task_ids: Sequence[str] | None = None, *,
                streaming: bool = False, memory_budget_mb: float | None = DEFAULT_MEMORY_BUDGET_MB,
                prior: Prior | None = None, progress: ProgressFn | None = None, cancel: CancelLike | None = None,
                executor: Any = "inprocess", scheduler: str | None = None, n_workers: int | None = None,
                output: str | Path | None = None, force: bool = False) -> Any:
    """A ``cls`` built from ``inputs``: ``LoRAWeights`` in memory, or adapter paths with ``streaming``.

    Args:
        cls: The subspace class (``cls(method, modules, tasks, params, dtype)``).
        inputs: The adapters, or their folders (``streaming``: read one at a time, per pass and chunk of modules).
        params: The checked build parameters.
        task_ids: One id per adapter; default: the adapters' names (folder names), else ``task_<i>``.
        memory_budget_mb: Bound on one chunk's statistics (``None``: one chunk); the result does not depend on it.
        prior: See ``JointParams.prior`` (``absorb`` only; in memory).
        executor, scheduler, n_workers: Where the passes run (see ``SharedSubspace.from_adapters``).
        output: Write the subspace folder there as it is built (each chunk's coefficients as soon as
            it is done, :class:`~engine.subspace.writer.FolderWriter`) and return it as loaded with
            ``lazy=True``: the build holds one chunk's result, whatever the number of adapters.
            Refused before anything is read if it exists, unless ``force``.

    Raises:
        ValueError: bad arguments, NaN/Inf, k too large, invalid task ids.
        IncompatibleAdaptersError: different modules/shapes/base models (or ranks for pca).
    """
    from ..io.local import check_compatible
    from ..registry import get_method

    what = "from_adapters_streaming" if streaming else "from_adapters"
    if not inputs:
        raise ValueError(f"{what}: no adapter{' paths' if streaming else 's'} given")
    if memory_budget_mb is not None and not memory_budget_mb > 0:
        raise ValueError(f"memory_budget_mb: must be > 0 (or None for no limit), got {memory_budget_mb}")
    method = get_method("compress", str(params.method))
    if streaming:
        return_freed_memory()
        paths = [Path(p) for p in inputs]
        ids = task_ids_for(len(paths), task_ids, [p.name for p in paths])
        report = check_compatible(paths)  # headers and configs only: cheap, every problem before any tensor
        source = AdapterSource(ids, paths=paths)
    else:
        adapters: list[LoRAWeights] = list(inputs)
        ids = task_ids_for(len(adapters), task_ids, [a.name for a in adapters])
        report = check_compatible(adapters)
        for i, a in enumerate(adapters):
            check_finite(a, f"adapter {ids[i]!r}")
        source = AdapterSource(ids, adapters=adapters)
    method.check(report)
    if output is None:
        return _assemble(cls, method.name, params, source, *method.build(
            params, source, report.shapes, ranks=report.ranks, memory_budget_mb=memory_budget_mb, checked=CheckedSource,
            prior=prior, progress=progress, cancel=cancel, executor=executor, scheduler=scheduler, n_workers=n_workers))
    from .writer import FolderWriter

    for t in ids:
        task_file(t)
    writer = FolderWriter(Path(output), force=force, spill=True)
    try:
        sink = partial(writer.add, dtype=parse_dtype(params.dtype))
        sub = _assemble(cls, method.name, params, source, *method.build(
            params, source, report.shapes, ranks=report.ranks, memory_budget_mb=memory_budget_mb, checked=CheckedSource,
            prior=prior, progress=progress, cancel=cancel, executor=executor, scheduler=scheduler, n_workers=n_workers,
            sink=sink))
        writer.finish(sub)
    except BaseException as exc:
        writer.abort(exc)
        raise
    del sub
    from .storage import load_subspace

    return load_subspace(Path(output), cls, lazy=True, verify=False)  # just written: each task checked when read


def _assemble(cls: Any, method: str, params: BuildParams, source: AdapterSource, bases: dict[str, Any],
              tasks: dict[str, TaskProjection], quantized: dict[Any, Any]) -> Any:
    """The subspace of a build's result, each task's input files measured."""
    srcs: list[Any] = list(source.paths) if source.paths is not None else [a.source for a in source.adapters or []]
    for tid, src in zip(source.task_ids, srcs):
        if tid in tasks:
            record_input(tasks[tid], src)
    sub = cls(method, bases, tasks, params.manifest(), parse_dtype(params.dtype))
    sub.quantized.update(quantized)
    return sub


def task_ids_for(n: int, task_ids: Sequence[str] | None, names: Sequence[str | None]) -> list[str]:
    """``task_ids`` checked (``n`` of them, valid, distinct), or ids from ``names`` (else ``task_<i>``)."""
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


def record_input(proj: TaskProjection, source: Any) -> None:
    """Measure the input adapter's files on disk into ``proj`` (``None`` when it has none)."""
    from .size import adapter_input_bytes

    got = adapter_input_bytes(source)
    proj.input_bytes, proj.input_bytes_fp16 = got if got is not None else (None, None)


class CheckedSource(AdapterSource):
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
