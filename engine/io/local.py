"""Load and save PEFT LoRA adapters on local disk (safetensors only)."""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import stat
import sys
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..constants import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, PEFT_PREFIX
from ..errors import AdapterFormatError, IncompatibleAdaptersError, OutputExistsError
from ..types import LoRAWeights
from .header import (
    FLOAT_DTYPES,
    check_pair_shapes,
    classify_keys,
    raise_problems,
    read_config,
    read_safetensors_header,
    resolve_adapter_files,
)


def load_adapter(path: str | Path, *, check_finite: bool = True, name: str | None = None,
                 modules: Collection[str] | None = None) -> LoRAWeights:
    """Load a PEFT LoRA adapter.

    Args:
        path: A PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``)
            or a ``.safetensors`` file with ``adapter_config.json`` beside it.
        check_finite: Refuse tensors holding NaN or Inf.
        name: Display name; defaults to the folder name.
        modules: Read only these modules' LoRA tensors (names without PEFT's
            prefix); names the file lacks are left out, so callers check what came
            back. The whole header is still validated and extra tensors are read.

    Returns:
        The adapter, tensors in their stored dtype.

    Raises:
        AdapterFormatError: missing/corrupt files, pickle weights, non-LoRA or
            mismatched tensors, NaN/Inf; the message names the file and key.
        UnsupportedAdapterError: DoRA, embedding LoRA, non-LoRA PEFT types.
    """
    import torch
    from safetensors import SafetensorError, safe_open

    config_path, weights_path = resolve_adapter_files(path)
    config = read_config(config_path)
    header = read_safetensors_header(weights_path)
    layout = classify_keys(list(header), config, str(weights_path))
    check_pair_shapes(layout, {k: v["shape"] for k, v in header.items()}, config)
    for module, (ka, kb) in layout.pairs.items():
        for k in (ka, kb):
            if header[k]["dtype"] not in FLOAT_DTYPES:
                layout.problems.append(f"tensor '{k}' has dtype {header[k]['dtype']}; LoRA factors must be float")
    raise_problems(weights_path, layout.problems)
    pairs = layout.pairs
    if modules is not None:
        wanted = set(modules)
        pairs = {m: keys for m, keys in pairs.items() if m in wanted}

    lora_a: dict[str, Any] = {}
    lora_b: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    bad: list[str] = []
    try:
        with safe_open(str(weights_path), framework="pt") as fh:
            for module, (ka, kb) in pairs.items():
                lora_a[module] = fh.get_tensor(ka)
                lora_b[module] = fh.get_tensor(kb)
                if check_finite:
                    for k, t in ((ka, lora_a[module]), (kb, lora_b[module])):
                        if not bool(torch.isfinite(t).all()):
                            bad.append(k)
            for k in layout.extra:
                extra[k] = fh.get_tensor(k)
    except SafetensorError as exc:
        raise AdapterFormatError(f"{weights_path}: corrupt safetensors file ({exc})") from exc
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise AdapterFormatError(f"{weights_path}: NaN/Inf values in {', '.join(repr(k) for k in bad[:3])}{more}")

    folder = config_path.parent
    # from the header, so that a subset of modules gets the same r as the whole file
    r = config.get("r") or max((int(header[ka]["shape"][0]) for ka, _ in layout.pairs.values()), default=0)
    return LoRAWeights(
        layer_names=sorted(lora_a),
        lora_a=lora_a,
        lora_b=lora_b,
        rank=int(r),
        metadata=config,
        lora_alpha=float(config.get("lora_alpha", 8)),
        use_rslora=bool(config.get("use_rslora", False)),
        # without target_modules in the config: every module's suffix, also when only some were read
        target_modules=(config["target_modules"] if config.get("target_modules") is not None
                        else sorted({m.rsplit(".", 1)[-1] for m in layout.pairs})),
        base_model_name_or_path=config.get("base_model_name_or_path"),
        extra_tensors=extra,
        name=name or folder.name,
        source=str(path),
    )


def _rank_pattern(ranks: dict[str, int], r: int) -> dict[str, int]:
    """``rank_pattern`` that gives every module its rank under PEFT's matching.

    PEFT takes the first key that matches the *end* of a module name, so the key
    ``model.layers.0.q_proj`` also matches ``x.model.layers.0.q_proj``. Longer
    names go first, and a module of rank ``r`` that some key would still match
    gets its own entry.
    """
    from ..types import match_pattern_key

    chosen = {m for m, rk in ranks.items() if rk != r}
    while True:
        order = sorted(chosen, key=lambda n: (-len(n), n))
        pattern = {m: ranks[m] for m in order}
        caught = {m for m in ranks if m not in chosen and match_pattern_key(pattern, m) is not None}
        if not caught:
            return pattern
        chosen |= caught


