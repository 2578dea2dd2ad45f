"""The ``add`` job kind: add an adapter to a saved subspace (absorb, --incremental or --project)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...progress import CancelLike, ProgressFn, StagedProgress, tick
from ...registry import Param
from ..base import JobKind, JobOutput
from ..params import output_param
from ..reports import ErrorPair, SubspaceStats, TaskChange, TaskReport, task_report
from ..results import Result


@dataclass(frozen=True)
class AddResult(Result):
    """``add``: the new task, every task before → after, the stored tasks' totals, the subspace's stats.

    ``target``: the subspace's k rule (``rule``, ``max_error``, ``mean_error``, ``num_components``,
    ``variance_threshold``, ``inferred``).
    """

    path: str = ""
    task_id: str = ""
    mode: str = "absorb"
    task: TaskReport = field(default_factory=TaskReport)
    target: dict[str, Any] | None = None
    tasks: list[TaskChange] = field(default_factory=list)
    before: ErrorPair | None = None
    after: ErrorPair | None = None
    stored_after: ErrorPair | None = None
    warnings: list[str] = field(default_factory=list)
    stats: SubspaceStats = field(default_factory=SubspaceStats)


def run_add(params: dict[str, Any], *, progress: ProgressFn | None = None, cancel: CancelLike | None = None) -> JobOutput:
    """Add an adapter to a saved subspace as a new task, and save the subspace.

    Modes: ``absorb`` (default, the seed's: recompute the bases from the stored tasks'
    reconstructions plus the new adapter, k chosen by the subspace's own k rule so that
    every task, old and new, meets its error target), ``incremental`` (bases grow by the
    few directions the new task needs; stored tasks untouched) or ``project`` (bases
    fixed; the new task is encoded in them). A result that breaks the subspace's error
    target is refused (nothing written) unless ``allow_worse``. The subspace is
    rewritten in place (atomically) only with ``force``, unless ``output`` names another
    folder. An existing task id is refused unless ``force``.

    data: ``{"path", "task_id", "mode", "task": {"task_id", "mean_error", "max_error",
    "error_is_bound", "fidelity": {module: error}}, "target": k rule {"rule", "max_error",
    "mean_error", "num_components", "variance_threshold", "inferred"}, "tasks": [{"task_id",
    "before": {mean, max}|None, "after": {mean, max}, "error_is_bound", "breaks_target"}],
    "before": {mean, max} (stored tasks), "stored_after": {mean, max} (the same tasks after),
    "after": {mean, max} (all tasks), "warnings": [str] (a break accepted by ``allow_worse``),
    "stats": compression_stats()}``
    """
    from ...errors import OutputExistsError
    from ...io.scan import validate_task_id
    from ...subspace import SharedSubspace
    from ...subspace.rule import breaks_message, change_report, totals
    from ..common import load_one

    if params["incremental"] and params["project"]:
        raise ValueError("incremental, project: give at most one of --incremental and --project")
    mode = "incremental" if params["incremental"] else "project" if params["project"] else "absorb"
    task_id = validate_task_id(params["task_id"])
    if params["output"] is None and not params["force"]:
        raise OutputExistsError(f"{params['subspace']}: add rewrites the subspace in place; use --force to allow it, "
                                "or -o to write the result to another folder")
    allow_worse = bool(params["allow_worse"])
    stages = StagedProgress(progress, {"load": 1, mode: 3, "save": 1})
    load = stages.stage("load")
    tick(load, cancel, 0, 2, f"loading {params['subspace']}")
    sub = SharedSubspace.load(params["subspace"])
    if task_id in sub.tasks and not params["force"]:
        raise ValueError(f"task_id: {task_id!r} is already in {params['subspace']}; use --force to replace it")
    tick(load, cancel, 1, 2, f"loading {params['adapter']}")
    adapter = load_one(str(params["adapter"]))
    step = stages.stage(mode)
    before = sub.fidelity()
    if mode == "absorb":
        sub.absorb(adapter, task_id, allow_worse=allow_worse, progress=step, cancel=cancel)
    elif mode == "incremental":
        sub.absorb_incremental(adapter, task_id, allow_worse=allow_worse, progress=step, cancel=cancel)
    else:
        proj = sub.project(adapter, task_id, progress=step, cancel=cancel)
        sub._refuse_breaks(f"adding {task_id!r}", before, {**before, task_id: dict(proj.fidelity)}, allow_worse)
        sub.add_task(proj)
    after = sub.fidelity()
    breaks = sub.target_breaks(before, after)
    warnings = [breaks_message(f"adding {task_id!r}", sub.k_rule, breaks, before, after).replace(" would break ", " breaks ")
                + " (accepted: --allow-worse)"] if breaks else []
    mx = sub.k_rule.get("max_error")
    blamed = {t for b_ in breaks for t in b_.tasks}
    over = {t: max(f.values()) for t, f in after.items() if f and mx is not None and t not in blamed and max(f.values()) > mx}
    if over:  # within the rounding tolerance, so not a break: say so rather than print 0.0501 under a 0.05 cap
        listed = ", ".join(f"{t} {e:.4g}" for t, e in sorted(over.items(), key=lambda kv: -kv[1])[:5])
        warnings.append(f"{len(over)} task(s) report an error above max_error {mx:g} by less than the storage "
                        f"rounding ({listed}): reported errors of stored tasks are upper bounds that include "
                        f"the rounding of the rebuilt bases")
    target = params["output"] or params["subspace"]
    tick(stages.stage("save"), cancel, 0, 1, f"writing {target}")
    out = sub.save(target, force=True if params["output"] is None else params["force"])
    stages.done()
    task = task_report(sub, task_id)
    kept = {t: f for t, f in before.items() if t != task_id}
    old_after = {t: after[t] for t in kept if t in after}
    b, a = totals(kept), totals(old_after)
    changes = change_report(before, after, breaks, {t: p.error_is_bound for t, p in sub.tasks.items()})
    result = AddResult(path=str(out), task_id=task_id, mode=mode, task=task, target=sub.k_rule,
                       tasks=[TaskChange.from_dict(c) for c in changes], before=ErrorPair.from_dict(b),
                       after=ErrorPair.from_dict(totals(after)), stored_after=ErrorPair.from_dict(a), warnings=warnings,
                       stats=SubspaceStats.from_dict(sub.compression_stats()))
    return JobOutput(
        summary=(f"added {task_id!r} to {out} ({mode}): ΔW error mean {task.mean_error:.3g} max {task.max_error:.3g}; "
                 f"stored tasks mean {b['mean']:.3g} → {a['mean']:.3g}, max {b['max']:.3g} → {a['max']:.3g}; {len(sub.tasks)} tasks"),
        outputs=[str(out)],
        data=result.to_dict(),
    )


KIND = JobKind(
    "add", "Add task", "add an adapter to a saved subspace (absorb, --incremental or --project)",
    (
        Param("subspace", "path", required=True, help="saved subspace folder"),
        Param("adapter", "path", required=True, help="adapter folder or hf://org/repo"),
        Param("task_id", "str", required=True, help="id of the new task"),
        Param("incremental", "bool", False, "grow the bases by the directions the task needs; stored tasks untouched"),
        Param("project", "bool", False, "keep the bases fixed and encode the task in them"),
        output_param("write the updated subspace here instead of in place", required=False),
        Param("allow_worse", "bool", False, "accept a result that breaks the subspace's error target"),
        Param("force", "bool", False, "rewrite the subspace in place (no --output) / overwrite --output / "
              "replace a task of the same id"),
    ),
    writes=("output",), modifies=("subspace",), func=run_add,
    positionals=("subspace", "adapter"), process=True, needs="subspace", form_rank=1, view="subspace_written", stderr_warnings=True,
    result=AddResult,
)
