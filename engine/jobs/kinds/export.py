"""The ``export`` job kind: reconstruct a task as a PEFT adapter folder (vLLM, TGI, Ollama)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...progress import CancelLike, ProgressFn, tick
from ...registry import Param
from ..base import JobKind, JobOutput
from ..params import FORCE, STORAGE_DTYPES, export_target, output_param
from ..reports import task_report
from ..results import Result


@dataclass(frozen=True)
class ExportResult(Result):
    """``export``: the PEFT folder written, its config, and the task's errors (:class:`TaskReport` less ``task_id``)."""

    path: str = ""
    task_id: str = ""
    target: str = "portable"
    rank: int = 0
    ranks: dict[str, int] = field(default_factory=dict)
    lora_alpha: float | None = None
    base_model: str | None = None
    target_modules: list[str] | str | None = None
    dtype: str = "float32"
    modelfile: str | None = None
    target_warnings: list[str] = field(default_factory=list)
    mean_error: float = 0.0
    max_error: float = 0.0
    error_is_bound: bool = False
    fidelity: dict[str, float] = field(default_factory=dict)


def run_export(params: dict[str, Any], *, progress: ProgressFn | None = None, cancel: CancelLike | None = None) -> JobOutput:
    """Reconstruct one task as a PEFT adapter folder (loads in PEFT, vLLM and TGI; optional Ollama Modelfile).

    ``alpha`` rewrites ``lora_alpha`` and rescales B so that ΔW is unchanged;
    ``base_model`` and ``target_modules`` override the config. ``target`` (default
    ``portable``: the same ΔW in PEFT, vLLM and TGI) says what form to write and what
    to drop (:func:`engine.io.targets.for_target`); ``exact_rank`` keeps per-module
    ranks, which only PEFT reads, so it goes with ``target="peft"`` (implied when no
    target is given). The Modelfile's ``FROM`` is ``base_model`` (a local folder as its
    absolute path), else the adapter's base model name, with a warning.

    data: ``{"path", "task_id", "target", "rank", "ranks": {module: rank}, "lora_alpha", "base_model",
    "target_modules", "dtype", "modelfile": path|None, "target_warnings": [str…], "mean_error",
    "max_error", "error_is_bound", "fidelity": {module: error}}``
    """
    import torch

    from ...io.local import save_adapter
    from ...io.targets import for_target, modelfile_text
    from ...subspace import SharedSubspace

    target = params.get("target")
    if params["exact_rank"] and target not in (None, "peft"):
        raise ValueError(f"exact_rank: per-module ranks need rank_pattern, which {target} ignores; "
                         f"use --exact-rank with --target peft, or drop --exact-rank")
    target = target or ("peft" if params["exact_rank"] else "portable")
    tick(progress, cancel, 0, 3, f"loading {params['subspace']}")
    sub = SharedSubspace.load(params["subspace"])
    task_id = params["task_id"]
    tick(progress, cancel, 1, 3, f"reconstructing {task_id}")
    # other targets pad to the largest module rank themselves (a vLLM rank like 16 for 12 is not needed)
    w = sub.reconstruct(task_id, pad_to_vllm=target == "peft" and not params["exact_rank"])
    if params["target_modules"] is not None:
        tm = list(params["target_modules"])
        missing = sorted({m.rsplit(".", 1)[-1] for m in w.layer_names} - set(tm))
        if missing:
            raise ValueError(f"target_modules: the adapter has modules named {', '.join(missing)}, which the list leaves out")
        w.target_modules = tm
        w.metadata["target_modules"] = tm
    if params["base_model"] is not None:
        w.base_model_name_or_path = params["base_model"]
        w.metadata["base_model_name_or_path"] = params["base_model"]
    if params["alpha"] is not None:
        factors = {m: (w.lora_b[m] * w.scale(m), w.lora_a[m]) for m in w.layer_names}
        w.lora_alpha = float(params["alpha"])
        w.metadata["lora_alpha"] = params["alpha"]
        w.metadata["alpha_pattern"] = {}
        w = w.replace_factors(factors, rank=w.rank)
    w, notes = for_target(w, target)
    if params["modelfile"]:
        note = modelfile_text(w, params["base_model"])[1]
        notes += [note] if note else []
    tick(progress, cancel, 2, 3, f"writing {params['output']}")
    dtype = getattr(torch, params["dtype"])
    out = save_adapter(w, params["output"], force=params["force"], dtype=dtype, modelfile=params["modelfile"],
                       target="peft", modelfile_base=params["base_model"])
    tick(progress, cancel, 3, 3, "done")
    task = task_report(sub, task_id)
    result = ExportResult(
        path=str(out), task_id=task_id, target=target, rank=w.rank, ranks=w.ranks, lora_alpha=w.lora_alpha,
        base_model=w.base_model_name_or_path, target_modules=w.target_modules, dtype=params["dtype"],
        modelfile=str(Path(out) / "Modelfile") if params["modelfile"] else None, target_warnings=notes,
        mean_error=task.mean_error, max_error=task.max_error, error_is_bound=task.error_is_bound, fidelity=task.fidelity,
    )
    return JobOutput(summary=f"exported {task_id!r} to {out} (rank {w.rank}, ΔW error max {task.max_error:.3g})",
                     outputs=[str(out)], data=result.to_dict())


KIND = JobKind(
    "export", "Export task", "reconstruct a task as a PEFT adapter folder (vLLM, TGI, Ollama)",
    (
        Param("subspace", "path", required=True, help="saved subspace folder"),
        Param("task_id", "str", required=True, help="task to export"),
        output_param("folder to write the PEFT adapter into"),
        Param("alpha", "float", None, "lora_alpha to write (B is rescaled so ΔW is unchanged)", minimum=0.0,
              exclusive_minimum=True),
        Param("base_model", "str", None, "base_model_name_or_path to write"),
        Param("target_modules", "strs", None, "target_modules to write"),
        Param("modelfile", "bool", False, "also write an Ollama Modelfile (FROM base, ADAPTER .)"),
        Param("exact_rank", "bool", False, "keep each module's own rank in rank_pattern, which only PEFT reads "
              "(implies --target peft; default: pad to the largest module rank)"),
        export_target(),
        Param("dtype", "choice", "float32", "dtype of the written factors", STORAGE_DTYPES[::-1]),
        FORCE,
    ),
    writes=("output",), func=run_export,
    positionals=("subspace", "task_id"), process=True, needs="subspace", form_rank=4, view="adapters_written",
    result=ExportResult,
)