def adapter_config_for(weights: LoRAWeights) -> dict[str, Any]:
    """The ``adapter_config.json`` to write for ``weights``.

    Starts from the original config and sets the fields PEFT, vLLM and TGI read
    from the tensors actually written (``r``, ``rank_pattern``), so nothing is lost.
    """
    cfg: dict[str, Any] = dict(weights.metadata)
    ranks = weights.ranks
    r = int(weights.rank)
    cfg["peft_type"] = "LORA"
    cfg["r"] = r
    cfg["lora_alpha"] = weights.lora_alpha if not float(weights.lora_alpha).is_integer() else int(weights.lora_alpha)
    cfg["use_rslora"] = bool(weights.use_rslora)
    tm = weights.target_modules
    cfg["target_modules"] = sorted(tm) if isinstance(tm, (list, tuple, set)) else tm
    cfg["rank_pattern"] = _rank_pattern(ranks, r)
    cfg.setdefault("alpha_pattern", {})
    cfg["base_model_name_or_path"] = weights.base_model_name_or_path
    cfg.setdefault("bias", "none")
    cfg.setdefault("task_type", None)
    cfg.setdefault("inference_mode", True)
    cfg.setdefault("fan_in_fan_out", False)
    cfg.setdefault("lora_dropout", 0.0)
    cfg.setdefault("modules_to_save", None)
    return cfg


def _state_dict(weights: LoRAWeights) -> dict[str, Any]:
    sd: dict[str, Any] = {}
    for m in weights.layer_names:
        sd[f"{PEFT_PREFIX}{m}.lora_A.weight"] = weights.lora_a[m].contiguous()
        sd[f"{PEFT_PREFIX}{m}.lora_B.weight"] = weights.lora_b[m].contiguous()
    for k, t in weights.extra_tensors.items():
        sd[k] = t.contiguous()
    return sd


def atomic_dir(path: str | Path, *, force: bool = False) -> AtomicDir:
    """Context manager: write into a temporary sibling folder, rename into place on success."""
    return AtomicDir(Path(path), force=force)


_SIBLING_RE = re.compile(r"^(?P<kind>tmp|old)-(?P<pid>[0-9]+)-[0-9a-f]{8}$")


def _sibling_prefix(path: Path) -> str:
    return f".{path.name}."


def _make_sibling_dir(path: Path, tag: str) -> Path:
    """Create a fresh hidden sibling ``.NAME.<tag>-<pid>-<hex>`` of ``path``.

    The pid in the name tells a later writer whether this one is still running
    (see :func:`sweep_siblings`). Unlike ``tempfile.mkdtemp`` (always 0o700)
    the folder gets the usual ``0o777 & ~umask`` mode.
    """
    for _ in range(100):
        cand = path.parent / f"{_sibling_prefix(path)}{tag}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            cand.mkdir()
        except FileExistsError:
            continue
        return cand
    raise FileExistsError(f"{path.parent}: cannot create a temporary folder")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's process (or an odd number): never touch its folder
    except OSError:
        return True
    return True


def _stale_siblings(path: Path) -> list[tuple[str, Path]]:
    """``(kind, folder)`` of the temporary siblings of ``path`` whose writer is gone."""
    prefix = _sibling_prefix(path)
    found: list[tuple[str, Path]] = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return found
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        m = _SIBLING_RE.match(entry.name[len(prefix):])
        if m is None or _pid_alive(int(m.group("pid"))):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                found.append((m.group("kind"), Path(entry.path)))
        except OSError:
            continue
    return found


def sweep_siblings(path: str | Path) -> None:
    """Clean up after writers of ``path`` that were killed.

    If ``path`` is missing and a dead writer left the previous output in a
    ``.NAME.old-*`` folder (killed between the two renames of the fallback
    swap), that folder is put back. Every other ``.NAME.tmp-*``/``.NAME.old-*``
    folder of a dead pid is removed; a live writer's are never touched.
    Best effort: errors are ignored.
    """
    path = Path(path)
    stale = _stale_siblings(path)
    if not stale:
        return
    if not os.path.lexists(path):
        olds = [p for kind, p in stale if kind == "old"]
        if olds:
            def _changed(p: Path) -> float:
                try:
                    return p.stat().st_ctime  # the rename that hid it sets ctime
                except OSError:
                    return 0.0
            newest = max(olds, key=_changed)
            try:
                os.rename(newest, path)
                stale = [(k, p) for k, p in stale if p != newest]
            except OSError:
                pass
    for _, p in stale:
        shutil.rmtree(p, ignore_errors=True)


