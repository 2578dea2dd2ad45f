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
EXCLUDE = Param("exclude", "strs", None, "leave out adapters whose folder name or path matches this glob pattern (repeatable)")


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
    - ``"subspace"`` (loads it, so torch is imported): ``{"path", "format_version", "method",
      "dtype", "base_model", "quantization": {bits, method, double_quant, quantize_loadings,
      block_size}|None, "stats": compression_stats() (without fidelity; ``stats.disk`` holds the
      ratio on disk, ``stats.storage.summary`` the line saying how much is shared), "tasks": [{"task_id",
      "mean_error", "max_error", "error_is_bound", "rank", "original_bytes", "input_bytes"}], "modules":
      [{"name", "kind", "k", "k_u", "k_v", "shared", "stored", "out_features", "in_features", "explained_at_k",
      "mean_error", "max_error"}] (``k_u``/``k_v``: columns of the joint U and V; ``k`` the larger;
      ``shared``: False for a module stored per task, ``stored``: ``"shared 3×4"`` or ``"per task, rank 4"``),
      "fidelity": {task: {module: error}}, "variance": {module: [cumulative explained share for k = 1, 2, …]}}``.
    """
    from ..io.scan import is_adapter_dir, is_subspace_dir

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
    if is_subspace_dir(p):
        data = subspace_info(p, progress=progress, cancel=cancel)
        st = data["stats"]
        return JobOutput(summary=f"{p}: subspace ({data['method']}), {len(data['tasks'])} tasks, "
                                 f"{_ratio_words(st['disk'])}, max ΔW error {st['error']['max']:.3g}; "
                                 f"{st['storage']['summary']}", data=data)
    if p.is_dir() and not is_adapter_dir(p) and p.exists():
        data = _collection_info(p, progress, cancel)
        return JobOutput(summary=f"{p}: {data['count']} adapters, {data['total_bytes']} bytes", data=data)
    from ..io.header import read_adapter_summary

    summary = read_adapter_summary(p).to_dict()
    return JobOutput(summary=_adapter_line(summary), data={"type": "adapter", **summary})


def _ratio_words(disk: dict[str, Any] | None) -> str:
    """The one ratio (:func:`engine.subspace.size.size_on_disk`) as job summaries print it."""
    if not disk:
        return "ratio n/a"
    return f"{disk['text']} on disk ({disk['bytes']} bytes" + (
        f" from {disk['input_bytes']})" if disk.get("input_bytes") is not None else "; the inputs' size is not recorded)")


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
    error or the set is incompatible; warnings alone keep it ``ok``. With ``target``
    (``vllm``, ``tgi``, ``ollama``, ``peft``) each adapter is also checked for what that
    server refuses or reads differently from PEFT (rank above ``max_lora_rank``,
    ``rank_pattern``/``alpha_pattern``, ``modules_to_save``, ``bias``, DoRA); any such
    problem fails the job too.

    data: ``{"ok": bool, "adapters": [{"path", "name", "ok", "error": str|None,
    "warnings": [str…], "target_problems": [str…]}], "compatible": bool|None, "compatibility": str|None,
    "compat_warnings": [str…], "target": str|None, "max_lora_rank": int}``
    """
    from ..errors import IncompatibleAdaptersError, VloraError
    from ..io.local import check_compatible, load_adapter
    from ..io.scan import expand_adapter_specs
    from .common import adapter_warnings, module_figures, unique_names

    from ..io.targets import target_problems

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
            if spec.repo_id:
                from ..io.hub import load_adapter_from_hub

                w = load_adapter_from_hub(spec.repo_id, spec.revision)
            else:
                assert spec.path is not None
                w = load_adapter(spec.path, name=name)
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
    data = {"ok": ok, "adapters": rows, "compatible": compatible, "compatibility": compat_msg, "compat_warnings": compat_warn,
            "target": target, "max_lora_rank": max_rank}
    return JobOutput(summary=summary, data=data, ok=ok)


def _config_target_problems(path: Any, target: str, max_rank: int) -> list[str]:
    """``target``'s problems read from the config alone, for an adapter the loader refused (DoRA…)."""
    import json

    from ..errors import VloraError
    from ..io.header import resolve_adapter_files
    from ..io.targets import target_problems

    try:
        config_path, _ = resolve_adapter_files(path)
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (VloraError, OSError, ValueError):
        return []
    return target_problems(config, {}, [], target, max_lora_rank=max_rank) if isinstance(config, dict) else []


# -- subspace jobs -------------------------------------------------------------------

_STORAGE_DTYPES = ("float16", "bfloat16", "float32")
_COMPRESS_FIXED = ("adapters", "output", "method", "task_ids", "force", "exclude", "group_by")
_QUANT_FIXED = ("subspace", "output", "method", "bits", "force")


