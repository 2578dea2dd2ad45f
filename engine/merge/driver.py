"""The merge driver: :func:`merge_adapters` checks its arguments, runs a method module by module and reports.

It returns a :class:`MergeResult` (weights, per-module errors, parameters, warnings);
the math is in :mod:`engine.merge.lowrank` and :mod:`engine.merge.entrywise`.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .. import ops
from ..io.compat import check_compatible
from ..progress import CancelLike, ProgressFn, tick
from ..types import LoRAWeights
from .entrywise import _dare_module, _ties_module
from .lowrank import _COMPUTE_DTYPE, _effective_factors, svd_truncate_dense, truncate_factors

#: Methods whose result is a sum of low-rank updates (exact by concatenation).
EXACT_METHODS = ("linear", "task_arithmetic", "cat")
#: Methods that act on single entries of ΔW (dense per module).
DENSE_METHODS = ("ties", "dare")
#: Every method name :func:`merge_adapters` takes.
METHOD_NAMES = EXACT_METHODS + DENSE_METHODS
#: Methods whose weights default to ``1/N`` each (the seed's default: a weighted average).
_MEAN_DEFAULT = ("linear", "task_arithmetic", "dare")

@dataclass
class MergeResult:
    """A merged adapter and what the merge cost.

    Attributes:
        weights: The merged adapter.
        method: ``linear``, ``task_arithmetic``, ``cat``, ``ties`` or ``dare``.
        params: The parameters used, resolved (weights, rank, density, seed, …).
        errors: Module → relative ΔW error of the rank truncation,
            ``‖ΔW − ΔW_k‖_F / ‖ΔW‖_F`` (0.0 when exact).
        norms: Module → ``‖ΔW‖_F`` of the untruncated merged update.
        warnings: Things the caller should know (e.g. dropped extra tensors).
        heads: Extra-tensor module (``modules_to_save`` head…) → ``identical``,
            ``from NAME`` or ``dropped`` (see ``head_from`` of :func:`merge_adapters`).
    """

    weights: LoRAWeights
    method: str
    params: dict[str, Any]
    errors: dict[str, float]
    norms: dict[str, float]
    warnings: list[str] = field(default_factory=list)
    heads: dict[str, str] = field(default_factory=dict)

    @property
    def max_error(self) -> float:
        """Largest per-module relative error."""
        return max(self.errors.values(), default=0.0)

    @property
    def mean_error(self) -> float:
        """Unweighted mean of the per-module relative errors."""
        return sum(self.errors.values()) / len(self.errors) if self.errors else 0.0

    @property
    def overall_error(self) -> float:
        """Relative error of all modules together (energy-weighted)."""
        total = sum(n * n for n in self.norms.values())
        if total <= 0:
            return 0.0
        lost = sum((self.errors[m] * self.norms[m]) ** 2 for m in self.errors)
        return math.sqrt(lost / total)

    @property
    def exact(self) -> bool:
        """Whether every module is written without truncation error."""
        return all(e == 0.0 for e in self.errors.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no tensors)."""
        w = self.weights
        return {
            "method": self.method,
            "params": {k: v for k, v in self.params.items()},
            "name": w.name,
            "rank": w.rank,
            "ranks": w.ranks,
            "num_modules": len(w.layer_names),
            "num_params": w.num_params,
            "max_error": self.max_error,
            "mean_error": self.mean_error,
            "overall_error": self.overall_error,
            "errors": dict(self.errors),
            "norms": dict(self.norms),
            "warnings": list(self.warnings),
            "heads": dict(self.heads),
        }


# -- argument handling ---------------------------------------------------------


def _resolve_weights(method: str, n: int, weights: Sequence[float] | None) -> list[float]:
    if weights is None:
        return [1.0 / n] * n if method in _MEAN_DEFAULT else [1.0] * n
    ws = [float(w) for w in weights]
    if len(ws) != n:
        raise ValueError(f"weights length ({len(ws)}) must match adapters ({n})")
    bad = [w for w in ws if not math.isfinite(w)]
    if bad:
        raise ValueError(f"weights: not finite: {bad}")
    if method == "linear":
        total = sum(ws)
        if abs(total) < 1e-12:
            raise ValueError(f"weights: linear merge normalizes by the sum of weights, which is {total}")
        ws = [w / total for w in ws]
    return ws


def _resolve_rank(method: str, rank: int | str | None) -> int | str:
    """``"exact"`` or a positive int (``"auto"`` resolves per method; ints may come as strings)."""
    if isinstance(rank, bool):
        raise ValueError(f"rank: expected 'exact', 'auto' or a positive integer, got {rank!r}")
    if rank is None or (isinstance(rank, str) and rank.strip().lower() in ("", "auto")):
        return "exact" if method in EXACT_METHODS else "auto"
    if isinstance(rank, str):
        text = rank.strip().lower()
        if text == "exact":
            rank = "exact"
        else:
            try:
                rank = int(text)
            except ValueError as exc:
                raise ValueError(f"rank: expected 'exact', 'auto' or a positive integer, got {rank!r}") from exc
    if rank == "exact":
        if method in DENSE_METHODS:
            raise ValueError(f"rank: {method} produces a dense update; give an integer rank (or 'auto')")
        return "exact"
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank: expected 'exact', 'auto' or a positive integer, got {rank!r}")
    if method == "cat":
        raise ValueError("rank: cat is exact by definition; use task_arithmetic for a truncated rank")
    return rank


