"""Save and load subspace folders.

Layout::

    subspace.json              manifest: format version, method, dtype, build params and the k rule
                               (error target) they set, k and kind per module, tasks (config, ranks,
                               fidelity, bytes of the input adapter's files), quantisation, sha256 and
                               size per file
    basis.safetensors          "<module>::<tensor>" (U, V or comp_a, comp_b, mean_a, mean_b, sv_a, sv_b)
    tasks/<task_id>.safetensors "<module>::<coeff>" plus "extra::<key>" (the adapter's extra tensors)

Quantised tensors are stored as ``<name>::q::codes`` (uint8; 4-bit packed two a
byte) and ``<name>::q::scales`` or the double-quantised ``scale_codes`` /
``scale_absmax`` / ``scale_mean``; the manifest's ``quantized`` map says which.
Folders are written atomically (temp sibling, then rename).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..constants import SUBSPACE_MANIFEST_NAME
from ..errors import SubspaceFormatError
from ..types import LoRAWeights
from .common import ModuleBasis, TaskProjection, dtype_name, parse_dtype
from .quant import QuantizedTensor

FORMAT_NAME = "vlora-tui-subspace"
FORMAT_VERSION = 1
BASIS_FILE = "basis.safetensors"
SEP = "::"


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

    from ..io.local import atomic_dir

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
        (tmp / "tasks").mkdir()
        save_file(basis, str(tmp / BASIS_FILE), metadata={"format": "pt"})
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
            rel = f"tasks/{tid}.safetensors"
            save_file(tensors, str(tmp / rel), metadata={"format": "pt"})
            manifest["quantized"][rel] = tq
            manifest["tasks"].append({
                "id": tid, "file": rel, "fidelity": p.fidelity, "norms": p.norms, "ranks": p.ranks,
                "error_is_bound": p.error_is_bound, "original_bytes": p.original_bytes,
                "input_bytes": p.input_bytes, "input_bytes_fp16": p.input_bytes_fp16, "config": _template_json(p.template),
                "extra_tensors": sorted(extras),
            })
        for f in sorted([BASIS_FILE] + [t["file"] for t in manifest["tasks"]]):
            fp = tmp / f
            manifest["files"][f] = {"sha256": _sha256(fp), "bytes": fp.stat().st_size}
        # compact: 7 significant digits (errors and norms are measured to about that), no indentation;
        # on a small collection the manifest is otherwise a visible share of the bytes on disk
        text = json.dumps(_rounded(manifest), separators=(",", ":"), sort_keys=True, default=_json_default)
        (tmp / SUBSPACE_MANIFEST_NAME).write_text(text + "\n", encoding="utf-8")
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


def _opt_int(v: Any) -> int | None:
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _json_default(o: Any) -> Any:
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, torch.dtype):
        return dtype_name(o)
    return str(o)


def _read_tensors(path: Path, quant: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, QuantizedTensor]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        raw = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise SubspaceFormatError(f"{path}: cannot read safetensors ({exc})") from exc
    plain: dict[str, Tensor] = {}
    parts: dict[str, dict[str, Tensor]] = {}
    for k, v in raw.items():
        name, tag, part = k.rpartition(f"{SEP}q{SEP}")
        if tag:
            parts.setdefault(name, {})[part] = v
        else:
            plain[k] = v
    qts: dict[str, QuantizedTensor] = {}
    for name, info in quant.items():
        if name not in parts or "codes" not in parts[name]:
            raise SubspaceFormatError(f"{path}: quantized tensor '{name}' is missing its codes")
        qts[name] = QuantizedTensor.from_parts(info, parts[name])
        plain[name] = qts[name].dequantize(torch.float32)
    return plain, qts


def load_subspace(path: Path) -> Any:
    """Read and verify a subspace folder (or a seed ``vlora`` folder); ``SubspaceFormatError`` names what is wrong."""
    from .core import SharedSubspace

    if not path.is_dir():
        raise SubspaceFormatError(f"{path}: not a folder")
    mpath = path / SUBSPACE_MANIFEST_NAME
    if not mpath.is_file():
        if (path / "subspace_meta.json").is_file():
            return load_seed_subspace(path)
        if (path / "manifest.json").is_file():
            raise SubspaceFormatError(f"{path}: this 'manifest.json' layout (seed per-layer tensors) is not supported; "
                                      "rebuild the subspace from the adapters")
        raise SubspaceFormatError(f"{path}: no {SUBSPACE_MANIFEST_NAME}; not a subspace folder")
    try:
        man = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SubspaceFormatError(f"{mpath}: unreadable manifest ({exc})") from exc
    if not isinstance(man, dict) or man.get("format") != FORMAT_NAME:
        raise SubspaceFormatError(f"{mpath}: not a {FORMAT_NAME} manifest")
    if int(man.get("format_version", 0)) > FORMAT_VERSION:
        raise SubspaceFormatError(f"{mpath}: format version {man.get('format_version')} is newer than this tool reads ({FORMAT_VERSION})")
    problems: list[str] = []
    for rel, info in sorted(man.get("files", {}).items()):
        fp = path / rel
        if not fp.is_file():
            problems.append(f"'{rel}' is missing")
            continue
        size = fp.stat().st_size
        if size != info.get("bytes"):
            problems.append(f"'{rel}' has {size} bytes, the manifest says {info.get('bytes')} (truncated or replaced)")
        elif _sha256(fp) != info.get("sha256"):
            problems.append(f"'{rel}' fails its sha256 checksum (corrupted)")
    expected = {BASIS_FILE} | {t.get("file") for t in man.get("tasks", [])}
    unlisted = sorted(f for f in expected if f not in man.get("files", {}))
    problems += [f"'{f}' has no checksum in the manifest" for f in unlisted]
    if problems:
        raise SubspaceFormatError(f"{path}: " + "; ".join(problems))

    dtype = parse_dtype(man.get("dtype", "float16"))
    quant = man.get("quantized", {})
    basis, bq = _read_tensors(path / BASIS_FILE, quant.get(BASIS_FILE, {}))
    modules: dict[str, ModuleBasis] = {}
    quantized: dict[tuple[str, ...], QuantizedTensor] = {}
    for m, info in man["modules"].items():
        keys = {"joint": ("U", "V"), "pca": ("comp_a", "comp_b", "mean_a", "mean_b", "sv_a", "sv_b")}.get(info["kind"], ())
        missing = [k for k in keys if f"{m}{SEP}{k}" not in basis]
        if missing:
            raise SubspaceFormatError(f"{path / BASIS_FILE}: module '{m}' lacks tensor '{missing[0]}'")
        modules[m] = ModuleBasis(info["kind"], tuple(info["shape"]), {k: basis[f"{m}{SEP}{k}"] for k in keys},
                                 rank=int(info.get("rank", 0)), explained=list(info.get("explained", [])))
        for k in keys:
            if f"{m}{SEP}{k}" in bq:
                quantized[(m, k)] = bq[f"{m}{SEP}{k}"]
    tasks: dict[str, TaskProjection] = {}
    for t in man["tasks"]:
        tid = t["id"]
        tensors, tq = _read_tensors(path / t["file"], quant.get(t["file"], {}))
        coeffs: dict[str, dict[str, Tensor]] = {m: {} for m in modules}
        extras: dict[str, Tensor] = {}
        for k, v in tensors.items():
            if k.startswith(f"extra{SEP}"):
                extras[k[len(f"extra{SEP}"):]] = v
                continue
            m, _, key = k.rpartition(SEP)
            if m not in coeffs:
                raise SubspaceFormatError(f"{path / t['file']}: tensor '{k}' names unknown module '{m}'")
            coeffs[m][key] = v
            if k in tq:
                quantized[(tid, m, key)] = tq[k]
        empty = [m for m, c in coeffs.items() if not c]
        if empty:
            raise SubspaceFormatError(f"{path / t['file']}: task {tid!r} has no coefficients for module '{empty[0]}'")
        cfg = t.get("config") or {}
        template = LoRAWeights(layer_names=[], lora_a={}, lora_b={}, rank=int(cfg.get("rank", 8)), metadata=cfg.get("metadata", {}),
                               lora_alpha=cfg.get("lora_alpha"), use_rslora=bool(cfg.get("use_rslora", False)),
                               target_modules=cfg.get("target_modules"), base_model_name_or_path=cfg.get("base_model_name_or_path"),
                               extra_tensors=extras, name=cfg.get("name") or tid, source=cfg.get("source"))
        tasks[tid] = TaskProjection(tid, coeffs, fidelity={k: float(v) for k, v in t.get("fidelity", {}).items()},
                                    norms={k: float(v) for k, v in t.get("norms", {}).items()},
                                    ranks={k: int(v) for k, v in t.get("ranks", {}).items()}, template=template,
                                    error_is_bound=bool(t.get("error_is_bound", False)), original_bytes=int(t.get("original_bytes", 0)),
                                    input_bytes=_opt_int(t.get("input_bytes")), input_bytes_fp16=_opt_int(t.get("input_bytes_fp16")))
    sub = SharedSubspace(man["method"], modules, tasks, man.get("params", {}), dtype)
    sub.quantized = quantized
    sub.quantization = man.get("quantization")
    sub.saved_path = path
    return sub


def load_seed_subspace(path: Path) -> Any:
    """Read a folder saved by the seed ``vlora`` package (``subspace_meta.json`` + safetensors) as a pca subspace.

    The seed does not record alpha or fidelity: alpha is taken as the rank (scale 1),
    errors are unknown (NaN).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .core import SharedSubspace

    try:
        meta = json.loads((path / "subspace_meta.json").read_text(encoding="utf-8"))
        tensors = load_file(str(path / "subspace.safetensors"))
        layers = list(meta["layer_names"])
        rank = int(meta["rank"])
        modules: dict[str, ModuleBasis] = {}
        for m in layers:
            sa, sb = meta["shapes_a"][m], meta["shapes_b"][m]
            t = {k: tensors[f"{m}.{src}"] for k, src in (("comp_a", "components_a"), ("comp_b", "components_b"),
                                                       ("mean_a", "mean_a"), ("mean_b", "mean_b"), ("sv_a", "sv_a"), ("sv_b", "sv_b"))}
            modules[m] = ModuleBasis("pca", (int(sb[0]), int(sa[1])), t, rank=rank)
        tasks: dict[str, TaskProjection] = {}
        names = meta.get("task_filenames", {})
        for tid in meta["task_ids"]:
            tt = load_file(str(path / f"task_{names.get(tid, tid)}.safetensors"))
            coeffs = {m: {"la": tt[f"{m}.loadings_a"], "lb": tt[f"{m}.loadings_b"]} for m in layers}
            tmpl = LoRAWeights(layer_names=[], lora_a={}, lora_b={}, rank=rank, metadata={"r": rank, "lora_alpha": rank},
                               lora_alpha=float(rank), name=tid)
            tasks[tid] = TaskProjection(tid, coeffs, fidelity={m: float("nan") for m in layers}, ranks={m: rank for m in layers},
                                        template=tmpl)
    except (KeyError, OSError, ValueError, SafetensorError, json.JSONDecodeError) as exc:
        raise SubspaceFormatError(f"{path}: seed vlora subspace folder is incomplete or corrupt ({exc})") from exc
    dtype = next(iter(tensors.values())).dtype if tensors else torch.float32
    return SharedSubspace("pca", modules, tasks, {"num_components": meta.get("num_components"), "variance_threshold":
                                                  meta.get("variance_threshold", 0.6), "adaptive_k": meta.get("adaptive_k", False),
                                                  "max_error": None, "mean_error": None, "refine": 0, "hybrid": False, "sketch_rank": 256}, dtype)