def _normalize_modes(root: Path) -> None:
    """Give everything under ``root`` the mode a plain ``open``/``mkdir`` would.

    Some writers (``safetensors.save_file``, ``tempfile.mkstemp``) create 0o600
    files; a server running as another user could not read them. ``root`` was
    made by ``mkdir`` and so already carries ``0o777 & ~umask``; files get
    ``0o666 & ~umask`` (executable bits kept), folders ``0o777 & ~umask``.
    """
    allowed = stat.S_IMODE(root.stat().st_mode) & 0o777
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                continue
            full = 0o777 if stat.S_ISDIR(st.st_mode) or st.st_mode & 0o111 else 0o666
            want = full & allowed
            if stat.S_IMODE(st.st_mode) != want:
                os.chmod(p, want)


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under ``root`` (and ``root``) to disk before it is renamed into place."""
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                continue
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a folder
    finally:
        os.close(fd)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_renameat2_fn: Any = None


def _renameat2() -> Any:
    """libc's ``renameat2`` (glibc 2.28+), or False where there is none."""
    global _renameat2_fn
    if _renameat2_fn is None:
        _renameat2_fn = False
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                fn = ctypes.CDLL(None, use_errno=True).renameat2
                fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
                fn.restype = ctypes.c_int
                _renameat2_fn = fn
            except (OSError, AttributeError):
                pass
    return _renameat2_fn


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux ``RENAME_EXCHANGE``).

    Returns False where the OS or filesystem cannot (no ``renameat2``, ENOSYS,
    EINVAL, EOPNOTSUPP); the caller then falls back to two renames.
    """
    import ctypes

    fn = _renameat2()
    if not fn:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


class AtomicDir:
    """Write a folder atomically: temp sibling, then rename; never half-written.

    ``with AtomicDir(out, force=False) as tmp: ...write into tmp...``
    On error (or ``KeyboardInterrupt``) the temporary folder is removed and
    ``out`` is left as it was. On success every file and folder inside gets
    the usual ``umask`` mode and is fsynced before the rename. An existing
    ``out`` (``force``) is replaced by an atomic exchange where Linux allows,
    so ``out`` exists at every instant; elsewhere by two renames, and a writer
    killed between them has its hidden ``.out.old-*`` put back by the next one.
    Folders that killed writers left beside ``out`` are removed on entry
    (:func:`sweep_siblings`).
    """

    def __init__(self, path: Path, *, force: bool = False) -> None:
        self.path = path
        self.force = force
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        sweep_siblings(self.path)
        # an existing empty folder (mkdtemp) holds nothing to overwrite
        if self.path.exists() and not self.force and not (self.path.is_dir() and not any(self.path.iterdir())):
            raise OutputExistsError(f"{self.path}: already exists (use --force / force=True to overwrite)")
        if self.path.exists() and not self.path.is_dir():
            raise OutputExistsError(f"{self.path}: exists and is not a folder")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = _make_sibling_dir(self.path, "tmp")
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self.tmp is not None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        try:
            _normalize_modes(self.tmp)
            _fsync_tree(self.tmp)
            if self.path.exists():
                self._replace()
            else:
                os.replace(self.tmp, self.path)
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        _fsync_dir(self.path.parent)

    def _replace(self) -> None:
        assert self.tmp is not None
        if _exchange(self.tmp, self.path):
            # self.tmp now holds the previous output; if this process dies here
            # the next writer removes it (its pid is gone)
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = self.path.parent / f"{_sibling_prefix(self.path)}old-{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(self.path, old)
        try:
            os.replace(self.tmp, self.path)
        except BaseException:
            os.replace(old, self.path)  # put the original back
            raise
        shutil.rmtree(old, ignore_errors=True)


def save_adapter(
    weights: LoRAWeights,
    path: str | Path,
    *,
    force: bool = False,
    dtype: Any = None,
    modelfile: bool = False,
    target: str = "portable",
    modelfile_base: str | None = None,
) -> Path:
    """Write ``weights`` as a PEFT folder that ``PeftModel.from_pretrained`` loads as is.

    By default (``target="portable"``) the folder means the same ΔW to PEFT, vLLM
    and TGI: each module's scale is folded into its B, every module has the
    config's ``r`` (the largest module rank) and the patterns are empty. See
    :func:`engine.io.targets.for_target` for the other targets and for the
    warnings a caller should show (this function does not return them).

    Args:
        weights: The adapter.
        path: Output folder; written to a temporary sibling and renamed into place.
        force: Replace an existing folder.
        dtype: Cast the LoRA factors (e.g. ``torch.float16``); extra tensors keep theirs.
        modelfile: Also write an Ollama ``Modelfile`` (``FROM <base>`` / ``ADAPTER .``).
        target: ``portable``, ``peft`` (as is: patterns and heads kept), ``vllm``,
            ``tgi`` or ``ollama``.
        modelfile_base: The Modelfile's ``FROM``: an Ollama model name or a local
            path (default: the adapter's ``base_model_name_or_path``).

    Returns:
        The folder written.

    Raises:
        OutputExistsError: ``path`` exists and ``force`` is false.
    """
    from safetensors.torch import save_file

    if not weights.layer_names:
        raise ValueError("save_adapter: the adapter has no modules")
    from .targets import for_target, modelfile_text

    w, _ = for_target(weights, target)
    if dtype is not None:
        w = LoRAWeights(**{**w.__dict__, "lora_a": {k: v.to(dtype) for k, v in w.lora_a.items()},
                           "lora_b": {k: v.to(dtype) for k, v in w.lora_b.items()}})
    out = Path(path)
    config = adapter_config_for(w)
    with atomic_dir(out, force=force) as tmp:
        save_file(_state_dict(w), str(tmp / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
        # top-level keys sorted like PEFT's; nested dicts keep their order (rank_pattern's is meaningful)
        text = json.dumps({k: config[k] for k in sorted(config)}, indent=2)
        (tmp / ADAPTER_CONFIG_NAME).write_text(text + "\n", encoding="utf-8")
        if modelfile:
            (tmp / "Modelfile").write_text(modelfile_text(w, modelfile_base)[0], encoding="utf-8")
    return out


@dataclass
class CompatibilityReport:
    """Result of :func:`check_compatible`."""

    modules: list[str]
    shapes: dict[str, tuple[int, int]]
    ranks: dict[str, list[int]] = field(default_factory=dict)  # module -> rank per adapter
    base_model: str | None = None
    mixed_ranks: bool = False
    warnings: list[str] = field(default_factory=list)


def _label(a: LoRAWeights, i: int) -> str:
    return a.name or a.source or f"adapter #{i}"


@dataclass(frozen=True)
class _Facts:
    """What the compatibility checks read of one adapter: from its tensors or from its header."""

    label: str
    base_model: str | None
    modules: list[str]
    shapes: dict[str, tuple[int, int]]
    ranks: dict[str, int]


def _facts(item: Any, i: int) -> _Facts:
    """The facts of a ``LoRAWeights``, an ``AdapterSummary`` or an adapter path (header and config only)."""
    from ..types import AdapterSummary
    from .header import read_adapter_summary

    if isinstance(item, (str, Path)):
        label = str(item)
        item = read_adapter_summary(item)
    else:
        label = ""
    if isinstance(item, AdapterSummary):
        return _Facts(label or Path(item.path).name, item.base_model, [m.name for m in item.modules],
                      {m.name: (int(m.out_features), int(m.in_features)) for m in item.modules},
                      {m.name: int(m.rank) for m in item.modules})
    if isinstance(item, LoRAWeights):
        return _Facts(_label(item, i), item.base_model_name_or_path, list(item.layer_names),
                      {m: item.shapes(m) for m in item.layer_names}, {m: item.module_rank(m) for m in item.layer_names})
    raise TypeError(f"expected LoRAWeights, AdapterSummary or an adapter path, got {type(item).__name__}")


def check_compatible(adapters: Sequence[Any], *, allow_mixed_ranks: bool = True) -> CompatibilityReport:
    """Check that adapters can share a basis: same base model, modules and shapes.

    The one check for adapters in memory and for adapter folders (``from_adapters_streaming``):
    ``adapters`` are :class:`~engine.types.LoRAWeights`, or paths / ``AdapterSummary`` read
    from their headers and configs only (no tensors). Different ranks are reported
    (``mixed_ranks``) and refused only when ``allow_mixed_ranks`` is false.

    Raises:
        IncompatibleAdaptersError: naming the first adapter and module that differ.
        AdapterFormatError: an unreadable path.
        ValueError: empty input.
    """
    if not adapters:
        raise ValueError("no adapters given")
    facts = [_facts(a, i) for i, a in enumerate(adapters)]
    ref = facts[0]
    problems: list[str] = []
    bases = {f.base_model for f in facts if f.base_model}
    if len(bases) > 1:
        problems.append("different base models: " + ", ".join(sorted(bases)))
    ref_set = set(ref.modules)
    shapes = dict(ref.shapes)
    ranks: dict[str, list[int]] = {m: [] for m in ref.modules}
    for f in facts:
        s = set(f.modules)
        if s != ref_set:
            missing, added = sorted(ref_set - s), sorted(s - ref_set)
            detail = []
            if missing:
                detail.append(f"lacks {len(missing)} module(s) of {ref.label}, e.g. '{missing[0]}'")
            if added:
                detail.append(f"has {len(added)} module(s) {ref.label} lacks, e.g. '{added[0]}'")
            problems.append(f"{f.label} " + " and ".join(detail))
            continue
        for m in ref.modules:
            if f.shapes[m] != shapes[m]:
                problems.append(f"{f.label}: module '{m}' has shape {f.shapes[m]}, {ref.label} has {shapes[m]}")
                break
            ranks[m].append(f.ranks[m])
    if problems:
        raise IncompatibleAdaptersError("; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else ""))
    mixed = any(len(set(v)) > 1 for v in ranks.values())
    report = CompatibilityReport(
        modules=list(ref.modules), shapes=shapes, ranks=ranks, base_model=next(iter(bases), None), mixed_ranks=mixed
    )
    if mixed:
        rset = sorted({r for v in ranks.values() for r in v})
        msg = f"adapters have different ranks ({', '.join(map(str, rset))})"
        if not allow_mixed_ranks:
            raise IncompatibleAdaptersError(msg + "; this operation needs one rank")
        report.warnings.append(msg)
    return report


# -- mixed folders: which adapters go together ------------------------------------


@dataclass(frozen=True)
class CompatibleSet:
    """Adapters that can share a basis: same base model (or none named), modules and shapes.

    Attributes:
        name: A folder-safe name from the modules' suffixes, e.g. ``q_proj+v_proj``
            (``-2``, ``-3``… when two sets target the same suffixes).
        members: The adapters' names, in input order.
        indices: Their positions in the input.
        modules: Module → ``(out_features, in_features)``.
        base_model: The base model the members name, if any.
    """

    name: str
    members: list[str]
    indices: list[int]
    modules: dict[str, tuple[int, int]]
    base_model: str | None = None

    @property
    def target_modules(self) -> list[str]:
        """The modules' last name parts (``q_proj``, ``v_proj``…), sorted."""
        return sorted({m.rsplit(".", 1)[-1] for m in self.modules})

    def describe(self, *, base_model: bool = False) -> str:
        """One line: ``[q_proj+v_proj] 4 modules (q_proj, v_proj): a, b`` (``base_model``: with the base model)."""
        base = f", base model {self.base_model or '(not named)'}" if base_model else ""
        return f"[{self.name}] {len(self.modules)} modules ({', '.join(self.target_modules)}){base}: {', '.join(self.members)}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: name, members, indices, target_modules, num_modules, modules {name: [out, in]}, base_model."""
        return {"name": self.name, "members": list(self.members), "indices": list(self.indices),
                "target_modules": self.target_modules, "num_modules": len(self.modules),
                "modules": {m: list(s) for m, s in self.modules.items()}, "base_model": self.base_model}


def _module_shapes(item: Any) -> tuple[str, str | None, dict[str, tuple[int, int]]]:
    """``(name, base model, {module: (out, in)})`` of a LoRAWeights, an AdapterSummary or a path."""
    if isinstance(item, (str, Path)):
        from .header import read_adapter_summary

        item = read_adapter_summary(item)  # named by its folder, as before
    try:
        f = _facts(item, 0)
    except TypeError as exc:
        raise TypeError(f"partition_compatible: {exc}") from None
    return (f.label if not isinstance(item, LoRAWeights) else item.name or item.source or "adapter"), f.base_model, f.shapes


def _set_name(suffixes: list[str], taken: set[str]) -> str:
    raw = "+".join(suffixes) or "set"
    base = "".join(c if c.isalnum() or c in "._+-" else "_" for c in raw).strip("._") or "set"
    if len(base) > 100:
        base = "set"
    name, k = base, 1
    while name in taken:
        k += 1
        name = f"{base}-{k}"
    taken.add(name)
    return name


def partition_compatible(adapters: Sequence[Any], names: Sequence[str] | None = None) -> list[CompatibleSet]:
    """Split adapters into sets that :func:`check_compatible` accepts together.

    Two adapters go together when they have the same modules with the same shapes
    and do not name different base models (ranks may differ). An adapter naming
    no base model joins the set of the same modules whose members name one, when
    there is exactly one such set. Torch-free when given summaries or paths.

    Args:
        adapters: :class:`~engine.types.LoRAWeights`, :class:`~engine.types.AdapterSummary`
            (from :func:`engine.io.header.read_adapter_summary`, header only) or adapter paths.
        names: Display names, one per adapter (default: each adapter's name or folder name).

    Returns:
        The sets, largest first (ties: by first member's position); one set when
        everything is compatible.

    Raises:
        ValueError: ``names`` of the wrong length. AdapterFormatError: an unreadable path.
    """
    facts = [_module_shapes(a) for a in adapters]
    if names is not None:
        if len(names) != len(facts):
            raise ValueError(f"names: got {len(names)} name(s) for {len(facts)} adapter(s)")
        facts = [(str(n), b, m) for n, (_, b, m) in zip(names, facts)]
    groups: dict[tuple[Any, str | None], list[int]] = {}
    for i, (_, base, mods) in enumerate(facts):
        groups.setdefault((tuple(sorted(mods.items())), base or None), []).append(i)
    # unnamed base model: joins the one named set with the same modules, if exactly one
    for key in [k for k in groups if k[1] is None]:
        named = [k for k in groups if k[0] == key[0] and k[1] is not None]
        if len(named) == 1:
            groups[named[0]] = sorted(groups[named[0]] + groups.pop(key))
    ordered = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[1][0]))
    taken: set[str] = set()
    out = []
    for (mods, base), idx in ordered:
        shapes = dict(mods)
        suffixes = sorted({m.rsplit(".", 1)[-1] for m in shapes})
        out.append(CompatibleSet(name=_set_name(suffixes, taken), members=[facts[i][0] for i in idx], indices=list(idx),
                                 modules=shapes, base_model=base))
    return out