def _check_fraction(name: str, value: float, *, upper_open: bool = False, lower_open: bool = False) -> float:
    v = float(value)
    if (not math.isfinite(v) or v < 0.0 or v > 1.0 or (upper_open and v >= 1.0)
            or (lower_open and v <= 0.0)):
        bound = ("(0" if lower_open else "[0") + (", 1)" if upper_open else ", 1]")
        raise ValueError(f"{name}: must be in {bound}, got {value!r}")
    return v


def _head_name(key: str) -> str:
    """The module an extra tensor belongs to: ``base_model.model.score.weight`` → ``score``."""
    from ..io.header import strip_prefix

    return strip_prefix(key).rsplit(".", 1)[0]


def _bitwise_equal(x: dict[str, Tensor], y: dict[str, Tensor]) -> bool:
    """Same keys, dtypes, shapes and bytes (NaN payloads and ``-0.0`` included)."""
    if x.keys() != y.keys():
        return False
    for k, t in x.items():
        u = y[k]
        if t.dtype != u.dtype or t.shape != u.shape:
            return False
        if not torch.equal(t.detach().contiguous().reshape(-1).view(torch.uint8),
                           u.detach().contiguous().reshape(-1).view(torch.uint8)):
            return False
    return True


def _merge_extras(
    adapters: Sequence[LoRAWeights], warnings: list[str], head_from: str | None = None
) -> tuple[dict[str, Tensor], list[str] | None, dict[str, str]]:
    """Extra tensors (``modules_to_save`` heads, LoRA biases, …) cannot be averaged meaningfully.

    Per head (the module an extra tensor belongs to): kept when every input that
    has it holds it bitwise equal; otherwise taken from the adapter named
    ``head_from`` (an input's name), or dropped. Each head taken from one of
    several different inputs, or dropped, adds a warning naming the adapters.

    Returns:
        ``(extra tensors, modules_to_save for the config or None, {head: what happened}}``,
        what happened being ``identical``, ``from NAME`` or ``dropped``.

    Raises:
        ValueError: ``head_from`` names no input.
    """
    from ..io.header import strip_prefix

    names = [a.name or f"adapter #{i}" for i, a in enumerate(adapters)]
    src: int | None = None
    if head_from is not None:
        if head_from not in names:
            raise ValueError(f"head_from: {head_from!r} is not one of the merged adapters ({', '.join(names)})")
        src = names.index(head_from)
    heads: dict[str, dict[int, dict[str, Tensor]]] = {}
    for i, a in enumerate(adapters):
        for k, t in a.extra_tensors.items():
            heads.setdefault(_head_name(k), {}).setdefault(i, {})[k] = t
    kept: dict[str, Tensor] = {}
    report: dict[str, str] = {}
    for head in sorted(heads):
        by = heads[head]
        owners = list(by)
        first = by[owners[0]]
        if all(_bitwise_equal(first, by[j]) for j in owners[1:]):
            kept.update(first)
            report[head] = "identical" if len(owners) > 1 else f"from {names[owners[0]]}"
            continue
        holders = ", ".join(names[j] for j in owners)
        if src is not None and src in by:
            kept.update(by[src])
            report[head] = f"from {names[src]}"
            dropped = [names[j] for j in owners if j != src and not _bitwise_equal(by[src], by[j])]
            warnings.append(f"head '{head}' (modules_to_save) differs between {holders}: kept {names[src]}'s "
                            f"(--head-from), dropped {', '.join(dropped)}'s")
        else:
            report[head] = "dropped"
            hint = f"{names[src]} has no '{head}'" if src is not None else "keep one with --head-from NAME"
            warnings.append(f"head '{head}' (modules_to_save) differs between {holders}: dropped ({hint})")
    mts: list[str] = []
    kept_parts = [strip_prefix(k).split(".") for k in kept]
    for a in adapters:
        for n in a.metadata.get("modules_to_save") or []:
            if n not in mts and any(n in parts for parts in kept_parts):
                mts.append(n)
    return kept, (mts or None), report


# -- the driver ------------------------------------------------------------------


