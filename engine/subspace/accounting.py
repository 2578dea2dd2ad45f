"""Accounting of a :class:`~engine.subspace.core.SharedSubspace`: bytes, ratios, errors, how each module is stored.

Functions of the subspace (``sub``) behind its methods of the same names
(``compression_stats``, ``storage``, ``full_stack_compression``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .common import dtype_name


def tensor_bytes(sub: Any) -> tuple[int, int]:
    """(bytes stored for bases and coefficients, float parameters they represent)."""
    total, params = 0, 0
    for m, b in sub.modules.items():
        for key, t in b.tensors.items():
            if key.startswith("sv_"):
                continue  # statistics, not needed to reconstruct
            qt = sub.quantized.get((m, key))
            total += qt.nbytes if qt is not None else t.numel() * elem_size(t, sub.dtype)
            params += t.numel()
    for tid, proj in sub.tasks.items():
        for m, c in proj.coeffs.items():
            for key, t in c.items():
                qt = sub.quantized.get((tid, m, key))
                total += qt.nbytes if qt is not None else t.numel() * elem_size(t, sub.dtype)
                params += t.numel()
    return total, params


def storage(sub: Any) -> dict[str, Any]:
    """How each module is stored: shared by the tasks, or per task (nothing shared), with a one-line summary (see ``SharedSubspace.storage``)."""
    mods: dict[str, dict[str, Any]] = {}
    for m, b in sorted(sub.modules.items()):
        if b.kind == "separate":
            rs = [int(p.coeffs[m]["b"].shape[1]) for p in sub.tasks.values() if "b" in p.coeffs.get(m, {})]
            lo, hi = (min(rs), max(rs)) if rs else (0, 0)
            mods[m] = {"shared": False, "kind": b.kind, "k_u": 0, "k_v": 0, "rank": [lo, hi],
                       "form": f"per task, rank {lo}" if lo == hi else f"per task, rank {lo}–{hi}"}
            continue
        ku = int(b.tensors["U"].shape[1]) if b.kind == "joint" else b.k
        kv = int(b.tensors["V"].shape[1]) if b.kind == "joint" else b.k
        mods[m] = {"shared": True, "kind": b.kind, "k_u": ku, "k_v": kv, "rank": None,
                   "form": f"shared {ku}×{kv}" if b.kind == "joint" else f"shared k={b.k}"}
    total = len(mods)
    sep = sum(1 for v in mods.values() if not v["shared"])
    if total and sep == total:
        if sub.method == "svd":
            summary = f"{sep} of {total} modules stored per task (method svd: each task alone, the baseline)"
        else:
            target = target_text(sub)
            summary = (f"{sep} of {total} modules stored per task, nothing shared: these adapters share too little"
                       f"{' at ' + target if target else ''} to gain from a shared basis; a looser target "
                       "(--max-error, --mean-error) or quantize stores less")
    elif sep:
        summary = (f"{total - sep} of {total} modules shared, {sep} stored per task "
                   "(there a shared basis would be larger)")
    else:
        summary = f"{total} of {total} modules shared"
    return {"modules": mods, "shared": total - sep, "per_task": sep, "total": total, "summary": summary}


def components_per_layer(sub: Any) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    for m, b in sorted(sub.modules.items()):
        if b.kind == "pca":
            out[m] = (int(b.tensors["comp_a"].shape[0]), int(b.tensors["comp_b"].shape[0]))
        elif b.kind == "joint":
            out[m] = (int(b.tensors["V"].shape[1]), int(b.tensors["U"].shape[1]))
        else:
            out[m] = (0, 0)  # stored per task: nothing shared
    return out


def target_text(sub: Any) -> str:
    """The build's error target in words (``a 5 % max ΔW error``), or ``""``."""
    parts = [f"{float(sub.params[k]) * 100:g} % {w}" for k, w in (("max_error", "max"), ("mean_error", "mean"))
             if sub.params.get(k) is not None]
    return f"a {' and '.join(parts)} ΔW error" if parts else ""


