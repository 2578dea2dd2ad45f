"""Training a task inside a shared subspace: only its coefficients learn; bases and other tasks stay as they are.

A task in the subspace is a few numbers per module: the core ``Σ`` (k_u×k_v) of a
module in a shared basis (``ΔW = U·Σ·Vᵀ``), or small per-task factors where a module
is stored per task. :class:`SubspaceTrainer` makes those numbers ``nn.Parameter``\\ s,
applies them live through a :class:`~engine.inference.VLoRAModel` (so gradients reach
them through the base model), and :meth:`SubspaceTrainer.write_back` stores the task
like any other: rounded to the storage precision, with its measured fidelity and a
PEFT config template, so that ``reconstruct`` → ``save_adapter`` gives a PEFT adapter.

``num_expand`` gives the task room outside the stored bases: that many new
directions per side of each shared module (orthogonal to the basis, rounded to the
storage precision before training so that what trains is what is stored), written
back as columns appended to ``U`` and ``V``. Other tasks' coefficients are left as
they are: they cover the first columns only (the subspace reads a task's
coefficients against that many leading columns), so their reconstructions are
bit for bit what they were.

Above ~450 lines because :class:`SubspaceTrainer` is one unit: making the task's parameters
(with ``num_expand``'s new directions and a stored head), the training loop and the write-back
share its state; the helpers here serve only it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .. import ops
from ..errors import UnknownTaskError
from ..io.scan import validate_task_id
from ..subspace.common import ModuleBasis, TaskProjection
from ..subspace.core import SharedSubspace
from ..subspace.joint import _core, basis_grams
from ..subspace.pca import pca_factors
from ..types import LoRAWeights

#: Keys of an adapter config that describe another task's file, not a trained task's.
_DROP_META = ("rank_pattern", "alpha_pattern", "modules_to_save", "revision")


def task_template(subspace: SharedSubspace, task_id: str) -> LoRAWeights:
    """A PEFT config for a new task: ``lora_alpha``, ``r``, rsLoRA, target modules and base model of the
    subspace's other tasks (the first that has a config); without any, ``r = lora_alpha = 8`` over its modules."""
    others = [p.template for t, p in subspace.tasks.items() if t != task_id and p.template is not None]
    if others:
        t0 = others[0]
        meta = {k: v for k, v in t0.metadata.items() if k not in _DROP_META}
        return LoRAWeights(layer_names=[], lora_a={}, lora_b={}, rank=int(t0.rank), metadata=meta,
                           lora_alpha=float(t0.lora_alpha), use_rslora=bool(t0.use_rslora),
                           target_modules=t0.target_modules,
                           base_model_name_or_path=t0.base_model_name_or_path or subspace.base_model, name=task_id)
    leaves = sorted({m.rsplit(".", 1)[-1] for m in subspace.modules})
    return LoRAWeights(layer_names=[], lora_a={}, lora_b={}, rank=8, lora_alpha=8.0, target_modules=leaves,
                       base_model_name_or_path=subspace.base_model, name=task_id)


def _separate_rank(subspace: SharedSubspace, m: str, task_id: str) -> int:
    """The rank the other tasks store in a per-task module (at least 1)."""
    rs = [int(p.coeffs[m]["b"].shape[1]) for t, p in subspace.tasks.items()
          if t != task_id and "b" in p.coeffs.get(m, {})]
    return max(rs, default=0) or 1


