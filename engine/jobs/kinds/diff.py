"""The ``diff`` job kind: compare two adapters' updates ΔW module by module."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...progress import CancelLike, ProgressFn
from ...registry import Param
from ..base import JobKind, JobOutput
from ..results import Result


@dataclass(frozen=True)
class ModuleDiffRow(Result):
    """Two adapters' ΔW on one module (or ``overall``): norms, cosine, ``‖ΔW_a − ΔW_b‖/‖ΔW_a‖`` (``None``: ΔW_a is zero)."""

    module: str = ""
    norm_a: float = 0.0
    norm_b: float = 0.0
    cosine: float | None = None
    relative_difference: float | None = None
    rank_a: int | None = None
    rank_b: int | None = None


@dataclass(frozen=True)
class DiffReport(Result):
    """``diff``: adapter ``a`` vs ``b``, overall and per shared module, and the modules only one has."""

    a: str = ""
    b: str = ""
    overall: ModuleDiffRow | None = None
    modules: list[ModuleDiffRow] = field(default_factory=list)
    only_in_a: list[str] = field(default_factory=list)
    only_in_b: list[str] = field(default_factory=list)


def run_diff(params: dict[str, Any], *, progress: ProgressFn | None = None, cancel: CancelLike | None = None) -> JobOutput:
    """Compare two adapters module by module (norms, cosine, relative difference of ΔW).

    data: ``{"a", "b", "overall": {"module", "norm_a", "norm_b", "cosine", "relative_difference",
    "rank_a", "rank_b"}, "modules": [same per module], "only_in_a": [module…], "only_in_b": [module…]}``
    (``relative_difference`` is ``‖ΔW_a − ΔW_b‖/‖ΔW_a‖``, ``null`` when ΔW_a is zero and ΔW_b is not).
    """
    from ...analysis import diff_report
    from ..common import load_one

    a = load_one(str(params["a"]))
    b = load_one(str(params["b"]))
    if a.name == b.name:
        a.name, b.name = str(params["a"]), str(params["b"])
    d = DiffReport.from_dict(diff_report(a, b, progress=progress, cancel=cancel).to_dict())
    o = d.overall or ModuleDiffRow()
    rel = o.relative_difference
    rel_s = "n/a" if rel is None else f"{rel:.3g}"
    summary = f"{d.a} vs {d.b}: cosine {o.cosine:.3f}, relative difference {rel_s}"
    if d.only_in_a or d.only_in_b:
        summary += (f" (on the {len(d.modules)} shared modules; left out: {len(d.only_in_a)} only in a, "
                    f"{len(d.only_in_b)} only in b)")
    return JobOutput(summary=summary, data=d.to_dict())


KIND = JobKind(
    "diff", "Diff two adapters", "compare two adapters' updates ΔW module by module",
    (
        Param("a", "path", required=True, help="first adapter (folder or hf://org/repo)"),
        Param("b", "path", required=True, help="second adapter (folder or hf://org/repo)"),
    ),
    func=run_diff,
    positionals=("a", "b"), min_adapters=2, form_rank=6, view="diff",
    result=DiffReport,
)
