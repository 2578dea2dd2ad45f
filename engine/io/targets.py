"""What inference servers read from a PEFT LoRA folder, and how to write one they all read alike.

PEFT gives each module its own scale (``alpha_m / r_m``, or ``/√r_m`` with rsLoRA,
through ``rank_pattern``/``alpha_pattern``). vLLM and TGI apply one scale from the
config's ``lora_alpha`` and ``r`` to every module and ignore both patterns; vLLM
refuses ``modules_to_save``, DoRA and a rank above its ``--max-lora-rank``.
Ollama's import reads an integer ``lora_alpha`` and each tensor's own rank, and
no ``use_rslora``. So the portable form folds each module's scale into its B,
pads every module with zeros to one ``r`` (the largest module rank, never more)
and writes empty patterns: every reader then computes the same ΔW.

Torch is imported only by the functions that touch tensors.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection
from typing import Any

from ..constants import PEFT_PREFIX, VLLM_RANKS
from ..types import LoRAWeights, match_pattern_key

#: What ``export``/``merge`` can write for: ``portable`` is read alike by PEFT, vLLM and TGI.
EXPORT_TARGETS = ("portable", "peft", "vllm", "tgi", "ollama")
#: What ``validate --target`` can check against.
CHECK_TARGETS = ("vllm", "tgi", "ollama", "peft")
#: vLLM's default ``--max-lora-rank``.
VLLM_DEFAULT_MAX_LORA_RANK = 16

_SERVER = {"vllm": "vLLM", "tgi": "TGI", "ollama": "Ollama", "peft": "PEFT"}


def _is_bias_key(key: str) -> bool:
    return ".lora_B." in key and key.endswith(".bias")


def head_keys(extra_keys: Collection[str]) -> list[str]:
    """The extra tensors that are whole modules (``modules_to_save`` heads, trainable tokens), not LoRA biases."""
    return sorted(k for k in extra_keys if not _is_bias_key(k))


def _head_names(config: dict[str, Any], keys: list[str]) -> str:
    """``lm_head, score``: the config's ``modules_to_save``, else the keys' module names."""
    mts = config.get("modules_to_save") or []
    if mts:
        return ", ".join(str(m) for m in mts)
    names = []
    for k in keys:
        k = k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k
        k = k.replace(".modules_to_save.default", "").rsplit(".", 1)[0]
        if k not in names:
            names.append(k)
    return ", ".join(names)


def _scale(alpha: float, r: int, rslora: bool) -> float:
    if r <= 0:
        return 0.0
    return alpha / math.sqrt(r) if rslora else alpha / r


def uniform_scale(weights: LoRAWeights, *, alpha: float | None = None, use_rslora: bool | None = None) -> LoRAWeights:
    """The same ΔW with one ``r``, one ``lora_alpha`` and empty ``rank_pattern``/``alpha_pattern``.

    ``r`` is the largest module rank; smaller modules get zero rows of A and zero
    columns of B. Each module's B is multiplied by ``scale_m / scale`` (``scale_m`` its
    PEFT scale, ``scale`` the one every module gets now); where that ratio is 1
    (the usual case: no patterns, one rank) B is written bit for bit. PEFT's
    ``lora_B`` bias, scaled by PEFT like B, is multiplied by the same ratio.

    Args:
        weights: The adapter (not modified).
        alpha: ``lora_alpha`` to write (default: the adapter's).
        use_rslora: rsLoRA flag to write (default: the adapter's).
    """
    import torch

    ranks = weights.ranks
    r = max(max(ranks.values(), default=1), 1)
    rs = weights.use_rslora if use_rslora is None else bool(use_rslora)
    a = float(weights.lora_alpha) if alpha is None else float(alpha)
    if a == 0.0 or not math.isfinite(a):  # a zero scale cannot carry the modules' own
        a = math.sqrt(r) if rs else float(r)
    common = _scale(a, r, rs)
    ratios: dict[str, float] = {}
    lora_a: dict[str, Any] = {}
    lora_b: dict[str, Any] = {}
    for m in weights.layer_names:
        A, B = weights.lora_a[m], weights.lora_b[m]
        ratio = weights.scale(m) / common
        ratios[m] = ratio
        if ratio != 1.0:
            B = (B.double() * ratio).to(B.dtype)
        q = A.shape[0]
        if q < r:
            A = torch.cat([A, A.new_zeros(r - q, A.shape[1])], dim=0)
            B = torch.cat([B, B.new_zeros(B.shape[0], r - q)], dim=1)
        lora_a[m], lora_b[m] = A, B
    extra = dict(weights.extra_tensors)
    for k, t in extra.items():
        if _is_bias_key(k):
            m = k.split(".lora_B.")[0]
            m = m[len(PEFT_PREFIX):] if m.startswith(PEFT_PREFIX) else m
            if ratios.get(m, 1.0) != 1.0:
                extra[k] = (t.double() * ratios[m]).to(t.dtype)
    meta = dict(weights.metadata)
    meta.update(r=r, lora_alpha=int(a) if a.is_integer() else a, use_rslora=rs, rank_pattern={}, alpha_pattern={})
    return LoRAWeights(
        layer_names=list(weights.layer_names), lora_a=lora_a, lora_b=lora_b, rank=r, metadata=meta,
        lora_alpha=a, use_rslora=rs, target_modules=weights.target_modules,
        base_model_name_or_path=weights.base_model_name_or_path, extra_tensors=extra, name=weights.name,
        source=weights.source,
    )


def _ollama_alpha(weights: LoRAWeights, r: int) -> int:
    """An integer ``lora_alpha`` without rsLoRA: the adapter's own where it is one, else ``r`` (scale 1)."""
    a = float(weights.lora_alpha)
    if weights.use_rslora:
        a *= math.sqrt(r)
    near = round(a)
    return int(near) if near > 0 and abs(a - near) <= 1e-9 * max(1.0, abs(a)) else r


def for_target(weights: LoRAWeights, target: str = "portable", *,
               max_lora_rank: int = VLLM_DEFAULT_MAX_LORA_RANK) -> tuple[LoRAWeights, list[str]]:
    """``weights`` in the form ``target`` reads as the same ΔW, and one line per thing dropped or still at risk.

    - ``peft``: as it is (per-module ranks and alphas in the patterns, heads kept).
    - ``portable`` (default), ``vllm``, ``tgi``: :func:`uniform_scale`.
    - ``ollama``: the same with an integer ``lora_alpha`` and no rsLoRA.
    - ``vllm``, ``tgi``, ``ollama`` drop ``modules_to_save`` heads (vLLM refuses them,
      the others do not load them); ``portable`` keeps them and says vLLM refuses them.

    Raises:
        ValueError: an unknown target.
    """
    if target not in EXPORT_TARGETS:
        raise ValueError(f"target: expected one of {', '.join(EXPORT_TARGETS)}, got {target!r}")
    if target == "peft":
        note = _headless_task_type(weights)
        if note is None:
            return weights, []
        w = dataclasses.replace(weights, metadata={**weights.metadata, "task_type": None})
        return w, [note]
    notes: list[str] = []
    if target == "ollama":
        r = max(max(weights.ranks.values(), default=1), 1)
        w = uniform_scale(weights, alpha=_ollama_alpha(weights, r), use_rslora=False)
    else:
        w = uniform_scale(weights)
    heads = head_keys(w.extra_tensors)
    if heads:
        names = _head_names(w.metadata, heads)
        if target == "portable":
            notes.append(f"kept modules_to_save head(s) {names}: PEFT loads them, vLLM refuses the adapter and TGI "
                         f"ignores them (--target vllm or tgi drops them)")
        else:
            why = "vLLM refuses modules_to_save" if target == "vllm" else f"{_SERVER[target]} does not load them"
            notes.append(f"dropped modules_to_save head(s) {names} ({why}; --target peft keeps them)")
            w.extra_tensors = {k: t for k, t in w.extra_tensors.items() if k not in heads}
            w.metadata["modules_to_save"] = None
    note = _headless_task_type(w)
    if note is not None:
        notes.append(note)
        w.metadata["task_type"] = None
    checks = ("vllm", "tgi") if target == "portable" else (target,)
    for t in checks:
        for p in target_problems(w.metadata, w.ranks, list(w.extra_tensors), t, max_lora_rank=max_lora_rank):
            if p not in notes and not (target == "portable" and p.startswith("modules_to_save ")):  # said above
                notes.append(p)
    return w, notes


#: PEFT task types whose model carries a head saved as ``modules_to_save`` (PEFT adds it to the
#: modules to save itself and fails to load such an adapter when the head's tensors are missing).
HEAD_TASK_TYPES = frozenset({"SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS"})


def _headless_task_type(w: LoRAWeights) -> str | None:
    """A note when ``w`` names a head-bearing task type but holds no head (merged or dropped): ``None`` otherwise.

    Such a folder is written without its ``task_type`` so that PEFT loads it onto the
    base model (whose own head then applies) instead of failing on the missing head.
    """
    task_type = (w.metadata or {}).get("task_type")
    if task_type not in HEAD_TASK_TYPES or head_keys(w.extra_tensors):
        return None
    return (f"task_type {task_type} removed: the adapter holds no {task_type} head (modules_to_save), so PEFT "
            f"loads it as a plain LoRA on the base model and its own head applies")


def _suggest_max_rank(r: int) -> int:
    return next((v for v in VLLM_RANKS if v >= r), r)


def target_problems(config: dict[str, Any], ranks: dict[str, int], extra_keys: Collection[str], target: str, *,
                    max_lora_rank: int = VLLM_DEFAULT_MAX_LORA_RANK) -> list[str]:
    """What ``target`` would refuse or read differently from PEFT, one line each.

    Args:
        config: The adapter's ``adapter_config.json`` as a dict.
        ranks: Module → rank of its tensors (empty when they could not be read).
        extra_keys: Keys of the non-LoRA tensors (heads, biases).
        target: One of :data:`CHECK_TARGETS`.
        max_lora_rank: vLLM's ``--max-lora-rank``.

    Returns:
        Problems (empty for ``peft``, which reads every folder this package writes).
    """
    if target not in CHECK_TARGETS:
        raise ValueError(f"target: expected one of {', '.join(CHECK_TARGETS)}, got {target!r}")
    if target == "peft":
        return []
    server = _SERVER[target]
    out: list[str] = []
    if config.get("use_dora"):
        out.append(f"use_dora is true: {server} does not support DoRA")
    r = config.get("r")
    r = int(r) if isinstance(r, (int, float)) and not isinstance(r, bool) else max(ranks.values(), default=0)
    top = max([r, *ranks.values()])
    if target == "vllm" and top > max_lora_rank:
        out.append(f"rank {top} is above --max-lora-rank {max_lora_rank}: vLLM refuses it "
                   f"(start vLLM with --max-lora-rank {_suggest_max_rank(top)})")
    alpha = config.get("lora_alpha", 8)
    alpha = float(alpha) if isinstance(alpha, (int, float)) and not isinstance(alpha, bool) else 8.0
    rslora = bool(config.get("use_rslora", False))
    if target == "ollama" and not alpha.is_integer():
        out.append(f"lora_alpha {alpha:g} is not an integer: Ollama reads it as an unsigned integer")
    out.extend(_misread_scales(config, ranks, target, r, alpha, rslora))
    heads = head_keys(extra_keys)
    if config.get("modules_to_save") or heads:
        names = _head_names(config, heads)
        what = "vLLM refuses the adapter" if target == "vllm" else f"{server} does not load them"
        out.append(f"modules_to_save {names}: {what}")
    bias = config.get("bias", "none")
    if bias not in (None, "none"):
        what = "vLLM refuses it" if target == "vllm" else f"{server} does not apply it"
        out.append(f"bias is {bias!r}: {what}")
    if config.get("lora_bias") or any(_is_bias_key(k) for k in extra_keys):
        what = "vLLM refuses it" if target == "vllm" else f"{server} does not apply it"
        out.append(f"lora_bias (a bias on lora_B): {what}")
    return out


def _misread_scales(config: dict[str, Any], ranks: dict[str, int], target: str, r: int, alpha: float,
                    rslora: bool) -> list[str]:
    """Modules whose scale under ``target`` differs from PEFT's, as one line (or none)."""
    server = _SERVER[target]
    rank_pat = config.get("rank_pattern") or {}
    alpha_pat = config.get("alpha_pattern") or {}
    differ: list[tuple[str, float, float]] = []
    for m, rm in sorted(ranks.items()):
        key = match_pattern_key(alpha_pat, m)
        am = float(alpha_pat[key]) if key is not None else alpha
        peft = _scale(am, rm, rslora)
        # vLLM and TGI: the config's alpha and r for every module; Ollama (llama.cpp): alpha over each tensor's rank
        theirs = _scale(alpha, rm, False) if target == "ollama" else _scale(alpha, r, rslora)
        if not math.isclose(peft, theirs, rel_tol=1e-6, abs_tol=0.0):
            differ.append((m, peft, theirs))
    if not differ:
        return []
    causes = []
    if rank_pat or alpha_pat:
        causes.append("rank_pattern/alpha_pattern, which it ignores")
    if target == "ollama" and rslora:
        causes.append("use_rslora, which it does not read")
    cause = " and ".join(causes) or "its one scale for all modules"
    m, peft, theirs = differ[0]
    return [f"{server} misreads the scale of {len(differ)} of {len(ranks)} module(s) because of {cause}, "
            f"e.g. '{m}': {theirs:.4g} instead of PEFT's {peft:.4g} (export it with --target {target})"]


def modelfile_text(weights: LoRAWeights, base: str | None = None) -> tuple[str, str | None]:
    """An Ollama ``Modelfile`` for the adapter folder it sits in, and a note on where ``FROM`` came from.

    ``base``: an Ollama model name, or a local folder (safetensors base model) or GGUF
    file, written as its absolute path. Without it, the adapter's
    ``base_model_name_or_path`` is used, which Ollama knows only if it is also an
    Ollama model name or a local path: the note says so.
    """
    from pathlib import Path

    note = None
    if base:
        p = Path(base).expanduser()
        src = str(p.resolve()) if p.exists() else base
    elif weights.base_model_name_or_path:
        src = weights.base_model_name_or_path
        note = (f"Modelfile: FROM {src} is the adapter's base_model_name_or_path; give --base-model an Ollama "
                f"model name or a local base model folder if Ollama does not know it by that name")
    else:
        src = "<base model>"
        note = "Modelfile: the adapter names no base model; replace '<base model>' in FROM (or give --base-model)"
    return f"FROM {src}\nADAPTER .\n", note


__all__ = ["CHECK_TARGETS", "EXPORT_TARGETS", "VLLM_DEFAULT_MAX_LORA_RANK", "for_target", "head_keys",
           "modelfile_text", "target_problems", "uniform_scale"]
