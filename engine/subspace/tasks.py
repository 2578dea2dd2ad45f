"""Task operations of a :class:`~engine.subspace.core.SharedSubspace`: project, add, absorb, train.

Functions of the subspace (``sub``), which the class exposes as its methods
(``sub.project(…)`` calls :func:`project`); the class's docstrings are the reference.
They change ``sub`` in place where the method does, and never import the class's module.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .. import ops
from ..errors import ErrorTargetError, IncompatibleAdaptersError
from ..io.scan import validate_task_id
from ..methods.build_params import BuildParams
from ..progress import CancelLike, ProgressFn, tick
from ..types import LoRAWeights
from .build import from_params, record_input
from .common import ModuleBasis, TaskProjection, check_finite, check_shapes, config_template, effective_factors, nbytes
from .joint import encode_joint, encode_separate, error_target, extend_for_task
from .pca import encode_pca
from .rule import RuleBreak, breaks_message, rule_breaks, tolerance


def check_adapter(sub: Any, adapter: LoRAWeights, label: str) -> None:
    check_shapes(adapter, label, sub.shapes, sub.base_model)
    check_finite(adapter, label)
    if sub.method == "pca":
        bad = [m for m, b in sub.modules.items() if adapter.module_rank(m) != b.rank]
        if bad:
            raise IncompatibleAdaptersError(f"{label}: module '{bad[0]}' has rank {adapter.module_rank(bad[0])}, "
                                            f"the pca subspace has rank {sub.modules[bad[0]].rank}")


def error_target_of(sub: Any) -> float | None:
    """The build's per-task error target: the stricter of ``max_error`` and ``mean_error`` (``None``: no target)."""
    return error_target(sub.params.get("max_error"), sub.params.get("mean_error"))


def encode(sub: Any, m: str, adapter: LoRAWeights, template: LoRAWeights) -> tuple[dict[str, Tensor], float]:
    b = sub.modules[m]
    sb, a = effective_factors(adapter, m)
    if b.kind == "pca":
        return encode_pca(b, adapter.lora_a[m], adapter.lora_b[m], sb, template, m, sub.dtype)
    if b.kind == "separate":
        me = error_target_of(sub)
        if me is None:
            me = max((t.fidelity.get(m, 0.0) for t in sub.tasks.values()), default=0.0)
        return encode_separate(sb, a, me, None, sub.dtype)
    return encode_joint(b.tensors["U"], b.tensors["V"], sb, a, adapter.module_rank(m), sub.dtype)


def _new_task(sub: Any, adapter: LoRAWeights, task_id: str, label: str) -> tuple[TaskProjection, Any]:
    """A checked adapter's empty projection (its ranks, config and input recorded) and its config template."""
    validate_task_id(task_id)
    check_adapter(sub, adapter, label)
    tmpl = config_template(adapter, task_id)
    proj = TaskProjection(task_id, {}, ranks=adapter.ranks, template=tmpl,
                          original_bytes=sum(nbytes(adapter.lora_a[m]) + nbytes(adapter.lora_b[m]) for m in sub.modules))
    record_input(proj, adapter.source)
    return proj, tmpl


def project(sub: Any, adapter: LoRAWeights, task_id: str, warn_threshold: float | None = None, *,
            progress: ProgressFn | None = None, cancel: CancelLike | None = None) -> TaskProjection:
    """Coefficients of ``adapter`` in the current bases (they do not change), with its measured error (see ``SharedSubspace.project``)."""
    label = f"adapter {task_id!r}"
    proj, tmpl = _new_task(sub, adapter, task_id, label)
    mods = sorted(sub.modules)
    for j, m in enumerate(mods):
        tick(progress, cancel, j, len(mods), f"projecting {m}")
        sb, a = effective_factors(adapter, m)
        proj.norms[m] = float(ops.lowrank_sqnorm(sb, a)) ** 0.5
        proj.coeffs[m], proj.fidelity[m] = encode(sub, m, adapter, tmpl)
    if warn_threshold is not None:
        cov = coverage(sub, adapter, proj)
        if cov < warn_threshold:
            import warnings

            warnings.warn(f"Low subspace coverage ({cov:.1%}) for adapter '{task_id}'. Reconstruction quality "
                          "may be poor. Consider absorb() to expand the basis.", stacklevel=2)
    return proj


