"""What the subspace jobs (``info``, ``compress``, ``add``, ``export``) report on a subspace, shared."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..progress import CancelLike, ProgressFn, tick


def ratio_words(disk: dict[str, Any] | None) -> str:
    """The one ratio (:func:`engine.subspace.size.size_on_disk`) as job summaries print it."""
    if not disk:
        return "ratio n/a"
    return f"{disk['text']} on disk ({disk['bytes']} bytes" + (
        f" from {disk['input_bytes']})" if disk.get("input_bytes") is not None else "; the inputs' size is not recorded)")


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
    modules = module_rows(sub, stats["storage"], fidelity, variance)
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


def module_rows(sub: Any, storage: dict[str, Any], fidelity: dict[str, dict[str, float]],
                 variance: dict[str, list[float]]) -> list[dict[str, Any]]:
    """Per module: how it is stored (shared k_u×k_v, or per task at a rank), bits and bytes, shape, variance and errors."""
    from ..subspace.precision import module_breakdown

    sizes = module_breakdown(sub)
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
            "rank": how["rank"],
            "bits": sizes[m]["bits"],
            "bytes": sizes[m]["bytes"],
            "out_features": b.shape[0],
            "in_features": b.shape[1],
            "explained_at_k": (variance[m][b.k - 1] if b.k and len(variance[m]) >= b.k else None),
            "mean_error": sum(errs) / len(errs) if errs else 0.0,
            "max_error": max(errs) if errs else 0.0,
        })
    return modules


def task_report(sub: Any, task_id: str) -> dict[str, Any]:
    proj = sub.tasks[task_id]
    return {"task_id": task_id, "mean_error": proj.mean_error, "max_error": proj.max_error,
            "error_is_bound": proj.error_is_bound, "fidelity": dict(proj.fidelity)}
