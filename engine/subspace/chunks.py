"""Builds in chunks of modules, so that the statistics held at once stay under a memory budget.

Every module's basis and coefficients depend on that module's factors alone, so
building chunks of modules one after the other and merging the results gives the
build over all modules at once, while only one chunk's statistics (the joint
sketches, the pca components) are held and each pass reads only that chunk's
tensors. The one coupling between modules, "one k for all modules" (joint/share
with k chosen by variance), is resolved by a first round over the chunks that
finds each module's own k.

A chunk holds its statistics and its result (every task's coefficients of its modules)
until the result is merged or, with an output folder, written. Chunks are planned with
each module's result at its bound (every task's own factors at fp16,
:func:`result_bytes`); once a chunk is built, what a module's result really holds is
known, and later chunks take as many modules as fit with that (a collection whose
modules are shared holds a few k×k cores per task; one stored per task, the factors).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ..memory import trim
from ..progress import Progress
from ..progress import counted as _Steps  # the one progress combinator (engine/progress.py)
from .common import AdapterSource, ModuleBasis, TaskProjection
from .joint import (
    BUFFER_COLUMNS,
    JointParams,
    build_joint,
    joint_module_k,
    joint_steps,
    one_k_for_all,
    sketch_widths,
)
from .passes import Reader
from .pca import PCAParams, build_pca, pca_steps

#: Default ``memory_budget_mb`` of the builds: the statistics of one chunk of modules stay under it.
DEFAULT_MEMORY_BUDGET_MB = 512.0

Built = tuple[dict[str, ModuleBasis], dict[str, TaskProjection]]


def module_stat_bytes(method: str, shape: tuple[int, int], ranks: Sequence[int], sketch_rank: int) -> int:
    """Estimated bytes a build holds for one module over adapters of these ``ranks`` (float64 statistics).

    joint/share: the larger of pass 1 (per side the range sketch and its Gaussian
    test matrix, ``dim × width``) and pass 2 (the orthonormal spaces, every task's
    projections onto them, K×r and r×K, and its r×r Gram matrices), each with the
    buffer of factors multiplied at once, plus the per-task coefficients at fp16. pca: per side, the components (one row per
    adapter) and the mean, flattened. svd: one adapter's factors.
    """
    o, i = shape
    n, r_sum, r_max = len(ranks), int(sum(ranks)), int(max(ranks, default=0))
    if method == "pca":
        return 8 * r_max * (o + i) * (n + 1)
    if method == "svd":
        return 8 * r_max * (o + i)
    wu, wv = sketch_widths(shape, r_sum, sketch_rank)
    buffered = 8 * 2 * (o + i) * min(BUFFER_COLUMNS + r_max, r_sum)  # the adapters' factors held for one product, and their concatenation
    first = 8 * 2 * (o * wu + i * wv) + buffered
    second = 8 * (o * wu + i * wv) + 8 * 2 * n * (wu * r_max + r_max * wv + 2 * r_max * r_max) + buffered
    k = min(wu, wv)
    return max(first, second) + 2 * n * min(k * k, 2 * k * r_max)


def bounded_stat_bytes(shape: tuple[int, int], ranks: Sequence[int], sketch_rank: int) -> int:
    """Bytes a joint/share build holds for one module with the bounded statistics of :mod:`.bounded` (float64).

    The largest of pass 1 (as in :func:`module_stat_bytes`) and the later passes: the
    orthonormal spaces, the Ritz bases and rotations, two K×K sums or two error tables,
    one task's cumulative r×r Gram matrices per k, the buffer of factors, and three
    scalars per task (‖ΔW‖², prior). Independent of the number of adapters but for those
    scalars. (The coefficients, the build's result, are not statistics and not counted.)
    """
    o, i = shape
    n, r_sum, r_max = len(ranks), int(sum(ranks)), int(max(ranks, default=0))
    wu, wv = sketch_widths(shape, r_sum, sketch_rank)
    buffered = 8 * 2 * (o + i) * min(BUFFER_COLUMNS + r_max, r_sum)
    first = 8 * 2 * (o * wu + i * wv) + buffered
    later = (8 * 2 * (o * wu + i * wv) + 8 * 2 * (wu * wu + wv * wv) + 8 * 2 * wu * wv
             + 8 * 2 * max(wu, wv) * r_max * r_max + buffered)
    return max(first, later) + 8 * 3 * n


def result_bytes(method: str, shape: tuple[int, int], ranks: Sequence[int]) -> int:
    """Bound on the bytes of one module's coefficients over adapters of these ``ranks``: what a chunk holds as its result.

    joint/share/svd: at most every task's own factors at fp16 (a module stored per task keeps
    a rank ≤ the adapter's; a shared one, a k×k core, usually far less). pca: 0 (its loadings
    are a few numbers per task). Until a chunk's records are merged (or written, with an output
    folder) they are held once in this process and, on Dask, copied between workers and to the driver.
    """
    if method == "pca":
        return 0
    o, i = shape
    return 2 * int(sum(ranks)) * (o + i)


def plan_chunks(sizes: dict[str, int], budget_bytes: float | None, apart: set[str] | None = None) -> list[list[str]]:
    """Consecutive runs of the sorted modules whose summed ``sizes`` stay within ``budget_bytes``.

    A module larger than the budget gets a chunk of its own; ``None`` puts all in one.
    A chunk holds modules all in ``apart`` or all outside it (built with bounded statistics or not).
    """
    mods = sorted(sizes)
    if budget_bytes is None or not mods:
        return [mods]
    apart = apart or set()
    chunks: list[list[str]] = []
    cur: list[str] = []
    used = 0
    for m in mods:
        if cur and (used + sizes[m] > budget_bytes or (m in apart) != (cur[0] in apart)):
            chunks.append(cur)
            cur, used = [], 0
        cur.append(m)
        used += sizes[m]
    chunks.append(cur)
    return chunks


def merge_parts(parts: list[Built]) -> Built:
    """One build from the builds of disjoint module chunks (the tasks in the same order in each)."""
    if len(parts) == 1:
        return parts[0]
    bases: dict[str, ModuleBasis] = {}
    tasks: dict[str, TaskProjection] = {}
    for part_bases, part_tasks in parts:
        bases.update(part_bases)
        for tid, pr in part_tasks.items():
            t = tasks.get(tid)
            if t is None:  # the first chunk's record carries the template (the same config in every chunk)
                tasks[tid] = pr
                continue
            t.coeffs.update(pr.coeffs)
            t.fidelity.update(pr.fidelity)
            t.norms.update(pr.norms)
            t.ranks.update(pr.ranks)
            t.original_bytes += pr.original_bytes  # summed over the chunk's modules only
            t.error_is_bound = t.error_is_bound or pr.error_is_bound
    return bases, tasks


def build_in_chunks(source: AdapterSource, shapes: dict[str, tuple[int, int]], method: str,
                    params: JointParams | PCAParams, *, ranks: dict[str, Sequence[int]], memory_budget_mb: float | None,
                    checked: Callable[[AdapterSource, dict[str, tuple[int, int]], bool], AdapterSource],
                    progress: Any = None, cancel: Any = None, executor: Any = None, scheduler: str | None = None,
                    n_workers: int | None = None, sink: Callable[[dict[str, TaskProjection], list[str], dict], None] | None = None) -> Built:
    """Run the build of ``method`` over chunks of modules under ``memory_budget_mb`` and merge the results.

    Args:
        source: All adapters, all modules.
        shapes: Module → (out, in).
        method: ``joint``, ``share``, ``pca`` or ``svd``; ``params`` its parameters.
        ranks: Module → the adapters' ranks there (for the estimate of :func:`module_stat_bytes`).
        memory_budget_mb: Bound on one chunk's estimated statistics; ``None``: one chunk.
        checked: ``(source, shapes, check)`` → the source to build from; with ``check`` it
            validates shapes and finiteness of the modules it yields (each chunk is checked once).
        executor: ``"inprocess"`` (``None``), ``"dask"`` or an :class:`~engine.executors.Executor`: where
            each pass of joint/share/svd runs, as a map over shards of adapters. pca runs in this process.
        scheduler: With ``"dask"``: a running scheduler's ``tcp://HOST:PORT``; ``None`` starts a
            ``LocalCluster`` of ``n_workers`` (default: the CPU cores) for this build.
        sink: Called with each chunk's task records, its modules and the build's quantised tensors
            (``(task, module, key)`` → stored tensor) as soon as the chunk is built, before the merge:
            :meth:`engine.subspace.writer.FolderWriter.add`, which writes the coefficients and drops them.
    """
    from ..executors import make_executor

    if method == "pca" and executor not in (None, "inprocess"):
        raise ValueError(f"executor {executor!r}: method 'pca' runs in-process only; use joint, share or svd")
    ex, owned = make_executor(executor, scheduler, n_workers=n_workers)
    try:
        return _build_chunks(source, shapes, method, params, ranks=ranks, memory_budget_mb=memory_budget_mb,
                             checked=checked, progress=progress, cancel=cancel, executor=ex, sink=sink)
    finally:
        if owned:
            ex.close()


def plan_build(method: str, params: JointParams | PCAParams, shapes: dict[str, tuple[int, int]],
               ranks: dict[str, Sequence[int]], memory_budget_mb: float | None) -> tuple[list[list[str]], set[str], dict[str, int]]:
    """``(chunks, bounded, sizes)``: the modules' chunks, those built with bounded statistics, each one's statistics' bytes.

    A joint/share module whose held statistics (:func:`module_stat_bytes`, N·K·r per side)
    alone exceed the budget is built with the bounded ones (:func:`bounded_stat_bytes`,
    independent of N): so each chunk's statistics stay within ``memory_budget_mb`` whatever
    the number of adapters, down to one module's sketch (``dim × sketch_rank`` per side).
    A chunk's modules also fit their result's bound (:func:`result_bytes`) in the budget, so
    that a collection stored mostly per task (whose coefficients are near the input's size)
    holds one module's worth at a time past a few hundred 7B-shaped adapters.
    """
    sketch_rank = params.sketch_rank if isinstance(params, JointParams) else 0
    budget = None if memory_budget_mb is None else memory_budget_mb * 2**20
    sizes = {m: max(1, module_stat_bytes(method, shapes[m], ranks.get(m, ()), sketch_rank)) for m in shapes}
    bounded: set[str] = set()
    if budget is not None and method in ("joint", "share") and not params.separate_only:  # type: ignore[union-attr]
        bounded = {m for m, b in sizes.items() if b > budget}
        sizes.update({m: max(1, bounded_stat_bytes(shapes[m], ranks.get(m, ()), sketch_rank)) for m in bounded})
    held = {m: sizes[m] + result_bytes(method, shapes[m], ranks.get(m, ())) for m in sizes}
    return plan_chunks(held, budget, bounded), bounded, sizes


def _build_chunks(source: AdapterSource, shapes: dict[str, tuple[int, int]], method: str,
                  params: JointParams | PCAParams, *, ranks: dict[str, Sequence[int]], memory_budget_mb: float | None,
                  checked: Callable[[AdapterSource, dict[str, tuple[int, int]], bool], AdapterSource],
                  progress: Any, cancel: Any, executor: Any, sink: Any = None) -> Built:
    chunks, bounded, sizes = plan_build(method, params, shapes, ranks, memory_budget_mb)
    budget = None if memory_budget_mb is None else memory_budget_mb * 2**20
    n = len(source)
    rank_sums = {m: int(sum(ranks.get(m, ()))) for m in shapes}
    whole = len(chunks) == 1
    pca = isinstance(params, PCAParams)
    k_first = not pca and not whole and one_k_for_all(params)  # type: ignore[arg-type]
    k_chunks = plan_chunks(sizes, budget, bounded) if k_first else []  # the k round holds statistics, no result

    def steps(c: list[str], k_only: bool = False) -> int:
        if pca:
            return pca_steps(params, n, len(c))  # type: ignore[arg-type]
        return joint_steps(params, n, len(c), k_only=k_only, bounded=c[0] in bounded)  # type: ignore[arg-type]

    prog = _Steps(progress, sum(steps(c) for c in chunks) + sum(steps(c, True) for c in k_chunks))
    order = {m: j for j, m in enumerate(sorted(shapes))}

    def label(c: list[str]) -> str:
        return "" if whole else f" [modules {order[c[0]] + 1}-{order[c[-1]] + 1} of {len(shapes)}]"

    k_all: int | None = None
    if k_first:
        own: dict[str, int] = {}
        for c in k_chunks:
            sub_shapes = {m: shapes[m] for m in c}
            reader = Reader(source.subset(c), executor, sub_shapes, checked, True, cancel, c[0] in bounded)
            own.update(joint_module_k(reader, sub_shapes, params,  # type: ignore[arg-type]
                                      progress=prog.part(steps(c, True), label(c)),
                                      cancel=cancel, rank_sums=rank_sums))
        k_all = max(own.values(), default=0)

    built: Built | None = None
    seen: int | None = None  # the largest result (coefficient bytes) of a module built so far
    queue = list(chunks)
    while queue:
        group = [queue.pop(0)]
        if seen is not None and budget is not None:
            # chunks are planned with each module's result at its bound (every task's factors): once the
            # first chunk shows what a module's result really holds, later chunks take as many modules as fit
            used = sum(sizes[m] + seen for m in group[0])
            while queue and (queue[0][0] in bounded) == (group[0][0] in bounded):
                more = sum(sizes[m] + seen for m in queue[0])
                if used + more > budget:
                    break
                used += more
                group.append(queue.pop(0))
        c = [m for g in group for m in g]
        sub_shapes = {m: shapes[m] for m in c}
        part_steps = sum(steps(g) for g in group)
        steps_c = _scaled(prog.part(part_steps, label(c)), part_steps)
        if pca:
            sub = checked(source.subset(None if whole else c), sub_shapes, not k_first)
            part = build_pca(sub, sub_shapes, params, progress=steps_c, cancel=cancel)  # type: ignore[arg-type]
        else:
            reader = Reader(source.subset(None if whole else c), executor, sub_shapes, checked, not k_first, cancel,
                            c[0] in bounded)
            part = build_joint(reader, sub_shapes, params, progress=steps_c, cancel=cancel, k_all=k_all,
                               rank_sums=rank_sums)  # type: ignore[arg-type]
        seen = max(seen or 0, max(_result_nbytes(part[1], m) for m in c))
        if sink is not None:  # the chunk's coefficients to disk now: the build holds one chunk's result
            sink(part[1], c, getattr(params, "quantized_out", {}))
        # merged as it comes: one record per task, not one per task and chunk (their configs, dicts) until the end
        built = part if built is None else merge_parts([built, part])
        del part
        trim()  # the chunk's statistics are gone: their pages back to the OS before the next chunk
    assert built is not None
    return built


def _result_nbytes(tasks: dict[str, TaskProjection], m: str) -> int:
    """Bytes of every task's coefficients of module ``m`` as held."""
    return sum(t.numel() * t.element_size() for p in tasks.values() for t in p.coeffs.get(m, {}).values())


def _scaled(fn: Any, part_steps: int) -> Any:
    """``fn``, a part of ``part_steps`` steps, for a build that counts its own: its fraction spread over the part."""
    if fn is None:
        return None

    def scaled(p: Progress) -> None:
        fn(Progress(round(p.fraction * part_steps), part_steps, p.message))

    return scaled
