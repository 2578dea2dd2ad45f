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

Each tensor file records in its safetensors metadata what it belongs to, checked on
load when present (folders saved before have none and load as they did):
``basis.safetensors``: ``vlora_file="basis"`` and ``vlora_modules_sha256`` (the
manifest's ``modules``); a task file: ``vlora_file="task"``, ``vlora_task_id``,
``vlora_config_sha256`` (its manifest ``config``) and ``vlora_basis_sha256`` (the
basis file it was projected onto). Task ids and file names are checked on load as
on build (:func:`engine.io.scan.validate_task_id`), so no manifest names a path
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
from ..io.scan import validate_task_id
from ..types import LoRAWeights
from .common import ModuleBasis, TaskProjection, dtype_name, parse_dtype
from .quant import QuantizedTensor

FORMAT_NAME = "vlora-tui-subspace"
FORMAT_VERSION = 1
BASIS_FILE = "basis.safetensors"
SEP = "::"
TASKS_DIR = "tasks"
#: Tensor names per module kind in ``basis.safetensors`` (``separate``: each task alone, no basis).
BASIS_KEYS = {"joint": ("U", "V"), "pca": ("comp_a", "comp_b", "mean_a", "mean_b", "sv_a", "sv_b"), "separate": ()}


def task_file(task_id: str) -> str:
    """The folder-relative file of a task, ``tasks/<task_id>.safetensors``; ``ValueError`` for an unsafe id."""
    return f"{TASKS_DIR}/{validate_task_id(task_id)}.safetensors"


def check_task_file(rel: Any) -> str:
    """``rel`` if it is a task file name as :func:`task_file` makes them (``tasks/<valid id>.safetensors``).

    Raises:
        ValueError: anything else (separators, ``..``, absolute paths, another folder or suffix).
    """
    folder, sep, name = rel.partition("/") if isinstance(rel, str) else ("", "", "")
    stem = name[: -len(".safetensors")] if name.endswith(".safetensors") else ""
    try:
        if folder != TASKS_DIR or not sep or task_file(stem) != rel:
            raise ValueError
    except ValueError:
        raise ValueError(f"{rel!r} is not of the form 'tasks/<id>.safetensors' (a valid task id: letters, digits, "
                         "'.', '_' or '-'; no separators, no '..')") from None
    return rel


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

    from ..io.local import atomic_dir

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
        try:  # bits say how the codes are packed (8: a byte each, 4: two a byte, 3/5/6: bit-packed)
            plain[name] = qts[name].dequantize(torch.float32)
        except (ValueError, RuntimeError) as exc:
            raise SubspaceFormatError(f"{path}: quantized tensor '{name}' does not match its manifest entry "
                                      f"({info.get('bits')} bits, shape {info.get('shape')}): {exc}") from exc
    return plain, qts


# -- checking a manifest before any of it is used --------------------------------------------

_MAX_PROBLEMS = 8


def _describe(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"the boolean {str(v).lower()}"
    if isinstance(v, (int, float)):
        return f"the number {v}"
    if isinstance(v, str):
        return f"the string {v[:40]!r}" + ("…" if len(v) > 40 else "")
    return {list: "a list", dict: "an object"}.get(type(v), type(v).__name__)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _is_dict(v: Any) -> bool:
    return isinstance(v, dict)


def _opt_str(v: Any) -> bool:
    return v is None or isinstance(v, str)


class _Checker:
    """Collects ``'key': expected …, got …`` problems over a parsed manifest."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def add(self, key: str, text: str) -> None:
        self.problems.append(f"'{key}' {text}")

    def check(self, obj: dict[str, Any], name: str, key: str, ok: Any, expected: str, *, required: bool = False) -> bool:
        """Whether ``obj[name]`` (at ``key``) is present and passes ``ok``; a missing optional one passes."""
        if name not in obj:
            if required:
                self.add(key, "is missing")
            return False
        if not ok(obj[name]):
            self.add(key, f"must be {expected}, got {_describe(obj[name])}")
            return False
        return True

    def mapping(self, obj: dict[str, Any], name: str, key: str, ok: Any, expected: str) -> None:
        """``obj[name]``, when present, must be an object whose every value passes ``ok``."""
        if self.check(obj, name, key, _is_dict, "an object"):
            for k, v in obj[name].items():
                if not ok(v):
                    self.add(f"{key}[{k!r}]", f"must be {expected}, got {_describe(v)}")


def _manifest_problems(man: dict[str, Any]) -> list[str]:
    """Every key of ``man`` that the loader reads, checked for presence and type; one line per problem."""
    c = _Checker()
    c.check(man, "method", "method", _is_str, "a string", required=True)
    dtype_names = ("float16", "fp16", "half", "bfloat16", "bf16", "float32", "fp32", "float", "float64")
    c.check(man, "dtype", "dtype", lambda v: v in dtype_names, "one of float16, bfloat16, float32, float64")
    c.check(man, "params", "params", _is_dict, "an object")
    c.check(man, "quantization", "quantization", lambda v: v is None or _is_dict(v), "an object or null")
    if c.check(man, "modules", "modules", _is_dict, "an object", required=True):
        for m, info in man["modules"].items():
            key = f"modules[{m!r}]"
            if not _is_dict(info):
                c.add(key, f"must be an object, got {_describe(info)}")
                continue
            c.check(info, "kind", f"{key}.kind", lambda v: v in BASIS_KEYS, "'joint', 'pca' or 'separate'", required=True)
            c.check(info, "shape", f"{key}.shape", lambda v: isinstance(v, list) and len(v) == 2
                    and all(_is_int(d) and d >= 0 for d in v), "a list of two integers ≥ 0", required=True)
            c.check(info, "rank", f"{key}.rank", lambda v: _is_int(v) and v >= 0, "an integer ≥ 0")
            c.check(info, "explained", f"{key}.explained", lambda v: isinstance(v, list) and all(map(_is_num, v)),
                    "a list of numbers")
    if c.check(man, "files", "files", _is_dict, "an object"):
        for rel, info in man["files"].items():
            key = f"files[{rel!r}]"
            if rel != BASIS_FILE:
                try:
                    check_task_file(rel)
                except ValueError as exc:
                    c.add(key, f"names no file of a subspace folder: {exc}")
                    continue
            if not _is_dict(info):
                c.add(key, f"must be an object, got {_describe(info)}")
                continue
            c.check(info, "sha256", f"{key}.sha256", lambda v: _is_str(v) and len(v) == 64, "a 64-digit hex string", required=True)
            c.check(info, "bytes", f"{key}.bytes", lambda v: _is_int(v) and v >= 0, "an integer ≥ 0", required=True)
    if c.check(man, "quantized", "quantized", _is_dict, "an object"):
        qspec = (("shape", lambda v: isinstance(v, list) and all(_is_int(d) and d >= 0 for d in v), "a list of integers ≥ 0"),
                 ("method", _is_str, "a string"), ("bits", _is_int, "an integer"),
                 ("block_size", lambda v: _is_int(v) and v > 0, "an integer > 0"))
        for rel, names in man["quantized"].items():
            if not _is_dict(names):
                c.add(f"quantized[{rel!r}]", f"must be an object, got {_describe(names)}")
                continue
            for name, info in names.items():
                key = f"quantized[{rel!r}][{name!r}]"
                if not _is_dict(info):
                    c.add(key, f"must be an object, got {_describe(info)}")
                    continue
                for k, ok, expected in qspec:
                    c.check(info, k, f"{key}.{k}", ok, expected, required=True)
    if c.check(man, "tasks", "tasks", lambda v: isinstance(v, list), "a list", required=True):
        seen_ids: dict[str, int] = {}
        seen_files: dict[str, int] = {}
        for i, t in enumerate(man["tasks"]):
            key = f"tasks[{i}]"
            if not _is_dict(t):
                c.add(key, f"must be an object, got {_describe(t)}")
                continue
            for field, valid, seen, clash in (("id", validate_task_id, seen_ids, "appears more than once (also tasks[{}])"),
                                              ("file", check_task_file, seen_files, "is also the file of tasks[{}]")):
                if not c.check(t, field, f"{key}.{field}", _is_str, "a string", required=True):
                    continue
                try:
                    valid(t[field])
                except ValueError as exc:
                    c.add(f"{key}.{field}", str(exc))
                    continue
                if t[field] in seen:
                    c.add(f"{key}.{field}", f"{t[field]!r} " + clash.format(seen[t[field]]))
                seen.setdefault(t[field], i)
            c.mapping(t, "fidelity", f"{key}.fidelity", _is_num, "a number")
            c.mapping(t, "norms", f"{key}.norms", _is_num, "a number")
            c.mapping(t, "ranks", f"{key}.ranks", lambda v: _is_int(v) and v >= 0, "an integer ≥ 0")
            c.check(t, "error_is_bound", f"{key}.error_is_bound", lambda v: isinstance(v, bool), "true or false")
            c.check(t, "original_bytes", f"{key}.original_bytes", lambda v: _is_int(v) and v >= 0, "an integer ≥ 0")
            if c.check(t, "config", f"{key}.config", lambda v: v is None or _is_dict(v), "an object or null") and t["config"]:
                cfg, ck = t["config"], f"{key}.config"
                c.check(cfg, "rank", f"{ck}.rank", lambda v: _is_int(v) and v >= 0, "an integer ≥ 0")
                c.check(cfg, "metadata", f"{ck}.metadata", _is_dict, "an object")
                c.check(cfg, "lora_alpha", f"{ck}.lora_alpha", lambda v: v is None or _is_num(v), "a number or null")
                c.check(cfg, "use_rslora", f"{ck}.use_rslora", lambda v: isinstance(v, bool), "true or false")
                c.check(cfg, "target_modules", f"{ck}.target_modules",
                        lambda v: _opt_str(v) or (isinstance(v, list) and all(map(_is_str, v))), "a string, a list of strings or null")
                for k in ("base_model_name_or_path", "name", "source"):
                    c.check(cfg, k, f"{ck}.{k}", _opt_str, "a string or null")
    return c.problems


def _problem_line(where: Path, problems: list[str]) -> str:
    more = len(problems) - _MAX_PROBLEMS
    return f"{where}: " + "; ".join(problems[:_MAX_PROBLEMS]) + (f"; … and {more} more" if more > 0 else "")


def _file_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (the header only)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise SubspaceFormatError(f"{path}: cannot read safetensors ({exc})") from exc


def _ownership_problems(path: Path, man: dict[str, Any]) -> list[str]:
    """Tensor files whose own metadata says they belong to another task, config or basis (checked where recorded)."""
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
    return problems


def load_subspace(path: Path, cls: Any) -> Any:
    """Read and verify a subspace folder (or a seed ``vlora`` folder) as a ``cls``; ``SubspaceFormatError`` names what is wrong.

    The manifest's structure (every key read, its type), task ids and file names are
    checked first, then sizes and checksums, then what each tensor file says it holds.
    ``cls`` is the subspace class (passed in: this module does not import the class's).
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
    if not _is_int(version):
        raise SubspaceFormatError(f"{mpath}: 'format_version' must be an integer, got {_describe(version)}")
    if version > FORMAT_VERSION:
        raise SubspaceFormatError(f"{mpath}: format version {version} is newer than this tool reads ({FORMAT_VERSION})")
    problems = _manifest_problems(man)
    if problems:
        raise SubspaceFormatError(_problem_line(mpath, problems))
    files = man.get("files", {})
    for rel, info in sorted(files.items()):
        fp = path / rel
        if not fp.is_file():
            problems.append(f"'{rel}' is missing")
            continue
        size = fp.stat().st_size
        if size != info["bytes"]:
            problems.append(f"'{rel}' has {size} bytes, the manifest says {info['bytes']} (truncated or replaced)")
        elif _sha256(fp) != info["sha256"]:
            problems.append(f"'{rel}' fails its sha256 checksum (corrupted)")
    expected = {BASIS_FILE} | {t["file"] for t in man["tasks"]}
    unlisted = sorted(f for f in expected if f not in files)
    problems += [f"'{f}' has no checksum in the manifest" for f in unlisted]
    if problems:
        raise SubspaceFormatError(f"{path}: " + "; ".join(problems))
    problems = _ownership_problems(path, man)
    if problems:
        raise SubspaceFormatError("; ".join(problems))

    dtype = parse_dtype(man.get("dtype", "float16"))
    quant = man.get("quantized", {})
    basis, bq = _read_tensors(path / BASIS_FILE, quant.get(BASIS_FILE, {}))
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
    sub = cls(man["method"], modules, tasks, man.get("params", {}), dtype)
    sub.quantized = quantized
    sub.quantization = man.get("quantization")
    sub.saved_path = path
    return sub


def _seed_id_problems(meta: Any) -> list[str]:
    """Task ids and file names of a seed ``subspace_meta.json`` that are not safe as file names."""
    if not isinstance(meta, dict):
        return [f"must be an object, got {_describe(meta)}"]
    c = _Checker()
    if c.check(meta, "task_ids", "task_ids", lambda v: isinstance(v, list), "a list", required=True):
        for i, tid in enumerate(meta["task_ids"]):
            try:
                validate_task_id(tid)
            except ValueError as exc:
                c.add(f"task_ids[{i}]", str(exc))
        dup = sorted({t for t in meta["task_ids"] if isinstance(t, str) and meta["task_ids"].count(t) > 1})
        if dup:
            c.add("task_ids", f"holds {dup[0]!r} more than once")
    if c.check(meta, "task_filenames", "task_filenames", _is_dict, "an object"):
        for tid, name in meta["task_filenames"].items():
            try:
                validate_task_id(name)
            except ValueError:
                c.add(f"task_filenames[{tid!r}]", f"{name!r} is not a valid file name (letters, digits, '.', '_' or '-'; "
                      "no separators, no '..')")
    return c.problems


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
        problems = _seed_id_problems(meta)
        if problems:
            raise SubspaceFormatError(_problem_line(path / "subspace_meta.json", problems))
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
