"""A task under training: its coefficients as ``nn.Parameter``\\ s that a :class:`VLoRAModel` applies live.

Each target module gets one small module whose ``update(x)`` is the task's
update of ``x``, recomputed from the parameters on every forward so that
gradients reach them (and nothing else: bases and other tasks are buffers or
plain tensors):

- :class:`SharedCore` (module in a shared basis): ``((x·V)·Σᵀ)·Uᵀ`` with a
  trainable core ``Σ`` (k_u×k_v, possibly grown by new directions of ``U``/``V``);
- :class:`TaskFactors` (module stored per task): ``(x·Aᵀ)·Bᵀ`` with trainable
  ``A``, ``B`` (``B`` effective: the scale is folded in, as the subspace stores it);
- :class:`PCALoadings` (the seed's pca modules): trainable loadings on both sides.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def _as(t: Tensor, x: Tensor) -> Tensor:
    return t if t.dtype == x.dtype and t.device == x.device else t.to(device=x.device, dtype=x.dtype)


class SharedCore(nn.Module):
    """``((x·V)·Σᵀ)·Uᵀ``: the trainable core ``sigma`` (k_u×k_v) between the frozen bases ``v`` (in×k_v), ``ut`` (k_u×out)."""

    kind = "joint"

    def __init__(self, v: Tensor, ut: Tensor, sigma: Tensor) -> None:
        super().__init__()
        self.register_buffer("v", v.float().contiguous(), persistent=False)
        self.register_buffer("ut", ut.float().contiguous(), persistent=False)
        self.sigma = nn.Parameter(sigma.float().clone())

    def update(self, x: Tensor) -> Tensor:
        return ((x @ _as(self.v, x)) @ _as(self.sigma, x).T) @ _as(self.ut, x)


class TaskFactors(nn.Module):
    """``(x·Aᵀ)·Bᵀ`` with trainable ``lora_A`` (q×in) and ``lora_B`` (out×q, scale included)."""

    kind = "separate"

    def __init__(self, a: Tensor, b: Tensor) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(a.float().clone())
        self.lora_B = nn.Parameter(b.float().clone())

    def update(self, x: Tensor) -> Tensor:
        return (x @ _as(self.lora_A, x).T) @ _as(self.lora_B, x).T


class PCALoadings(nn.Module):
    """The seed's pca module: ``A = mean_a + l_a·comp_a``, ``B = mean_b + l_b·comp_b`` with trainable loadings."""

    kind = "pca"

    def __init__(self, basis: Any, template: Any, module: str, la: Tensor, lb: Tensor) -> None:
        super().__init__()
        self.basis, self.template, self.module = basis, template, module
        self.loadings_a = nn.Parameter(la.float().clone())
        self.loadings_b = nn.Parameter(lb.float().clone())

    def factors(self) -> tuple[Tensor, Tensor]:
        from ..subspace.pca import pca_factors

        return pca_factors(self.basis, {"la": self.loadings_a, "lb": self.loadings_b}, self.template, self.module)

    def update(self, x: Tensor) -> Tensor:
        b, a = self.factors()
        return (x @ _as(a, x).T) @ _as(b, x).T


class TrainableTask(nn.Module):
    """One task's trainable modules, by subspace module name (what :meth:`VLoRAModel.attach_trainable` takes).

    Attributes:
        task_id: The task being trained.
        names: The subspace's module names, in the order of ``mods`` (``m0``, ``m1``, …: dots are not allowed in keys).
    """

    def __init__(self, task_id: str, modules: dict[str, nn.Module]) -> None:
        super().__init__()
        self.task_id = task_id
        self.names = sorted(modules)
        self.mods = nn.ModuleDict({f"m{i}": modules[m] for i, m in enumerate(self.names)})

    def module(self, name: str) -> nn.Module:
        return self.mods[f"m{self.names.index(name)}"]

    def by_module(self) -> dict[str, nn.Module]:
        return {m: self.mods[f"m{i}"] for i, m in enumerate(self.names)}

    def named_coefficients(self) -> dict[str, nn.Parameter]:
        """``<module>.<param>`` → parameter (``sigma``, ``lora_A``/``lora_B``, ``loadings_a``/``loadings_b``)."""
        return {f"{m}.{pn}": p for m, mod in self.by_module().items() for pn, p in mod.named_parameters()}
