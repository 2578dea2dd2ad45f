"""High-level helpers for the three-step pipeline, with the ``vlora`` package's names.

``init_subspace`` builds a subspace from adapters on disk, ``absorb_task`` adds one,
``extract_adapter`` writes a task back as a PEFT folder. Thin wrappers over
:class:`engine.subspace.SharedSubspace` and :mod:`engine.io`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .progress import CancelLike, ProgressFn

if TYPE_CHECKING:  # pragma: no cover
    from .subspace import SharedSubspace, TaskProjection
    from .types import LoRAWeights


def init_subspace(
    adapter_paths: Sequence[str | Path],
    task_ids: Sequence[str] | None = None,
    variance_threshold: float = 0.6,
    num_components: int | None = None,
    *,
    adaptive_k: bool = False,
    max_error: float | None = None,
    method: str | None = None,
    streaming: bool = False,
    progress: ProgressFn | None = None,
    cancel: CancelLike | None = None,
) -> SharedSubspace:
    """Load adapters from disk (or the Hub) and build a shared subspace in one call.

    Args:
        adapter_paths: Adapter folders, parent folders of adapters, or ``hf://org/repo[@rev]``.
        task_ids: One id per adapter; defaults to the folder or repo names.
        variance_threshold: Share of variance k must explain when ``num_components`` is not given.
        num_components: k for every module.
        adaptive_k: Choose k per module by ``variance_threshold``.
        max_error: Choose k per module so every task's ‖ΔW−ΔŴ‖/‖ΔW‖ is at most this.
        method: Compression method (not given: as :meth:`SharedSubspace.from_adapters`: the
            seed's ``pca``, or ``joint`` with ``max_error``).
        streaming: Read one adapter at a time (memory bounded by one adapter plus the basis).
        progress: Called with ``Progress`` events.
        cancel: ``is_set()`` → ``JobCancelled``.

    Returns:
        The subspace (not saved; call ``.save(path)``).
    """
    from .jobs.common import load_adapters, resolve_local_paths
    from .subspace import SharedSubspace

    kw: dict[str, Any] = {
        "num_components": num_components,
        "variance_threshold": variance_threshold,
        "adaptive_k": adaptive_k,
        "max_error": max_error,
        "method": method,  # None: the seed's pca, or joint with max_error (SharedSubspace.from_adapters)
        "progress": progress,
        "cancel": cancel,
    }
    specs = [str(p) for p in adapter_paths]
    if streaming:
        pairs = resolve_local_paths(specs, cancel=cancel)
        ids = list(task_ids) if task_ids is not None else [n for n, _ in pairs]
        return SharedSubspace.from_adapters_streaming([p for _, p in pairs], task_ids=ids, **kw)
    adapters = load_adapters(specs, cancel=cancel)
    ids = list(task_ids) if task_ids is not None else [a.name for a in adapters]
    return SharedSubspace.from_adapters(adapters, task_ids=ids, **kw)


def absorb_task(
    subspace: SharedSubspace,
    adapter_path: str | Path,
    task_id: str,
    *,
    incremental: bool = False,
    progress: ProgressFn | None = None,
    cancel: CancelLike | None = None,
) -> TaskProjection:
    """Load an adapter and absorb it into ``subspace`` (modified in place) as ``task_id``.

    Args:
        subspace: The subspace to extend.
        adapter_path: Adapter folder, ``.safetensors`` file or ``hf://org/repo[@rev]``.
        task_id: Id of the new task.
        incremental: Grow the bases by the directions the task needs instead of
            recomputing them (stored tasks untouched).

    Returns:
        The new task's projection (its measured errors in ``fidelity``).
    """
    from .jobs.common import load_one

    adapter = load_one(str(adapter_path))
    if incremental:
        return subspace.absorb_incremental(adapter, task_id, progress=progress, cancel=cancel)
    subspace.absorb(adapter, task_id, progress=progress, cancel=cancel)
    return subspace.tasks[task_id]


def extract_adapter(
    subspace: SharedSubspace,
    task_id: str,
    output_path: str | Path,
    *,
    force: bool = False,
    modelfile: bool = False,
    target: str = "portable",
) -> LoRAWeights:
    """Reconstruct a task and save it as a PEFT adapter folder (written atomically).

    By default the folder means the same ΔW to PEFT, vLLM and TGI (one ``r``, the
    largest module rank; per-module scales folded into B; empty patterns).

    Args:
        subspace: The subspace holding the task.
        task_id: Task to reconstruct.
        output_path: Folder to write.
        force: Replace an existing folder.
        modelfile: Also write an Ollama ``Modelfile``.
        target: ``portable``, ``peft``, ``vllm``, ``tgi`` or ``ollama``
            (see :func:`engine.io.targets.for_target`).

    Returns:
        The ``LoRAWeights`` as written.

    Raises:
        UnknownTaskError: the subspace has no such task.
        OutputExistsError: ``output_path`` exists and ``force`` is false.
    """
    from .io.local import save_adapter
    from .io.targets import for_target

    weights, _ = for_target(subspace.reconstruct(task_id, pad_to_vllm=target == "peft"), target)
    save_adapter(weights, output_path, force=force, modelfile=modelfile, target="peft")
    return weights


__all__ = ["absorb_task", "extract_adapter", "init_subspace"]
