"""The manifest of a subspace folder (``subspace.json``): its checks, and version 2's compact form.

Every key the loader reads is checked for presence and type before any of it is
used (:func:`manifest_problems`, one line per problem). Version 2 (written since the
packed layout, :mod:`engine.subspace.layout`) differs from version 1 in:

- ``configs``: each distinct task config once, without ``name`` and ``source``; a task's
  ``config`` is the index of its own (``null``: none), its ``name`` (absent when it is the
  task id) and ``source`` are on the task;
- a task's ``fidelity``, ``norms`` and ``ranks`` are lists in the order of the module names
  (sorted), and its ``tensors`` one list of tensor specs per module; a module's ``tensors``
  the specs of its basis tensors (version 1's ``quantized`` section and ``extra_tensors`` are gone:
  the specs and the files say it);
- explained-variance curves to 4 significant digits (every other float to 7, as in version 1).

:func:`expand` turns a version 2 manifest into version 1's shape (plus the layouts), so
the rest of the loader reads both.
"""

from __future__ import annotations

import math
from typing import Any

from ..io.scan import validate_task_id
from .layout import parse_spec

BASIS_FILE = "basis.safetensors"
TASKS_DIR = "tasks"
#: Tensor names per module kind in ``basis.safetensors`` (``separate``: each task alone, no basis).
BASIS_KEYS = {"joint": ("U", "V"), "pca": ("comp_a", "comp_b", "mean_a", "mean_b", "sv_a", "sv_b"), "separate": ()}
#: Keys of a task config that are the task's own (on the task in version 2), not shared in ``configs``.
OWN_CONFIG_KEYS = ("name", "source")
_MAX_PROBLEMS = 8


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


def significant(o: Any, digits: int) -> Any:
    """``o`` (a float or a list of them) with every finite float rounded to ``digits`` significant digits."""
    if isinstance(o, float):
        return float(f"{o:.{digits}g}") if math.isfinite(o) else o
    if isinstance(o, (list, tuple)):
        return [significant(v, digits) for v in o]
    return o


def by_module(values: dict[str, Any], names: list[str]) -> Any:
    """``values`` as a list in the order of ``names`` when its keys are exactly those (else as it is)."""
    return [values[m] for m in names] if sorted(values) == names else values


def expand(man: dict[str, Any]) -> tuple[dict[str, Any], dict[str, list[tuple[str, list[str]]]]]:
    """A checked version 2 manifest in version 1's shape, and each file's layout ``[(module, specs), …]``."""
    names = sorted(man["modules"])
    configs = man.get("configs", [])
    layouts: dict[str, list[tuple[str, list[str]]]] = {BASIS_FILE: [(m, man["modules"][m].get("tensors", [])) for m in names]}
    tasks = []
    for t in man["tasks"]:
        t = dict(t)
        idx = t.pop("config", None)
        own = {"name": t.pop("name", t["id"]), "source": t.pop("source", None)}
        t["config"] = {} if idx is None else {**configs[idx], **own}
        for k in ("fidelity", "norms", "ranks"):
            if isinstance(t.get(k), list):
                t[k] = dict(zip(names, t[k]))
        layouts[t["file"]] = list(zip(names, t.pop("tensors", [[] for _ in names])))
        tasks.append(t)
    return {**man, "tasks": tasks}, layouts


# -- checking a manifest before any of it is used --------------------------------------------


