"""Pieces shared by the subspace methods: per-task records, module bases, adapter sources."""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import IncompatibleAdaptersError
from ..methods.build_params import dtype_name as _dtype_name
from ..methods.compress import DEFAULT_COMPRESS_METHOD
from ..registry import methods as _methods
from ..types import LoRAWeights

#: Compression methods, as registered (:mod:`engine.methods.compress`). ``pca`` is the seed;
#: ``joint``/``share`` share row and column bases per module; ``svd`` is the honest per-task baseline.
METHODS = tuple(_methods("compress"))
DEFAULT_METHOD = DEFAULT_COMPRESS_METHOD


def module_scale(template: LoRAWeights, module: str, rank: int) -> float:
    """PEFT's scale for ``module`` at ``rank`` under ``template``'s alpha/rsLoRA/alpha_pattern."""
    if rank == 0:
        return 0.0
    alpha = template.module_alpha(module)
    return alpha / math.sqrt(rank) if template.use_rslora else alpha / rank


def config_template(adapter: LoRAWeights, task_id: str) -> LoRAWeights:
    """A tensor-free copy of ``adapter`` carrying its config and extra tensors (for export)."""
    return LoRAWeights(
        layer_names=[], lora_a={}, lora_b={}, rank=int(adapter.rank), metadata=dict(adapter.metadata),
        lora_alpha=float(adapter.lora_alpha), use_rslora=bool(adapter.use_rslora),
        target_modules=adapter.target_modules, base_model_name_or_path=adapter.base_model_name_or_path,
        extra_tensors=dict(adapter.extra_tensors), name=adapter.name or task_id, source=adapter.source,
    )


def effective_factors(adapter: LoRAWeights, module: str) -> tuple[Tensor, Tensor]:
    """``(scale·B, A)`` in float64: their product is the module's ΔW."""
    return adapter.lora_b[module].double() * adapter.scale(module), adapter.lora_a[module].double()


@dataclass
class TaskProjection:
    """One task in the subspace: its coefficients per module, its fidelity and its original config.

    Attributes:
        task_id: The task's id.
        coeffs: Module → named coefficient tensors (``sigma`` k×k or ``c``/``d``
            for ``joint``/``share``; ``la``/``lb`` loadings for ``pca``; ``b``/``a``
            per-task factors for modules stored alone).
        fidelity: Module → relative error ‖ΔW−ΔŴ‖_F/‖ΔW‖_F of :meth:`SharedSubspace.reconstruct`.
        norms: Module → ‖ΔW‖_F of the original.
        ranks: Module → rank of the original.
        template: Tensor-free ``LoRAWeights`` with the original config and extra tensors.
        error_is_bound: ``fidelity`` is an upper bound (triangle inequality), not exact:
            after ``absorb`` or ``quantize`` without the original adapters.
        original_bytes: Bytes of the original LoRA factors at their stored dtype.
        input_bytes: Bytes of the input adapter's files on disk (``adapter_model.safetensors`` +
            ``adapter_config.json``), measured at build time; ``None`` for an adapter without files.
        input_bytes_fp16: The same with its fp32 tensors counted at fp16.
    """

    task_id: str
    coeffs: dict[str, dict[str, Tensor]]
    fidelity: dict[str, float] = field(default_factory=dict)
    norms: dict[str, float] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)
    template: LoRAWeights | None = None
    error_is_bound: bool = False
    original_bytes: int = 0
    input_bytes: int | None = None
    input_bytes_fp16: int | None = None

    @property
    def loadings_a(self) -> dict[str, Tensor]:
        """Seed-compatible view: the A-side loadings (pca) per module."""
        return {m: c["la"] for m, c in self.coeffs.items() if "la" in c}

    @property
    def loadings_b(self) -> dict[str, Tensor]:
        """Seed-compatible view: the B-side loadings (pca) per module."""
        return {m: c["lb"] for m, c in self.coeffs.items() if "lb" in c}

    @property
    def mean_error(self) -> float:
        v = list(self.fidelity.values())
        return float(sum(v) / len(v)) if v else 0.0

    @property
    def max_error(self) -> float:
        return float(max(self.fidelity.values())) if self.fidelity else 0.0

    def __repr__(self) -> str:
        return f"TaskProjection(task_id={self.task_id!r}, modules={len(self.coeffs)}, max_error={self.max_error:.3g})"


@dataclass
class ModuleBasis:
    """The shared part of one module.

    Attributes:
        kind: ``joint`` (``U`` out×k, ``V`` in×k, used by joint/share), ``pca``
            (``comp_a``, ``comp_b``, ``mean_a``, ``mean_b``, ``sv_a``, ``sv_b``) or
            ``separate`` (nothing shared: each task stores its own truncated SVD).
        shape: ``(out_features, in_features)``.
        tensors: The tensors by name.
        rank: The common LoRA rank (pca only).
        explained: Cumulative explained variance for k = 1, 2, … (ΔW energy for joint).
    """

    kind: str
    shape: tuple[int, int]
    tensors: dict[str, Tensor] = field(default_factory=dict)
    rank: int = 0
    explained: list[float] = field(default_factory=list)

    @property
    def k(self) -> int:
        """Components of the basis: for ``joint``, the larger of k_u (columns of U) and k_v (of V)."""
        if self.kind == "joint":
            return max(int(self.tensors["U"].shape[1]), int(self.tensors["V"].shape[1]))
        if self.kind == "pca":
            return int(self.tensors["comp_a"].shape[0])
        return 0