def coverage(sub: Any, adapter: LoRAWeights, proj: TaskProjection) -> float:
    """Mean coverage over modules (and, for pca, sides): see :meth:`project`."""
    vals: list[float] = []
    for m, b in sorted(sub.modules.items()):
        if b.kind != "pca":
            vals.append(1.0 - min(1.0, float(proj.fidelity[m])))
            continue
        for side, x in (("a", adapter.lora_a[m]), ("b", adapter.lora_b[m])):
            c = x.double().reshape(-1) - b.tensors[f"mean_{side}"].double()
            n = float(c.norm())
            if n < 1e-8:
                vals.append(1.0)
                continue
            comp = b.tensors[f"comp_{side}"].double()
            vals.append(1.0 - float((c - (c @ comp.T) @ comp).norm()) / n)
    return sum(vals) / len(vals) if vals else 1.0


def add_task(sub: Any, projection: TaskProjection) -> None:
    """Store a projection made by :meth:`project` (replaces a task of the same id)."""
    validate_task_id(projection.task_id)
    missing = sorted(set(sub.modules) - set(projection.coeffs))
    if missing:
        raise ValueError(f"projection {projection.task_id!r} lacks module '{missing[0]}'")
    sub.tasks[projection.task_id] = projection
    sub.saved_path = None


def absorb(sub: Any, adapter: LoRAWeights, new_task_id: str, *, allow_worse: bool = False,
           progress: ProgressFn | None = None, cancel: CancelLike | None = None) -> None:
    """Add a task and recompute the bases from the stored tasks' reconstructions plus the new adapter (see ``SharedSubspace.absorb``)."""
    validate_task_id(new_task_id)
    check_adapter(sub, adapter, f"adapter {new_task_id!r}")
    before = sub.fidelity()
    olds = {t: sub.reconstruct(t, pad_to_vllm=False) for t in sub.tasks if t != new_task_id}
    adapters = list(olds.values()) + [adapter]
    ids = list(olds) + [new_task_id]
    p = sub.params
    new = from_params(type(sub), adapters, BuildParams.from_manifest(sub.method, p, sub.dtype), ids,
                      prior=absorb_prior(sub, olds), progress=progress, cancel=cancel)
    for tid, old_w in olds.items():
        prev = sub.tasks[tid]
        proj = new.tasks[tid]
        for m in proj.fidelity:
            drift = proj.fidelity[m] * (proj.norms[m] / prev.norms[m]) if prev.norms.get(m) else 0.0
            proj.fidelity[m] = prev.fidelity[m] + drift
            proj.norms[m] = prev.norms[m]
        proj.ranks, proj.template, proj.original_bytes = prev.ranks, prev.template, prev.original_bytes
        proj.input_bytes, proj.input_bytes_fp16 = prev.input_bytes, prev.input_bytes_fp16
        proj.error_is_bound = True
    refuse_breaks(sub, f"absorbing {new_task_id!r}", before, new.fidelity(), allow_worse)
    sub.modules, sub.tasks = new.modules, new.tasks
    sub.quantized, sub.quantization = new.quantized, None
    sub.saved_path = None


def absorb_prior(sub: Any, olds: dict[str, LoRAWeights]) -> dict[str, dict[str, tuple[float, float]]] | None:
    """Each stored task's ``(offset, scale)`` per module for a rebuild from reconstructions (``None``: no error target).

    offset: the task's stored error (at most ``max_error``; unknown: 0), less half the
    storage epsilon, so that a task at the target may still move by rounding;
    scale: ‖reconstruction‖/‖original‖, which turns an error relative to the
    reconstruction into one relative to the original.
    """
    if error_target_of(sub) is None:
        return None
    mx = sub.params.get("max_error")
    allow = float(torch.finfo(sub.dtype).eps) / 2
    prior: dict[str, dict[str, tuple[float, float]]] = {}
    for tid, w in olds.items():
        prev = sub.tasks[tid]
        pm: dict[str, tuple[float, float]] = {}
        for m in sub.modules:
            e = prev.fidelity.get(m, math.nan)
            e = e if math.isfinite(e) else 0.0
            if mx is not None:
                e = min(e, mx)
            norig = prev.norms.get(m, 0.0)
            sb, a = effective_factors(w, m)
            nrec = float(ops.lowrank_sqnorm(sb, a)) ** 0.5
            pm[m] = (max(0.0, e - allow), nrec / norig if norig > 0 else 1.0)
        prior[tid] = pm
    return prior


