"""The ``validate`` job kind: check adapters' files, tensors and config, and that they fit together."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...progress import CancelLike, ProgressFn, tick
from ...registry import Param
from ..base import JobKind, JobOutput
from ..params import ADAPTERS, EXCLUDE, check_targets
from ..results import Result


@dataclass(frozen=True)
class AdapterCheck(Result):
    """One adapter checked: its error (``None`` when it loads), warnings, and what ``target`` refuses or misreads."""

    path: str = ""
    name: str = ""
    ok: bool = True
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    target_problems: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ValidateResult(Result):
    """``validate``: every adapter checked, whether they fit together, and the target checked for."""

    ok: bool = True
    adapters: list[AdapterCheck] = field(default_factory=list)
    compatible: bool | None = None
    compatibility: str | None = None
    compat_warnings: list[str] = field(default_factory=list)
    target: str | None = None
    max_lora_rank: int = 16


def run_validate(params: dict[str, Any], *, progress: ProgressFn | None = None, cancel: CancelLike | None = None) -> JobOutput:
    """Check adapters: files, keys, shapes, dtypes, NaN/Inf, config, and that they fit together.

    The job's status is ``failed`` (``error_kind="error"``) when any adapter has an
    error or the set is incompatible; warnings alone keep it ``ok``. With ``target``
    (``vllm``, ``tgi``, ``ollama``, ``peft``) each adapter is also checked for what that
    server refuses or reads differently from PEFT (rank above ``max_lora_rank``,
    ``rank_pattern``/``alpha_pattern``, ``modules_to_save``, ``bias``, DoRA); any such
    problem fails the job too.

    data: ``{"ok": bool, "adapters": [{"path", "name", "ok", "error": str|None,
    "warnings": [str…], "target_problems": [str…]}], "compatible": bool|None, "compatibility": str|None,
    "compat_warnings": [str…], "target": str|None, "max_lora_rank": int}``
    """
    from ...errors import IncompatibleAdaptersError, VloraError
    from ...io.local import check_compatible
    from ...io.scan import expand_adapter_specs
    from ...analysis.figures import module_figures
    from ..common import adapter_warnings, load_spec, unique_names

    from ...io.targets import target_problems

    target = params.get("target")
    max_rank = int(params.get("max_lora_rank") or 16)
    specs = expand_adapter_specs(list(params["adapters"]), params.get("exclude"))
    names = unique_names([s.name for s in specs])
    rows: list[dict[str, Any]] = []
    loaded = []
    for i, (spec, name) in enumerate(zip(specs, names)):
        tick(progress, cancel, i, len(specs), f"checking {spec.label}")
        row: dict[str, Any] = {"path": spec.label, "name": name, "ok": True, "error": None, "warnings": [],
                               "target_problems": []}
        try:
            w = load_spec(spec, name) if spec.path is not None else load_spec(spec)
            figs = [module_figures(w, m) for m in w.layer_names]
            row["warnings"] = adapter_warnings(w, figs)
            loaded.append(w)
            if target:
                row["target_problems"] = target_problems(w.metadata, w.ranks, list(w.extra_tensors), target,
                                                         max_lora_rank=max_rank)
        except VloraError as exc:
            row.update(ok=False, error=str(exc))
            if target and spec.path is not None:
                row["target_problems"] = _config_target_problems(spec.path, target, max_rank)
        rows.append(row)
    tick(progress, cancel, len(specs), len(specs), "done")
    compatible: bool | None = None
    compat_msg: str | None = None
    compat_warn: list[str] = []
    if len(loaded) >= 2:
        try:
            rep = check_compatible(loaded)
            compatible = True
            compat_warn = list(rep.warnings)
        except IncompatibleAdaptersError as exc:
            compatible, compat_msg = False, str(exc)
    n_target = sum(len(r["target_problems"]) for r in rows)
    ok = all(r["ok"] for r in rows) and compatible is not False and n_target == 0
    bad = sum(not r["ok"] for r in rows)
    summary = f"{len(rows)} adapter(s): {len(rows) - bad} valid, {bad} invalid"
    if compatible is False:
        summary += "; incompatible: " + str(compat_msg)
    elif compatible:
        summary += "; compatible"
    if target:
        summary += f"; {n_target} problem(s) for {target}"
    result = ValidateResult(ok=ok, adapters=[AdapterCheck.from_dict(r) for r in rows], compatible=compatible,
                            compatibility=compat_msg, compat_warnings=compat_warn, target=target, max_lora_rank=max_rank)
    return JobOutput(summary=summary, data=result.to_dict(), ok=ok)


def _config_target_problems(path: Any, target: str, max_rank: int) -> list[str]:
    """``target``'s problems read from the config alone, for an adapter the loader refused (DoRA…)."""
    import json

    from ...errors import VloraError
    from ...io.header import resolve_adapter_files
    from ...io.targets import target_problems

    try:
        config_path, _ = resolve_adapter_files(path)
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (VloraError, OSError, ValueError):
        return []
    return target_problems(config, {}, [], target, max_lora_rank=max_rank) if isinstance(config, dict) else []


KIND = JobKind(
    "validate", "Validate adapters", "check adapters' files, tensors and config, and that they fit together",
    (
        ADAPTERS,
        EXCLUDE,
        Param("target", "choice", None, "also list what this server refuses or misreads (fails the check)",
              check_targets()),
        Param("max_lora_rank", "int", 16, "vLLM's --max-lora-rank, for --target vllm", minimum=1),
    ),
    func=run_validate,
    positionals=("adapters",), min_adapters=1, form_rank=8, view="validate",
    result=ValidateResult,
)
