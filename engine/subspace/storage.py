"""Save and load subspace folders.

Layout (format version 2)::

    subspace.json              manifest (:mod:`engine.subspace.manifest`): format version, method, dtype, build
                               params and the k rule (error target) they set; per module its kind, shape, k and
                               the specs of its basis tensors; each distinct task config once; per task its
                               config, errors, norms and ranks per module, the specs of its tensors and the
                               bytes of the input adapter's files; sha256 and size per file
    basis.safetensors          "packed": every module's basis tensors (U, V or comp_a, …)
    tasks/<task_id>.safetensors "packed": every module's coefficients; "extra::<key>": the adapter's extra tensors

``packed`` is one uint8 tensor: the bytes of the file's tensors one after another in the
order of their specs (``a=6x384:int6``: 6-bit codes bit-packed, then fp16 block scales; see
:mod:`engine.subspace.layout`), so a file holds one tensor whatever its modules, and its
layout follows from the manifest. Folders of format version 1 (a tensor per part,
``<module>::<key>[::q::codes|scales…]``, described by the manifest's ``quantized`` map) load
as they did. Folders are written atomically (temp sibling, then rename).

Each tensor file records in its safetensors metadata what it belongs to, checked on
load when present (folders saved before have none and load as they did):
``basis.safetensors``: ``vlora_file="basis"`` and ``vlora_modules_sha256`` (the
manifest's ``modules``); a task file: ``vlora_file="task"``, ``vlora_task_id``,
``vlora_config_sha256`` (its config, whole), ``vlora_basis_sha256`` (the
basis file it was projected onto) and, in format 2, ``vlora_tensors_sha256`` (its
tensor specs). Task ids and file names are checked on load as on build (:func:`engine.io.scan.validate_task_id`), so no manifest names a path
outside the folder.
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
from . import layout
from .common import ModuleBasis, TaskProjection, dtype_name, parse_dtype
from .manifest import (BASIS_FILE, BASIS_KEYS, TASKS_DIR, check_task_file, describe, expand, is_int, manifest_problems,
                       problem_line, seed_id_problems, task_file)
from .quant import QuantizedTensor

__all__ = ["BASIS_FILE", "BASIS_KEYS", "FORMAT_NAME", "FORMAT_VERSION", "TASKS_DIR", "check_task_file", "load_seed_subspace",
           "load_subspace", "save_subspace", "task_file"]

FORMAT_NAME = "vlora-tui-subspace"
FORMAT_VERSION = 2
SEP = "::"
#: Significant digits of the explained-variance curves in the manifest (a plot's worth; every other float: 7, so
#: errors and norms read back agree with a re-measurement far below 1e-4).
EXPLAINED_DIGITS = 4


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


def _template_json(t: LoRAWeights | None) -> dict[str, Any]:
    if t is None:
        return {}
    return {"metadata": t.metadata, "rank": t.rank, "lora_alpha": t.lora_alpha, "use_rslora": t.use_rslora,
            "target_modules": t.target_modules, "base_model_name_or_path": t.base_model_name_or_path,
            "name": t.name, "source": t.source}


def save_subspace(sub: Any, path: Path, *, force: bool = False) -> Path:
    """Write ``sub`` to ``path`` atomically in format version 2; see the module docstring for the layout."""
    from .writer import FolderWriter

    for tid in sub.tasks:
        task_file(tid)  # ValueError before anything is written
    writer = FolderWriter(path, force=force)
    try:
        writer.add(sub.tasks, sorted(sub.modules), sub.quantized, sub.dtype)
        return writer.finish(sub)
    except BaseException as exc:
        writer.abort(exc)
        raise


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


def _load_file(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise SubspaceFormatError(f"{path}: cannot read safetensors ({exc})") from exc


def _dequantized(path: Path, name: str, qt: QuantizedTensor) -> Tensor:
    try:  # bits say how the codes are packed (8: a byte each, 4: two a byte, 3/5/6: bit-packed)
        return qt.dequantize(torch.float32)
    except (ValueError, RuntimeError) as exc:
        raise SubspaceFormatError(f"{path}: quantized tensor '{name}' does not match its manifest entry "
                                  f"({qt.bits} bits, shape {list(qt.shape)}): {exc}") from exc


def _read_tensors(path: Path, quant: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, QuantizedTensor]]:
    """Format version 1: a tensor per part, ``<name>::q::<part>`` for quantised ones (described by ``quant``)."""
    plain: dict[str, Tensor] = {}
    parts: dict[str, dict[str, Tensor]] = {}
    for k, v in _load_file(path).items():
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
        plain[name] = _dequantized(path, name, qts[name])
    return plain, qts


def _read_packed(path: Path, specs: list[tuple[str, list[str]]]) -> tuple[dict[str, Tensor], dict[str, QuantizedTensor]]:
    """Format version 2: the ``packed`` tensor cut by the manifest's specs ``[(module, specs), …]``, and the extras."""
    raw = _load_file(path)
    if layout.PACKED not in raw:
        raise SubspaceFormatError(f"{path}: has no '{layout.PACKED}' tensor (format version 2 packs a file's tensors in one)")
    odd = sorted(k for k in raw if k != layout.PACKED and not k.startswith(f"extra{SEP}"))
    if odd:
        raise SubspaceFormatError(f"{path}: tensor '{odd[0]}' is not part of format version 2 (only "
                                  f"'{layout.PACKED}' and 'extra::<key>')")
    plain = {k: v for k, v in raw.items() if k != layout.PACKED}
    try:
        groups = layout.unpack([module_specs for _, module_specs in specs], raw[layout.PACKED])
    except ValueError as exc:
        raise SubspaceFormatError(f"{path}: {exc}") from exc
    qts: dict[str, QuantizedTensor] = {}
    for (m, _), values in zip(specs, groups):
        for key, v in values.items():
            name = f"{m}{SEP}{key}"
            if isinstance(v, QuantizedTensor):
                qts[name] = v
                plain[name] = _dequantized(path, name, v)
            else:
                plain[name] = v
    return plain, qts