def check_shapes(adapter: LoRAWeights, label: str, shapes: dict[str, tuple[int, int]], base: str | None) -> None:
    """Refuse an adapter whose modules or shapes differ from the subspace's, naming the first few."""
    problems: list[str] = []
    mods = set(adapter.layer_names)
    missing, extra = sorted(set(shapes) - mods), sorted(mods - set(shapes))
    if missing:
        problems.append(f"lacks {len(missing)} module(s), e.g. '{missing[0]}'")
    if extra:
        problems.append(f"has {len(extra)} module(s) the subspace lacks, e.g. '{extra[0]}'")
    for m in sorted(mods & set(shapes)):
        if adapter.shapes(m) != shapes[m]:
            problems.append(f"module '{m}' has shape {adapter.shapes(m)}, the subspace has {shapes[m]}")
            break
    b = adapter.base_model_name_or_path
    if base and b and b != base:
        problems.append(f"base model {b!r} differs from {base!r}")
    if problems:
        raise IncompatibleAdaptersError(f"{label}: " + "; ".join(problems))


def check_finite(adapter: LoRAWeights, label: str) -> None:
    """``ValueError`` naming the module and side holding NaN/Inf."""
    for m in adapter.layer_names:
        for side, t in (("lora_A", adapter.lora_a[m]), ("lora_B", adapter.lora_b[m])):
            # NaN and ±Inf survive the sum (fast); a sum overflowing from finite float64 values is confirmed
            if not bool(torch.isfinite(t.sum(dtype=torch.float64))) and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{label}: module '{m}' {side} holds NaN or Inf")


class AdapterSource:
    """The adapters of a build, iterated once per pass: a list in memory, or paths loaded one at a time.

    With ``modules`` each adapter comes restricted to those modules: a view sharing
    the tensors (in memory) or only their tensors read from the file (paths).
    """

    def __init__(self, task_ids: Sequence[str], adapters: Sequence[LoRAWeights] | None = None,
                 paths: Sequence[Path] | None = None, modules: Collection[str] | None = None) -> None:
        self.task_ids = list(task_ids)
        self.adapters = list(adapters) if adapters is not None else None
        self.paths = list(paths) if paths is not None else None
        self.modules = frozenset(modules) if modules is not None else None
        self.passes = 0

    def __len__(self) -> int:
        return len(self.task_ids)

    def subset(self, modules: Collection[str] | None) -> AdapterSource:
        """The same adapters restricted to ``modules`` (``None``: all of them)."""
        return AdapterSource(self.task_ids, self.adapters, self.paths, modules)

    def split(self, n: int) -> list[AdapterSource]:
        """``n`` consecutive shards of about equal size (fewer when there are fewer adapters), same modules."""
        n = max(1, min(n, len(self)))
        bounds = [len(self) * j // n for j in range(n + 1)]
        return [self.slice(lo, hi) for lo, hi in zip(bounds, bounds[1:])]

    def slice(self, start: int, stop: int) -> AdapterSource:
        """The adapters ``start:stop`` (paths stay paths: a shard sent elsewhere reads its own tensors)."""
        return AdapterSource(self.task_ids[start:stop], None if self.adapters is None else self.adapters[start:stop],
                             None if self.paths is None else self.paths[start:stop], self.modules)

    def label(self, i: int) -> str:
        if self.paths is not None:
            return str(self.paths[i])
        a = self.adapters[i] if self.adapters else None
        return f"adapter {self.task_ids[i]!r}" + (f" ({a.source})" if a is not None and a.source else "")

    def __iter__(self) -> Iterator[tuple[int, str, LoRAWeights]]:
        self.passes += 1
        if self.adapters is not None:
            for i, (t, a) in enumerate(zip(self.task_ids, self.adapters)):
                yield i, t, (restrict_modules(a, self.modules) if self.modules is not None else a)
            return
        from ..io.local import load_adapter

        assert self.paths is not None
        for i, (t, p) in enumerate(zip(self.task_ids, self.paths)):
            # finiteness is checked once, by the build's first pass (not on every read)
            yield i, t, load_adapter(p, name=t, modules=self.modules, check_finite=False)


def restrict_modules(adapter: LoRAWeights, modules: Collection[str]) -> LoRAWeights:
    """A view of ``adapter`` holding only ``modules`` (tensors shared, config and extras as they are)."""
    keep = [m for m in adapter.layer_names if m in modules]
    return replace(adapter, layer_names=keep, lora_a={m: adapter.lora_a[m] for m in keep},
                   lora_b={m: adapter.lora_b[m] for m in keep})


def vllm_rank(rank: int) -> int:
    """Smallest rank vLLM accepts that is ≥ ``rank`` (``rank`` itself above the largest)."""
    from ..constants import VLLM_RANKS

    for r in VLLM_RANKS:
        if r >= rank:
            return r
    return rank


def nbytes(t: Tensor) -> int:
    return int(t.numel() * t.element_size())


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def parse_dtype(dtype: Any) -> torch.dtype:
    """``torch.float16`` from ``"float16"``/``"fp16"``/a torch dtype; ``ValueError`` otherwise."""
    dt = getattr(torch, _dtype_name(dtype))
    assert isinstance(dt, torch.dtype)
    return dt