def compression_stats(sub: Any) -> dict[str, Any]:
    """Bytes, ratio and fidelity (see ``SharedSubspace.compression_stats``)."""
    from .size import size_on_disk

    stored, stored_params = tensor_bytes(sub)
    orig = sum(p.original_bytes for p in sub.tasks.values())
    orig_params = sum(sum(p.ranks.get(m, 0) * (b.shape[0] + b.shape[1]) for m, b in sub.modules.items())
                      for p in sub.tasks.values())
    per_task = {t: {"mean": p.mean_error, "max": p.max_error} for t, p in sub.tasks.items()}
    per_module: dict[str, dict[str, float]] = {}
    for m in sorted(sub.modules):
        v = [p.fidelity[m] for p in sub.tasks.values() if m in p.fidelity]
        per_module[m] = {"mean": float(sum(v) / len(v)) if v else 0.0, "max": float(max(v)) if v else 0.0}
    allv = [e for p in sub.tasks.values() for e in p.fidelity.values()]
    return {
        "method": sub.method,
        "num_tasks": len(sub.tasks),
        "num_modules": len(sub.modules),
        "num_layers": len(sub.modules),
        "dtype": dtype_name(sub.dtype),
        "quantization": sub.quantization,
        "precision": sub.params.get("precision", "fp16"),
        "k": sub.k_per_module,
        # the seed's (k_a, k_b): basis rows of the A side (row space V) and the B side (column space U)
        "components_per_layer": components_per_layer(sub),
        "module_kinds": {m: b.kind for m, b in sorted(sub.modules.items())},
        "original_bytes": int(orig),
        "stored_bytes": int(stored),
        "ratio": orig / stored if stored else 0.0,
        "compression_ratio": orig / stored if stored else 0.0,
        "ratio_vs_fp16": 2 * orig_params / stored if stored else 0.0,
        "original_params": int(orig_params),
        "stored_params": int(stored_params),
        "total_params_original": int(orig_params),
        "total_params_compressed": int(stored_params),
        "disk": size_on_disk(sub.saved_path) if sub.saved_path is not None and Path(sub.saved_path).is_dir() else None,
        "storage": storage(sub),
        "error": {
            "mean": float(sum(allv) / len(allv)) if allv else 0.0,
            "max": float(max(allv)) if allv else 0.0,
            "per_task": per_task,
            "per_module": per_module,
            "is_bound": any(p.error_is_bound for p in sub.tasks.values()),
        },
        "fidelity": sub.fidelity(),
    }


def full_stack_compression(sub: Any, base_model_params: int, base_model_bits: int = 16, quantized_bits: int = 4) -> dict[str, Any]:
    """Memory of base model + all adapters, before and after (base quantised to ``quantized_bits``, adapters as stored)."""
    if base_model_params < 0:
        raise ValueError(f"base_model_params must be >= 0, got {base_model_params}")
    stats = compression_stats(sub)
    base_before = base_model_params * base_model_bits / 8
    base_after = base_model_params * quantized_bits / 8
    before = base_before + stats["original_bytes"]
    after = base_after + stats["stored_bytes"]
    return {
        "base_model_bytes": int(base_before), "base_model_quantized_bytes": int(base_after),
        "adapters_bytes": stats["original_bytes"], "subspace_bytes": stats["stored_bytes"],
        "total_before_bytes": int(before), "total_after_bytes": int(after),
        "ratio": before / after if after else 0.0, "adapter_ratio": stats["ratio"], "num_tasks": stats["num_tasks"],
    }


def elem_size(t: Tensor, dtype: torch.dtype) -> int:
    """Bytes per stored value of ``t``: its own for integer tensors, else ``dtype``'s."""
    return t.element_size() if not t.is_floating_point() else torch.empty(0, dtype=dtype).element_size()
