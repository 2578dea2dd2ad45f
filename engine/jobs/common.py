"""Helpers the job implementations share: loading adapter specs, naming tasks, soft problems of an adapter.

The figures of a module (norms, spectrum) are :func:`engine.analysis.figures.module_figures` (no math here).

Torch is imported inside functions only.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..analysis.figures import module_figures
from ..progress import CancelLike, ProgressFn, tick

__all__ = ["adapter_warnings", "load_adapters", "load_one", "load_spec", "local_folder", "module_figures",
           "resolve_local_paths", "unique_names"]


def resolve_local_paths(specs: list[str], *, progress: ProgressFn | None = None, cancel: CancelLike | None = None,
                        exclude: list[str] | None = None) -> list[tuple[str, Path]]:
    """Expand adapter specs into ``(name, local folder)``; ``hf://`` specs are downloaded to the cache.

    ``exclude``: glob patterns of adapters to leave out (:func:`engine.io.scan.spec_excluded`).

    Raises:
        AdapterFormatError: a path that is neither an adapter nor holds any.
        ValueError: a malformed ``hf://`` id. HubError: the Hub failed.
    """
    from ..io.scan import expand_adapter_specs

    expanded = expand_adapter_specs(list(specs), exclude)
    out: list[tuple[str, Path]] = []
    names = unique_names([s.name for s in expanded])
    for i, (spec, name) in enumerate(zip(expanded, names)):
        tick(progress, cancel, i, len(expanded), f"resolving {spec.label}")
        out.append((name, local_folder(spec)))
    return out


def local_folder(spec: Any) -> Path:
    """The local folder (or file) of an :class:`~engine.io.scan.AdapterSpec`: a Hub one is downloaded to the cache.

    The one place a job turns ``hf://`` into files (with :func:`load_spec`).
    """
    if spec.repo_id:
        from ..io.hub import download_adapter

        return download_adapter(spec.repo_id, spec.revision)
    assert spec.path is not None
    return Path(spec.path)


def load_spec(spec: Any, name: str | None = None) -> Any:
    """Load the adapter of an :class:`~engine.io.scan.AdapterSpec` (a Hub one named ``name`` or after its repo)."""
    if spec.repo_id:
        from ..io.hub import load_adapter_from_hub

        w = load_adapter_from_hub(spec.repo_id, spec.revision)
        if name is not None:
            w.name = name
        return w
    from ..io.local import load_adapter

    assert spec.path is not None
    return load_adapter(spec.path, name=name) if name is not None else load_adapter(spec.path)


def load_adapters(specs: list[str], *, progress: ProgressFn | None = None, cancel: CancelLike | None = None,
                  exclude: list[str] | None = None) -> list[Any]:
    """Load every adapter named by ``specs`` (folders, parent folders, ``hf://`` ids).

    Each adapter's ``name`` is a unique task id derived from its folder or repo name.
    ``exclude``: glob patterns of adapters to leave out (:func:`engine.io.scan.spec_excluded`).
    """
    from ..io.scan import expand_adapter_specs

    expanded = expand_adapter_specs(list(specs), exclude)
    names = unique_names([s.name for s in expanded])
    adapters = []
    for i, (spec, name) in enumerate(zip(expanded, names)):
        tick(progress, cancel, i, len(expanded), f"loading {spec.label}")
        adapters.append(load_spec(spec, name))
    tick(progress, cancel, len(expanded), len(expanded), f"loaded {len(expanded)} adapter(s)")
    return adapters


def load_one(spec: str) -> Any:
    """Load exactly one adapter (a folder, a ``.safetensors`` file or ``hf://`` id)."""
    from ..io.scan import spec_of

    return load_spec(spec_of(spec))


def unique_names(names: list[str]) -> list[str]:
    """Make names unique by suffixing ``-2``, ``-3``, … to repeats (keeps them valid task ids)."""
    seen: dict[str, int] = {}
    out = []
    taken = set(names)
    for n in names:
        if n not in seen:
            seen[n] = 1
            out.append(n)
            continue
        k = seen[n]
        while True:
            k += 1
            cand = f"{n}-{k}"
            if cand not in taken:
                break
        seen[n] = k
        taken.add(cand)
        out.append(cand)
    return out


def _config_file(w: Any) -> str:
    """The ``adapter_config.json`` an adapter was read from (its source folder or weights file)."""
    from ..constants import ADAPTER_CONFIG_NAME

    if not w.source:
        return ADAPTER_CONFIG_NAME
    src = Path(w.source)
    return str((src.parent if src.suffix == ".safetensors" else src) / ADAPTER_CONFIG_NAME)


def adapter_warnings(w: Any, figures: list[dict[str, Any]]) -> list[str]:
    """Soft problems of a loaded adapter: NaN/Inf, zero updates, config vs tensors, serving limits."""
    from ..constants import VLLM_RANKS

    problems: list[str] = []
    bad = [f["name"] for f in figures if not f["finite"]]
    if bad:
        problems.append(f"NaN/Inf values in {len(bad)} module(s), e.g. '{bad[0]}'")
    zero = [f["name"] for f in figures if f["finite"] and f["norm_delta"] == 0.0]
    if zero:
        problems.append(f"{len(zero)} module(s) have a zero update (B is all zeros: untrained?), e.g. '{zero[0]}'")
    tm = w.target_modules
    if isinstance(tm, (list, tuple)) and tm:
        present = {n.rsplit(".", 1)[-1] for n in w.layer_names}
        missing = sorted(set(tm) - present - {"all-linear"})
        if missing:
            problems.append(f"target_modules lists {', '.join(missing)} but the weights hold no such module")
    elif isinstance(tm, str) and tm != "all-linear":
        try:
            pat = re.compile(tm)
            if not any(pat.fullmatch(n) or pat.search(n) for n in w.layer_names):
                problems.append(f"target_modules regex {tm!r} matches none of the modules")
        except re.error:
            problems.append(f"target_modules {tm!r} is not a valid regex")
    big = [f["name"] for f in figures if f["rank"] > min(f["in_features"], f["out_features"])]
    if big:
        problems.append(f"rank exceeds min(in, out) in {len(big)} module(s), e.g. '{big[0]}'")
    if not w.base_model_name_or_path:
        problems.append("adapter_config.json names no base_model_name_or_path (vLLM/TGI and Ollama export need it)")
    negative = [k for k, v in (w.metadata.get("alpha_pattern") or {}).items() if isinstance(v, (int, float)) and v < 0]
    if w.lora_alpha < 0 or negative:
        where = f"'{negative[0]}' in alpha_pattern" if w.lora_alpha >= 0 else f"lora_alpha ({w.lora_alpha:g})"
        problems.append(f"{_config_file(w)}: {where} is negative, which flips the sign of the update; "
                        "PEFT applies it as written, but it is most likely a mistake")
    ranks = sorted({f["rank"] for f in figures})
    over = [r for r in ranks if r > max(VLLM_RANKS)]
    if over:
        problems.append(f"rank {over[0]} exceeds vLLM's largest --max-lora-rank ({max(VLLM_RANKS)})")
    return problems
