"""Rows of a mixed or routed batch, and the routing half of :class:`~engine.inference.VLoRAModel`.

:class:`_Rows` holds the task of each row of a mixed batch (``task_ids=[…]``) and the
index tensors its hooks need; :class:`_Blend` holds per-row blend weights over tasks
(routing); :class:`RowsMixin` is the part of ``VLoRAModel`` that sets them up for one
forward (``task_ids=`` → :class:`_Rows`, a router or ``blend=`` → :class:`_Blend`) and
applies a blend per module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .layers import ModuleState


@dataclass
class _Rows:
    """The task of each row of one mixed batch, and its per-device index tensors (built once per forward)."""

    task_ids: list[str | None]
    slots: list[int]
    _slot_t: dict[tuple[Any, int], Tensor] = field(default_factory=dict)
    _groups: dict[tuple[Any, int], list[tuple[str, Tensor | None]]] = field(default_factory=dict)

    def _rep(self, n: int, module: str) -> int:
        b = len(self.task_ids)
        if n == b:
            return 1
        if n % b:
            raise ValueError(f"module '{module}' sees {n} rows but task_ids has {b} entries; "
                             "give one task id per row of the batch")
        return n // b  # rows expanded in place (beam search, or (B·L)×in flattening): row j is row j // rep

    def slot_tensor(self, device: torch.device, n: int, module: str) -> Tensor:
        key = (device, n)
        t = self._slot_t.get(key)
        if t is None:
            t = torch.tensor(self.slots, dtype=torch.long, device=device)
            rep = self._rep(n, module)
            if rep > 1:
                t = t.repeat_interleave(rep)
            self._slot_t[key] = t
        return t

    def groups(self, device: torch.device, n: int, module: str) -> list[tuple[str, Tensor | None]]:
        key = (device, n)
        g = self._groups.get(key)
        if g is None:
            rep = self._rep(n, module)
            g = []
            for tid in dict.fromkeys(t for t in self.task_ids if t is not None):
                rows = [i for i, t in enumerate(self.task_ids) if t == tid]
                if len(rows) == len(self.task_ids):
                    g.append((tid, None))
                    continue
                r = torch.tensor(rows, dtype=torch.long, device=device)
                if rep > 1:
                    r = (r[:, None] * rep + torch.arange(rep, device=device)).reshape(-1)
                g.append((tid, r))
            self._groups[key] = g
        return g


@dataclass
class _Blend:
    """Per-row blend weights over tasks for one routed forward (rows expanded as :class:`_Rows` does)."""

    task_ids: list[str]
    weights: Tensor  # rows × tasks
    _w: dict[tuple[Any, Any, int], Tensor] = field(default_factory=dict)

    def weights_for(self, device: torch.device, dtype: torch.dtype, n: int, module: str) -> Tensor:
        key = (device, dtype, n)
        w = self._w.get(key)
        if w is None:
            b = self.weights.shape[0]
            if n % b:
                raise ValueError(f"module '{module}' sees {n} rows but the blend has {b} rows; give one row of weights per row of the batch")
            w = self.weights.to(device=device, dtype=dtype)
            if n != b:
                w = w.repeat_interleave(n // b, dim=0)
            self._w[key] = w
        return w


class RowsMixin:
    """Mixed and routed batches for :class:`~engine.inference.VLoRAModel`: which task (or blend) each row runs.

    ``VLoRAModel`` provides the state it reads: ``subspace``, ``router``, ``base_model``, ``_task``, ``_live``,
    ``set_task``, ``available_tasks``, ``_heads``, ``_states``, ``_cache``, ``_slots``, ``_cache_version``,
    ``_active``, ``_active_id``, ``_rows``, ``_blend``, ``_dense``, ``_merged``.
    """

    subspace: Any
    router: Any
    base_model: Any
    _blend: _Blend | None
    _dense: dict[str, tuple[Any, Tensor]]
    _cache_version: int
    _active: Any
    _merged: str | None

    def _set_router(self, router: Any) -> None:
        if router is not None:
            ids = list(getattr(router, "task_ids", []) or [])
            if not ids:
                raise ValueError("the router names no tasks (router.task_ids is empty)")
            for t in ids:
                self.subspace._task(t)  # UnknownTaskError names a task the subspace lacks
        self.__dict__["router"] = router

    def _dense_for(self, st: ModuleState, task_ids: list[str]) -> Tensor:
        """``T×k_v×k_u``: each task's core as the single-task path applies it, for one module (cached)."""
        key = (tuple(task_ids), self._cache_version)
        got = self._dense.get(st.name)
        if got is not None and got[0] == key:
            return got[1]
        parts = [self._task(t)[st.name] for t in task_ids]
        dense = torch.stack([p.left @ p.right for p in parts])
        self._dense[st.name] = (key, dense)
        return dense

    def _blended(self, st: ModuleState, x: Tensor, out_features: int) -> Tensor:
        blend = self._blend
        assert blend is not None
        w = blend.weights_for(x.device, st.dtype, x.shape[0], st.model_name)
        if st.shared:
            return st.blended_shared(x, w, self._dense_for(st, blend.task_ids))
        xc = x if x.dtype == st.dtype else x.to(st.dtype)
        out = xc.new_zeros(*xc.shape[:-1], out_features)
        shape = (w.shape[0],) + (1,) * (xc.dim() - 1)
        for j, t in enumerate(blend.task_ids):
            col = w[:, j]
            if not bool((col != 0).any()):
                continue  # a task no row uses costs nothing (one-hot blends: one task per row)
            out = out + col.reshape(shape) * st.single(xc, self._task(t)[st.name])
        return out

    def _pool_features(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        """The router's default features: the input embeddings averaged over the attention mask (rows × hidden)."""
        emb = kwargs.get("inputs_embeds")
        if emb is None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is None:
                raise ValueError("routing needs input_ids or inputs_embeds (or router_features=, or blend=)")
            get = getattr(self.base_model, "get_input_embeddings", None)
            if get is None or get() is None:
                raise ValueError("the base model has no get_input_embeddings(); pass router_features= (rows × input_dim)")
            emb = get()(ids)
        mask = kwargs.get("attention_mask")
        if mask is None:
            return emb.float().mean(dim=1)
        m = mask.to(emb.device, torch.float32).unsqueeze(-1)
        return (emb.float() * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)

    def route(self, *args: Any, router_features: Tensor | None = None, **kwargs: Any) -> Tensor:
        """The router's blend weights (rows × ``router.task_ids``) for a forward's inputs."""
        router = self.router
        if router is None:
            raise ValueError("no router: VLoRAModel(..., router=TaskRouter…)")
        feats = router_features if router_features is not None else self._pool_features(args, kwargs)
        return router(feats)

    def _blend_for(self, args: tuple[Any, ...], kwargs: dict[str, Any], blend: Any,
                   router_features: Tensor | None) -> _Blend | None:
        """The rows' blend for this call: ``blend`` given, else the router's when no task applies (``None``: no routing)."""
        if blend is None and (self.router is None or self._active is not None or self._merged is not None):
            return None
        if self._merged is not None:
            raise RuntimeError(f"task {self._merged!r} is merged into the weights; unmerge() before a routed batch")
        ids = list(self.router.task_ids) if self.router is not None else self.available_tasks
        if blend is None:
            with torch.no_grad():
                w = self.route(*args, router_features=router_features, **kwargs)
        else:
            w = blend.weights if isinstance(blend, _Blend) else getattr(blend, "weights", blend)
            ids = list(getattr(blend, "task_ids", None) or ids)
            w = torch.as_tensor(w)
        if w.dim() != 2 or w.shape[1] != len(ids):
            raise ValueError(f"blend weights must be rows × {len(ids)} tasks ({', '.join(ids[:4])}…), got shape {tuple(w.shape)}")
        for t in ids:
            if self._live(t) is not None:
                raise ValueError(f"task {t!r} is being trained; detach_trainable() before routing over it")
            self._task(t)
        return _Blend(ids, w.detach())

    def _rows_for(self, task_ids: Sequence[str | None]) -> _Rows:
        ids = [None if t is None else str(t) for t in task_ids]
        if not ids:
            raise ValueError("task_ids is empty; give one task id (or None) per row")
        if self._merged is not None:
            raise RuntimeError(f"task {self._merged!r} is merged into the weights; unmerge() before a mixed batch")
        for t in dict.fromkeys(x for x in ids if x is not None):
            if self._live(t) is not None:
                raise ValueError(f"task {t!r} is being trained: run it alone (set_task, or the same id on every row), "
                                 "or detach_trainable() after write_back()")
            self._task(t)
            self._heads.of(t)
        if any(st.shared and st.stacks_version != self._cache_version for st in self._states.values()):
            tasks = list(self._cache.values())
            for st in self._states.values():
                if st.shared and st.stacks_version != self._cache_version:
                    st.build_stacks(tasks, self._cache_version)
        return _Rows(ids, [self._slots[t] if t is not None else 0 for t in ids])

    def _run(self, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any], task_ids: Sequence[str | None] | None,
             blend: Any = None, router_features: Tensor | None = None) -> Any:
        if task_ids is not None and blend is not None:
            raise ValueError("give task_ids or blend, not both")
        if task_ids is None:
            b = self._blend_for(args, kwargs, blend, router_features)
            if b is None:
                return fn(*args, **kwargs)
            saved_blend = self._blend
            self._blend = b
            try:
                return fn(*args, **kwargs)
            finally:
                self._blend = saved_blend
        if isinstance(task_ids, str):
            raise ValueError("task_ids must be a sequence with one task id (or None) per row, not a string")
        distinct = set(task_ids)
        saved = (self._active, self._active_id, self._rows)
        try:
            if len(distinct) == 1:  # one task for the whole batch: the single-task path
                (t,) = distinct
                if t is None:
                    self._active, self._active_id = None, None
                else:
                    self.set_task(str(t))
            else:
                self._rows = self._rows_for(task_ids)
            return fn(*args, **kwargs)
        finally:
            self._active, self._active_id, self._rows = saved