def refuse_breaks(sub: Any, what: str, before: dict[str, dict[str, float]], after: dict[str, dict[str, float]],
                   allow_worse: bool) -> list[RuleBreak]:
    """The places where ``after`` breaks the error target; ``ErrorTargetError`` unless ``allow_worse``."""
    rule = sub.k_rule
    breaks = rule_breaks(rule, before, after, tolerance(sub.dtype), norms(sub))
    if breaks and not allow_worse:
        raise ErrorTargetError(breaks_message(what, rule, breaks, before, after)
                               + "; nothing was changed (allow_worse=True / --allow-worse accepts it)")
    return breaks


def target_breaks(sub: Any, before: dict[str, dict[str, float]],
                  after: dict[str, dict[str, float]] | None = None) -> list[RuleBreak]:
    """Where ``after`` (default: the current :meth:`fidelity`) breaks the k rule's error target that ``before`` met."""
    return rule_breaks(sub.k_rule, before, sub.fidelity() if after is None else after, tolerance(sub.dtype), norms(sub))


def norms(sub: Any) -> dict[str, dict[str, float]]:
    """Task → module → ‖ΔW‖ of the original (the weights of a per-task ``mean_error``)."""
    return {t: dict(p.norms) for t, p in sub.tasks.items()}


def absorb_incremental(sub: Any, adapter: LoRAWeights, task_id: str, *, allow_worse: bool = False,
                       progress: ProgressFn | None = None, cancel: CancelLike | None = None) -> TaskProjection:
    """Add a task in O(1) of N: stored tasks are not touched; bases grow by the few directions it needs (see ``SharedSubspace.absorb_incremental``)."""
    label = f"adapter {task_id!r}"
    proj, tmpl = _new_task(sub, adapter, task_id, label)
    pending: dict[str, dict[str, Tensor]] = {}  # module → its grown tensors, applied once the task is accepted
    mods = sorted(sub.modules)
    for j, m in enumerate(mods):
        tick(progress, cancel, j, len(mods), f"absorbing {m}")
        b = sub.modules[m]
        sb, a = effective_factors(adapter, m)
        proj.norms[m] = float(ops.lowrank_sqnorm(sb, a)) ** 0.5
        target = error_target_of(sub)
        if target is None:
            target = max((t.fidelity.get(m, 0.0) for t in sub.tasks.values() if t.task_id != task_id), default=0.0)
        if b.kind == "joint":
            u, v, c, e = extend_for_task(b.tensors["U"], b.tensors["V"], sb, a, adapter.module_rank(m), target, sub.dtype)
            if u is not b.tensors["U"] or v is not b.tensors["V"]:
                pending[m] = {"U": u, "V": v}
            proj.coeffs[m], proj.fidelity[m] = c, e
        elif b.kind == "pca":
            c, e = encode_pca(b, adapter.lora_a[m], adapter.lora_b[m], sb, tmpl, m, sub.dtype)
            if e > target:
                t = dict(b.tensors)
                for side, x in (("a", adapter.lora_a[m]), ("b", adapter.lora_b[m])):
                    resid = x.double().reshape(1, -1) - t[f"mean_{side}"].double()
                    t[f"comp_{side}"] = ops.gram_schmidt(t[f"comp_{side}"].double(), resid).to(sub.dtype)
                    t[f"sv_{side}"] = torch.cat([t[f"sv_{side}"], t[f"sv_{side}"].new_zeros(
                        t[f"comp_{side}"].shape[0] - t[f"sv_{side}"].shape[0])])
                grown = ModuleBasis(b.kind, b.shape, t, rank=b.rank, explained=b.explained)
                c, e = encode_pca(grown, adapter.lora_a[m], adapter.lora_b[m], sb, tmpl, m, sub.dtype)
                pending[m] = {f"comp_{side}": t[f"comp_{side}"] for side in ("a", "b")}
                pending[m].update({f"sv_{side}": t[f"sv_{side}"] for side in ("a", "b")})
            proj.coeffs[m], proj.fidelity[m] = c, e
        else:
            proj.coeffs[m], proj.fidelity[m] = encode_separate(sb, a, target, None, sub.dtype)
    before = sub.fidelity()
    after = {**before, task_id: dict(proj.fidelity)}
    refuse_breaks(sub, f"adding {task_id!r}", before, after, allow_worse)
    for m, grown_tensors in pending.items():
        sub.modules[m].tensors.update(grown_tensors)
        for key in grown_tensors:
            sub.quantized.pop((m, key), None)
    sub.tasks[task_id] = proj
    sub.saved_path = None
    return proj


