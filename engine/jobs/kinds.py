"""The job kinds: parameters and implementations.

Each implementation is ``func(params, *, progress, cancel) -> JobOutput``; its
docstring documents the schema of the result's ``data``. This module imports
without torch; implementations import what they need when they run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..progress import CancelLike, ProgressFn, tick
from ..registry import Param
from .base import JobKind, JobOutput, StagedProgress, register_kind

# -- shared parameters ----------------------------------------------------------

ADAPTERS = Param("adapters", "paths", required=True, help="adapter folders, parent folders of adapters, or hf://org/repo[@rev]")
FORCE = Param("force", "bool", default=False, help="overwrite an existing output")


def _output(help: str, required: bool = True) -> Param:
    return Param("output", "path", required=required, help=help)


# -- demo ---------------------------------------------------------------------


def run_demo(params: dict[str, Any], *, progress: ProgressFn | None = None, cancel: CancelLike | None = None) -> JobOutput:
    """Write the built-in demo collection (one PEFT folder per task).

    data: ``{"path": str, "adapters": [str, …], "families": {family: [task, …]}}``
    """
    from ..demo import DEMO_FAMILIES, make_demo_collection
    from ..io.local import atomic_dir

    out = Path(params["output"])
    with atomic_dir(out, force=params["force"]) as tmp:  # the whole collection appears at once, or not at all
        written = make_demo_collection(tmp, force=True, progress=progress, cancel=cancel)
    paths = [out / p.name for p in written]
    return JobOutput(
        summary=f"wrote {len(paths)} demo adapters to {out}",
        outputs=[str(out)],
        data={"path": str(out), "adapters": [str(p) for p in paths], "families": DEMO_FAMILIES},
    )


# -- info -----------------------------------------------------------------------


def _collection_info(root: Path, progress: ProgressFn | None, cancel: CancelLike | None) -> dict[str, Any]:
    from ..errors import VloraError
    from ..io.header import read_adapter_summary
    from ..io.scan import scan_local_adapters

    found = scan_local_adapters(root)
    if not found:
        from ..errors import AdapterFormatError

        raise AdapterFormatError(f"{root}: no adapter folders and not a subspace folder")
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    for i, p in enumerate(found):
        tick(progress, cancel, i, len(found), f"reading {p.name}")
        try:
            s = read_adapter_summary(p).to_dict()
            s["name"] = p.name
            s["ok"] = True
            rows.append(s)
        except VloraError as exc:
            rows.append({"path": str(p), "name": p.name, "ok": False, "error": str(exc)})
            problems.append(str(exc))
    good = [r for r in rows if r["ok"]]
    bases = sorted({r["base_model"] for r in good if r.get("base_model")})
    if len(bases) > 1:
        problems.append(f"adapters name {len(bases)} different base models: {', '.join(bases)}")
    module_sets = {tuple(m["name"] for m in r["modules"]) for r in good}
    if len(module_sets) > 1:
        problems.append(f"adapters target {len(module_sets)} different module sets")
    return {
        "type": "collection",
        "path": str(root),
        "count": len(rows),
        "adapters": [{k: v for k, v in r.items() if k != "modules"} for r in rows],
        "base_models": bases,
        "ranks": sorted({r["rank"] for r in good}),
        "total_params": sum(r["num_params"] for r in good),
        "total_bytes": sum(r["bytes"] for r in good),
        "problems": problems,
    }


def run_info(params: dict[str, Any], *, progress: ProgressFn | None = None, cancel: CancelLike | None = None) -> JobOutput:
    """Describe an adapter, a folder of adapters, or a saved subspace.

    An adapter (folder, ``.safetensors`` file or ``hf://`` id) is read from its
    header and config only: torch is not imported.

    data, by ``type``:

    - ``"adapter"``: :meth:`AdapterSummary.to_dict` (``path``, ``base_model``, ``rank``,
      ``lora_alpha``, ``use_rslora``, ``target_modules``, ``num_modules``, ``modules``
      [{name, rank, in_features, out_features, dtype}], ``extra_tensors``, ``num_params``,
      ``bytes``, ``dtypes``) plus ``"type"``.
    - ``"collection"``: ``{"path", "count", "adapters": [summary without modules, plus
      name/ok/error], "base_models", "ranks", "total_params", "total_bytes", "problems"}``.
    """
    from ..io.scan import is_adapter_dir

    spec = str(params["path"])
    if spec.startswith("hf://"):
        from ..io.header import read_adapter_summary
        from ..io.hub import download_adapter
        from ..io.scan import parse_hub_spec

        s = parse_hub_spec(spec)
        assert s.repo_id is not None
        summary = read_adapter_summary(download_adapter(s.repo_id, s.revision)).to_dict()
        summary["path"] = spec
        return JobOutput(summary=_adapter_line(summary), data={"type": "adapter", **summary})
    p = Path(spec)
    if p.is_dir() and not is_adapter_dir(p) and p.exists():
        data = _collection_info(p, progress, cancel)
        return JobOutput(summary=f"{p}: {data['count']} adapters, {data['total_bytes']} bytes", data=data)
    from ..io.header import read_adapter_summary

    summary = read_adapter_summary(p).to_dict()
    return JobOutput(summary=_adapter_line(summary), data={"type": "adapter", **summary})


def _adapter_line(s: dict[str, Any]) -> str:
    return f"{s['path']}: {s['num_modules']} modules, r={s['rank']}, alpha={s['lora_alpha']:g}, {s['num_params']} params, {s['bytes']} bytes"


# -- inspect --------------------------------------------------------------------


def run_inspect(params: dict[str, Any], *, progress: ProgressFn | None = None, cancel: CancelLike | None = None) -> JobOutput:
    """Per-module figures of one adapter, plus the problems validation finds.

    Norms go through r×r products: no d×d update is formed.

    data: ``{"path", "name", "base_model", "rank", "lora_alpha", "use_rslora", "target_modules",
    "num_params", "bytes", "extra_tensors": [key, …], "config": {…},
    "modules": [{"name", "rank", "in_features", "out_features", "dtype", "scale", "finite",
    "norm_a", "norm_b", "norm_delta", "singular_values": [σ…], "stable_rank", "effective_rank"}],
    "norm_delta_total", "problems": [str, …]}``
    """
    from ..io.local import load_adapter
    from .common import adapter_warnings, module_figures

    spec = str(params["adapter"])
    if spec.startswith("hf://"):
        from ..io.hub import download_adapter
        from ..io.scan import parse_hub_spec

        s = parse_hub_spec(spec)
        assert s.repo_id is not None
        folder = download_adapter(s.repo_id, s.revision)
    else:
        folder = Path(spec)
    w = load_adapter(folder, check_finite=False)
    figures = []
    for i, m in enumerate(w.layer_names):
        tick(progress, cancel, i, len(w.layer_names), m)
        figures.append(module_figures(w, m))
    tick(progress, cancel, len(w.layer_names), len(w.layer_names), "done")
    problems = adapter_warnings(w, figures)
    total = sum((f["norm_delta"] or 0.0) ** 2 for f in figures) ** 0.5
    data = {
        "path": spec,
        "name": w.name,
        "base_model": w.base_model_name_or_path,
        "rank": w.rank,
        "lora_alpha": w.lora_alpha,
        "use_rslora": w.use_rslora,
        "target_modules": w.target_modules,
        "num_params": w.num_params,
        "bytes": w.nbytes,
        "extra_tensors": sorted(w.extra_tensors),
        "config": w.metadata,
        "modules": figures,
        "norm_delta_total": total,
        "problems": problems,
    }
    return JobOutput(summary=f"{spec}: {len(figures)} modules, ‖ΔW‖={total:.4g}, {len(problems)} problem(s)", data=data)


# -- validate -------------------------------------------------------------------


def run_validate(params: dict[str, Any], *, progress: ProgressFn | None = None, cancel: CancelLike | None = None) -> JobOutput:
    """Check adapters: files, keys, shapes, dtypes, NaN/Inf, config, and that they fit together.

    The job's status is ``failed`` (``error_kind="error"``) when any adapter has an
    error or the set is incompatible; warnings alone keep it ``ok``.

    data: ``{"ok": bool, "adapters": [{"path", "name", "ok", "error": str|None,
    "warnings": [str…]}], "compatible": bool|None, "compatibility": str|None,
    "compat_warnings": [str…]}``
    """
    from ..errors import IncompatibleAdaptersError, VloraError
    from ..io.local import check_compatible, load_adapter
    from ..io.scan import expand_adapter_specs
    from .common import adapter_warnings, module_figures, unique_names

    specs = expand_adapter_specs(list(params["adapters"]))
    names = unique_names([s.name for s in specs])
    rows: list[dict[str, Any]] = []
    loaded = []
    for i, (spec, name) in enumerate(zip(specs, names)):
        tick(progress, cancel, i, len(specs), f"checking {spec.label}")
        row: dict[str, Any] = {"path": spec.label, "name": name, "ok": True, "error": None, "warnings": []}
        try:
            if spec.repo_id:
                from ..io.hub import load_adapter_from_hub

                w = load_adapter_from_hub(spec.repo_id, spec.revision)
            else:
                assert spec.path is not None
                w = load_adapter(spec.path, name=name)
            figs = [module_figures(w, m) for m in w.layer_names]
            row["warnings"] = adapter_warnings(w, figs)
            loaded.append(w)
        except VloraError as exc:
            row.update(ok=False, error=str(exc))
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
    ok = all(r["ok"] for r in rows) and compatible is not False
    bad = sum(not r["ok"] for r in rows)
    summary = f"{len(rows)} adapter(s): {len(rows) - bad} valid, {bad} invalid"
    if compatible is False:
        summary += "; incompatible: " + str(compat_msg)
    elif compatible:
        summary += "; compatible"
    data = {"ok": ok, "adapters": rows, "compatible": compatible, "compatibility": compat_msg, "compat_warnings": compat_warn}
    return JobOutput(summary=summary, data=data, ok=ok)


# -- merge ----------------------------------------------------------------------


def _method_params(kind: str, fixed: tuple[str, ...]) -> tuple[Param, ...]:
    """The union of the registered ``kind`` methods' parameters, as optional job parameters.

    Defaults differ between methods (``rank`` is ``exact`` for task arithmetic and
    ``auto`` for TIES), so each job parameter defaults to ``None``: the chosen
    method's own default applies, and its help names the methods it applies to.
    """
    from ..registry import methods

    seen: dict[str, Param] = {}
    used_by: dict[str, list[str]] = {}
    for mname, info in methods(kind).items():
        for p in info.params:
            if p.name in fixed:
                continue
            used_by.setdefault(p.name, []).append(mname)
            seen.setdefault(p.name, p)
    out = []
    for name, p in seen.items():
        who = used_by[name]
        suffix = f" [{', '.join(who)}]" if len(who) < len(methods(kind)) else ""
        out.append(Param(p.name, p.type, None, (p.help or "") + suffix, p.choices, False, p.minimum, p.maximum))
    return tuple(out)


def _method_kwargs(kind: str, method: str, params: dict[str, Any], fixed: tuple[str, ...]) -> dict[str, Any]:
    """Keyword arguments for ``method`` from the job parameters; refuse ones it does not take."""
    from ..registry import get_method

    info = get_method(kind, method)
    accepted = {p.name: p for p in info.params}
    kwargs: dict[str, Any] = {}
    for name, value in params.items():
        if name in fixed or value is None or value is False:
            continue
        if name not in accepted:
            raise ValueError(f"{name}: does not apply to {kind} method {method!r} (it takes {', '.join(accepted) or 'no parameters'})")
        kwargs[name] = accepted[name].validate(value)
    return kwargs


_MERGE_FIXED = ("adapters", "output", "method", "force", "modelfile")


def run_merge(params: dict[str, Any], *, progress: ProgressFn | None = None, cancel: CancelLike | None = None) -> JobOutput:
    """Merge adapters' updates ΔW with a registered method and write the result as a PEFT folder.

    data: ``{"path", "inputs": [name…], **MergeResult.to_dict()}`` — ``method``, ``params``
    (resolved: weights, rank, density, drop_rate, seed…), ``name``, ``rank``, ``ranks``,
    ``num_modules``, ``num_params``, ``max_error``, ``mean_error``, ``overall_error``,
    ``errors`` {module: relative ΔW error of the rank truncation}, ``norms``, ``warnings``.
    """
    from ..io.local import save_adapter
    from ..registry import get_method
    from .common import load_adapters

    method = params["method"]
    info = get_method("merge", method)
    kwargs = _method_kwargs("merge", method, params, _MERGE_FIXED)
    stages = StagedProgress(progress, {"load": 1, "merge": 3, "save": 1})
    adapters = load_adapters(params["adapters"], progress=stages.stage("load"), cancel=cancel)
    assert info.func is not None
    result = info.func(adapters, progress=stages.stage("merge"), cancel=cancel, **kwargs)
    tick(stages.stage("save"), cancel, 0, 1, f"writing {params['output']}")
    out = save_adapter(result.weights, params["output"], force=params["force"], modelfile=params["modelfile"])
    stages.done()
    d = result.to_dict()
    data = {"path": str(out), "inputs": [a.name for a in adapters], **d}
    err = "exact" if result.exact else f"max ΔW error {result.max_error:.3g}"
    return JobOutput(
        summary=f"merged {len(adapters)} adapters with {method} (rank {result.weights.rank}, {err}) into {out}",
        outputs=[str(out)],
        data=data,
    )


# -- registration ---------------------------------------------------------------

_REGISTERED = False


def ensure_registered() -> None:
    """Register every kind once (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    for kind in _build_kinds():
        register_kind(kind)
    _REGISTERED = True


def _build_kinds() -> list[JobKind]:
    return [
        JobKind(
            "demo", "Demo collection", "write the built-in demo collection of adapters",
            (_output("folder to write the demo adapters into"), FORCE), writes=("output",), func=run_demo,
        ),
        JobKind(
            "info", "Info", "summarize an adapter (header only), a folder of adapters, or a subspace",
            (Param("path", "path", required=True, help="adapter folder, folder of adapters, subspace folder or hf://org/repo"),),
            func=run_info,
        ),
        JobKind(
            "inspect", "Inspect adapter", "per-module norms of A, B and ΔW, spectrum, and validation problems",
            (Param("adapter", "path", required=True, help="adapter folder, .safetensors file or hf://org/repo"),),
            func=run_inspect,
        ),
        JobKind(
            "validate", "Validate adapters", "check adapters' files, tensors and config, and that they fit together",
            (ADAPTERS,), func=run_validate,
        ),
        JobKind(
            "merge", "Merge adapters", "merge adapters' updates ΔW into one PEFT adapter (task arithmetic, TIES, DARE, …)",
            (
                ADAPTERS,
                _output("folder to write the merged PEFT adapter into"),
                Param("method", "choice", "task_arithmetic", "merge method", _choices("merge")),
                *_method_params("merge", _MERGE_FIXED),
                Param("modelfile", "bool", False, "also write an Ollama Modelfile beside the adapter"),
                FORCE,
            ),
            writes=("output",), func=run_merge,
        ),
    ]


def _choices(kind: str) -> tuple[str, ...]:
    from ..registry import methods

    return tuple(methods(kind))


__all__ = ["ensure_registered", "run_demo", "run_info", "run_inspect", "run_validate"]