def _file_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (the header only)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise SubspaceFormatError(f"{path}: cannot read safetensors ({exc})") from exc


def _ownership_problems(path: Path, man: dict[str, Any], layouts: dict[str, list[tuple[str, list[str]]]] | None) -> list[str]:
    """Tensor files whose own metadata says they belong to another task, config, basis or layout (checked where recorded)."""
    problems: list[str] = []
    meta = _file_metadata(path / BASIS_FILE)
    if meta.get("vlora_file", "basis") != "basis":
        problems.append(f"{path / BASIS_FILE}: is a {meta['vlora_file']} file, not a basis")
    elif "vlora_modules_sha256" in meta and meta["vlora_modules_sha256"] != _digest(man["modules"]):
        problems.append(f"{path / BASIS_FILE}: was saved with other modules than the manifest's 'modules' "
                        "(a basis of another subspace, or an edited manifest)")
    basis_sha = man.get("files", {}).get(BASIS_FILE, {}).get("sha256")
    for t in man["tasks"]:
        fp, tid = path / t["file"], t["id"]
        meta = _file_metadata(fp)
        if meta.get("vlora_file", "task") != "task":
            problems.append(f"{fp}: is a {meta['vlora_file']} file, not the file of task {tid!r}")
        elif "vlora_task_id" in meta and meta["vlora_task_id"] != tid:
            problems.append(f"{fp}: holds task {meta['vlora_task_id']!r}, but the manifest lists it for task {tid!r} "
                            "(task files swapped or renamed)")
        elif "vlora_config_sha256" in meta and meta["vlora_config_sha256"] != _digest(t.get("config") or {}):
            problems.append(f"{fp}: the manifest's config of task {tid!r} is not the one saved with it (configs swapped or edited)")
        elif "vlora_basis_sha256" in meta and meta["vlora_basis_sha256"] != basis_sha:
            problems.append(f"{fp}: task {tid!r} was projected onto another basis than {BASIS_FILE} (a basis of another subspace)")
        elif layouts is not None and "vlora_tensors_sha256" in meta and meta["vlora_tensors_sha256"] != _digest([s for _, s in layouts[t["file"]]]):
            problems.append(f"{fp}: the manifest's tensor specs of task {tid!r} are not the ones it was saved with (edited)")
    return problems