def get_trainable_params(sub: Any, task_id: str, num_expand: int = 0) -> dict[str, Tensor]:
    """The task's coefficients as float32 leaf tensors with ``requires_grad`` (bases stay frozen) (see ``SharedSubspace.get_trainable_params``)."""
    proj = sub._task(task_id)
    if num_expand < 0:
        raise ValueError(f"num_expand must be >= 0, got {num_expand}")
    g = torch.Generator().manual_seed(len(sub.tasks) * 7919 + num_expand)
    if num_expand:
        sub.saved_path = None
        for m, b in sub.modules.items():
            t = b.tensors
            if b.kind == "joint":
                for key in ("U", "V"):
                    base = t[key].double().T
                    t[key] = ops.gram_schmidt(base, torch.randn(num_expand, base.shape[1], generator=g, dtype=torch.float64)).T.to(sub.dtype)
                    sub.quantized.pop((m, key), None)
            elif b.kind == "pca":
                for side in ("a", "b"):
                    base = t[f"comp_{side}"].double()
                    t[f"comp_{side}"] = ops.gram_schmidt(base, torch.randn(num_expand, base.shape[1], generator=g, dtype=torch.float64)).to(sub.dtype)
                    t[f"sv_{side}"] = torch.cat([t[f"sv_{side}"], t[f"sv_{side}"].new_zeros(t[f"comp_{side}"].shape[0] - t[f"sv_{side}"].shape[0])])
                    sub.quantized.pop((m, f"comp_{side}"), None)
    params: dict[str, Tensor] = {}
    for m, b in sub.modules.items():
        c = proj.coeffs[m]
        if b.kind == "joint":
            sig = c["c"].float() @ c["d"].float() if "c" in c else c["sigma"].float()
            full = torch.zeros(b.tensors["U"].shape[1], b.tensors["V"].shape[1])
            full[: sig.shape[0], : sig.shape[1]] = sig
            params[f"{m}.sigma"] = full.requires_grad_(True)
        elif b.kind == "pca":
            for side, key in (("a", "la"), ("b", "lb")):
                k = b.tensors[f"comp_{side}"].shape[0]
                full = torch.zeros(k)
                full[: c[key].shape[0]] = c[key].float()
                params[f"{m}.loadings_{side}"] = full.requires_grad_(True)
        else:
            params[f"{m}.lora_B"] = c["b"].float().clone().requires_grad_(True)
            params[f"{m}.lora_A"] = c["a"].float().clone().requires_grad_(True)
    return params


def set_trainable_params(sub: Any, task_id: str, params: dict[str, Tensor]) -> None:
    """Write coefficients from :meth:`get_trainable_params` back into the task (errors become unknown: NaN)."""
    proj = sub._task(task_id)
    names = {"sigma": ("sigma",), "loadings_a": ("la",), "loadings_b": ("lb",), "lora_B": ("b",), "lora_A": ("a",)}
    sub.saved_path = None
    for key, value in params.items():
        m, _, part = key.rpartition(".")
        if m not in sub.modules or part not in names:
            raise ValueError(f"unknown trainable parameter {key!r}")
        c = proj.coeffs[m]
        if part == "sigma":
            c.pop("c", None)
            c.pop("d", None)
        c[names[part][0]] = value.detach().to(sub.dtype).clone()
        proj.fidelity[m] = float("nan")
