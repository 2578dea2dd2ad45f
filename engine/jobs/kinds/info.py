"""The ``info`` job kind: summarize an adapter (header only), a folder of adapters, or a subspace."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...progress import CancelLike, ProgressFn, tick
from ...registry import Param
from ..base import JobKind, JobOutput
from ..reports import ratio_words, subspace_info


def _collection_info(root: Path, progress: ProgressFn | None, cancel: CancelLike | None) -> dict[str, Any]:
    from ...errors import VloraError
    from ...io.header import read_adapter_summary
    from ...io.scan import scan_local_adapters

    found = scan_local_adapters(root)
    if not found:
        from ...errors import AdapterFormatError

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
    from ...io.scan import is_adapter_dir, is_hub_spec, is_subspace_dir

    spec = str(params["path"])
    if is_hub_spec(spec):
        from ...io.header import read_adapter_summary
        from ...io.scan import spec_of
        from ..common import local_folder

        summary = read_adapter_summary(local_folder(spec_of(spec))).to_dict()
        summary["path"] = spec
        return JobOutput(summary=_adapter_line(summary), data={"type": "adapter", **summary})
    p = Path(spec)
    if is_subspace_dir(p):
        data = subspace_info(p, progress=progress, cancel=cancel)
        st = data["stats"]
        return JobOutput(summary=f"{p}: subspace ({data['method']}), {len(data['tasks'])} tasks, "
                                 f"{ratio_words(st['disk'])}, max ΔW error {st['error']['max']:.3g}; "
                                 f"{st['storage']['summary']}", data=data)
    if p.is_dir() and not is_adapter_dir(p) and p.exists():
        data = _collection_info(p, progress, cancel)
        return JobOutput(summary=f"{p}: {data['count']} adapters, {data['total_bytes']} bytes", data=data)
    from ...io.header import read_adapter_summary

    summary = read_adapter_summary(p).to_dict()
    return JobOutput(summary=_adapter_line(summary), data={"type": "adapter", **summary})


def _adapter_line(s: dict[str, Any]) -> str:
    return f"{s['path']}: {s['num_modules']} modules, r={s['rank']}, alpha={s['lora_alpha']:g}, {s['num_params']} params, {s['bytes']} bytes"


KIND = JobKind(
    "info", "Info", "summarize an adapter (header only), a folder of adapters, or a subspace",
    (Param("path", "path", required=True, help="adapter folder, folder of adapters, subspace folder or hf://org/repo"),),
    func=run_info,
    positionals=("path",), form_rank=9, view="subspace_info",
)