def describe_sets(sets: Sequence[CompatibleSet]) -> str:
    """The sets on one line: ``2 sets: [q_proj+v_proj] 4 modules (…): a, b; [k_proj+…] …``.

    Base models are named when the sets do not all have the same one.
    """
    bases = len({s.base_model for s in sets}) > 1
    return f"{len(sets)} sets: " + "; ".join(s.describe(base_model=bases) for s in sets)


@dataclass(frozen=True)
class ModuleOverlap:
    """The modules every adapter has (same shape), and what each adapter has beyond them.

    Attributes:
        modules: Modules in every adapter with one shape, sorted.
        left_out: Adapter name → its modules not in ``modules`` (only adapters with some).
    """

    modules: list[str]
    left_out: dict[str, list[str]]

    @property
    def complete(self) -> bool:
        """True when no adapter has a module the others lack."""
        return not self.left_out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``compared_modules`` and ``left_out`` {adapter: [module…]}."""
        return {"compared_modules": list(self.modules), "left_out": {k: list(v) for k, v in self.left_out.items()}}


def common_modules(adapters: Sequence[LoRAWeights]) -> ModuleOverlap:
    """Modules that every adapter has with the same shape, for comparing mixed adapters on what they share.

    Use :func:`engine.subspace.common.restrict_modules` to cut adapters down to
    ``modules``; ``left_out`` says what that leaves out, per adapter.

    Raises:
        IncompatibleAdaptersError: no module is shared by all adapters (the
            message lists the compatible sets). ValueError: no adapters.
    """
    if not adapters:
        raise ValueError("no adapters given")
    shared: dict[str, tuple[int, int]] | None = None
    for a in adapters:
        mine = {m: a.shapes(m) for m in a.layer_names}
        shared = mine if shared is None else {m: s for m, s in shared.items() if mine.get(m) == s}
    assert shared is not None
    modules = sorted(shared)
    if not modules:
        raise IncompatibleAdaptersError(
            "no module is in every adapter with the same shape; " + describe_sets(partition_compatible(adapters))
            + "; choose adapters with --exclude PATTERN"
        )
    left = {_label(a, i): [m for m in a.layer_names if m not in shared] for i, a in enumerate(adapters)}
    return ModuleOverlap(modules=modules, left_out={k: v for k, v in left.items() if v})
