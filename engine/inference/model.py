"""``VLoRAModel``: serve every task of a shared subspace from one base model, one task per batch row if need be.

Above ~450 lines because it is one class: the hooks, the per-task factor cache, task switching and the
per-row batched path share that state (the row gathering itself is in ``RowsMixin``)."""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import IncompatibleAdaptersError, UnknownTaskError
from ..subspace.common import module_scale
from ..subspace.core import SharedSubspace, _module_factors
from ..subspace.joint import _core
from .heads import TaskHeads
from .layers import ModuleState, TaskModule, layer_compute_dtype, layer_kind, layer_shape, match_modules
from .rows import RowsMixin, _Blend, _Rows

PEFT_PREFIX = "base_model.model."


class VLoRAModel(RowsMixin, nn.Module):
    """A base model serving the tasks of a :class:`~engine.SharedSubspace`.

    Each target module (``nn.Linear``, transformers' ``Conv1D``, bitsandbytes
    4/8-bit linears) gets a forward hook that adds the active task's update as
    low-rank products through the stored form: ``((x·V)·Σᵀ)·Uᵀ`` for modules in
    the shared basis, ``(x·Aᵀ)·Bᵀ`` for modules stored per task. Per-task factors
    are built once, on a task's first use, in the compute dtype on each layer's
    device; switching between cached tasks rebuilds nothing.

    ``model(input_ids, task_ids=[…])`` runs one task per row (``None``: the base
    model): shared modules compute ``x·V`` and ``·Uᵀ`` once for the batch and
    each row's small core by a gathered batched matmul; modules stored per task
    run one pair of matmuls per distinct task in the batch.

    Scale: by default each task's own (``lora_alpha/r``, ``/√r`` with rsLoRA,
    ``rank_pattern``/``alpha_pattern`` honoured), which the subspace stores
    folded into its update. ``scaling`` replaces it by ``scaling`` (ΔW =
    ``scaling·B·A`` with the task's original B, A); ``lora_alpha`` replaces
    alpha (ΔW = ``lora_alpha/r·B·A``, r each module's original rank).

    Training (:class:`~engine.training.SubspaceTrainer`): :meth:`attach_trainable`
    applies a task whose coefficients are ``nn.Parameter``\ s, recomputed on every
    forward so that gradients reach them; the base model's parameters are frozen.

    Heads: a task that stores its own head (``modules_to_save``: a PEFT ``SEQ_CLS``
    adapter's classifier, a head trained by ``SubspaceTrainer``) runs with it, the
    base model's modules untouched (:mod:`engine.inference.heads`); in a mixed batch
    each row gets its task's head; base rows, tasks without a head, routed rows and a
    task under training use the model's own.

    Routing: with ``router`` (a :class:`~engine.training.TaskRouter`), a forward
    without ``task_ids`` and without an active task blends the tasks per row by
    the router's weights over ``router.task_ids`` (features: ``router_features=``,
    else the mean of the input embeddings over the attention mask); ``blend=``
    (rows × tasks weights) gives the weights directly. A row's update is the blend
    of the tasks' updates: shared modules blend the cores Σ per row (one ``x·V``
    and one ``·Uᵀ`` for the batch), modules stored per task sum the weighted
    per-task outputs.

    Args:
        base_model: Any torch model holding the subspace's modules (names matched by suffix).
        subspace: The tasks.
        scaling: Replace each task's ``alpha/r`` by this factor (wins over ``lora_alpha`` if both are given).
        lora_alpha: Replace each task's ``lora_alpha`` (and ``alpha_pattern``) by this.

    ``model.scaling`` is the one factor applied to every module's ``B·A`` of every
    task (``scaling``, else ``lora_alpha/r``, else the tasks' own ``alpha/r``), or
    ``None`` when it differs between tasks or modules (see :meth:`module_scaling`).
        compute_dtype: dtype of the low-rank products (default: each layer's weight
            dtype; a quantised layer's compute dtype).
        router: Routes rows without a task (see above); not a submodule (its parameters
            are not the model's).
        strict: Modules of the subspace that the model lacks are an error (default: as vlora,
            they are not applied, with a warning that names them; other mismatches always raise).

    Raises:
        IncompatibleAdaptersError: modules ambiguous, of another shape, or of an unsupported
            type, or (``strict=True``) missing from the model (all named in one message).
    """

    def __init__(self, base_model: nn.Module, subspace: SharedSubspace, scaling: float | None = None,
                 lora_alpha: float | None = None, compute_dtype: torch.dtype | None = None,
                 router: Any = None, strict: bool = False) -> None:
        super().__init__()
        if scaling is not None and not math.isfinite(float(scaling)):
            raise ValueError(f"scaling must be a finite number, got {scaling!r}")
        if lora_alpha is not None and not math.isfinite(float(lora_alpha)):
            raise ValueError(f"lora_alpha must be a finite number, got {lora_alpha!r}")
        self.base_model = base_model
        self.subspace = subspace.materialize()  # every task served: read a lazily loaded one whole
        # explicit scaling wins over lora_alpha (vlora's order: scaling > lora_alpha/r > the task's own)
        self._scaling = None if scaling is None else float(scaling)
        self.lora_alpha = None if lora_alpha is None or scaling is not None else float(lora_alpha)
        self.compute_dtype = compute_dtype
        self._cache: dict[str, dict[str, TaskModule]] = {}
        self._slots: dict[str, int] = {}  # task → 1-based slot in the stacks (0: base rows)
        self._cache_version = 0
        self._active_id: str | None = None
        self._active: dict[str, TaskModule] | None = None
        self._rows: _Rows | None = None
        self._merged: str | None = None
        self._originals: dict[str, Tensor] = {}
        self._compiled: Any = None
        self._states: dict[str, ModuleState] = {}
        self._blend: _Blend | None = None
        self._dense: dict[str, tuple[Any, Tensor]] = {}  # module → (key, T×k_v×k_u cores) for routed rows
        self.strict = bool(strict)
        self._heads = TaskHeads(self)
        self._attach()
        self.router = router

    # -- wiring -----------------------------------------------------------------------
    def _attach(self) -> None:
        names = sorted(self.subspace.modules)
        mapping, problems = match_modules(self.base_model, names)
        layers = dict(self.base_model.named_modules())
        for s, mn in mapping.items():
            layer = layers[mn]
            kind = layer_kind(layer)
            if kind is None:
                problems.append(f"module '{mn}' is a {type(layer).__name__}; supported: nn.Linear, transformers Conv1D, "
                                "bitsandbytes Linear4bit/Linear8bitLt")
                continue
            shape = layer_shape(layer, kind)
            if shape != tuple(self.subspace.modules[s].shape):
                problems.append(f"module '{mn}' is {shape[0]}×{shape[1]} (out×in), the subspace's '{s}' is "
                                f"{self.subspace.modules[s].shape[0]}×{self.subspace.modules[s].shape[1]}")
                continue
            w = layer.weight
            dtype = self.compute_dtype or layer_compute_dtype(layer, kind)
            self._states[s] = ModuleState(name=s, model_name=mn, layer=layer, kind=kind,
                                          shared=self.subspace.modules[s].kind == "joint", dtype=dtype, device=w.device)
        if problems and not self.strict and problems[0].startswith("the model has no module for"):
            # vlora's meaning: modules the model lacks are not applied (a warning here, an error with strict=True)
            warnings.warn(f"VLoRAModel: {problems.pop(0)}; those modules are not applied (strict=True: an error)",
                          UserWarning, stacklevel=3)
        if problems:
            raise IncompatibleAdaptersError("; ".join(problems), title="Model does not fit the subspace")
        for st in self._states.values():
            if st.shared:
                b = self.subspace.modules[st.name]
                st.v = b.tensors["V"].to(device=st.device, dtype=st.dtype).contiguous()
                st.ut = b.tensors["U"].T.to(device=st.device, dtype=st.dtype).contiguous()
            st.hook = st.layer.register_forward_hook(self._make_hook(st))

    def _make_hook(self, st: ModuleState) -> Any:
        out_features = self.subspace.modules[st.name].shape[0]
        # a weak reference: the base model's hooks must not keep the wrapper alive (its __del__ removes them)
        ref = weakref.ref(self)

        def hook(layer: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor | None:
            me = ref()
            if me is None:
                return None
            rows = me._rows
            if me._blend is not None:
                return output + me._blended(st, args[0], out_features).to(output.dtype)
            if rows is None:
                active = me._active
                if active is None:
                    return None
                return output + st.single(args[0], active[st.name]).to(output.dtype)
            x = args[0]
            if st.shared:
                d = st.mixed_shared(x, rows.slot_tensor(x.device, x.shape[0], st.model_name))
            else:
                groups = [(me._cache[t][st.name], r) for t, r in rows.groups(x.device, x.shape[0], st.model_name)]
                d = st.mixed_grouped(x, groups, out_features)
            return output + d.to(output.dtype)

        return hook

    # -- routing -----------------------------------------------------------------------
    def __setattr__(self, name: str, value: Any) -> None:
        if name == "router":  # kept out of the module tree: its parameters are not the model's
            self._set_router(value)
            return
        super().__setattr__(name, value)

    # -- training --------------------------------------------------------------------
    @property
    def trainable_task(self) -> Any:
        """The attached :class:`~engine.inference.trainable.TrainableTask` (``None``: none)."""
        return self._modules.get("trainable")

    def attach_trainable(self, task: Any) -> None:
        """Apply ``task`` (a :class:`~engine.inference.trainable.TrainableTask`) live, from its parameters.

        Its modules move to their layers' devices; it becomes the active task (and
        :meth:`set_task` with its id selects it); every parameter of the base model is
        frozen (``requires_grad=False``), so that gradients reach only the task's coefficients.
        """
        if self._merged is not None:
            raise RuntimeError(f"task {self._merged!r} is merged into the weights; unmerge() first")
        missing = sorted(set(self._states) - set(task.names))
        if missing:
            raise ValueError(f"the trainable task {task.task_id!r} lacks module '{missing[0]}'")
        for m, mod in task.by_module().items():
            if m in self._states:
                mod.to(self._states[m].device)
        for p in self.base_model.parameters():
            p.requires_grad_(False)
        self._modules["trainable"] = task
        self._drop_cache()
        self.set_task(task.task_id)

    def detach_trainable(self) -> Any:
        """Stop applying the task under training (the subspace's stored version applies from now on); returns it."""
        task = self._modules.pop("trainable", None)
        if task is not None:
            if self._active_id == task.task_id:
                self._active, self._active_id = None, None
            self._drop_cache()
        return task

    def _live(self, task_id: str | None) -> dict[str, Any] | None:
        task = self._modules.get("trainable")
        if task is None or task_id is None or task_id != task.task_id:
            return None
        return task.by_module()

    def _drop_cache(self) -> None:
        self._cache.clear()
        self._slots.clear()
        self._dense.clear()
        self._heads.clear()
        self._cache_version += 1

    def unwrap(self) -> nn.Module:
        """Remove the hooks (unmerging first if merged) and return the base model as it was."""
        if self._merged is not None:
            self.unmerge()
        for st in self._states.values():
            if st.hook is not None:
                st.hook.remove()
                st.hook = None
        self._heads.remove()
        self._active = None
        self._active_id = None
        return self.base_model

    def __del__(self) -> None:
        # the base model goes back to what it was: hooks removed, merged weights restored
        try:
            if self.__dict__.get("_merged") is not None:
                self._restore()
            for st in self.__dict__.get("_states", {}).values():
                if st.hook is not None:
                    st.hook.remove()
            if "_heads" in self.__dict__:
                self._heads.remove()
        except Exception:  # interpreter shutdown: nothing left to restore
            pass

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if name == "base_model" or "base_model" not in modules:
                raise
            return getattr(modules["base_model"], name)

    # -- facts -----------------------------------------------------------------------
    @property
    def scaling(self) -> float | None:
        """The single factor on every module's original ``B·A`` across all tasks; ``None`` when it varies."""
        if self._scaling is not None:
            return self._scaling
        sub = self.subspace
        seen: set[float] = set()
        for t in sub.tasks:
            proj = sub._task(t)
            for m in self._states:
                seen.add(round(self._orig_scale(proj, m) * self._multiplier(proj, m), 12))
                if len(seen) > 1:
                    return None
        return next(iter(seen)) if seen else None

    @property
    def _cached_deltas(self) -> dict[str, Any] | None:
        """vlora's name: the active task's per-module factors (the same object while the task stays active)."""
        return self._active

    @property
    def _target_modules(self) -> dict[str, nn.Module]:
        """vlora's name: the model's module name → the layer the subspace's module is applied to."""
        return {st.model_name: st.layer for _, st in sorted(self._states.items())}

    @property
    def available_tasks(self) -> list[str]:
        """The subspace's task ids, sorted."""
        return sorted(self.subspace.tasks)

    @property
    def active_task(self) -> str | None:
        """The task applied to every row, or the merged task (``None``: the base model)."""
        return self._merged if self._merged is not None else self._active_id

    @property
    def is_merged(self) -> bool:
        return self._merged is not None

    @property
    def cached_tasks(self) -> list[str]:
        """Tasks whose factors are built (in first-use order)."""
        return list(self._cache)

    @property
    def target_modules(self) -> dict[str, str]:
        """Subspace module name → the model's module name it is applied to."""
        return {s: st.model_name for s, st in sorted(self._states.items())}

    @property
    def qlora_info(self) -> dict[str, Any]:
        """Which target layers are quantised: ``quantized``, ``method`` (``nf4``/``fp4``/``int8``/``None``),
        ``num_quantized_layers``, ``num_target_layers``, ``quantized_layers`` (model name → method)."""
        layers: dict[str, str] = {}
        for st in self._states.values():
            if st.kind == "bnb4":
                layers[st.model_name] = str(getattr(st.layer.weight, "quant_type", "nf4"))
            elif st.kind == "bnb8":
                layers[st.model_name] = "int8"
        methods = sorted(set(layers.values()))
        return {"quantized": bool(layers), "method": methods[0] if len(methods) == 1 else (methods or None),
                "num_quantized_layers": len(layers), "num_target_layers": len(self._states),
                "quantized_layers": dict(sorted(layers.items()))}

    def task_bytes(self, task_id: str) -> int:
        """Bytes the cached factors of ``task_id`` hold (building them if need be)."""
        return sum(t.nbytes for t in self._task(task_id).values())

    def shared_bytes(self) -> int:
        """Bytes of the shared bases held on the layers' devices (paid once, whatever the number of tasks)."""
        return int(sum(t.numel() * t.element_size() for st in self._states.values() for t in (st.v, st.ut) if t is not None))

    # -- scale -------------------------------------------------------------------------
    def module_scaling(self, task_id: str) -> dict[str, float]:
        """Module → the factor applied to the task's original ``B·A`` (its own ``alpha/r`` unless overridden)."""
        proj = self.subspace._task(task_id)
        return {m: self._orig_scale(proj, m) * self._multiplier(proj, m) for m in sorted(self._states)}

    @staticmethod
    def _orig_scale(proj: Any, m: str) -> float:
        r = int(proj.ranks.get(m, 0))
        return module_scale(proj.template, m, r) if proj.template is not None else 1.0

    def _multiplier(self, proj: Any, m: str) -> float:
        """Factor on the stored update (which holds the task's own scale)."""
        if self._scaling is None and self.lora_alpha is None:
            return 1.0
        s = self._orig_scale(proj, m)
        if s == 0.0:
            return 0.0
        if self._scaling is not None:
            return self._scaling / s
        r = int(proj.ranks.get(m, 0))
        rs = proj.template is not None and proj.template.use_rslora
        assert self.lora_alpha is not None
        return (self.lora_alpha / (math.sqrt(r) if rs else r)) / s

    # -- per-task factors -------------------------------------------------------------
    def _build_task(self, task_id: str) -> dict[str, TaskModule]:
        """Every module's ``(left, right)`` of one task, in compute dtype on the layer's device."""
        sub = self.subspace
        proj = sub._task(task_id)
        out: dict[str, TaskModule] = {}
        for m, st in self._states.items():
            b = sub.modules[m]
            mult = self._multiplier(proj, m)
            if st.shared:
                assert st.v is not None and st.ut is not None
                # the core as reconstruct() truncates it, padded to the (possibly grown) basis
                lf, rf = _core(proj.coeffs[m], proj.ranks.get(m, b.k))
                q = lf.shape[1]
                left = torch.zeros(st.v.shape[1], q, dtype=torch.float64)
                right = torch.zeros(q, st.ut.shape[0], dtype=torch.float64)
                left[: rf.shape[1]] = rf.T
                right[:, : lf.shape[0]] = lf.T * mult
            else:
                bb, aa = _module_factors(b, proj.coeffs[m], proj, m)
                left, right = aa.T, bb.T * mult
            out[m] = TaskModule(left.to(device=st.device, dtype=st.dtype).contiguous(),
                                right.to(device=st.device, dtype=st.dtype).contiguous())
        return out

    def _task(self, task_id: str) -> dict[str, TaskModule]:
        t = self._cache.get(task_id)
        if t is None:
            t = self._build_task(task_id)
            self._cache[task_id] = t
            self._slots[task_id] = len(self._slots) + 1
            self._cache_version += 1
        return t

    def preload(self, task_ids: Sequence[str] | None = None) -> VLoRAModel:
        """Build the factors of ``task_ids`` (default: every task) now rather than on first use. Returns ``self``."""
        for t in self.available_tasks if task_ids is None else task_ids:
            self._task(t)
        return self

    def refresh(self) -> VLoRAModel:
        """Drop every cached factor and re-read the shared bases: call after changing the subspace in place
        (``quantize``, ``absorb_incremental``, ``absorb``, training). Returns ``self``."""
        if self._merged is not None:
            raise RuntimeError("the model is merged; unmerge() before refresh()")
        active = self._active_id
        self._drop_cache()
        self._active, self._active_id = None, None
        for st in self._states.values():
            st.stacks = None
            b = self.subspace.modules[st.name]
            st.shared = b.kind == "joint"
            if st.shared:
                st.v = b.tensors["V"].to(device=st.device, dtype=st.dtype).contiguous()
                st.ut = b.tensors["U"].T.to(device=st.device, dtype=st.dtype).contiguous()
            else:
                st.v = st.ut = None
        if active is not None and (active in self.subspace.tasks or self._live(active) is not None):
            self.set_task(active)
        return self

    # -- one task --------------------------------------------------------------------
    def set_task(self, task_id: str) -> None:
        """Apply ``task_id`` to every row (its factors built on first use, cached after).

        Raises:
            UnknownTaskError: no such task.
            RuntimeError: the model is merged.
        """
        if self._merged is not None:
            raise RuntimeError(f"Cannot switch tasks while merged: task {self._merged!r} is merged into the weights; "
                               "unmerge() before set_task()")
        live = self._live(task_id)
        if live is None and task_id not in self.subspace.tasks:
            known = ", ".join(sorted(self.subspace.tasks))
            raise UnknownTaskError(f"Unknown task {task_id!r}; the subspace holds: {known or '(none)'}")
        self._active = live if live is not None else self._task(task_id)
        self._active_id = task_id
        if live is None:
            self._heads.of(task_id)  # the task's own head (modules_to_save), if it stores one

    def clear_task(self) -> None:
        """Back to the base model."""
        if self._merged is not None:
            raise RuntimeError(f"Cannot clear task while merged: task {self._merged!r} is merged into the weights; "
                               "unmerge() first")
        self._active, self._active_id = None, None

    def reconstruct_state_dict(self, task_id: str) -> dict[str, Tensor]:
        """vlora's meaning: ``{module: ΔW}`` with ``ΔW = B·A`` (out×in) of the task as the subspace reconstructs it
        (without this model's ``scaling``/``lora_alpha``; the adapter's own ``alpha/r`` is not applied either).

        For PEFT's state dict of the task, see :meth:`peft_state_dict`.
        """
        w = self.subspace.reconstruct(task_id)
        return {m: w.lora_b[m] @ w.lora_a[m] for m in w.layer_names}

    def peft_state_dict(self, task_id: str) -> dict[str, Tensor]:
        """The task as PEFT's state dict for this model (``base_model.model.<module>.lora_A.weight`` / ``lora_B``).

        The adapter as the subspace reconstructs it, with its own config
        (``subspace.reconstruct(task_id).metadata``), i.e. without this model's ``scaling``/``lora_alpha``.
        """
        w = self.subspace.reconstruct(task_id)
        sd: dict[str, Tensor] = {}
        for m in w.layer_names:
            mn = self._states[m].model_name if m in self._states else m
            sd[f"{PEFT_PREFIX}{mn}.lora_A.weight"] = w.lora_a[m]
            sd[f"{PEFT_PREFIX}{mn}.lora_B.weight"] = w.lora_b[m]
        return sd

    # -- merge -------------------------------------------------------------------------
    def merge(self, task_id: str | None = None) -> None:
        """Add a task's dense update into the base weights (hooks then add nothing).

        The original weights are kept (a copy) so that :meth:`unmerge` restores them bit for bit.

        Raises:
            RuntimeError: already merged, or a target layer is quantised.
            ValueError: no task given and none active.
        """
        if self._merged is not None:
            raise RuntimeError(f"Model is already merged (task {self._merged!r}); unmerge() first")
        q = self.qlora_info
        if q["quantized"]:
            raise RuntimeError(f"cannot merge into {q['num_quantized_layers']} quantised layer(s) "
                               f"(e.g. '{next(iter(q['quantized_layers']))}'); use set_task() instead")
        tid = task_id if task_id is not None else self._active_id
        if tid is None:
            raise ValueError("No task to merge: pass task_id or call set_task() first")
        if self._live(tid) is not None:
            raise RuntimeError(f"task {tid!r} is being trained; detach_trainable() before merge()")
        proj = self.subspace._task(tid)
        factors = self.subspace.task_factors(tid)
        self._heads.of(tid)
        try:
            with torch.no_grad():
                for m, st in self._states.items():
                    b_eff, a = factors[m]
                    dw = (b_eff * self._multiplier(proj, m)) @ a  # out×in, float64: one dense update per module, once
                    w = st.layer.weight
                    self._originals[m] = w.detach().clone()
                    dw = dw.T if st.kind == "conv1d" else dw
                    w.copy_((w.double() + dw.to(w.device)).to(w.dtype))
        except BaseException:
            self._restore()
            raise
        self._merged = tid
        self._active, self._active_id = None, None

    def _restore(self) -> None:
        with torch.no_grad():
            for m, orig in self._originals.items():
                self._states[m].layer.weight.copy_(orig)
        self._originals.clear()

    def unmerge(self) -> None:
        """Restore the base weights exactly as they were before :meth:`merge` (the merged task becomes active)."""
        if self._merged is None:
            raise RuntimeError("Model is not merged: nothing is merged")
        tid = self._merged
        self._restore()
        self._merged = None
        self.set_task(tid)

    # -- running ---------------------------------------------------------------------------
    def compile(self, **kwargs: Any) -> VLoRAModel:
        """``torch.compile`` the base model (hooks included); a torch without it, or a failure, leaves it eager.

        Returns ``self``.
        """
        fn = getattr(torch, "compile", None)
        if fn is None:
            warnings.warn("this torch has no torch.compile; running eager", RuntimeWarning, stacklevel=2)
            return self
        try:
            self._compiled = fn(self.base_model, **kwargs)
        except Exception as exc:  # e.g. an unsupported platform or backend
            warnings.warn(f"torch.compile failed ({exc}); running eager", RuntimeWarning, stacklevel=2)
            self._compiled = None
        return self

    def forward(self, *args: Any, task_ids: Sequence[str | None] | None = None, blend: Any = None,
                router_features: Tensor | None = None, **kwargs: Any) -> Any:
        """The base model's forward; ``task_ids`` (one per row, ``None`` for the base model) overrides the active task.

        ``blend`` (rows × tasks weights, or a :class:`~engine.training.RoutedBlend`) blends the tasks per row;
        with a router and no task, the router's blend applies (``router_features``: its input, rows × input_dim).
        """
        fn = self._compiled if self._compiled is not None else self.base_model
        return self._run(fn, args, kwargs, task_ids, blend, router_features)

    def generate(self, *args: Any, task_ids: Sequence[str | None] | None = None, blend: Any = None,
                 router_features: Tensor | None = None, **kwargs: Any) -> Any:
        """The base model's ``generate``; ``task_ids``/``blend`` as in :meth:`forward` (beams follow their row;
        a router's blend is computed once, from the prompt)."""
        return self._run(self.base_model.generate, args, kwargs, task_ids, blend, router_features)
