"""Helpers the job implementations share: loading adapter specs, naming tasks, module math.

Torch is imported inside functions only.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from ..progress import CancelLike, ProgressFn, tick


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
        if spec.repo_id:
            from ..io.hub import download_adapter

            out.append((name, download_adapter(spec.repo_id, spec.revision)))
        else:
            assert spec.path is not None
            out.append((name, spec.path))
    return out


def load_adapters(specs: list[str], *, progress: ProgressFn | None = None, cancel: CancelLike | None = None,
                  exclude: list[str] | None = None) -> list[Any]:
    """Load every adapter named by ``specs`` (folders, parent folders, ``hf://`` ids).

    Each adapter's ``name`` is a unique task id derived from its folder or repo name.
    ``exclude``: glob patterns of adapters to leave out (:func:`engine.io.scan.spec_excluded`).
    """
    from ..io.local import load_adapter
    from ..io.scan import expand_adapter_specs

    expanded = expand_adapter_specs(list(specs), exclude)
    names = unique_names([s.name for s in expanded])
    adapters = []
    for i, (spec, name) in enumerate(zip(expanded, names)):
        tick(progress, cancel, i, len(expanded), f"loading {spec.label}")
        if spec.repo_id:
            from ..io.hub import load_adapter_from_hub

            w = load_adapter_from_hub(spec.repo_id, spec.revision)
            w.name = name
        else:
            assert spec.path is not None
            w = load_adapter(spec.path, name=name)
        adapters.append(w)
    tick(progress, cancel, len(expanded), len(expanded), f"loaded {len(expanded)} adapter(s)")
    return adapters


def load_one(spec: str) -> Any:
    """Load exactly one adapter (a folder, a ``.safetensors`` file or ``hf://`` id)."""
    from ..io.local import load_adapter

    if spec.startswith("hf://"):
        from ..io.hub import load_adapter_from_hub
        from ..io.scan import parse_hub_spec

        s = parse_hub_spec(spec)
        assert s.repo_id is not None
        return load_adapter_from_hub(s.repo_id, s.revision)
    return load_adapter(spec)


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


def module_figures(w: Any, m: str) -> dict[str, Any]:
    """Norms and spectrum of one module's update, through r×r products only.

    ``‖ΔW‖_F² = s²·tr((BᵀB)(AAᵀ))``; the singular values of ``B·A`` are those of
    ``R_B·R_Aᵀ`` where ``B = Q_B R_B`` and ``Aᵀ = Q_A R_A``.
    """
    import torch

    a = w.lora_a[m].double()
    b = w.lora_b[m].double()
    s = float(w.scale(m))
    finite = bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())
    out_f, in_f = w.shapes(m)
    fig: dict[str, Any] = {
        "name": m,
        "rank": int(a.shape[0]),
        "in_features": int(in_f),
        "out_features": int(out_f),
        "dtype": str(w.lora_a[m].dtype).replace("torch.", ""),
        "scale": s,
        "finite": finite,
    }
    if not finite:
        fig.update(norm_a=None, norm_b=None, norm_delta=None, singular_values=[], stable_rank=None, effective_rank=None)
        return fig
    norm_a = float(torch.linalg.norm(a))
    norm_b = float(torch.linalg.norm(b))
    r = a.shape[0]
    if r == 0:
        sv = torch.zeros(0, dtype=torch.float64)
    else:
        rb = torch.linalg.qr(b, mode="r")[1]
        ra = torch.linalg.qr(a.T, mode="r")[1]
        sv = torch.linalg.svdvals(rb @ ra.T) * abs(s)
    fro2 = float((sv**2).sum())
    top = float(sv[0]) if sv.numel() else 0.0
    if fro2 > 0:
        p = (sv**2) / fro2
        p = p[p > 0]
        eff = float(torch.exp(-(p * p.log()).sum()))
    else:
        eff = 0.0
    fig.update(
        norm_a=norm_a,
        norm_b=norm_b,
        norm_delta=math.sqrt(fro2),
        singular_values=[float(x) for x in sv],
        stable_rank=(fro2 / top**2) if top > 0 else 0.0,
        effective_rank=eff,
    )
    return fig


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