def merge_adapters(
    adapters: Sequence[LoRAWeights],
    method: str = "task_arithmetic",
    *,
    weights: Sequence[float] | None = None,
    rank: int | str | None = None,
    density: float = 0.5,
    drop_rate: float = 0.5,
    seed: int | None = None,
    elect_sign: bool = False,
    name: str | None = None,
    head_from: str | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelLike | None = None,
) -> MergeResult:
    """Merge adapters' updates with one method and return the result with its errors.

    Args:
        adapters: Two or more (one is allowed) adapters on the same base model,
            with the same modules and shapes; ranks, alphas and rsLoRA may differ.
        method: ``linear`` (weighted mean, weights normalized to sum 1; default the
            plain mean), ``task_arithmetic`` (``Σ w_i ΔW_i``, weights used as given,
            default ``1/N`` each: the mean, as the seed), ``cat`` (``Σ w_i ΔW_i``,
            always exact, default weights 1), ``ties`` (default weights 1) or
            ``dare`` (default ``1/N``, so that its expectation is task arithmetic's).
        weights: One weight per adapter; negative weights subtract.
        rank: ``"exact"``, ``"auto"``/``None`` or an int (truncated SVD).
        density: TIES: fraction of entries of each ΔW kept by magnitude, in (0, 1].
        drop_rate: DARE: probability of dropping each entry (kept ones are
            rescaled by ``1/(1 − drop_rate)``).
        seed: DARE: seed of the drop masks; ``None`` draws one (recorded in
            ``params`` so the merge can be repeated).
        elect_sign: DARE: combine with TIES' sign election and disjoint mean
            (DARE-TIES) instead of a weighted sum (DARE-linear).
        name: Name of the merged adapter; defaults to ``merged-<method>``.
        head_from: Name of the input whose extra tensors (``modules_to_save``
            heads such as a classifier) to keep where the inputs' differ. Heads
            that are bitwise equal across the inputs holding them are kept
            anyway; a differing head without ``head_from`` is dropped, with a warning.
        progress: Called once per module.
        cancel: Checked once per module; raises :class:`~engine.errors.JobCancelled`.

    Returns:
        A :class:`MergeResult`. The merged adapter keeps the first adapter's
        ``lora_alpha``/``use_rslora``; B absorbs the scale so ``ΔW`` is exact.

    Raises:
        ValueError: an unknown method or a bad weight, rank, density or drop rate.
        IncompatibleAdaptersError: different base models, modules or shapes.
    """
    if method not in METHOD_NAMES:
        raise ValueError(f"method: unknown merge method {method!r}; choose from {', '.join(METHOD_NAMES)}")
    adapters = list(adapters)
    if not adapters:
        raise ValueError("adapters: no adapters given (need at least one adapter to merge)")
    n = len(adapters)
    ws = _resolve_weights(method, n, weights)
    rk = _resolve_rank(method, rank)
    params: dict[str, Any] = {"weights": ws, "rank": rk}
    if method == "ties":
        params["density"] = _check_fraction("density", density, lower_open=True)
    if method == "dare":
        params["drop_rate"] = _check_fraction("drop_rate", drop_rate, upper_open=True)
        if seed is None:
            seed = secrets.randbits(31)
        params["seed"] = int(seed)
        params["elect_sign"] = bool(elect_sign)
    report = check_compatible(adapters)
    warnings = list(report.warnings)
    extras, mts, heads = _merge_extras(adapters, warnings, head_from)  # before the work: a bad head_from fails fast
    modules = report.modules
    if rk == "auto":
        rk = max(a.module_rank(m) for a in adapters for m in modules)
        params["rank"] = rk

    factors: dict[str, tuple[Tensor, Tensor]] = {}
    errors: dict[str, float] = {}
    norms: dict[str, float] = {}
    total = len(modules)
    for mi, m in enumerate(modules):
        tick(progress, cancel, mi, total, f"{method}: {m}")
        if method in EXACT_METHODS:
            b, a = _effective_factors(adapters, ws, m)
            if rk == "exact":
                factors[m] = (b, a)
                errors[m] = 0.0
                norms[m] = ops.lowrank_norm(b, a)
            else:
                bk, ak, errors[m], norms[m] = truncate_factors(b, a, int(rk))
                factors[m] = (bk, ak)
        else:
            if method == "ties":
                dense = _ties_module(adapters, ws, m, params["density"])
            else:
                dense = _dare_module(adapters, ws, m, mi, params["drop_rate"], params["seed"], params["elect_sign"])
            bk, ak, errors[m], norms[m] = svd_truncate_dense(dense, int(rk), seed=mi)
            del dense
            factors[m] = (bk, ak)
    tick(progress, cancel, total, total, f"{method}: done")

    out_dtype = adapters[0].lora_a[modules[0]].dtype if modules else _COMPUTE_DTYPE
    merged = adapters[0].replace_factors(
        factors,
        rank=int(rk) if rk != "exact" else None,
        name=name or f"merged-{method}",
        dtype=out_dtype,
    )
    merged.extra_tensors = extras
    merged.metadata["modules_to_save"] = mts
    merged.source = None
    return MergeResult(weights=merged, method=method, params=params, errors=errors, norms=norms, warnings=warnings,
                       heads=heads)