def subspace_info(path: Path, *, progress: ProgressFn | None = None, cancel: CancelLike | None = None) -> dict[str, Any]:
    """What ``info`` reports on a saved subspace (see :func:`run_info`)."""
    import json

    from ..constants import SUBSPACE_MANIFEST_NAME
    from ..subspace import SharedSubspace

    tick(progress, cancel, 0, 2, f"loading {path}")
    sub = SharedSubspace.load(path)
    tick(progress, cancel, 1, 2, "measuring")
    stats = sub.compression_stats()
    fidelity = stats.pop("fidelity")
    try:
        manifest = json.loads((Path(path) / SUBSPACE_MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = {}
    tasks = []
    for tid, proj in sub.tasks.items():
        tasks.append({
            "task_id": tid,
            "mean_error": proj.mean_error,
            "max_error": proj.max_error,
            "error_is_bound": proj.error_is_bound,
            "rank": max(proj.ranks.values(), default=0),
            "original_bytes": proj.original_bytes,
            "input_bytes": proj.input_bytes,
        })
    variance = sub.explained_variance()
    modules = _module_rows(sub, stats["storage"], fidelity, variance)
    tick(progress, cancel, 2, 2, "done")
    return {
        "type": "subspace",
        "path": str(path),
        "format_version": manifest.get("format_version", manifest.get("version")),
        "method": sub.method,
        "dtype": stats["dtype"],
        "base_model": sub.base_model,
        "quantization": sub.quantization,
        "stats": stats,
        "tasks": tasks,
        "modules": modules,
        "fidelity": fidelity,
        "variance": variance,
    }


def _module_rows(sub: Any, storage: dict[str, Any], fidelity: dict[str, dict[str, float]],
                 variance: dict[str, list[float]]) -> list[dict[str, Any]]:
    """Per module: how it is stored (shared k_u×k_v, or per task at a rank), shape, variance and errors."""
    modules = []
    for m in sub.layer_names:
        b = sub.modules[m]
        how = storage["modules"][m]
        errs = [f[m] for f in fidelity.values() if m in f]
        modules.append({
            "name": m,
            "kind": b.kind,
            "k": b.k,
            "k_u": how["k_u"] if how["shared"] else 0,
            "k_v": how["k_v"] if how["shared"] else 0,
            "shared": how["shared"],
            "stored": how["form"],
            "out_features": b.shape[0],
            "in_features": b.shape[1],
            "explained_at_k": (variance[m][b.k - 1] if b.k and len(variance[m]) >= b.k else None),
            "mean_error": sum(errs) / len(errs) if errs else 0.0,
            "max_error": max(errs) if errs else 0.0,
        })
    return modules


def run_compress(params: dict[str, Any], *, progress: ProgressFn | None = None, cancel: CancelLike | None = None) -> JobOutput:
    """Build a shared subspace from adapters with a registered method and save it (temp folder, then rename).

    The method's own parameters (``num_components``, ``variance_threshold``, ``max_error``,
    ``adaptive_k``, ``dtype``, ``streaming``, ``refine``, ``hybrid``…) pass through; one the
    method does not take is refused.

    data: ``{"path", "tasks": [task id…], "method", "streaming": bool,
    "stats": SharedSubspace.compression_stats(), "modules": [as in ``info``]}`` — ``stats`` holds
    ``disk`` (the ratio printed: the inputs' files on disk / every file of the saved folder,
    :func:`engine.subspace.size.size_on_disk`), ``storage`` (shared or per task, per module, and
    its ``summary`` line), ``original_bytes``, ``stored_bytes``, ``ratio``, ``ratio_vs_fp16``
    (tensors in memory, seed-compatible), ``k`` {module: k}, ``module_kinds``,
    ``dtype``, ``quantization``, ``error`` {``mean``, ``max``, ``per_task`` {task: {mean, max}},
    ``per_module`` {module: {mean, max}}, ``is_bound``} and ``fidelity`` {task: {module: error}}
    (errors are relative ‖ΔW−ΔŴ‖/‖ΔW‖, measured after rounding to the storage dtype).
    """
    from ..registry import get_method
    from .common import load_adapters, resolve_local_paths

    if params["task_ids"] is not None:
        from ..io.scan import validate_task_id

        for t in params["task_ids"]:
            validate_task_id(t)
    from ..errors import IncompatibleAdaptersError
    from ..io.local import describe_sets, partition_compatible

    method = params["method"]
    info = get_method("compress", method)
    kwargs = _method_kwargs("compress", method, params, _COMPRESS_FIXED)
    streaming = bool(kwargs.get("streaming"))
    grouped = params.get("group_by") == "compat"
    stages = StagedProgress(progress, {"load": 1, "build": 4, "save": 1})
    inputs: list[Any]
    exclude = params.get("exclude")
    if streaming:
        pairs = resolve_local_paths(params["adapters"], progress=stages.stage("load"), cancel=cancel, exclude=exclude)
        names, inputs = [n for n, _ in pairs], [p for _, p in pairs]
    else:
        inputs = load_adapters(params["adapters"], progress=stages.stage("load"), cancel=cancel, exclude=exclude)
        names = [a.name for a in inputs]
    ids = params["task_ids"] or names
    _check_ids(ids, len(inputs))
    sets = partition_compatible(inputs, names=ids)  # headers only when streaming
    if grouped:
        return _compress_groups(params, info, kwargs, inputs, ids, sets, stages, streaming, cancel)
    if len(sets) > 1:
        raise IncompatibleAdaptersError(
            f"adapters: one subspace needs adapters with the same target modules and shapes, these form {describe_sets(sets)}. "
            "Compress one set with --exclude PATTERN, or each set into its own subspace with --group-by compat"
        )
    assert info.func is not None
    sub = info.func(inputs, task_ids=ids, progress=stages.stage("build"), cancel=cancel, **kwargs)
    tick(stages.stage("save"), cancel, 0, 1, f"writing {params['output']}")
    out = sub.save(params["output"], force=params["force"])
    stages.done()
    stats = sub.compression_stats()
    err = stats["error"]
    modules = _module_rows(sub, stats["storage"], stats["fidelity"], sub.explained_variance())
    return JobOutput(
        summary=(f"compressed {len(sub.tasks)} adapters into {out} ({stats['method']}): {_ratio_words(stats['disk'])}, "
                 f"ΔW error mean {err['mean']:.3g} max {err['max']:.3g}; {stats['storage']['summary']}"),
        outputs=[str(out)],
        data={"path": str(out), "tasks": sub.task_ids, "method": sub.method, "streaming": streaming, "stats": stats,
              "modules": modules},
    )


def _compress_groups(params: dict[str, Any], info: Any, kwargs: dict[str, Any], inputs: list[Any], ids: list[str],
                     sets: list[Any], stages: StagedProgress, streaming: bool, cancel: CancelLike | None) -> JobOutput:
    """``compress --group-by compat``: one subspace per compatible set, written as ``OUTPUT/<set name>``."""
    from ..io.local import atomic_dir

    out = Path(params["output"])
    build = stages.stage("build")
    written: list[dict[str, Any]] = []
    assert info.func is not None
    with atomic_dir(out, force=params["force"]) as tmp:  # every subspace appears at once, or none
        for si, cs in enumerate(sets):
            tick(build, cancel, si, len(sets), f"set {cs.name}: {len(cs.members)} adapter(s)")
            sub = info.func([inputs[i] for i in cs.indices], task_ids=[ids[i] for i in cs.indices], cancel=cancel, **kwargs)
            sub.save(tmp / cs.name)
            stats = sub.compression_stats()
            written.append({**cs.to_dict(), "path": str(out / cs.name), "tasks": sub.task_ids, "stats": stats})
        tick(build, cancel, len(sets), len(sets), "saving")
        tick(stages.stage("save"), cancel, 0, 1, f"writing {out}")
    stages.done()
    worst = max((w["stats"]["error"]["max"] for w in written), default=0.0)
    return JobOutput(
        summary=(f"compressed {len(inputs)} adapters into {len(written)} subspace(s) under {out} "
                 f"({', '.join(w['name'] for w in written)}), ΔW error max {worst:.3g}"),
        outputs=[w["path"] for w in written],
        data={"path": str(out), "grouped": True, "layout": "OUTPUT/<set name>", "method": info.name,
              "streaming": streaming, "tasks": [t for w in written for t in w["tasks"]], "sets": written},
    )


def _check_ids(ids: list[str], n: int) -> None:
    if len(ids) != n:
        raise ValueError(f"task_ids: got {len(ids)} id(s) for {n} adapter(s)")
    dup = sorted({t for t in ids if ids.count(t) > 1})
    if dup:
        raise ValueError(f"task_ids: duplicate id {dup[0]!r}")


def _task_report(sub: Any, task_id: str) -> dict[str, Any]:
    proj = sub.tasks[task_id]
    return {"task_id": task_id, "mean_error": proj.mean_error, "max_error": proj.max_error,
            "error_is_bound": proj.error_is_bound, "fidelity": dict(proj.fidelity)}


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
    from ..errors import OutputExistsError
    from ..io.scan import validate_task_id
    from ..subspace import SharedSubspace
    from ..subspace.rule import breaks_message, change_report, totals
    from .common import load_one

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
    target = params["output"] or params["subspace"]
    tick(stages.stage("save"), cancel, 0, 1, f"writing {target}")
    out = sub.save(target, force=True if params["output"] is None else params["force"])
    stages.done()
    task = _task_report(sub, task_id)
    kept = {t: f for t, f in before.items() if t != task_id}
    old_after = {t: after[t] for t in kept if t in after}
    b, a = totals(kept), totals(old_after)
    return JobOutput(
        summary=(f"added {task_id!r} to {out} ({mode}): ΔW error mean {task['mean_error']:.3g} max {task['max_error']:.3g}; "
                 f"stored tasks mean {b['mean']:.3g} → {a['mean']:.3g}, max {b['max']:.3g} → {a['max']:.3g}; {len(sub.tasks)} tasks"),
        outputs=[str(out)],
        data={"path": str(out), "task_id": task_id, "mode": mode, "task": task, "target": sub.k_rule,
              "tasks": change_report(before, after, breaks, {t: p.error_is_bound for t, p in sub.tasks.items()}),
              "before": b, "after": totals(after), "stored_after": a, "warnings": warnings,
              "stats": sub.compression_stats()},
    )


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

    from ..io.local import save_adapter
    from ..io.targets import for_target, modelfile_text
    from ..subspace import SharedSubspace

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
    task = _task_report(sub, task_id)
    data = {
        "path": str(out), "task_id": task_id, "target": target, "rank": w.rank, "ranks": w.ranks,
        "lora_alpha": w.lora_alpha, "base_model": w.base_model_name_or_path, "target_modules": w.target_modules,
        "dtype": params["dtype"], "modelfile": str(Path(out) / "Modelfile") if params["modelfile"] else None,
        "target_warnings": notes, **{k: v for k, v in task.items() if k != "task_id"},
    }
    return JobOutput(summary=f"exported {task_id!r} to {out} (rank {w.rank}, ΔW error max {task['max_error']:.3g})",
                     outputs=[str(out)], data=data)


def run_quantize(params: dict[str, Any], *, progress: ProgressFn | None = None, cancel: CancelLike | None = None) -> JobOutput:
    """Quantize a saved subspace's bases (and optionally its coefficients) per block and save it.

    Errors are re-measured after rounding (upper bounds, since the original adapters are
    not read). ``nf4`` is 4-bit by definition (and double-quantizes its scales unless told not to).

    data: ``{"path", "quantization": {"bits", "method", "double_quant", "quantize_loadings",
    "block_size"}, "before": {"stored_bytes", "disk_bytes", "ratio", "mean_error", "max_error"},
    "after": {same}, "target": the subspace's k rule (see ``add``), "warnings": [str] (one
    line when the rounding breaks the error target), "stats": compression_stats() after}``
    (``ratio``: the ratio on disk, of the input folder before and of the written one after;
    ``stored_bytes``: tensors in memory)
    """
    from ..registry import get_method
    from ..subspace import SharedSubspace

    bits, method = int(params["bits"]), params["method"]
    if method == "nf4" and bits != 4:
        raise ValueError(f"bits: nf4 is a 4-bit format, got --bits {bits}")
    info = get_method("quantize", method)
    kwargs = _method_kwargs("quantize", method, params, _QUANT_FIXED)
    if any(p.name == "bits" for p in info.params):
        kwargs["bits"] = bits
    stages = StagedProgress(progress, {"load": 1, "quantize": 3, "save": 1})
    tick(stages.stage("load"), cancel, 0, 1, f"loading {params['subspace']}")
    sub = SharedSubspace.load(params["subspace"])

    def figures() -> dict[str, Any]:
        st = sub.compression_stats()
        disk = st["disk"] or {}
        return {"stored_bytes": st["stored_bytes"], "disk_bytes": disk.get("bytes"), "ratio": disk.get("ratio"),
                "mean_error": st["error"]["mean"], "max_error": st["error"]["max"]}

    before = figures()
    fid_before = sub.fidelity()
    assert info.func is not None
    info.func(sub, progress=stages.stage("quantize"), cancel=cancel, **kwargs)
    from ..subspace.rule import rule_text

    breaks = sub.target_breaks(fid_before)
    warnings = []
    if breaks:
        blamed = {t for b in breaks for t in b.tasks}
        now = figures()
        warnings.append(f"{bits}-bit {method} breaks the subspace's error target ({rule_text(sub.k_rule)}) in "
                        f"{len({b.module for b in breaks})} module(s) for {len(blamed)} task(s): ΔW error mean "
                        f"{before['mean_error']:.3g} → {now['mean_error']:.3g}, max "
                        f"{before['max_error']:.3g} → {now['max_error']:.3g}")
    tick(stages.stage("save"), cancel, 0, 1, f"writing {params['output']}")
    out = sub.save(params["output"], force=params["force"])
    stages.done()
    after = figures()
    return JobOutput(
        summary=(f"quantized {params['subspace']} to {bits}-bit {method} in {out}: {before['stored_bytes']} → "
                 f"{after['stored_bytes']} bytes, max ΔW error {before['max_error']:.3g} → {after['max_error']:.3g}"),
        outputs=[str(out)],
        data={"path": str(out), "quantization": sub.quantization, "before": before, "after": after,
              "target": sub.k_rule, "warnings": warnings, "stats": sub.compression_stats()},
    )


def run_benchmark(params: dict[str, Any], *, progress: ProgressFn | None = None, cancel: CancelLike | None = None) -> JobOutput:
    """Fidelity against size over k for each compression method (nothing is kept on disk).

    For each method and k the subspace is built with ``num_components=k``, saved to a
    temporary folder (deleted at once) and measured as ``compress`` measures it: bytes of
    every file on disk and the ratio of :func:`engine.subspace.size.size_on_disk`, and its
    ΔW errors (after rounding to the storage dtype). The ``svd`` method is the honest
    baseline (each task alone, truncated SVD per module). A method that does not apply to
    these adapters (``pca`` on mixed ranks) is skipped with a note; every finished row is kept.

    data: ``{"tasks": [task id…], "input_bytes", "input_bytes_fp16", "ks": [k…], "methods": [name…],
    "rows": [{"method", "k", "stored_bytes" (on disk), "ratio", "ratio_vs_fp16", "mean_error", "max_error",
    "seconds", "error": str|None}], "skipped": [{"method", "reason"}]}`` (a cell that cannot be
    built, e.g. k above what a method allows, has ``error`` set and null figures).
    """
    import shutil
    import tempfile
    import time

    from ..errors import IncompatibleAdaptersError, JobCancelled
    from ..registry import get_method
    from .common import load_adapters

    stages = StagedProgress(progress, {"load": 1, "bench": 6})
    adapters = load_adapters(params["adapters"], progress=stages.stage("load"), cancel=cancel, exclude=params.get("exclude"))
    max_r = max(a.module_rank(m) for a in adapters for m in a.layer_names)
    if params["k_values"] is not None:
        ks = sorted({int(k) for k in params["k_values"]})
        if any(k < 1 or k != int(k) for k in params["k_values"]):
            raise ValueError(f"k_values: positive integers expected, got {params['k_values']}")
    else:
        ks, k = [], 1
        cap = max_r * len(adapters)
        while k <= cap:
            ks.append(k)
            k *= 2
    meths = list(params["methods"] or _choices("compress"))
    unknown = [m for m in meths if m not in _choices("compress")]
    if unknown:
        raise ValueError(f"methods: unknown compression method {unknown[0]!r}")
    bench = stages.stage("bench")
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    total = len(ks) * len(meths)
    disk: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="vlora-benchmark-") as tmp:
        for i, (meth, k) in enumerate((m, k) for m in meths for k in ks):
            tick(bench, cancel, i, total, f"{meth} k={k}")
            if any(s["method"] == meth for s in skipped):
                continue
            t0 = time.perf_counter()
            row: dict[str, Any] = {"method": meth, "k": k, "stored_bytes": None, "ratio": None, "ratio_vs_fp16": None,
                                   "mean_error": None, "max_error": None, "seconds": None, "error": None}
            try:
                build = get_method("compress", meth).func
                assert build is not None
                sub = build(adapters, num_components=k, dtype=params["dtype"], cancel=cancel)
                seconds = time.perf_counter() - t0
                folder = sub.save(Path(tmp) / f"{meth}-k{k}")
            except JobCancelled:
                raise
            except IncompatibleAdaptersError as exc:  # the method does not apply to these adapters: no k will do
                skipped.append({"method": meth, "reason": str(exc)})
                continue
            except Exception as exc:  # one cell failed: note it, keep the finished rows
                row["error"] = str(exc) or exc.__class__.__name__
                rows.append(row)
                continue
            st = sub.compression_stats()
            shutil.rmtree(folder)
            disk = st["disk"]
            row.update(stored_bytes=disk["bytes"], ratio=disk["ratio"], ratio_vs_fp16=disk["ratio_vs_fp16"],
                       mean_error=st["error"]["mean"], max_error=st["error"]["max"], seconds=seconds)
            rows.append(row)
    stages.done()
    ok = [r for r in rows if r["error"] is None]
    best = min(ok, key=lambda r: (r["max_error"], -(r["ratio"] or 0.0))) if ok else None
    summary = f"benchmarked {len(meths)} method(s) × {len(ks)} k value(s) on {len(adapters)} adapters"
    if best:
        ratio = f"{best['ratio']:.2f}x" if best["ratio"] is not None else "ratio n/a"
        summary += f"; lowest max error {best['max_error']:.3g} ({best['method']}, k={best['k']}, {ratio} on disk)"
    for sk in skipped:
        summary += f"; {sk['method']} skipped: {sk['reason']}"
    return JobOutput(summary=summary, data={"tasks": [a.name for a in adapters], "input_bytes": disk.get("input_bytes"),
                                            "input_bytes_fp16": disk.get("input_bytes_fp16"), "ks": ks,
                                            "methods": meths, "rows": rows, "skipped": skipped})


# -- analyze / diff ---------------------------------------------------------------


def run_analyze(params: dict[str, Any], *, progress: ProgressFn | None = None, cancel: CancelLike | None = None) -> JobOutput:
    """Similarity of the adapters' updates ΔW, clusters, outliers, and shared structure.

    Cosines go through r×r products (no d×d update is formed).

    data: ``{"names": [str…], "similarity": N×N list (overall cosine of ΔW), "norms": [‖ΔW‖…],
    "clusters": [{"members": [i…], "names": [str…]}…] (largest first), "threshold", "linkage",
    "outliers": [{"index", "name"}…], "outlier_threshold", "max_similarity": [per adapter],
    "mean_similarity": [per adapter], "variance": {"side": "column", "ks", "mean": {k: share},
    "modules": {module: {"cumulative", "at_k", "k90", "k99"}}},
    "modules": {module: {"matrix", "norms"}} (only with ``per_module``),
    "compared_modules": [module…], "left_out": {adapter: [module…]}}``

    Adapters with different target modules are compared on the modules they all
    have (same shape); ``left_out`` lists, per adapter, the modules that leaves out
    (empty when every adapter has the same modules).
    """
    from ..analysis import explained_variance, find_clusters, outlier_report, similarity_report
    from ..io.local import common_modules
    from ..subspace.common import restrict_modules
    from .common import load_adapters

    stages = StagedProgress(progress, {"load": 2, "similarity": 2, "variance": 1})
    adapters = load_adapters(params["adapters"], progress=stages.stage("load"), cancel=cancel, exclude=params.get("exclude"))
    if len(adapters) < 2:
        raise ValueError(f"adapters: analyze needs at least 2 adapters, got {len(adapters)}")
    overlap = common_modules(adapters)
    if not overlap.complete:
        adapters = [restrict_modules(a, overlap.modules) for a in adapters]
    sim = similarity_report(adapters, progress=stages.stage("similarity"), cancel=cancel)
    clusters = find_clusters(sim, params["threshold"], linkage=params["linkage"])
    outliers = outlier_report(sim, params["outlier_threshold"])
    variance = explained_variance(adapters, progress=stages.stage("variance"), cancel=cancel)
    stages.done()
    sd = sim.to_dict(modules=params["per_module"])
    od = outliers.to_dict()
    data: dict[str, Any] = {
        "names": sd["names"],
        "similarity": sd["matrix"],
        "norms": sd["norms"],
        "clusters": clusters.to_dict()["clusters"],
        "threshold": clusters.threshold,
        "linkage": clusters.linkage,
        "outliers": od["outliers"],
        "outlier_threshold": od["threshold"],
        "max_similarity": od["max_similarity"],
        "mean_similarity": od["mean_similarity"],
        "variance": variance.to_dict(),
        **overlap.to_dict(),
    }
    if params["per_module"]:
        data["modules"] = sd["modules"]
    multi = sum(1 for c in clusters if len(c) > 1)
    summary = f"{len(adapters)} adapters: {len(clusters)} cluster(s) ({multi} with several members), {len(outliers)} outlier(s)"
    if not overlap.complete:
        summary += (f"; compared on the {len(overlap.modules)} modules all share "
                    f"({len(overlap.left_out)} adapter(s) have modules left out)")
    return JobOutput(summary=summary, data=data)


def run_diff(params: dict[str, Any], *, progress: ProgressFn | None = None, cancel: CancelLike | None = None) -> JobOutput:
    """Compare two adapters module by module (norms, cosine, relative difference of ΔW).

    data: ``{"a", "b", "overall": {"module", "norm_a", "norm_b", "cosine", "relative_difference",
    "rank_a", "rank_b"}, "modules": [same per module], "only_in_a": [module…], "only_in_b": [module…]}``
    (``relative_difference`` is ``‖ΔW_a − ΔW_b‖/‖ΔW_a‖``, ``null`` when ΔW_a is zero and ΔW_b is not).
    """
    from ..analysis import diff_report
    from .common import load_one

    a = load_one(str(params["a"]))
    b = load_one(str(params["b"]))
    if a.name == b.name:
        a.name, b.name = str(params["a"]), str(params["b"])
    d = diff_report(a, b, progress=progress, cancel=cancel).to_dict()
    o = d["overall"]
    rel = o["relative_difference"]
    rel_s = "n/a" if rel is None else f"{rel:.3g}"
    summary = f"{d['a']} vs {d['b']}: cosine {o['cosine']:.3f}, relative difference {rel_s}"
    if d["only_in_a"] or d["only_in_b"]:
        summary += (f" (on the {len(d['modules'])} shared modules; left out: {len(d['only_in_a'])} only in a, "
                    f"{len(d['only_in_b'])} only in b)")
    return JobOutput(summary=summary, data=d)


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
    defaults: dict[str, dict[str, Any]] = {}
    for mname, info in methods(kind).items():
        for p in info.params:
            if p.name in fixed:
                continue
            used_by.setdefault(p.name, []).append(mname)
            defaults.setdefault(p.name, {})[mname] = p.default
            seen.setdefault(p.name, p)
    out = []
    for name, p in seen.items():
        who = used_by[name]
        text = p.help or ""
        shown = {m: d for m, d in defaults[name].items() if d is not None}
        if shown and len(set(map(repr, shown.values()))) == 1:
            text += f" (default {_show(next(iter(shown.values())))})"
        elif shown:
            text += " (default " + ", ".join(f"{_show(d)} for {m}" for m, d in shown.items()) + ")"
        if len(who) < len(methods(kind)):
            text += f" [{', '.join(who)}]"
        out.append(Param(p.name, p.type, None, text, p.choices, False, p.minimum, p.maximum, p.exclusive_minimum))
    return tuple(out)


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def _method_kwargs(kind: str, method: str, params: dict[str, Any], fixed: tuple[str, ...]) -> dict[str, Any]:
    """Keyword arguments for ``method`` from the job parameters; refuse ones it does not take."""
    from ..registry import get_method

    info = get_method(kind, method)
    accepted = {p.name: p for p in info.params}
    kwargs: dict[str, Any] = {}
    for name, value in params.items():
        if name in fixed or value is None:
            continue
        if name not in accepted:
            raise ValueError(f"{name}: does not apply to {kind} method {method!r} (it takes {', '.join(accepted) or 'no parameters'})")
        kwargs[name] = accepted[name].validate(value)
    return kwargs


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
    from ..io.local import save_adapter
    from ..io.targets import for_target, modelfile_text
    from ..registry import get_method
    from .common import load_adapters

    method = params["method"]
    info = get_method("merge", method)
    kwargs = _method_kwargs("merge", method, params, _MERGE_FIXED)
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
    d = result.to_dict()
    data = {"path": str(out), "inputs": [a.name for a in adapters], "target": target, "target_warnings": notes, **d}
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
    order = ("demo", "info", "inspect", "validate", "analyze", "diff", "compress", "add", "export", "merge", "quantize", "benchmark")
    for kind in sorted(_build_kinds(), key=lambda k: order.index(k.name)):
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
            (
                ADAPTERS,
                EXCLUDE,
                Param("target", "choice", None, "also list what this server refuses or misreads (fails the check)",
                      _check_targets()),
                Param("max_lora_rank", "int", 16, "vLLM's --max-lora-rank, for --target vllm", minimum=1),
            ),
            func=run_validate,
        ),
        JobKind(
            "compress", "Compress adapters", "build a shared subspace from adapters and save it",
            (
                ADAPTERS,
                _output("folder to write the subspace into"),
                Param("method", "choice", _default_compress_method(), "compression method", _choices("compress")),
                *_method_params("compress", _COMPRESS_FIXED),
                Param("task_ids", "strs", None, "one task id per adapter (default: folder or repo names)"),
                EXCLUDE,
                Param("group_by", "choice", "none", "compat: one subspace per set of adapters with the same target "
                      "modules and shapes, written as OUTPUT/<set name>; none: refuse adapters that differ", ("none", "compat")),
                FORCE,
            ),
            writes=("output",), func=run_compress,
        ),
        JobKind(
            "add", "Add task", "add an adapter to a saved subspace (absorb, --incremental or --project)",
            (
                Param("subspace", "path", required=True, help="saved subspace folder"),
                Param("adapter", "path", required=True, help="adapter folder or hf://org/repo"),
                Param("task_id", "str", required=True, help="id of the new task"),
                Param("incremental", "bool", False, "grow the bases by the directions the task needs; stored tasks untouched"),
                Param("project", "bool", False, "keep the bases fixed and encode the task in them"),
                _output("write the updated subspace here instead of in place", required=False),
                Param("allow_worse", "bool", False, "accept a result that breaks the subspace's error target"),
                Param("force", "bool", False, "rewrite the subspace in place (no --output) / overwrite --output / "
                      "replace a task of the same id"),
            ),
            writes=("output",), modifies=("subspace",), func=run_add,
        ),
        JobKind(
            "export", "Export task", "reconstruct a task as a PEFT adapter folder (vLLM, TGI, Ollama)",
            (
                Param("subspace", "path", required=True, help="saved subspace folder"),
                Param("task_id", "str", required=True, help="task to export"),
                _output("folder to write the PEFT adapter into"),
                Param("alpha", "float", None, "lora_alpha to write (B is rescaled so ΔW is unchanged)", minimum=0.0,
                      exclusive_minimum=True),
                Param("base_model", "str", None, "base_model_name_or_path to write"),
                Param("target_modules", "strs", None, "target_modules to write"),
                Param("modelfile", "bool", False, "also write an Ollama Modelfile (FROM base, ADAPTER .)"),
                Param("exact_rank", "bool", False, "keep each module's own rank in rank_pattern, which only PEFT reads "
                      "(implies --target peft; default: pad to the largest module rank)"),
                _export_target(),
                Param("dtype", "choice", "float32", "dtype of the written factors", _STORAGE_DTYPES[::-1]),
                FORCE,
            ),
            writes=("output",), func=run_export,
        ),
        JobKind(
            "quantize", "Quantize subspace", "quantize a subspace's bases per block (int8, int4, NF4) and save it",
            (
                Param("subspace", "path", required=True, help="saved subspace folder"),
                _output("folder to write the quantized subspace into"),
                Param("bits", "choice", None, "bits per value", (8, 4), required=True),
                Param("method", "choice", "symmetric", "quantization method", _choices("quantize")),
                *_method_params("quantize", _QUANT_FIXED),
                FORCE,
            ),
            writes=("output",), func=run_quantize,
        ),
        JobKind(
            "benchmark", "Benchmark compression", "fidelity and size over k for each compression method (nothing written)",
            (
                ADAPTERS,
                EXCLUDE,
                Param("k_values", "floats", None, "k values to try (default 1, 2, 4, … up to N·r)"),
                Param("methods", "strs", None, "methods to compare (default: all)"),
                Param("dtype", "choice", "float16", "storage precision", _STORAGE_DTYPES),
            ),
            func=run_benchmark,
        ),
        JobKind(
            "analyze", "Analyze collection", "similarity of the updates ΔW, clusters, outliers and shared structure",
            (
                ADAPTERS,
                EXCLUDE,
                Param("threshold", "float", 0.5, "similarity at which adapters cluster together", minimum=-1.0, maximum=1.0),
                Param("outlier_threshold", "float", 0.1, "an adapter whose largest |cosine| to the others is below this is an outlier",
                      minimum=0.0, maximum=1.0),
                Param("linkage", "choice", "average", "clustering linkage", ("average", "single")),
                Param("per_module", "bool", False, "also report per-module similarity matrices"),
            ),
            func=run_analyze,
        ),
        JobKind(
            "diff", "Diff two adapters", "compare two adapters' updates ΔW module by module",
            (
                Param("a", "path", required=True, help="first adapter (folder or hf://org/repo)"),
                Param("b", "path", required=True, help="second adapter (folder or hf://org/repo)"),
            ),
            func=run_diff,
        ),
        JobKind(
            "merge", "Merge adapters", "merge adapters' updates ΔW into one PEFT adapter (task arithmetic, TIES, DARE, …)",
            (
                ADAPTERS,
                _output("folder to write the merged PEFT adapter into"),
                Param("method", "choice", "task_arithmetic", "merge method", _choices("merge")),
                *_method_params("merge", _MERGE_FIXED),
                Param("modelfile", "bool", False, "also write an Ollama Modelfile beside the adapter"),
                EXCLUDE,
                Param("head_from", "str", None, "keep this input's modules_to_save heads (e.g. a classifier) where the "
                      "inputs' differ (an adapter name/task id); identical heads are always kept"),
                _export_target(),
                FORCE,
            ),
            writes=("output",), func=run_merge,
        ),
    ]


def _export_target() -> Param:
    from ..io.targets import EXPORT_TARGETS

    return Param("target", "choice", None, "what to write for: portable (default; the same ΔW in PEFT, vLLM and TGI), "
                 "peft (as is: rank/alpha patterns and heads kept), vllm/tgi/ollama (portable, heads dropped; "
                 "ollama: integer alpha, no rsLoRA)", EXPORT_TARGETS)


def _check_targets() -> tuple[str, ...]:
    from ..io.targets import CHECK_TARGETS

    return CHECK_TARGETS


def _choices(kind: str) -> tuple[str, ...]:
    """Registered method names of ``kind``."""
    from ..registry import methods

    return tuple(methods(kind))


def _default_compress_method() -> str:
    from ..methods.compress import DEFAULT_COMPRESS_METHOD

    return DEFAULT_COMPRESS_METHOD


__all__ = ["ensure_registered", "run_demo", "run_info", "run_inspect", "run_validate"]