def describe(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"the boolean {str(v).lower()}"
    if isinstance(v, (int, float)):
        return f"the number {v}"
    if isinstance(v, str):
        return f"the string {v[:40]!r}" + ("…" if len(v) > 40 else "")
    return {list: "a list", dict: "an object"}.get(type(v), type(v).__name__)


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _is_dict(v: Any) -> bool:
    return isinstance(v, dict)


def _opt_str(v: Any) -> bool:
    return v is None or isinstance(v, str)


def _count(v: Any) -> bool:
    return is_int(v) and v >= 0


class Checker:
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
            self.add(key, f"must be {expected}, got {describe(obj[name])}")
            return False
        return True

    def mapping(self, obj: dict[str, Any], name: str, key: str, ok: Any, expected: str) -> None:
        """``obj[name]``, when present, must be an object whose every value passes ``ok``."""
        if self.check(obj, name, key, _is_dict, "an object"):
            for k, v in obj[name].items():
                if not ok(v):
                    self.add(f"{key}[{k!r}]", f"must be {expected}, got {describe(v)}")

    def per_module(self, obj: dict[str, Any], name: str, key: str, ok: Any, expected: str, n: int | None) -> None:
        """Version 2: ``obj[name]`` an object as :meth:`mapping`, or a list of ``n`` values (one per module)."""
        v = obj.get(name)
        if not isinstance(v, list):
            if name in obj and not _is_dict(v):
                self.add(key, f"must be an object or a list of {n} (one per module), got {describe(v)}")
            else:
                self.mapping(obj, name, key, ok, expected)
            return
        if n is not None and len(v) != n:
            self.add(key, f"must hold {n} values (one per module), got {len(v)}")
        for i, x in enumerate(v):
            if not ok(x):
                self.add(f"{key}[{i}]", f"must be {expected}, got {describe(x)}")

    def specs(self, v: Any, key: str) -> None:
        """``v`` must be a list of tensor specs (:func:`engine.subspace.layout.parse_spec`)."""
        if not isinstance(v, list):
            self.add(key, f"must be a list of tensor specs, got {describe(v)}")
            return
        for i, s in enumerate(v):
            try:
                parse_spec(s)
            except ValueError as exc:
                self.add(f"{key}[{i}]", str(exc))

    def config(self, cfg: Any, ck: str, *, shared: bool) -> None:
        if not _is_dict(cfg):
            self.add(ck, f"must be an object, got {describe(cfg)}")
            return
        self.check(cfg, "rank", f"{ck}.rank", _count, "an integer ≥ 0")
        self.check(cfg, "metadata", f"{ck}.metadata", _is_dict, "an object")
        self.check(cfg, "lora_alpha", f"{ck}.lora_alpha", lambda v: v is None or _is_num(v), "a number or null")
        self.check(cfg, "use_rslora", f"{ck}.use_rslora", lambda v: isinstance(v, bool), "true or false")
        self.check(cfg, "target_modules", f"{ck}.target_modules",
                   lambda v: _opt_str(v) or (isinstance(v, list) and all(map(_is_str, v))), "a string, a list of strings or null")
        for k in ("base_model_name_or_path",) if shared else ("base_model_name_or_path", *OWN_CONFIG_KEYS):
            self.check(cfg, k, f"{ck}.{k}", _opt_str, "a string or null")


def manifest_problems(man: dict[str, Any], version: int) -> list[str]:
    """Every key of ``man`` (of format ``version``) that the loader reads, checked for presence and type."""
    c = Checker()
    v2 = version >= 2
    c.check(man, "method", "method", _is_str, "a string", required=True)
    dtype_names = ("float16", "fp16", "half", "bfloat16", "bf16", "float32", "fp32", "float", "float64")
    c.check(man, "dtype", "dtype", lambda v: v in dtype_names, "one of float16, bfloat16, float32, float64")
    c.check(man, "params", "params", _is_dict, "an object")
    c.check(man, "quantization", "quantization", lambda v: v is None or _is_dict(v), "an object or null")
    n_modules: int | None = None  # unknown: lists per module are not checked for their length
    if c.check(man, "modules", "modules", _is_dict, "an object", required=True):
        n_modules = len(man["modules"])
        for m, info in man["modules"].items():
            key = f"modules[{m!r}]"
            if not _is_dict(info):
                c.add(key, f"must be an object, got {describe(info)}")
                continue
            c.check(info, "kind", f"{key}.kind", lambda v: v in BASIS_KEYS, "'joint', 'pca' or 'separate'", required=True)
            c.check(info, "shape", f"{key}.shape", lambda v: isinstance(v, list) and len(v) == 2
                    and all(map(_count, v)), "a list of two integers ≥ 0", required=True)
            c.check(info, "rank", f"{key}.rank", _count, "an integer ≥ 0")
            c.check(info, "explained", f"{key}.explained", lambda v: isinstance(v, list) and all(map(_is_num, v)),
                    "a list of numbers")
            if v2 and c.check(info, "tensors", f"{key}.tensors", lambda v: True, "", required=True):
                c.specs(info["tensors"], f"{key}.tensors")
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
                c.add(key, f"must be an object, got {describe(info)}")
                continue
            c.check(info, "sha256", f"{key}.sha256", lambda v: _is_str(v) and len(v) == 64, "a 64-digit hex string", required=True)
            c.check(info, "bytes", f"{key}.bytes", _count, "an integer ≥ 0", required=True)
    if not v2 and c.check(man, "quantized", "quantized", _is_dict, "an object"):
        qspec = (("shape", lambda v: isinstance(v, list) and all(map(_count, v)), "a list of integers ≥ 0"),
                 ("method", _is_str, "a string"), ("bits", is_int, "an integer"),
                 ("block_size", lambda v: is_int(v) and v > 0, "an integer > 0"))
        for rel, names in man["quantized"].items():
            if not _is_dict(names):
                c.add(f"quantized[{rel!r}]", f"must be an object, got {describe(names)}")
                continue
            for name, info in names.items():
                key = f"quantized[{rel!r}][{name!r}]"
                if not _is_dict(info):
                    c.add(key, f"must be an object, got {describe(info)}")
                    continue
                for k, ok, expected in qspec:
                    c.check(info, k, f"{key}.{k}", ok, expected, required=True)
    n_configs = 0
    if v2 and c.check(man, "configs", "configs", lambda v: isinstance(v, list), "a list"):
        n_configs = len(man["configs"])
        for i, cfg in enumerate(man["configs"]):
            c.config(cfg, f"configs[{i}]", shared=True)
    if c.check(man, "tasks", "tasks", lambda v: isinstance(v, list), "a list", required=True):
        _task_problems(c, man["tasks"], v2, n_modules, n_configs)
    return c.problems


def _task_problems(c: Checker, tasks: list[Any], v2: bool, n_modules: int | None, n_configs: int) -> None:
    seen_ids: dict[str, int] = {}
    seen_files: dict[str, int] = {}
    for i, t in enumerate(tasks):
        key = f"tasks[{i}]"
        if not _is_dict(t):
            c.add(key, f"must be an object, got {describe(t)}")
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
        if v2:
            c.per_module(t, "fidelity", f"{key}.fidelity", _is_num, "a number", n_modules)
            c.per_module(t, "norms", f"{key}.norms", _is_num, "a number", n_modules)
            c.per_module(t, "ranks", f"{key}.ranks", _count, "an integer ≥ 0", n_modules)
            c.check(t, "config", f"{key}.config", lambda v: v is None or (is_int(v) and 0 <= v < n_configs),
                    f"null or the index of one of the {n_configs} entries of 'configs'")
            for k in OWN_CONFIG_KEYS:
                c.check(t, k, f"{key}.{k}", _opt_str, "a string or null")
            if c.check(t, "tensors", f"{key}.tensors", lambda v: isinstance(v, list) and (n_modules is None or len(v) == n_modules),
                       f"a list of {n_modules} lists of tensor specs (one per module)", required=True):
                for j, specs in enumerate(t["tensors"]):
                    c.specs(specs, f"{key}.tensors[{j}]")
        else:
            c.mapping(t, "fidelity", f"{key}.fidelity", _is_num, "a number")
            c.mapping(t, "norms", f"{key}.norms", _is_num, "a number")
            c.mapping(t, "ranks", f"{key}.ranks", _count, "an integer ≥ 0")
            if c.check(t, "config", f"{key}.config", lambda v: v is None or _is_dict(v), "an object or null") and t["config"]:
                c.config(t["config"], f"{key}.config", shared=False)
        c.check(t, "error_is_bound", f"{key}.error_is_bound", lambda v: isinstance(v, bool), "true or false")
        c.check(t, "original_bytes", f"{key}.original_bytes", _count, "an integer ≥ 0")


def problem_line(where: Any, problems: list[str]) -> str:
    more = len(problems) - _MAX_PROBLEMS
    return f"{where}: " + "; ".join(problems[:_MAX_PROBLEMS]) + (f"; … and {more} more" if more > 0 else "")


def seed_id_problems(meta: Any) -> list[str]:
    """Task ids and file names of a seed ``subspace_meta.json`` that are not safe as file names."""
    if not isinstance(meta, dict):
        return [f"must be an object, got {describe(meta)}"]
    c = Checker()
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
