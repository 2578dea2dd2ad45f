"""Load and save PEFT LoRA adapters on local disk (safetensors only).

Atomic folder writes live in :mod:`engine.io.atomic` and the compatibility checks
in :mod:`engine.io.compat`; both are re-exported here (``from engine.io.local
import atomic_dir, check_compatible`` keeps working).
"""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path
from typing import Any

from ..constants import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, PEFT_PREFIX
from ..errors import AdapterFormatError
from ..types import LoRAWeights
from .atomic import AtomicDir, atomic_dir, sweep_siblings
from .compat import (
    CompatibilityReport,
    CompatibleSet,
    ModuleOverlap,
    check_compatible,
    common_modules,
    describe_sets,
    incompatible_with_majority,
    partition_compatible,
)
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


__all__ = [
    "AtomicDir",
    "CompatibilityReport",
    "CompatibleSet",
    "ModuleOverlap",
    "adapter_config_for",
    "atomic_dir",
    "check_compatible",
    "common_modules",
    "describe_sets",
    "incompatible_with_majority",
    "load_adapter",
    "partition_compatible",
    "save_adapter",
    "sweep_siblings",
]
