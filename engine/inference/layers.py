"""Target layers of a base model and the low-rank products a task adds to them.

A task's update of one module is applied as ``x·L·R`` (two thin matmuls), never as
a dense ΔW: for a module stored in the shared basis (``ΔŴ = U·Σ·Vᵀ`` with ``Σ = C·D``)
``L = Dᵀ`` (k_v×q) and ``R = Cᵀ`` (q×k_u) sit between the shared ``x·V`` and ``·Uᵀ``;
for a module stored per task (or by pca loadings) ``L = Aᵀ`` (in×q) and ``R = B_effᵀ``
(q×out) act on ``x`` directly. The task's scale is folded into ``R``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

#: Prefixes PEFT puts before a module's name in its keys; a subspace's names lack them already.
_PREFIXES = ("base_model.model.",)


def _conv1d_class() -> type | None:
    """transformers' ``Conv1D`` when transformers is loaded (a model that has one has loaded it)."""
    mod = sys.modules.get("transformers.pytorch_utils")
    return getattr(mod, "Conv1D", None) if mod is not None else None


def _bnb_classes() -> tuple[type | None, type | None]:
    """bitsandbytes' ``(Linear4bit, Linear8bitLt)`` when bitsandbytes is loaded, else ``(None, None)``."""
    bnb = sys.modules.get("bitsandbytes")
    nn_mod = getattr(bnb, "nn", None) if bnb is not None else None
    if nn_mod is None:
        return None, None
    return getattr(nn_mod, "Linear4bit", None), getattr(nn_mod, "Linear8bitLt", None)


def layer_kind(layer: nn.Module) -> str | None:
    """``"bnb4"``, ``"bnb8"``, ``"linear"``, ``"conv1d"`` (fan_in_fan_out: weight in×out) or ``None`` (unsupported)."""
    b4, b8 = _bnb_classes()
    if b4 is not None and isinstance(layer, b4):
        return "bnb4"
    if b8 is not None and isinstance(layer, b8):
        return "bnb8"
    if isinstance(layer, nn.Linear):
        return "linear"
    conv = _conv1d_class()
    if conv is not None and isinstance(layer, conv):
        return "conv1d"
    return None


def layer_shape(layer: nn.Module, kind: str) -> tuple[int, int]:
    """``(out_features, in_features)`` of a supported layer."""
    if kind == "conv1d":
        w = layer.weight
        return int(w.shape[1]), int(w.shape[0])
    return int(layer.out_features), int(layer.in_features)


def layer_compute_dtype(layer: nn.Module, kind: str) -> torch.dtype:
    """The dtype the layer computes in: its weight's, or a quantised layer's compute dtype."""
    if kind in ("bnb4", "bnb8"):
        dt = getattr(layer, "compute_dtype", None)
        return dt if isinstance(dt, torch.dtype) else torch.float16
    return layer.weight.dtype


def strip_peft_prefix(name: str) -> str:
    for p in _PREFIXES:
        if name.startswith(p):
            return name[len(p):]
    return name


