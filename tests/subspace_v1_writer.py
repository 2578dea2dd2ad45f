"""The subspace writer of format version 1 (engine/subspace/storage.py at 755d78f), kept to test that such folders load.

A verbatim copy of ``save_subspace`` and its helpers as they were before the packed
layout (format version 2): a tensor per part (``<module>::<key>::q::codes`` …), the
``quantized`` map, a config per task. Only the imports differ.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from engine.constants import SUBSPACE_MANIFEST_NAME
from engine.subspace.common import dtype_name
from engine.subspace.manifest import BASIS_FILE, TASKS_DIR, task_file
from engine.subspace.quant import QuantizedTensor
from engine.types import LoRAWeights

FORMAT_NAME = "vlora-tui-subspace"
FORMAT_VERSION = 1
SEP = "::"


def _dest(root: Path, rel: str) -> Path:
    """``root / rel`` for writing, refused (``ValueError``) unless it resolves to a path inside ``root``."""
    dest = root / rel
    base = root.resolve()
    if dest.resolve() == base or not dest.resolve().is_relative_to(base):
        raise ValueError(f"{root}: refusing to write {rel!r}, which is outside the folder")
    return dest


def _digest(o: Any) -> str:
    """sha256 of ``o`` as the manifest stores it (rounded JSON, keys sorted); the same before save and after load."""
    normal = json.loads(json.dumps(_rounded(o), sort_keys=True, default=_json_default))
    return hashlib.sha256(json.dumps(normal, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _put(out: dict[str, Tensor], quant: dict[str, Any], name: str, t: Tensor, qt: QuantizedTensor | None) -> None:
    if qt is None:
        out[name] = t.contiguous()
        return
    quant[name] = qt.info()
    for part, v in qt.tensors().items():
        out[f"{name}{SEP}q{SEP}{part}"] = v.contiguous()


def _template_json(t: LoRAWeights | None) -> dict[str, Any]:
    if t is None:
        return {}
    return {"metadata": t.metadata, "rank": t.rank, "lora_alpha": t.lora_alpha, "use_rslora": t.use_rslora,
            "target_modules": t.target_modules, "base_model_name_or_path": t.base_model_name_or_path,
            "name": t.name, "source": t.source}


def save_subspace(sub: Any, path: Path, *, force: bool = False) -> Path:
    """Write ``sub`` to ``path`` atomically; see the module docstring for the layout."""
    from safetensors.torch import save_file

    from engine.io.local import atomic_dir

    files = {tid: task_file(tid) for tid in sub.tasks}  # ValueError before anything is written
    quant: dict[str, Any] = {}
    basis: dict[str, Tensor] = {}
    for m, b in sorted(sub.modules.items()):
        for key, t in b.tensors.items():
            _put(basis, quant, f"{m}{SEP}{key}", t.to(sub.dtype) if (m, key) not in sub.quantized else t, sub.quantized.get((m, key)))
    manifest: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "method": sub.method,
        "dtype": dtype_name(sub.dtype),
        "params": sub.params,
        "k_rule": sub.k_rule,  # the rule k was chosen by (from params): what absorb and quantize are held to
        "quantization": sub.quantization,
        "base_model": sub.base_model,
        "modules": {m: {"kind": b.kind, "shape": list(b.shape), "k": b.k, "rank": b.rank, "explained": b.explained}
                    for m, b in sorted(sub.modules.items())},
        "tasks": [],
        "quantized": {},
        "files": {},
    }
    with atomic_dir(path, force=force) as tmp:
        _dest(tmp, TASKS_DIR).mkdir()
        basis_path = _dest(tmp, BASIS_FILE)
        save_file(basis, str(basis_path), metadata={"format": "pt", "vlora_file": "basis",
                                                    "vlora_modules_sha256": _digest(manifest["modules"])})
        basis_sha = _sha256(basis_path)
        manifest["quantized"][BASIS_FILE] = quant
        for tid, p in sub.tasks.items():
            tq: dict[str, Any] = {}
            tensors: dict[str, Tensor] = {}
            for m, c in sorted(p.coeffs.items()):
                for key, t in c.items():
                    qt = sub.quantized.get((tid, m, key))
                    _put(tensors, tq, f"{m}{SEP}{key}", t if qt is not None else t.to(sub.dtype), qt)
            extras = p.template.extra_tensors if p.template is not None else {}
            for k, t in extras.items():
                tensors[f"extra{SEP}{k}"] = t.contiguous()
            rel = files[tid]
            config = _template_json(p.template)
            save_file(tensors, str(_dest(tmp, rel)), metadata={
                "format": "pt", "vlora_file": "task", "vlora_task_id": tid, "vlora_config_sha256": _digest(config),
                "vlora_basis_sha256": basis_sha})
            manifest["quantized"][rel] = tq
            manifest["tasks"].append({
                "id": tid, "file": rel, "fidelity": p.fidelity, "norms": p.norms, "ranks": p.ranks,
                "error_is_bound": p.error_is_bound, "original_bytes": p.original_bytes,
                "input_bytes": p.input_bytes, "input_bytes_fp16": p.input_bytes_fp16, "config": config,
                "extra_tensors": sorted(extras),
            })
        for f in sorted([BASIS_FILE] + [t["file"] for t in manifest["tasks"]]):
            fp = _dest(tmp, f)
            manifest["files"][f] = {"sha256": _sha256(fp), "bytes": fp.stat().st_size}
        # compact: 7 significant digits (errors and norms are measured to about that), no indentation;
        # on a small collection the manifest is otherwise a visible share of the bytes on disk
        text = json.dumps(_rounded(manifest), separators=(",", ":"), sort_keys=True, default=_json_default)
        _dest(tmp, SUBSPACE_MANIFEST_NAME).write_text(text + "\n", encoding="utf-8")
    return path


def _rounded(o: Any) -> Any:
    """``o`` with every float rounded to 7 significant digits (non-finite ones kept)."""
    if isinstance(o, float):
        return float(f"{o:.7g}") if math.isfinite(o) else o
    if isinstance(o, dict):
        return {k: _rounded(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_rounded(v) for v in o]
    return o


def _json_default(o: Any) -> Any:
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, torch.dtype):
        return dtype_name(o)
    return str(o)
