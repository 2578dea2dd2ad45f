"""``TaskRouter``: a small classifier over input features that blends a subspace's tasks per input.

Its softmax weights over tasks say how much of each task's update a row gets. In a
shared basis, a blend of updates is a blend of cores, ``U·(Σ_t w_t Σ_t)·Vᵀ``, so a
:class:`~engine.inference.VLoRAModel` with ``router=`` applies a different blend on
every row of a batch for about the cost of one task (modules stored per task sum the
weighted per-task outputs instead).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..subspace.common import TaskProjection
from ..subspace.core import SharedSubspace
from ..subspace.joint import _core


@dataclass
class RoutedBlend:
    """Per-input blends of a subspace's tasks.

    Attributes:
        task_ids: The tasks, in the order of ``weights``' columns.
        weights: ``B×T`` softmax weights (each row sums to 1).
        cores: Module → ``B×k_u×k_v`` blended core ``Σ_t w_t·Σ_t`` of each input (modules in a
            shared basis; scale included, as the subspace stores it).
    """

    task_ids: list[str]
    weights: Tensor
    cores: dict[str, Tensor]

    def top(self) -> list[str]:
        """The heaviest task of each input."""
        return [self.task_ids[i] for i in self.weights.argmax(dim=1).tolist()]


class TaskRouter(nn.Module):
    """Softmax weights over tasks from input features (``B×input_dim`` → ``B×num_tasks``).

    A linear classifier (``hidden_dim=0``) or a one-hidden-layer MLP, over features
    standardised with the mean and spread :meth:`fit` saw.

    Args:
        input_dim: Feature size (e.g. the base model's hidden size for its pooled input embeddings).
        num_tasks: Number of tasks.
        hidden_dim: Hidden units (0: linear).
        task_ids: The tasks' ids, in output order (default ``task_0``, ``task_1``, …).
        temperature: Softmax temperature (larger: softer blends).
    """

    def __init__(self, input_dim: int, num_tasks: int, hidden_dim: int = 64, task_ids: Sequence[str] | None = None,
                 temperature: float = 1.0) -> None:
        super().__init__()
        if input_dim < 1 or num_tasks < 1 or hidden_dim < 0:
            raise ValueError(f"need input_dim >= 1, num_tasks >= 1, hidden_dim >= 0; got {input_dim}, {num_tasks}, {hidden_dim}")
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        ids = [str(t) for t in task_ids] if task_ids is not None else [f"task_{i}" for i in range(num_tasks)]
        if len(ids) != num_tasks:
            raise ValueError(f"task_ids has {len(ids)} entries for num_tasks={num_tasks}")
        self.input_dim, self.num_tasks, self.hidden_dim = int(input_dim), int(num_tasks), int(hidden_dim)
        self.task_ids = ids
        self.temperature = float(temperature)
        self.register_buffer("feature_mean", torch.zeros(input_dim))
        self.register_buffer("feature_std", torch.ones(input_dim))
        if hidden_dim:
            self.net: nn.Module = nn.Sequential(nn.Linear(input_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, num_tasks))
        else:
            self.net = nn.Linear(input_dim, num_tasks)

    @classmethod
    def from_subspace(cls, subspace: SharedSubspace, input_dim: int, hidden_dim: int = 64,
                      temperature: float = 1.0, init_from_loadings: bool = True) -> TaskRouter:
        """A router over ``subspace``'s tasks (sorted, as ``VLoRAModel.available_tasks``).

        ``init_from_loadings`` (vlora's warm start): the output layer's bias is each task's total
        coefficient norm (summed over modules and coefficient tensors), divided by the largest,
        so that tasks with larger coefficients start with slightly more weight.
        """
        ids = sorted(subspace.tasks)
        if not ids:
            raise ValueError("the subspace holds no tasks to route to")
        if init_from_loadings and len(ids) > 1:
            subspace.materialize()  # every task's coefficients (a lazily loaded subspace reads them now)
        router = cls(input_dim, len(ids), hidden_dim=hidden_dim, task_ids=ids, temperature=temperature)
        if init_from_loadings and len(ids) > 1:
            norms = torch.tensor([sum(float(t.double().norm()) for c in subspace.tasks[i].coeffs.values()
                                      for t in c.values()) for i in ids])
            last = router.net[-1] if isinstance(router.net, nn.Sequential) else router.net
            with torch.no_grad():
                last.bias.copy_((norms / (norms.max() + 1e-8)).to(last.bias.dtype))
        return router

    # -- inference -------------------------------------------------------------------
    def logits(self, x: Tensor) -> Tensor:
        x = x.to(self.feature_mean.device, torch.float32)
        if x.dim() != 2 or x.shape[1] != self.input_dim:
            raise ValueError(f"features must be rows × {self.input_dim}, got shape {tuple(x.shape)}")
        return self.net((x - self.feature_mean) / self.feature_std)

    def forward(self, x: Tensor) -> Tensor:
        """``B×num_tasks`` blend weights (softmax, rows sum to 1)."""
        return torch.softmax(self.logits(x) / self.temperature, dim=-1)

    def predict(self, x: Tensor) -> list[str]:
        """The most likely task of each row."""
        with torch.no_grad():
            return [self.task_ids[i] for i in self.logits(x).argmax(dim=1).tolist()]

    def blend_loadings(self, x: Tensor, subspace: SharedSubspace) -> TaskProjection:
        """vlora's meaning: one task ``"__routed__"`` for the whole batch, its coefficients the average
        of the tasks' coefficients under the batch-mean routing weights.

        Register it (``subspace.tasks["__routed__"] = result``) to reconstruct it. In a shared
        basis (``joint``) a blend of cores is the blend of the updates; with ``pca`` loadings (and
        modules stored per task) A and B are blended separately, as vlora does. Per-row blends:
        :meth:`blend`.

        Raises:
            ValueError: the router routes to a task the subspace lacks, or the tasks' coefficients
                of a module differ in shape (tasks of different ranks stored per task).
        """
        missing = [t for t in self.task_ids if t not in subspace.tasks]
        if missing:
            raise ValueError(f"the router routes to task {missing[0]!r}, which the subspace does not hold")
        with torch.no_grad():
            w = self.forward(x).mean(dim=0).double().cpu()
        projs = [subspace._task(t) for t in self.task_ids]  # read now where loaded lazily
        coeffs: dict[str, dict[str, Tensor]] = {}
        ranks: dict[str, int] = {}
        for m in sorted(projs[0].coeffs):
            out: dict[str, Tensor] = {}
            for key, t0 in projs[0].coeffs[m].items():
                parts = [p.coeffs[m][key] for p in projs]
                if any(q.shape != t0.shape for q in parts):
                    raise ValueError(f"module '{m}': the tasks' '{key}' coefficients differ in shape "
                                     f"({', '.join(str(tuple(q.shape)) for q in parts[:3])}); they cannot be blended")
                out[key] = sum(float(wi) * q.double() for wi, q in zip(w, parts)).to(t0.dtype)
            coeffs[m] = out
            rs = [int(p.ranks.get(m, 0)) for p in projs]
            b = subspace.modules.get(m)
            # a blend of rank-r updates in a shared basis can reach the basis' width
            ranks[m] = min(sum(rs), int(b.k)) if b is not None and b.kind == "joint" else max(rs)
        return TaskProjection(task_id="__routed__", coeffs=coeffs, ranks=ranks, template=projs[0].template,
                              error_is_bound=True)

    def blend(self, x: Tensor, subspace: SharedSubspace) -> RoutedBlend:
        """Per-input blends: the weights, and for each module in a shared basis each input's blended core.

        ``VLoRAModel(..., blend=result)`` (or ``router=self``) applies them, one blend per row.
        """
        missing = [t for t in self.task_ids if t not in subspace.tasks]
        if missing:
            raise ValueError(f"the router routes to task {missing[0]!r}, which the subspace does not hold")
        with torch.no_grad():
            w = self.forward(x)
        cores: dict[str, Tensor] = {}
        for m, b in sorted(subspace.modules.items()):
            if b.kind != "joint":
                continue
            ku, kv = int(b.tensors["U"].shape[1]), int(b.tensors["V"].shape[1])
            stack = torch.zeros(len(self.task_ids), ku, kv, dtype=torch.float32)
            for i, t in enumerate(self.task_ids):
                proj = subspace._task(t)
                left, right = _core(proj.coeffs[m], proj.ranks.get(m, b.k))
                if left.shape[1]:
                    s = left @ right
                    stack[i, : s.shape[0], : s.shape[1]] = s.float()
            cores[m] = torch.einsum("bt,tuv->buv", w.float().cpu(), stack)
        return RoutedBlend(list(self.task_ids), w, cores)

    # -- training --------------------------------------------------------------------
    def _label_indices(self, labels: Any) -> Tensor:
        if isinstance(labels, Tensor):
            y = labels.long().reshape(-1)
        else:
            vals = list(labels)
            if vals and isinstance(vals[0], str):
                index = {t: i for i, t in enumerate(self.task_ids)}
                unknown = sorted({v for v in vals if v not in index})
                if unknown:
                    raise ValueError(f"labels name task {unknown[0]!r}, which the router does not route to "
                                     f"({', '.join(self.task_ids[:4])}…)")
                y = torch.tensor([index[v] for v in vals], dtype=torch.long)
            else:
                y = torch.tensor([int(v) for v in vals], dtype=torch.long)
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_tasks):
            raise ValueError(f"label indices must be in [0, {self.num_tasks}), got {int(y.min())}..{int(y.max())}")
        return y

    def fit(self, features: Tensor, labels: Any, *, epochs: int = 200, lr: float = 1e-2, weight_decay: float = 1e-3,
            batch_size: int | None = None, seed: int = 0) -> list[float]:
        """Train on labelled examples (a few hundred: seconds on a CPU) with AdamW and cross-entropy.

        Args:
            features: ``N×input_dim``.
            labels: ``N`` task indices, or task ids.
            epochs: Passes over the examples.
            lr: Learning rate.
            weight_decay: AdamW's weight decay.
            batch_size: Examples per step (``None``: all of them at once).
            seed: Seed of the shuffling and of nothing else.

        Returns:
            The mean loss of each epoch.
        """
        x = torch.as_tensor(features).float()
        y = self._label_indices(labels)
        if x.dim() != 2 or x.shape[1] != self.input_dim:
            raise ValueError(f"features must be N × {self.input_dim}, got shape {tuple(x.shape)}")
        if x.shape[0] != y.shape[0] or x.shape[0] == 0:
            raise ValueError(f"{x.shape[0]} feature rows for {y.shape[0]} labels; give one label per row (and at least one)")
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        device = self.feature_mean.device
        x, y = x.to(device), y.to(device)
        with torch.no_grad():
            self.feature_mean.copy_(x.mean(dim=0))
            self.feature_std.copy_(x.std(dim=0, unbiased=False).clamp_min(1e-6) if x.shape[0] > 1 else torch.ones_like(x[0]))
        opt = torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=weight_decay)
        bs = batch_size or x.shape[0]
        gen = torch.Generator().manual_seed(seed)
        history: list[float] = []
        self.train()
        for _ in range(epochs):
            order = torch.randperm(x.shape[0], generator=gen).to(device) if bs < x.shape[0] else torch.arange(x.shape[0], device=device)
            total = 0.0
            for i in range(0, x.shape[0], bs):
                idx = order[i : i + bs]
                loss = nn.functional.cross_entropy(self.logits(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * idx.numel()
            history.append(total / x.shape[0])
        self.eval()
        return history

    @property
    def num_params(self) -> int:
        return int(sum(p.numel() for p in self.parameters()))