def orthogonal_init(subspace: SharedSubspace, task_id: str, scale: float = 0.01) -> TaskProjection:
    """Register a new, untrained task whose update starts at zero (LoRA's convention) and return it.

    Per module: a shared module's core ``Σ`` is zero (the update is linear in ``Σ``, so
    gradients flow from the first step); a module stored per task gets LoRA factors of
    the rank the other tasks store there, ``A`` with orthonormal rows times ``scale`` and
    ``B`` zero; a pca module (the seed's) gets A-side loadings ``scale``·N(0, 1) and zero
    B-side loadings, as the seed does (its update is then the stored mean's). The
    task's config (``lora_alpha``, ``r``, target modules) comes from the other tasks
    (:func:`task_template`). Random numbers come from torch's global generator
    (``torch.manual_seed`` makes them repeatable).

    Raises:
        ValueError: a bad task id, a task of that id already stored, or a negative ``scale``.
    """
    validate_task_id(task_id)
    if task_id in subspace.tasks:
        raise ValueError(f"the subspace holds a task {task_id!r} already; SubspaceTrainer(subspace, {task_id!r}) "
                         "trains it from where it is")
    if not math.isfinite(scale) or scale < 0:
        raise ValueError(f"scale must be a finite number >= 0, got {scale!r}")
    dt = subspace.dtype
    proj = TaskProjection(task_id, {}, template=task_template(subspace, task_id))
    for m, b in sorted(subspace.modules.items()):
        out, inn = b.shape
        if b.kind == "joint":
            ku, kv = int(b.tensors["U"].shape[1]), int(b.tensors["V"].shape[1])
            proj.coeffs[m] = {"sigma": torch.zeros(ku, kv, dtype=dt)}
            proj.ranks[m] = max(1, min(ku, kv))
        elif b.kind == "pca":
            k = int(b.tensors["comp_a"].shape[0])
            proj.coeffs[m] = {"la": (torch.randn(k, dtype=torch.float64) * scale).to(dt), "lb": torch.zeros(k, dtype=dt)}
            proj.ranks[m] = int(b.rank)
        else:
            q = _separate_rank(subspace, m, task_id)
            a = torch.empty(q, inn, dtype=torch.float64)
            nn.init.orthogonal_(a)
            proj.coeffs[m] = {"b": torch.zeros(out, q, dtype=dt), "a": (a * scale).to(dt)}
            proj.ranks[m] = q
        proj.fidelity[m] = 0.0  # stored exactly as defined
        proj.norms[m] = _stored_norm(subspace, b, proj, m)
    proj.original_bytes = _lora_bytes(subspace, proj)
    subspace.add_task(proj)
    return proj


def _stored_norm(subspace: SharedSubspace, b: ModuleBasis, proj: TaskProjection, m: str) -> float:
    from ..subspace.core import _module_factors

    bb, aa = _module_factors(b, proj.coeffs[m], proj, m)
    return float(ops.lowrank_sqnorm(bb, aa)) ** 0.5 if aa.shape[0] else 0.0


def _lora_bytes(subspace: SharedSubspace, proj: TaskProjection) -> int:
    """Bytes of the task as PEFT factors at the storage precision: what keeping it as an adapter would cost."""
    elem = torch.empty(0, dtype=subspace.dtype).element_size()
    return int(sum(proj.ranks.get(m, 0) * (b.shape[0] + b.shape[1]) * elem for m, b in subspace.modules.items()))


def _new_directions(basis_rows: Tensor, count: int, dim: int, dtype: torch.dtype, gen: torch.Generator) -> Tensor:
    """``j ≤ count`` new unit rows orthogonal to ``basis_rows`` (k×dim), rounded to ``dtype`` (returned in float32)."""
    count = min(count, dim - basis_rows.shape[0])
    if count <= 0:
        return torch.zeros(0, dim)
    grown = ops.gram_schmidt(basis_rows.double(), torch.randn(count, dim, generator=gen, dtype=torch.float64))
    return grown[basis_rows.shape[0]:].to(dtype).float()


def _stored_head(subspace: SharedSubspace, task_id: str) -> tuple[list[str], list[str]] | None:
    """``(modules_to_save, head tensor keys)`` of the first other task that stores a head (``None``: none does)."""
    from ..io.targets import head_keys

    for t, p in subspace.tasks.items():
        if t == task_id or p.template is None:
            continue
        mts = (p.template.metadata or {}).get("modules_to_save") or []
        keys = head_keys(p.template.extra_tensors)
        if mts and keys:
            return [str(x) for x in mts], keys
    return None


def _head_modules(base: nn.Module, modules_to_save: list[str]) -> dict[str, nn.Module]:
    """The base model's modules that ``modules_to_save`` names (PEFT's matching: the name, or its last parts)."""
    found: dict[str, nn.Module] = {}
    for name, mod in base.named_modules():
        if name and any(name == t or name.endswith(f".{t}") for t in modules_to_save):
            if not any(name.startswith(f"{f}.") for f in found):
                found[name] = mod
    return found


