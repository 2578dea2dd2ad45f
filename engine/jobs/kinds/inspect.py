"""The ``inspect`` job kind: per-module norms of A, B and ΔW, spectrum, and validation problems."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...progress import CancelLike, ProgressFn, tick
from ...registry import Param
from ..base import JobKind, JobOutput
from ..results import Result


@dataclass(frozen=True)
class ModuleFigures(Result):
    """One module's norms and spectrum (:func:`engine.analysis.figures.module_figures`; ``None`` where not finite)."""

    name: str = ""
    rank: int = 0
    in_features: int = 0
    out_features: int = 0
    dtype: str = ""
    scale: float = 1.0
    finite: bool = True
    norm_a: float | None = None
    norm_b: float | None = None
    norm_delta: float | None = None
    singular_values: list[float] = field(default_factory=list)
    stable_rank: float | None = None
    effective_rank: float | None = None


@dataclass(frozen=True)
class InspectResult(Result):
    """``inspect``: one adapter's config, per-module figures, total ‖ΔW‖ and the problems validation finds."""

    path: str = ""
    name: str = ""
    base_model: str | None = None
    rank: int = 0
    lora_alpha: float | None = None
    use_rslora: bool = False
    target_modules: list[str] | str | None = None
    num_params: int = 0
    bytes: int = 0
    extra_tensors: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    modules: list[ModuleFigures] = field(default_factory=list)
    norm_delta_total: float = 0.0
    problems: list[str] = field(default_factory=list)


def run_inspect(params: dict[str, Any], *, progress: ProgressFn | None = None, cancel: CancelLike | None = None) -> JobOutput:
    """Per-module figures of one adapter, plus the problems validation finds.

    Norms go through r×r products: no d×d update is formed.

    data: ``{"path", "name", "base_model", "rank", "lora_alpha", "use_rslora", "target_modules",
    "num_params", "bytes", "extra_tensors": [key, …], "config": {…},
    "modules": [{"name", "rank", "in_features", "out_features", "dtype", "scale", "finite",
    "norm_a", "norm_b", "norm_delta", "singular_values": [σ…], "stable_rank", "effective_rank"}],
    "norm_delta_total", "problems": [str, …]}``
    """
    from ...io.local import load_adapter
    from ...analysis.figures import module_figures
    from ...io.scan import spec_of
    from ..common import adapter_warnings, local_folder

    spec = str(params["adapter"])
    w = load_adapter(local_folder(spec_of(spec)), check_finite=False)
    figures = []
    for i, m in enumerate(w.layer_names):
        tick(progress, cancel, i, len(w.layer_names), m)
        figures.append(module_figures(w, m))
    tick(progress, cancel, len(w.layer_names), len(w.layer_names), "done")
    problems = adapter_warnings(w, figures)
    total = sum((f["norm_delta"] or 0.0) ** 2 for f in figures) ** 0.5
    result = InspectResult(
        path=spec, name=w.name, base_model=w.base_model_name_or_path, rank=w.rank, lora_alpha=w.lora_alpha,
        use_rslora=w.use_rslora, target_modules=w.target_modules, num_params=w.num_params, bytes=w.nbytes,
        extra_tensors=sorted(w.extra_tensors), config=w.metadata, modules=[ModuleFigures.from_dict(f) for f in figures],
        norm_delta_total=total, problems=problems,
    )
    return JobOutput(summary=f"{spec}: {len(figures)} modules, ‖ΔW‖={total:.4g}, {len(problems)} problem(s)", data=result.to_dict())


KIND = JobKind(
    "inspect", "Inspect adapter", "per-module norms of A, B and ΔW, spectrum, and validation problems",
    (Param("adapter", "path", required=True, help="adapter folder, .safetensors file or hf://org/repo"),),
    func=run_inspect,
    positionals=("adapter",), needs="adapter", form_rank=7, view="inspect",
    result=InspectResult,
)
