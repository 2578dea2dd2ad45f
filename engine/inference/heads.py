"""A stored task's own head (``modules_to_save``): applied by :class:`~engine.inference.VLoRAModel` with the task.

A PEFT ``SEQ_CLS`` adapter (and a task that :class:`~engine.training.SubspaceTrainer`
trained with its head) keeps whole modules besides its LoRA factors, the classifier
head, stored as the task's extra tensors (``base_model.model.score.weight``, or
``….score.modules_to_save.default.weight``). Serving such a task means running
those modules with the task's tensors. Nothing in the base model is modified: a
forward hook on each head module reruns it with the task's tensors
(``torch.func.functional_call``) when the active task has a head; rows without a
head task (the base model, or a task that stores none) keep the model's own head.

In a mixed batch (``task_ids=[…]``) the head module runs once more per distinct
task with a head, on that task's rows (its output must then be a tensor whose
first dimension is the rows). Routed rows (``blend=``, a router) keep the model's
own head: a blend of heads is not defined.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import torch
from torch import Tensor, nn

from ..io.targets import head_keys
from .layers import strip_peft_prefix


def head_param_name(key: str) -> str:
    """``base_model.model.score.modules_to_save.default.weight`` → ``score.weight`` (PEFT's wrappers removed)."""
    parts = strip_peft_prefix(key).split(".")
    if "modules_to_save" in parts:
        i = parts.index("modules_to_save")
        parts = parts[:i] + parts[i + 2:]
    return ".".join(parts)


class TaskHeads:
    """The heads of a subspace's tasks over one base model: each task's tensors by head module, hooks on those modules.

    Args:
        owner: The :class:`~engine.inference.VLoRAModel` (held weakly) whose state says which task each row runs.
    """

    def __init__(self, owner: Any) -> None:
        self._owner = weakref.ref(owner)
        self._params: dict[str, dict[str, dict[str, Tensor]]] = {}  # task → module name → {param: tensor}
        self._hooks: dict[str, Any] = {}  # module name → hook handle
        self._busy = False

    def clear(self) -> None:
        """Forget every task's converted tensors (after the subspace changed)."""
        self._params.clear()

    def remove(self) -> None:
        """Remove every hook (the base model as it was)."""
        for h in self._hooks.values():
            h.remove()
        self._hooks.clear()

    def of(self, task_id: str) -> dict[str, dict[str, Tensor]]:
        """Head module name → ``{param: tensor}`` of ``task_id`` (``{}``: it stores no head), built once and hooked."""
        got = self._params.get(task_id)
        if got is not None:
            return got
        owner = self._owner()
        assert owner is not None
        got = self._build(owner, task_id)
        self._params[task_id] = got
        modules = dict(owner.base_model.named_modules())
        for name in got:
            if name not in self._hooks:
                self._hooks[name] = modules[name].register_forward_hook(self._make_hook(name), with_kwargs=True)
        return got

    @staticmethod
    def _build(owner: Any, task_id: str) -> dict[str, dict[str, Tensor]]:
        proj = owner.subspace._task(task_id)
        tpl = proj.template
        if tpl is None or not tpl.extra_tensors:
            return {}
        keys = head_keys(tpl.extra_tensors)
        if not keys:
            return {}
        params = dict(owner.base_model.named_parameters())
        names = list(params)
        out: dict[str, dict[str, Tensor]] = {}
        problems: list[str] = []
        for key in keys:
            want = head_param_name(key)
            if want in params:
                hit = want
            else:
                longer = [n for n in names if n.endswith("." + want)]
                shorter = sorted((n for n in names if want.endswith("." + n)), key=len, reverse=True)
                hit = longer[0] if len(longer) == 1 else (shorter[0] if shorter and not longer else None)
            if hit is None:
                problems.append(f"the model has no parameter '{want}'")
                continue
            t = tpl.extra_tensors[key]
            p = params[hit]
            if tuple(t.shape) != tuple(p.shape):
                problems.append(f"'{hit}' is {tuple(p.shape)}, the task's is {tuple(t.shape)}")
                continue
            mod, _, pn = hit.rpartition(".")
            out.setdefault(mod, {})[pn] = t.detach().to(device=p.device, dtype=p.dtype)
        if problems:
            warnings.warn(f"VLoRAModel: task {task_id!r}'s head (modules_to_save) is not applied: "
                          f"{'; '.join(problems[:3])}; the model's own head serves it", UserWarning, stacklevel=4)
            return {}
        return out

    def _call(self, module: nn.Module, params: dict[str, Tensor], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self._busy = True  # the rerun passes through this hook again: leave it alone
        try:
            return torch.func.functional_call(module, params, args, kwargs, strict=False)
        finally:
            self._busy = False

    def _make_hook(self, name: str) -> Any:
        ref = weakref.ref(self)

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
            me = ref()
            owner = me._owner() if me is not None else None
            if me is None or owner is None or me._busy or owner._blend is not None:
                return None
            rows = owner._rows
            if rows is None:
                tid = owner.active_task
                if tid is None or owner._live(tid) is not None:  # a task under training: its head is the model's
                    return None
                p = me.of(tid).get(name)
                return None if p is None else me._call(module, p, args, kwargs)
            return me._mixed(name, module, args, kwargs, output, rows)

        return hook

    def _mixed(self, name: str, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any,
               rows: Any) -> Any:
        lead = next((a for a in args if isinstance(a, Tensor)), None)
        if lead is None:
            lead = next((v for v in kwargs.values() if isinstance(v, Tensor)), None)
        n = int(lead.shape[0]) if lead is not None and lead.dim() else 0
        groups = [(t, r) for t, r in rows.groups(output.device if isinstance(output, Tensor) else torch.device("cpu"), n, name)
                  if self.of(t).get(name) is not None] if n else []
        if not groups:
            return None
        if not isinstance(output, Tensor) or output.shape[:1] != (n,):
            raise ValueError(f"head module '{name}' returns {type(output).__name__} without one row per input row: "
                             "a mixed batch of tasks with their own heads needs a head whose output has the rows first; "
                             "run such tasks one at a time (set_task)")
        out = output.clone()
        for t, r in groups:
            p = self.of(t)[name]
            if r is None:
                return self._call(module, p, args, kwargs)

            def pick(v: Any, r: Tensor = r) -> Any:
                return v[r.to(v.device)] if isinstance(v, Tensor) and v.dim() and v.shape[0] == n else v

            got = self._call(module, p, tuple(pick(a) for a in args), {k: pick(v) for k, v in kwargs.items()})
            out[r.to(out.device)] = got.to(out.dtype)
        return out