def _head_key_prefix(keys: list[str], names: list[str]) -> str:
    """The prefix the stored tasks put before ``<module>.<param>`` in their head keys (PEFT's by default)."""
    from ..inference.model import PEFT_PREFIX

    for k in keys:
        k = k.replace(".modules_to_save.default", "")
        for n in names:
            i = k.find(f"{n}.")
            if i >= 0 and (i == 0 or k[i - 1] == "."):
                return k[:i]
    return PEFT_PREFIX


class SubspaceTrainer:
    """Train one task's coefficients in a shared subspace; everything else stays frozen.

    What trains, per module: the core ``Σ`` of a module in a shared basis (k_u×k_v, plus
    ``num_expand`` rows and columns for new directions); for a module stored per task,
    LoRA factors ``A`` (q×in) and ``B`` (out×q, the scale folded in, as the subspace
    stores them) of the rank the other tasks store there, initialised like LoRA (``A``
    small orthonormal rows, ``B`` zero) by :func:`orthogonal_init`; the loadings of a pca
    module. A task absent from the subspace raises (as vlora's does), unless ``init_if_missing=True``
    registers it first by :func:`orthogonal_init`; a stored one trains from its current coefficients.

    A classification head: where the subspace's stored tasks keep one (``modules_to_save``
    in their config, its tensors among their extra tensors, as PEFT's ``SEQ_CLS`` adapters
    do) and the model has that module, its parameters train too (``train_head``), in
    place in the model (which then serves every task with it) and in the same optimizer; :meth:`write_back` stores them as the
    task's extra tensors under the stored tasks' key format and keeps ``modules_to_save`` in
    its config, so ``save_adapter(subspace.reconstruct(task))`` writes an adapter with its
    head. They are counted in :attr:`num_head_params`, not :attr:`num_trainable_params`.

    Use it with your own loop (``loss = model(...).loss; trainer.step(loss)``), or with
    transformers' ``Trainer`` through :class:`~engine.training.VLoRACallback`.

    Args:
        subspace: The subspace; gains the task (and, with ``num_expand``, basis columns at :meth:`write_back`).
        task_id: The task to train.
        lr: Learning rate.
        num_expand: New directions per side of each shared module (orthogonal to its basis).
        optimizer_cls: The optimizer class (``torch.optim.AdamW`` by default).
        optimizer_kwargs: More keyword arguments for it.
        model: A :class:`~engine.inference.VLoRAModel` over ``subspace``, or the base model
            (then wrapped in one); the task is attached to it (:meth:`VLoRAModel.attach_trainable`)
            and its base parameters are frozen. ``None``: attach later with :meth:`attach`.
        init_scale: ``scale`` of :func:`orthogonal_init` for a new task.
        init_if_missing: Register a task the subspace lacks with :func:`orthogonal_init` (default:
            :class:`~engine.errors.UnknownTaskError`, a ``KeyError``, as vlora raises).
        seed: Seed of the new directions (``None``: torch's global generator).
        train_head: Train the head (``modules_to_save``) too: ``None`` (default) does so when the
            other tasks store a head and the model has its module; ``True`` requires that (else
            ``ValueError`` at :meth:`attach`); ``False`` keeps the head frozen and unstored.

    Attributes:
        model: The :class:`VLoRAModel` the task is attached to (``None``: none yet).
        task: The :class:`~engine.inference.trainable.TrainableTask` (an ``nn.Module``).
        params: ``<module>.<name>`` → the trainable parameters (``sigma``, ``lora_A``/``lora_B``, ``loadings_a``/``loadings_b``).
        head_params: ``<module>.<param>`` (the model's names) → the head's parameters that train (empty: none).
        optimizer: The optimizer over ``params`` (and ``head_params``).
    """

    def __init__(self, subspace: SharedSubspace, task_id: str, lr: float = 1e-3, num_expand: int = 0,
                 optimizer_cls: type = torch.optim.AdamW, optimizer_kwargs: dict[str, Any] | None = None,
                 model: nn.Module | None = None, *, init_scale: float = 0.01, seed: int | None = None,
                 init_if_missing: bool = False, train_head: bool | None = None) -> None:
        from ..inference.trainable import PCALoadings, SharedCore, TaskFactors, TrainableTask

        if not (isinstance(num_expand, int) and num_expand >= 0):
            raise ValueError(f"num_expand must be an integer >= 0, got {num_expand!r}")
        if not (math.isfinite(float(lr)) and lr > 0):
            raise ValueError(f"lr must be a number > 0, got {lr!r}")
        if train_head not in (None, True, False):
            raise ValueError(f"train_head must be True, False or None, got {train_head!r}")
        validate_task_id(task_id)
        self.subspace = subspace
        self.task_id = task_id
        self.num_expand = num_expand
        self.train_head = train_head
        self.head_params: dict[str, nn.Parameter] = {}
        self._head: tuple[list[str], str] | None = None  # (modules_to_save, key prefix) while a head trains
        if task_id not in subspace.tasks:
            if not init_if_missing:  # vlora's meaning: the task must exist
                raise UnknownTaskError(f"Task {task_id!r} not in subspace. Use orthogonal_init() or subspace.project() "
                                       "first, or SubspaceTrainer(..., init_if_missing=True)")
            orthogonal_init(subspace, task_id, init_scale)
        proj = subspace._task(task_id)
        gen = torch.Generator()
        if seed is not None:
            gen.manual_seed(seed)
        else:
            gen.manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
        #: module → (tensor key → the directions appended at write-back, rows in the layout the basis keeps)
        self._extension: dict[str, dict[str, Tensor]] = {}
        self._widths: dict[str, dict[str, int]] = {}  # module → key → the basis width before the extension
        mods: dict[str, nn.Module] = {}
        for m, b in sorted(subspace.modules.items()):
            out, inn = b.shape
            c = proj.coeffs[m]
            t = b.tensors
            if b.kind == "joint":
                u, v = t["U"].double(), t["V"].double()
                eu = _new_directions(u.T, num_expand, out, subspace.dtype, gen) if num_expand else torch.zeros(0, out)
                ev = _new_directions(v.T, num_expand, inn, subspace.dtype, gen) if num_expand else torch.zeros(0, inn)
                self._extension[m] = {"U": eu.T, "V": ev.T}
                self._widths[m] = {"U": u.shape[1], "V": v.shape[1]}
                ku, kv = u.shape[1] + eu.shape[0], v.shape[1] + ev.shape[0]
                sigma = torch.zeros(ku, kv, dtype=torch.float64)
                left, right = _core(c, proj.ranks.get(m, b.k))
                if left.shape[1]:
                    s0 = left @ right
                    sigma[: s0.shape[0], : s0.shape[1]] = s0
                v_ext = torch.cat([v, ev.double().T], dim=1)
                ut_ext = torch.cat([u, eu.double().T], dim=1).T
                mods[m] = SharedCore(v_ext, ut_ext, sigma)
            elif b.kind == "pca":
                k_a, k_b = t["comp_a"].shape[0], t["comp_b"].shape[0]
                ea = _new_directions(t["comp_a"].double(), num_expand, t["comp_a"].shape[1], subspace.dtype, gen) \
                    if num_expand else torch.zeros(0, t["comp_a"].shape[1])
                eb = _new_directions(t["comp_b"].double(), num_expand, t["comp_b"].shape[1], subspace.dtype, gen) \
                    if num_expand else torch.zeros(0, t["comp_b"].shape[1])
                self._extension[m] = {"comp_a": ea, "comp_b": eb}
                self._widths[m] = {"comp_a": k_a, "comp_b": k_b}
                grown = ModuleBasis(b.kind, b.shape, {**t, "comp_a": torch.cat([t["comp_a"].float(), ea]),
                                                      "comp_b": torch.cat([t["comp_b"].float(), eb])}, rank=b.rank)
                la = torch.zeros(k_a + ea.shape[0])
                lb = torch.zeros(k_b + eb.shape[0])
                la[: c["la"].shape[0]] = c["la"].float()
                lb[: c["lb"].shape[0]] = c["lb"].float()
                mods[m] = PCALoadings(grown, proj.template, m, la, lb)
            else:
                mods[m] = TaskFactors(c["a"].float(), c["b"].float())
        self.task = TrainableTask(task_id, mods)
        self._extended = False
        self.model: Any = None
        if model is not None:
            self.attach(model)
        self.params: dict[str, nn.Parameter] = self.task.named_coefficients()
        kwargs = dict(optimizer_kwargs or {})
        kwargs["lr"] = lr
        self.optimizer = optimizer_cls(list(self.params.values()) + list(self.head_params.values()), **kwargs)
        self._step_count = 0

    # -- wiring ----------------------------------------------------------------------
    def attach(self, model: nn.Module) -> Any:
        """Apply the task live in ``model`` (a :class:`VLoRAModel` over this subspace, or a base model to wrap).

        Returns:
            The :class:`VLoRAModel`.
        """
        from ..inference.model import VLoRAModel

        if not isinstance(model, VLoRAModel):
            model = VLoRAModel(model, self.subspace, strict=True)
        elif model.subspace is not self.subspace:
            raise ValueError("the VLoRAModel serves another subspace than the trainer's")
        model.attach_trainable(self.task)
        self.model = model
        self._attach_head(model.base_model)
        return model

    def _attach_head(self, base: nn.Module) -> None:
        """Unfreeze the head the stored tasks keep (see ``train_head``) and add it to the optimizer."""
        if self.train_head is False:
            return
        stored = _stored_head(self.subspace, self.task_id)
        mods = _head_modules(base, stored[0]) if stored is not None else {}
        if not mods:
            if self.train_head:
                why = ("no other task of the subspace stores a head (modules_to_save)" if stored is None
                       else f"the model has no module named {', '.join(stored[0])}")
                raise ValueError(f"train_head=True but {why}")
            return
        new = {f"{n}.{pn}": p for n, mod in mods.items() for pn, p in mod.named_parameters()}
        for p in new.values():
            p.requires_grad_(True)
        self._head = (stored[0], _head_key_prefix(stored[1], list(mods)))
        self.head_params = new
        if hasattr(self, "optimizer"):  # attached after construction
            known = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
            fresh = [p for p in new.values() if id(p) not in known]
            if fresh:
                self.optimizer.add_param_group({"params": fresh})

    # -- training --------------------------------------------------------------------
    def step(self, loss: Tensor) -> float:
        """One optimiser step on ``loss`` (zero_grad, backward, step). Returns the loss as a float."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self._step_count += 1
        return float(loss.detach())

    def evaluate(self, batches: Any, *, classify: bool) -> dict[str, Any]:
        """Held-out loss (and a classifier's accuracy) of the model as it is now (:func:`~engine.training.evaluate.evaluate`):
        before the first step, the starting point (the task's initial coefficients, the initial head)."""
        from .evaluate import evaluate

        if self.model is None:
            raise ValueError("no model attached: SubspaceTrainer(..., model=…) or attach() first")
        return evaluate(self.model, batches, classify=classify)

    @property
    def num_trainable_params(self) -> int:
        """Numbers of the task's coefficients that train (new directions' included; the head's: :attr:`num_head_params`)."""
        return int(sum(p.numel() for p in self.params.values()))

    @property
    def num_head_params(self) -> int:
        """Numbers of the head that train with the task (``train_head``; 0: none), not in :attr:`num_trainable_params`."""
        return int(sum(p.numel() for p in self.head_params.values()))

    @property
    def step_count(self) -> int:
        return self._step_count

    # -- storing -----------------------------------------------------------------------
    def _extend_bases(self) -> None:
        """Append the new directions to the bases, once (later write-backs find them there)."""
        sub = self.subspace
        for m, ext in self._extension.items():
            b = sub.modules[m]
            for key, d in ext.items():
                width = b.tensors[key].shape[1] if key in ("U", "V") else b.tensors[key].shape[0]
                want = self._widths[m][key]
                if width != want:
                    raise RuntimeError(f"module '{m}': the basis {key} changed while the task was training "
                                       f"({want} → {width} directions); nothing was written back")
        for m, ext in self._extension.items():
            b = sub.modules[m]
            for key, d in ext.items():
                if not d.numel():
                    continue
                if key in ("U", "V"):
                    b.tensors[key] = torch.cat([b.tensors[key], d.to(b.tensors[key].dtype)], dim=1)
                else:
                    b.tensors[key] = torch.cat([b.tensors[key], d.to(b.tensors[key].dtype)], dim=0)
                    sv = f"sv_{key[-1]}"
                    if sv in b.tensors:
                        b.tensors[sv] = torch.cat([b.tensors[sv], b.tensors[sv].new_zeros(d.shape[0])])
                sub.quantized.pop((m, key), None)
        self._extended = True

    def write_back(self) -> TaskProjection:
        """Store the trained coefficients in the subspace (rounded to its precision), like any other task.

        The task's fidelity is measured after rounding: per module, ‖ΔW − ΔŴ‖/‖ΔW‖ with ΔW the
        update as trained and ΔŴ what the subspace now reconstructs. With ``num_expand``, the
        first call appends the new directions to the bases. May be called again (checkpoints):
        each call replaces the task. An attached model is refreshed, the task staying live. A
        head that trains (``train_head``) is stored as the task's extra tensors, with
        ``modules_to_save`` in its config.

        Returns:
            The stored :class:`TaskProjection`.
        """
        from ..subspace.core import _module_factors

        sub = self.subspace
        old = sub._task(self.task_id) if self.task_id in sub.tasks else None
        template = old.template if old is not None and old.template is not None else task_template(sub, self.task_id)
        if self._head is not None:
            mts, prefix = self._head
            with torch.no_grad():
                head = {f"{prefix}{k}": p.detach().cpu().clone().contiguous() for k, p in self.head_params.items()}
            template = LoRAWeights(layer_names=[], lora_a={}, lora_b={}, rank=int(template.rank),
                                   metadata={**template.metadata, "modules_to_save": list(mts)},
                                   lora_alpha=float(template.lora_alpha), use_rslora=bool(template.use_rslora),
                                   target_modules=template.target_modules,
                                   base_model_name_or_path=template.base_model_name_or_path,
                                   extra_tensors=head, name=template.name, source=template.source)
        if not self._extended:
            self._extend_bases()
        dt = sub.dtype
        proj = TaskProjection(self.task_id, {}, template=template)
        mods = self.task.by_module()
        with torch.no_grad():
            for m, b in sorted(sub.modules.items()):
                mod = mods[m]
                if b.kind == "joint":
                    sigma = mod.sigma.detach().double().cpu()
                    proj.coeffs[m] = {"sigma": sigma.to(dt)}
                    proj.ranks[m] = max(1, min(sigma.shape))
                    left, right = _core(proj.coeffs[m], proj.ranks[m])
                    stored = left @ right if left.shape[1] else torch.zeros_like(sigma)
                    gu, gv = basis_grams(b.tensors["U"][:, : sigma.shape[0]], b.tensors["V"][:, : sigma.shape[1]])
                    n2 = float(((sigma.T @ gu) @ (sigma @ gv)).diagonal().sum())
                    d = sigma - stored
                    e2 = float(((d.T @ gu) @ (d @ gv)).diagonal().sum())
                elif b.kind == "pca":
                    la, lb = mod.loadings_a.detach().double().cpu(), mod.loadings_b.detach().double().cpu()
                    proj.coeffs[m] = {"la": la.to(dt), "lb": lb.to(dt)}
                    proj.ranks[m] = int(b.rank)
                    bt, at = pca_factors(b, {"la": la, "lb": lb}, template, m)
                    bs, as_ = pca_factors(b, proj.coeffs[m], template, m)
                    n2 = float(ops.lowrank_sqnorm(bt, at))
                    e2 = (ops.lowrank_rel_error(bt, at, bs, as_) ** 2) * n2 if n2 > 0 else 0.0
                else:
                    bt, at = mod.lora_B.detach().double().cpu(), mod.lora_A.detach().double().cpu()
                    proj.coeffs[m] = {"b": bt.to(dt), "a": at.to(dt)}
                    proj.ranks[m] = int(at.shape[0])
                    n2 = float(ops.lowrank_sqnorm(bt, at))
                    bs, as_ = _module_factors(b, proj.coeffs[m], proj, m)
                    e2 = (ops.lowrank_rel_error(bt, at, bs, as_) ** 2) * n2 if n2 > 0 else 0.0
                proj.norms[m] = max(n2, 0.0) ** 0.5
                proj.fidelity[m] = (max(e2, 0.0) / n2) ** 0.5 if n2 > 0 else 0.0
        proj.original_bytes = _lora_bytes(sub, proj)
        sub.add_task(proj)
        if self.model is not None:
            self.model.refresh()
        return proj
