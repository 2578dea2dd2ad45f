"""The ``merge`` job kind: merge adapters' updates ΔW into one PEFT adapter (task arithmetic, TIES, DARE, …)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...progress import CancelLike, ProgressFn, StagedProgress, tick
from ...registry import Param
from ..base import JobKind, JobOutput
from ..params import ADAPTERS, EXCLUDE, FORCE, export_target, method_choices, method_kwargs, method_params, output_param
from ..results import Result


@dataclass(frozen=True)
class MergedResult(Result):
    """``merge``: the PEFT folder written, its inputs and target, then the merge's figures
    (:meth:`engine.merge.driver.MergeResult.to_dict`: method, resolved params, rank, errors per module, heads…)."""

    path: str = ""
    inputs: list[str] = field(default_factory=list)
    target: str = "portable"
    target_warnings: list[str] = field(default_factory=list)
    method: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    name: str | None = None
    rank: int = 0
    ranks: dict[str, int] = field(default_factory=dict)
    num_modules: int = 0
    num_params: int = 0
    max_error: float = 0.0
    mean_error: float = 0.0
    overall_error: float = 0.0
    errors: dict[str, float] = field(default_factory=dict)
    norms: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    heads: dict[str, str] = field(default_factory=dict)


_MERGE_FIXED = ("adapters", "output", "method", "force", "modelfile", "exclude", "head_from", "target")


def run_merge(params: dict[str, Any], *, progress: ProgressFn | None = None, cancel: CancelLike | None = None) -> JobOutput:
    """Merge adapters' updates ΔW with a registered method and write the result as a PEFT folder.

    ``target`` (default ``portable``) is the form written, as for ``export``.

    data: ``{"path", "inputs": [name…], "target", "target_warnings": [str…], **MergeResult.to_dict()}`` —
    ``method``, ``params`` (resolved: weights, rank, density, drop_rate, seed…), ``name``, ``rank``, ``ranks``,
    ``num_modules``, ``num_params``, ``max_error``, ``mean_error``, ``overall_error``,
    ``errors`` {module: relative ΔW error of the rank truncation}, ``norms``, ``warnings``,
    ``heads`` {head: "identical" | "from NAME" | "dropped"} (``modules_to_save`` heads and other
    extra tensors: kept when bitwise equal across the inputs, else from ``head_from`` or dropped).
    """
    from ...io.local import save_adapter
    from ...io.targets import for_target, modelfile_text
    from ...registry import get_method
    from ..common import load_adapters

    method = params["method"]
    info = get_method("merge", method)
    kwargs = method_kwargs("merge", method, params, _MERGE_FIXED)
    stages = StagedProgress(progress, {"load": 1, "merge": 3, "save": 1})
    adapters = load_adapters(params["adapters"], progress=stages.stage("load"), cancel=cancel, exclude=params.get("exclude"))
    assert info.func is not None
    if params.get("head_from") is not None:
        kwargs["head_from"] = str(params["head_from"])
    result = info.func(adapters, progress=stages.stage("merge"), cancel=cancel, **kwargs)
    target = params.get("target") or "portable"
    w, notes = for_target(result.weights, target)
    if params["modelfile"]:
        note = modelfile_text(w)[1]
        notes += [note] if note else []
    tick(stages.stage("save"), cancel, 0, 1, f"writing {params['output']}")
    out = save_adapter(w, params["output"], force=params["force"], modelfile=params["modelfile"], target="peft")
    stages.done()
    merged = MergedResult.from_dict({"path": str(out), "inputs": [a.name for a in adapters], "target": target,
                                     "target_warnings": notes, **result.to_dict()})
    err = "exact" if result.exact else f"max ΔW error {result.max_error:.3g}"
    return JobOutput(
        summary=f"merged {len(adapters)} adapters with {method} (rank {result.weights.rank}, {err}) into {out}",
        outputs=[str(out)],
        data=merged.to_dict(),
    )


KIND = JobKind(
    "merge", "Merge adapters", "merge adapters' updates ΔW into one PEFT adapter (task arithmetic, TIES, DARE, …)",
    (
        ADAPTERS,
        output_param("folder to write the merged PEFT adapter into"),
        Param("method", "choice", "task_arithmetic", "merge method", method_choices("merge")),
        *method_params("merge", _MERGE_FIXED),
        Param("modelfile", "bool", False, "also write an Ollama Modelfile beside the adapter"),
        EXCLUDE,
        Param("head_from", "str", None, "keep this input's modules_to_save heads (e.g. a classifier) where the "
              "inputs' differ (an adapter name/task id); identical heads are always kept"),
        export_target(),
        FORCE,
    ),
    writes=("output",), func=run_merge, stderr_warnings=True,
    positionals=("adapters",), process=True, min_adapters=2, needs="adapters|subspace", form_rank=2, view="adapters_written",
    result=MergedResult,
)
