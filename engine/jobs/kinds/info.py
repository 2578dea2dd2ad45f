"""The ``info`` job kind: summarize an adapter (header only), a folder of adapters, or a subspace."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...progress import CancelLike, ProgressFn, tick
from ...registry import Param
from ..base import JobKind, JobOutput
from ..reports import SubspaceInfo, ratio_words, subspace_info
from ..results import Result


@dataclass(frozen=True)
class AdapterModuleRow(Result):
    """One module of an adapter, from its header."""

    name: str = ""
    rank: int | None = None
    in_features: int | None = None
    out_features: int | None = None
    dtype: str | None = None


@dataclass(frozen=True)
class AdapterInfo(Result):
    """``info`` on one adapter: its header and config (:meth:`AdapterSummary.to_dict`)."""

    type: str = "adapter"
    path: str = ""
    base_model: str | None = None
    peft_type: str | None = None
    rank: int | None = None
    lora_alpha: float | None = None
    use_rslora: bool = False
    target_modules: list[str] | str | None = None
    num_modules: int = 0
    modules: list[AdapterModuleRow] = field(default_factory=list)
    extra_tensors: list[str] = field(default_factory=list)
    num_params: int = 0
    bytes: int = 0
    dtypes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class CollectionInfo(Result):
    """``info`` on a folder of adapters: one row per adapter (its summary without modules, plus name/ok/error)."""

    type: str = "collection"
    path: str = ""
    count: int = 0
    adapters: list[dict[str, Any]] = field(default_factory=list)
    base_models: list[str] = field(default_factory=list)
    ranks: list[int] = field(default_factory=list)
    total_params: int = 0
    total_bytes: int = 0
    problems: list[str] = field(default_factory=list)


class Info:
    """The ``info`` kind's result: :class:`AdapterInfo`, :class:`CollectionInfo` or :class:`SubspaceInfo`, by ``type``."""

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> AdapterInfo | CollectionInfo | SubspaceInfo:
        cls = {"collection": CollectionInfo, "subspace": SubspaceInfo}.get(d.get("type"), AdapterInfo)
        return cls.from_dict(d)


def _adapter_info(summary: dict[str, Any]) -> AdapterInfo:
    return AdapterInfo.from_dict({"type": "adapter", **summary})


def _collection_info(root: Path, progress: ProgressFn | None, cancel: CancelLike | None) -> CollectionInfo:
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
    return CollectionInfo(
        path=str(root), count=len(rows), adapters=[{k: v for k, v in r.items() if k != "modules"} for r in rows],
        base_models=bases, ranks=sorted({r["rank"] for r in good}), total_params=sum(r["num_params"] for r in good),
        total_bytes=sum(r["bytes"] for r in good), problems=problems,
    )


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
        return JobOutput(summary=_adapter_line(summary), data=_adapter_info(summary).to_dict())
    p = Path(spec)
    if is_subspace_dir(p):
        info = subspace_info(p, progress=progress, cancel=cancel)
        st = info.stats
        return JobOutput(summary=f"{p}: subspace ({info.method}), {len(info.tasks)} tasks, "
                                 f"{ratio_words(st.disk.to_dict() if st.disk else None)}, max ΔW error {st.error.max:.3g}; "
                                 f"{st.storage.summary}", data=info.to_dict())
    if p.is_dir() and not is_adapter_dir(p) and p.exists():
        coll = _collection_info(p, progress, cancel)
        return JobOutput(summary=f"{p}: {coll.count} adapters, {coll.total_bytes} bytes", data=coll.to_dict())
    from ...io.header import read_adapter_summary

    summary = read_adapter_summary(p).to_dict()
    return JobOutput(summary=_adapter_line(summary), data=_adapter_info(summary).to_dict())


def _adapter_line(s: dict[str, Any]) -> str:
    return f"{s['path']}: {s['num_modules']} modules, r={s['rank']}, alpha={s['lora_alpha']:g}, {s['num_params']} params, {s['bytes']} bytes"


KIND = JobKind(
    "info", "Info", "summarize an adapter (header only), a folder of adapters, or a subspace",
    (Param("path", "path", required=True, help="adapter folder, folder of adapters, subspace folder or hf://org/repo"),),
    func=run_info,
    positionals=("path",), form_rank=9, view="subspace_info", result=Info,
)