def load_subspace(path: Path, cls: Any, *, lazy: bool = False, verify: bool = True) -> Any:
    """Read and verify a subspace folder (or a seed ``vlora`` folder) as a ``cls``; ``SubspaceFormatError`` names what is wrong.

    The manifest's structure (every key read, its type), task ids and file names are
    checked first, then sizes and checksums, then what each tensor file says it holds.
    ``cls`` is the subspace class (passed in: this module does not import the class's).

    ``lazy`` (format version 2): the bases are read now, each task's coefficients when the
    task is first used (:func:`engine.subspace.ondisk.read_task`, its checksum verified
    again then); until then its record holds tensors on the ``meta`` device of the stored
    shapes, so sizes, errors and how each module is stored are known without holding the
    tasks' tensors. Every file's checksum is verified at load all the same (a pass over
    the bytes, nothing held), unless ``verify=False`` (a folder just written).
    """
    if not path.is_dir():
        raise SubspaceFormatError(f"{path}: not a folder")
    mpath = path / SUBSPACE_MANIFEST_NAME
    if not mpath.is_file():
        if (path / "subspace_meta.json").is_file():
            return load_seed_subspace(path, cls)
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
    version = man.get("format_version", 0)
    if not is_int(version):
        raise SubspaceFormatError(f"{mpath}: 'format_version' must be an integer, got {describe(version)}")
    if version > FORMAT_VERSION:
        raise SubspaceFormatError(f"{mpath}: format version {version} is newer than this tool reads ({FORMAT_VERSION})")
    problems = manifest_problems(man, version)
    if problems:
        raise SubspaceFormatError(problem_line(mpath, problems))
    layouts: dict[str, list[tuple[str, list[str]]]] | None = None
    if version >= 2:
        man, layouts = expand(man)
    lazy = lazy and layouts is not None
    files = man.get("files", {})
    deferred = {t["file"] for t in man["tasks"]} if lazy and not verify else set()
    for rel, info in sorted(files.items()):
        fp = path / rel
        if not fp.is_file():
            problems.append(f"'{rel}' is missing")
            continue
        size = fp.stat().st_size
        if size != info["bytes"]:
            problems.append(f"'{rel}' has {size} bytes, the manifest says {info['bytes']} (truncated or replaced)")
        elif rel not in deferred and _sha256(fp) != info["sha256"]:
            problems.append(f"'{rel}' fails its sha256 checksum (corrupted)")
    expected = {BASIS_FILE} | {t["file"] for t in man["tasks"]}
    unlisted = sorted(f for f in expected if f not in files)
    problems += [f"'{f}' has no checksum in the manifest" for f in unlisted]
    if problems:
        raise SubspaceFormatError(f"{path}: " + "; ".join(problems))
    problems = _ownership_problems(path, man, layouts)
    if problems:
        raise SubspaceFormatError("; ".join(problems))

    dtype = parse_dtype(man.get("dtype", "float16"))
    quant = man.get("quantized", {})

    def read(rel: str) -> tuple[dict[str, Tensor], dict[str, QuantizedTensor]]:
        return _read_tensors(path / rel, quant.get(rel, {})) if layouts is None else _read_packed(path / rel, layouts[rel])

    basis, bq = read(BASIS_FILE)
    modules: dict[str, ModuleBasis] = {}
    quantized: dict[tuple[str, ...], QuantizedTensor] = {}
    for m, info in man["modules"].items():
        keys = BASIS_KEYS[info["kind"]]
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
        if lazy:
            from .ondisk import meta_tensors

            assert layouts is not None
            tensors, tq = meta_tensors(layouts[t["file"]])
            tasks[t["id"]] = _task_record(path, t, modules, tensors, tq, quantized)
        else:
            tasks[t["id"]] = _task_record(path, t, modules, *read(t["file"]), quantized)
    sub = cls(man["method"], modules, tasks, man.get("params", {}), dtype)
    sub.quantized = quantized
    sub.quantization = man.get("quantization")
    sub.saved_path = path
    if lazy:
        from .ondisk import OnDisk

        sub.on_disk = OnDisk(path, {t["id"]: t for t in man["tasks"]}, layouts or {}, files)
    return sub


def _task_record(path: Path, t: dict[str, Any], modules: dict[str, ModuleBasis], tensors: dict[str, Tensor],
                 tq: dict[str, QuantizedTensor], quantized: dict[tuple[str, ...], QuantizedTensor]) -> TaskProjection:
    """One task's record from its manifest entry ``t`` and its file's tensors (its quantised ones into ``quantized``)."""
    tid = t["id"]
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
    return TaskProjection(tid, coeffs, fidelity={k: float(v) for k, v in t.get("fidelity", {}).items()},
                          norms={k: float(v) for k, v in t.get("norms", {}).items()},
                          ranks={k: int(v) for k, v in t.get("ranks", {}).items()}, template=template,
                          error_is_bound=bool(t.get("error_is_bound", False)), original_bytes=int(t.get("original_bytes", 0)),
                          input_bytes=_opt_int(t.get("input_bytes")), input_bytes_fp16=_opt_int(t.get("input_bytes_fp16")))


def load_seed_subspace(path: Path, cls: Any) -> Any:
    """Read a folder saved by the seed ``vlora`` package (``subspace_meta.json`` + safetensors) as a pca subspace.

    The seed does not record alpha or fidelity: alpha is taken as the rank (scale 1),
    errors are unknown (NaN). Task ids (which become file names when saved) and the
    ``task_filenames`` they map to are checked as on build.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        meta = json.loads((path / "subspace_meta.json").read_text(encoding="utf-8"))
        problems = seed_id_problems(meta)
        if problems:
            raise SubspaceFormatError(problem_line(path / "subspace_meta.json", problems))
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
    except (KeyError, OSError, ValueError, TypeError, AttributeError, SafetensorError, json.JSONDecodeError) as exc:
        raise SubspaceFormatError(f"{path}: seed vlora subspace folder is incomplete or corrupt ({exc})") from exc
    dtype = next(iter(tensors.values())).dtype if tensors else torch.float32
    return cls("pca", modules, tasks, {"num_components": meta.get("num_components"), "variance_threshold":
                                                  meta.get("variance_threshold", 0.6), "adaptive_k": meta.get("adaptive_k", False),
                                                  "max_error": None, "mean_error": None, "refine": 0, "hybrid": False, "sketch_rank": 256}, dtype)
