"""Plain data types shared across the engine.

Importing this module does not import torch: tensors are only touched inside
methods, so torch-free paths (``--batch info``, the TUI's start-up) can use it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor


def match_pattern_key(patterns: dict[str, Any] | None, module: str) -> str | None:
    """Return the key of ``patterns`` that applies to ``module``, as PEFT matches them.

    PEFT's ``rank_pattern``/``alpha_pattern`` keys are module names or regexes
    matched against the end of the dotted module name; the *first* key (in the
    config's order) that matches wins, exactly as ``peft.utils.other.get_pattern_key``.
    """
    if not patterns:
        return None
    for key in patterns:
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return key
        except re.error:
            if key == module:
                return key
    return None


@dataclass
class LoRAWeights:
    """One LoRA adapter: per-module factors plus everything needed to write it back.

    The update of module ``m`` is ``ΔW_m = scale(m) · B_m @ A_m`` with
    ``A_m`` of shape ``(r_m, in)`` and ``B_m`` of shape ``(out, r_m)``.

    Attributes:
        layer_names: Module names without PEFT's ``base_model.model.`` prefix,
            e.g. ``model.layers.0.self_attn.q_proj``, sorted.
        lora_a: Module name → A ``(r, in_features)``.
        lora_b: Module name → B ``(out_features, r)``.
        rank: The config's ``r`` (modules may differ through ``rank_pattern``).
        metadata: The original ``adapter_config.json`` as a dict (kept verbatim).
        lora_alpha: The config's ``lora_alpha``.
        use_rslora: Scale is ``alpha/sqrt(r)`` instead of ``alpha/r``.
        target_modules: The config's ``target_modules`` (list, or a regex string).
        base_model_name_or_path: Base model named in the config, if any.
        extra_tensors: Every other tensor in the file (``modules_to_save`` heads,
            biases, …) under its original key, so export round-trips it.
        name: A display name (folder name or task id).
        source: Where it was loaded from (path or ``hf://repo@rev``).
    """

    layer_names: list[str]
    lora_a: dict[str, Tensor]
    lora_b: dict[str, Tensor]
    rank: int
    metadata: dict = field(default_factory=dict)
    lora_alpha: float | None = None
    use_rslora: bool = False
    target_modules: list[str] | str | None = None
    base_model_name_or_path: str | None = None
    extra_tensors: dict[str, Tensor] = field(default_factory=dict)
    name: str | None = None
    source: str | None = None

    def __post_init__(self) -> None:
        if self.lora_alpha is None:
            self.lora_alpha = float(self.metadata.get("lora_alpha", self.rank))
        if not self.use_rslora:
            self.use_rslora = bool(self.metadata.get("use_rslora", False))
        if self.target_modules is None:
            tm = self.metadata.get("target_modules")
            self.target_modules = tm if tm is not None else sorted({n.rsplit(".", 1)[-1] for n in self.layer_names})
        if self.base_model_name_or_path is None:
            self.base_model_name_or_path = self.metadata.get("base_model_name_or_path")

    # -- per-module facts -------------------------------------------------
    @property
    def config(self) -> dict:
        """The original adapter config (alias of ``metadata``)."""
        return self.metadata

    def module_rank(self, layer: str) -> int:
        """Actual rank of ``layer`` (rows of its A)."""
        return int(self.lora_a[layer].shape[0])

    def module_alpha(self, layer: str) -> float:
        """``lora_alpha`` for ``layer``, honouring ``alpha_pattern``."""
        patterns = self.metadata.get("alpha_pattern") or {}
        key = match_pattern_key(patterns, layer)
        return float(patterns[key]) if key is not None else float(self.lora_alpha)

    def scale(self, layer: str) -> float:
        """PEFT's scaling for ``layer``: ``alpha/r`` or ``alpha/sqrt(r)`` with rsLoRA."""
        r = self.module_rank(layer)
        if r == 0:
            return 0.0
        alpha = self.module_alpha(layer)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def shapes(self, layer: str) -> tuple[int, int]:
        """``(out_features, in_features)`` of ``layer``'s update."""
        return int(self.lora_b[layer].shape[0]), int(self.lora_a[layer].shape[1])

    def delta_weight(self, layer: str) -> Tensor:
        """Dense ``ΔW = scale·B@A`` in fp32. Forms out×in: for small shapes and tests."""
        b = self.lora_b[layer].float()
        a = self.lora_a[layer].float()
        return self.scale(layer) * (b @ a)

    @property
    def ranks(self) -> dict[str, int]:
        return {n: self.module_rank(n) for n in self.layer_names}

    @property
    def num_params(self) -> int:
        """Number of LoRA parameters (A and B of every module)."""
        return sum(int(self.lora_a[n].numel()) + int(self.lora_b[n].numel()) for n in self.layer_names)

    @property
    def nbytes(self) -> int:
        """Bytes of the LoRA tensors plus extra tensors, at their stored dtype."""
        total = sum(t.numel() * t.element_size() for n in self.layer_names for t in (self.lora_a[n], self.lora_b[n]))
        return int(total + sum(t.numel() * t.element_size() for t in self.extra_tensors.values()))

    def replace_factors(
        self,
        factors: dict[str, tuple[Tensor, Tensor]],
        *,
        rank: int | None = None,
        name: str | None = None,
        dtype: Any = None,
    ) -> LoRAWeights:
        """A copy whose modules are given by *effective* factors ``(B_eff, A)``.

        ``B_eff @ A`` is the full update ΔW (scale included). B is divided by the
        new module's scale so that the original ``lora_alpha``/``use_rslora``
        (and ``alpha_pattern``) stay valid whatever the new rank. ``rank`` sets
        the config's ``r``; modules of another rank go in ``rank_pattern``.
        """
        names = sorted(factors)
        meta = dict(self.metadata)
        ranks = {n: int(factors[n][1].shape[0]) for n in names}
        r = int(rank) if rank is not None else (max(ranks.values()) if ranks else self.rank)
        pattern = {n: rk for n, rk in ranks.items() if rk != r}
        meta["r"] = r
        meta["rank_pattern"] = pattern
        out = LoRAWeights(
            layer_names=names,
            lora_a={},
            lora_b={},
            rank=r,
            metadata=meta,
            lora_alpha=self.lora_alpha,
            use_rslora=self.use_rslora,
            target_modules=self.target_modules,
            base_model_name_or_path=self.base_model_name_or_path,
            extra_tensors=dict(self.extra_tensors),
            name=name if name is not None else self.name,
            source=None,
        )
        for n in names:
            b_eff, a = factors[n]
            # scale depends only on rank/alpha, which are known from the shapes and config
            out.lora_a[n] = a
            out.lora_b[n] = b_eff
            s = out.scale(n)
            b = b_eff / s if s != 0 else b_eff
            if dtype is not None:
                a, b = a.to(dtype), b.to(dtype)
            out.lora_a[n] = a.contiguous()
            out.lora_b[n] = b.contiguous()
        return out


@dataclass(frozen=True)
class ModuleInfo:
    """Header-level facts about one LoRA module (no tensors loaded)."""

    name: str
    rank: int
    in_features: int
    out_features: int
    dtype: str


@dataclass(frozen=True)
class AdapterSummary:
    """What ``info`` shows about an adapter, read from its header and config only."""

    path: str
    base_model: str | None
    rank: int
    lora_alpha: float
    use_rslora: bool
    target_modules: list[str] | str
    modules: list[ModuleInfo]
    extra_tensors: list[str]
    num_params: int
    nbytes: int
    dtypes: list[str]
    peft_type: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "path": self.path,
            "base_model": self.base_model,
            "peft_type": self.peft_type,
            "rank": self.rank,
            "lora_alpha": self.lora_alpha,
            "use_rslora": self.use_rslora,
            "target_modules": self.target_modules,
            "num_modules": len(self.modules),
            "modules": [
                {"name": m.name, "rank": m.rank, "in_features": m.in_features, "out_features": m.out_features, "dtype": m.dtype}
                for m in self.modules
            ],
            "extra_tensors": self.extra_tensors,
            "num_params": self.num_params,
            "bytes": self.nbytes,
            "dtypes": self.dtypes,
        }