def match_modules(model: nn.Module, names: list[str]) -> tuple[dict[str, str], list[str]]:
    """Map each subspace module name to one of ``model``'s module names.

    An exact name wins; else the model's name may carry an extra prefix
    (``…<name>``: exactly one such module), or the model may be a sub-model
    (``<name>`` ends with ``.<model name>``: the longest such module).

    Returns:
        ``(subspace name → model name, problems)``; problems name what is missing or ambiguous.
    """
    mods = [n for n, _ in model.named_modules() if n]
    have = set(mods)
    out: dict[str, str] = {}
    missing: list[str] = []
    problems: list[str] = []
    for s in names:
        key = strip_peft_prefix(s)
        if key in have:
            out[s] = key
            continue
        longer = [n for n in mods if n.endswith("." + key)]
        if len(longer) == 1:
            out[s] = longer[0]
            continue
        if len(longer) > 1:
            problems.append(f"module '{s}' matches {len(longer)} modules of the model ({', '.join(longer[:3])})")
            continue
        shorter = sorted((n for n in mods if key.endswith("." + n)), key=len, reverse=True)
        if shorter:
            out[s] = shorter[0]
            continue
        missing.append(s)
    if missing:
        shown = ", ".join(f"'{m}'" for m in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        problems.insert(0, f"the model has no module for {len(missing)} of the subspace's {len(names)} modules: {shown}{more}")
    return out, problems


@dataclass
class TaskModule:
    """One task's update of one module: ``(x·left)·right`` (scale folded into ``right``)."""

    left: Tensor
    right: Tensor

    @property
    def nbytes(self) -> int:
        return int(self.left.numel() * self.left.element_size() + self.right.numel() * self.right.element_size())


@dataclass
class ModuleState:
    """A wrapped target layer: where it is, how it computes, and the shared basis of its module.

    Attributes:
        name: The subspace's module name.
        model_name: The model's module name.
        layer: The base layer (a reference; the model keeps owning it).
        kind: :func:`layer_kind`.
        shared: The module is stored in a shared basis (``x·V`` and ``·Uᵀ`` are shared by all tasks).
        v: ``V`` (in×k_v) in compute dtype on the layer's device (shared modules).
        ut: ``Uᵀ`` (k_u×out), likewise.
        dtype: Compute dtype.
        device: The layer's device.
        stacks: ``(left [T+1, k_v, q], right [T+1, q, k_u])`` of every cached task, slot 0 zero (base rows).
        stacks_version: The cache version the stacks were built for.
    """

    name: str
    model_name: str
    layer: nn.Module
    kind: str
    shared: bool
    dtype: torch.dtype
    device: torch.device
    v: Tensor | None = None
    ut: Tensor | None = None
    stacks: tuple[Tensor, Tensor] | None = None
    stacks_version: int = -1
    hook: Any = field(default=None, repr=False)

    # -- one task for every row -------------------------------------------------------
    def single(self, x: Tensor, t: Any) -> Tensor:
        """The update of ``x`` (…×in) by one task (…×out, compute dtype).

        ``t`` is a cached :class:`TaskModule`, or a module of a task under training
        (:mod:`engine.inference.trainable`), whose ``update`` recomputes it from its parameters.
        """
        xc = x if x.dtype == self.dtype else x.to(self.dtype)
        if not isinstance(t, TaskModule):
            return t.update(xc)
        if self.shared:
            return ((xc @ self.v) @ t.left) @ t.right @ self.ut
        return (xc @ t.left) @ t.right

    # -- one task per row -----------------------------------------------------------------
    def mixed_shared(self, x: Tensor, slots: Tensor) -> Tensor:
        """Shared basis: ``x·V`` once, each row's own core by a gathered batched matmul, ``·Uᵀ`` once."""
        assert self.stacks is not None and self.v is not None and self.ut is not None
        xc = x if x.dtype == self.dtype else x.to(self.dtype)
        h = xc @ self.v
        n = h.shape[0]
        h3 = h.reshape(n, -1, h.shape[-1])
        left, right = self.stacks
        g = torch.bmm(torch.bmm(h3, left[slots]), right[slots])
        return g.reshape(*h.shape[:-1], g.shape[-1]) @ self.ut

    def mixed_grouped(self, x: Tensor, groups: list[tuple[TaskModule, Tensor | None]], out_features: int) -> Tensor:
        """Per-task modules: one pair of matmuls per distinct task on its rows (``None``: all rows)."""
        xc = x if x.dtype == self.dtype else x.to(self.dtype)
        out = xc.new_zeros(*xc.shape[:-1], out_features)
        for t, rows in groups:
            if rows is None:
                out = (xc @ t.left) @ t.right
            else:
                out[rows] = (xc[rows] @ t.left) @ t.right
        return out

    def blended_shared(self, x: Tensor, weights: Tensor, dense: Tensor) -> Tensor:
        """Shared basis, a blend of tasks per row: ``x·V`` once, each row's blended core ``Σ_t w_t·Σ_tᵀ``, ``·Uᵀ`` once.

        Args:
            x: ``n×…×in``.
            weights: ``n×T`` blend weights (compute dtype, on ``x``'s device).
            dense: ``T×k_v×k_u``, each task's core as the single-task path applies it (``left·right``).
        """
        assert self.v is not None and self.ut is not None
        xc = x if x.dtype == self.dtype else x.to(self.dtype)
        h = xc @ self.v
        n = h.shape[0]
        h3 = h.reshape(n, -1, h.shape[-1])
        cores = torch.einsum("nt,tvu->nvu", weights, dense)
        g = torch.bmm(h3, cores)
        return g.reshape(*h.shape[:-1], g.shape[-1]) @ self.ut

    def build_stacks(self, tasks: list[dict[str, TaskModule]], version: int) -> None:
        """Stack every cached task's ``left``/``right`` (zero-padded to the largest q) behind a zero slot."""
        assert self.v is not None and self.ut is not None
        kv, ku = self.v.shape[1], self.ut.shape[0]
        parts = [t[self.name] for t in tasks]
        q = max((p.left.shape[1] for p in parts), default=0)
        left = torch.zeros(len(parts) + 1, kv, q, dtype=self.dtype, device=self.device)
        right = torch.zeros(len(parts) + 1, q, ku, dtype=self.dtype, device=self.device)
        for i, p in enumerate(parts, start=1):
            left[i, :, : p.left.shape[1]] = p.left
            right[i, : p.right.shape[0]] = p.right
        self.stacks = (left, right)
        self.stacks_version = version
