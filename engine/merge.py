"""Merging LoRA adapters: linear, task arithmetic, cat, TIES and DARE.

Every method merges the *updates* ``ΔW_i = scale_i · B_i @ A_i``, never A and B
separately: the mean of the Bs times the mean of the As is not the mean of the
products (PEFT's ``combination_type="linear"`` does the factor-wise thing; our
``linear`` does not).

Output rank:

* ``"exact"`` (linear, task arithmetic, cat): the weighted sum of low-rank
  updates is itself low rank, so it is written exactly by concatenation,
  ``B = [w_1 s_1 B_1, …, w_N s_N B_N]``, ``A = [A_1; …; A_N]``, rank ``Σ r_i``.
* an integer ``k``: the best rank-``k`` approximation. For the exact-representable
  methods it is computed from the stacked factors through two thin QRs and an
  SVD of a ``Σr × Σr`` core, never forming ``out × in``. TIES and DARE act on
  single entries of ΔW, so they form the dense updates of *one module at a time*
  (a few ``out × in`` buffers) and truncate that module's merged ΔW by SVD.
* ``"auto"`` / ``None``: ``"exact"`` where possible, else the largest input rank
  (PEFT's default ``svd_rank``).

The relative ΔW error of the truncation, ``‖ΔW − ΔW_k‖_F / ‖ΔW‖_F``, is reported
per module in :class:`MergeResult`.

The vlora-style functions (:func:`task_arithmetic`, :func:`ties_merge`,
:func:`dare_merge`, :func:`linear_merge`, :func:`cat_merge`) return the merged
:class:`~engine.types.LoRAWeights`; :func:`merge_adapters` returns the full
:class:`MergeResult` (weights, errors, parameters, warnings).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import ops
from .io.local import check_compatible
from .progress import CancelLike, ProgressFn, tick
from .types import LoRAWeights

#: Methods whose result is a sum of low-rank updates (exact by concatenation).
EXACT_METHODS = ("linear", "task_arithmetic", "cat")
#: Methods that act on single entries of ΔW (dense per module).
DENSE_METHODS = ("ties", "dare")
#: Every method name :func:`merge_adapters` takes.
METHOD_NAMES = EXACT_METHODS + DENSE_METHODS
#: Methods whose weights default to ``1/N`` each (the seed's default: a weighted average).
_MEAN_DEFAULT = ("linear", "task_arithmetic", "dare")

#: Below this ``min(out, in)`` a dense module is truncated with a full SVD; above
#: it with a seeded randomized SVD (the error reported is measured either way).
_FULL_SVD_MAX_DIM = 1024
_COMPUTE_DTYPE = torch.float32


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
    from .io.header import strip_prefix

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
    from .io.header import strip_prefix

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


# -- low-rank math ---------------------------------------------------------------


def _effective_factors(adapters: Sequence[LoRAWeights], weights: Sequence[float], module: str) -> tuple[Tensor, Tensor]:
    """Stacked ``(B_eff, A)`` with ``B_eff @ A = Σ w_i ΔW_i`` (scale folded into B)."""
    bs = [a.lora_b[module].to(_COMPUTE_DTYPE) * (w * a.scale(module)) for a, w in zip(adapters, weights)]
    as_ = [a.lora_a[module].to(_COMPUTE_DTYPE) for a in adapters]
    return torch.cat(bs, dim=1), torch.cat(as_, dim=0)


def _pad_rank(b: Tensor, a: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Zero-pad factors to exactly rank ``k`` (as PEFT does) so every module has the asked rank."""
    r = a.shape[0]
    if r >= k:
        return b, a
    b = torch.cat([b, b.new_zeros(b.shape[0], k - r)], dim=1)
    a = torch.cat([a, a.new_zeros(k - r, a.shape[1])], dim=0)
    return b, a


def truncate_factors(b: Tensor, a: Tensor, rank: int) -> tuple[Tensor, Tensor, float, float]:
    """Best rank-``rank`` approximation of ``b @ a`` without forming it.

    ``b = Q_b R_b`` and ``aᵀ = Q_a R_a`` (thin QR), so ``b @ a = Q_b (R_b R_aᵀ) Q_aᵀ``
    and the SVD of the small core gives the SVD of the product (Eckart–Young).

    Returns:
        ``(B_k, A_k, relative_error, norm)`` with ``B_k @ A_k`` the truncation,
        ``relative_error = ‖b a − B_k A_k‖_F / ‖b a‖_F`` from the discarded
        singular values, and ``norm = ‖b a‖_F``. Factors are zero-padded to
        ``rank`` when the product has lower rank.
    """
    if b.shape[1] <= rank:
        norm = ops.lowrank_norm(b, a)
        pb, pa = _pad_rank(b, a, rank)
        return pb, pa, 0.0, norm
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    k = min(rank, s.numel())
    s2 = s.double() ** 2
    total = float(s2.sum())
    tail = float(s2[k:].sum())
    b_k = qb @ (u[:, :k] * s[:k])
    a_k = vh[:k] @ qa.T
    b_k, a_k = _pad_rank(b_k, a_k, rank)
    err = math.sqrt(tail / total) if total > 0 else 0.0
    return b_k, a_k, err, math.sqrt(total)


def _dense_delta(adapter: LoRAWeights, module: str) -> Tensor:
    # Same op order as PEFT's get_delta_weight, so TIES' top-k picks the same entries.
    return (adapter.lora_b[module].to(_COMPUTE_DTYPE) @ adapter.lora_a[module].to(_COMPUTE_DTYPE)) * adapter.scale(module)


def svd_truncate_dense(delta: Tensor, rank: int, *, seed: int = 0, niter: int = 4) -> tuple[Tensor, Tensor, float, float]:
    """Rank-``rank`` factors of a dense update and the relative error they cost.

    A full SVD when ``min(out, in) <= 1024`` (optimal); above that a seeded
    randomized SVD (range finder with ``niter`` power iterations, oversampling
    ``max(10, rank)``), which is near-optimal for decaying spectra. The error
    returned is measured, ``‖ΔW − B A‖_F / ‖ΔW‖_F``, whichever path ran.

    Returns:
        ``(B, A, relative_error, norm)``, factors zero-padded to ``rank``.
    """
    out_f, in_f = delta.shape
    n = min(out_f, in_f)
    norm = float(torch.linalg.vector_norm(delta))
    if norm == 0.0:
        return delta.new_zeros(out_f, rank), delta.new_zeros(rank, in_f), 0.0, 0.0
    k = min(rank, n)
    if n <= _FULL_SVD_MAX_DIM or k + max(10, k) >= n:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        b = u[:, :k] * s[:k]
        a = vh[:k]
        s2 = s.double() ** 2
        err = math.sqrt(float(s2[k:].sum()) / float(s2.sum())) if float(s2.sum()) > 0 else 0.0
    else:
        q = min(n, k + max(10, k))
        g = torch.Generator().manual_seed(seed)
        omega = torch.randn(in_f, q, generator=g, dtype=delta.dtype)
        basis = torch.linalg.qr(delta @ omega).Q
        for _ in range(niter):
            z = torch.linalg.qr(delta.T @ basis).Q
            basis = torch.linalg.qr(delta @ z).Q
        uc, s, vh = torch.linalg.svd(basis.T @ delta, full_matrices=False)
        b = (basis @ uc[:, :k]) * s[:k]
        a = vh[:k]
        resid = delta - b @ a
        err = float(torch.linalg.vector_norm(resid)) / norm
        del resid
    b, a = _pad_rank(b, a, rank)
    return b, a, err, norm


# -- entry-wise methods (TIES, DARE) ---------------------------------------------


def _mix_seed(seed: int, module_index: int, adapter_index: int) -> int:
    # splitmix-style mixing: distinct, reproducible streams per (module, adapter)
    x = (seed * 0x9E3779B97F4A7C15 + module_index * 0xBF58476D1CE4E5B9 + adapter_index * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) & (2**64 - 1)
    x ^= x >> 32
    return x & (2**63 - 1)


def dare_mask(shape: Sequence[int], drop_rate: float, seed: int, module_index: int, adapter_index: int) -> Tensor:
    """DARE's keep-mask for one adapter in one module (``True`` = kept).

    Each entry is kept with probability ``1 − drop_rate``, from a generator seeded
    by ``(seed, module_index, adapter_index)``, so a merge is reproducible and a
    second pass over the same module regenerates the same mask.
    """
    g = torch.Generator().manual_seed(_mix_seed(int(seed), int(module_index), int(adapter_index)))
    return torch.rand(tuple(shape), generator=g) >= drop_rate


def magnitude_threshold(delta: Tensor, density: float) -> float:
    """The magnitude at or above which TIES keeps ``int(density · numel)`` entries.

    Returns ``inf`` when nothing is kept and ``0.0`` when everything is (PEFT's
    ``magnitude_based_pruning`` keeps the top ``int(density · numel)`` by |value|).
    """
    n = delta.numel()
    k = int(density * n)
    if k <= 0:
        return math.inf
    if k >= n:
        return 0.0
    return float(torch.kthvalue(delta.abs().reshape(-1), n - k + 1).values)


def _ties_trim(delta: Tensor, threshold: float) -> Tensor:
    if threshold == 0.0:
        return delta
    if math.isinf(threshold):
        return torch.zeros_like(delta)
    return torch.where(delta.abs() >= threshold, delta, torch.zeros((), dtype=delta.dtype))


def _elected_merge(contribs, n: int) -> Tensor:
    """Sign election and disjoint mean over weighted task tensors produced by ``contribs(i)``.

    Pass 1 sums the weighted tensors to elect a sign per entry (``+`` on ties, as
    PEFT); pass 2 averages the tensors that agree with it. Only a few dense
    buffers of one module live at a time; ``contribs`` recomputes on demand.
    """
    total: Tensor | None = None
    for i in range(n):
        t = contribs(i)
        total = t if total is None else total.add_(t)
    assert total is not None
    elected = total >= 0
    del total
    num: Tensor | None = None
    count: Tensor | None = None
    for i in range(n):
        t = contribs(i)
        agree = torch.where(elected, t > 0, t < 0)
        part = torch.where(agree, t, torch.zeros((), dtype=t.dtype))
        num = part if num is None else num.add_(part)
        count = agree.to(torch.int32) if count is None else count.add_(agree)
    assert num is not None and count is not None
    return num.div_(count.clamp_(min=1))


def _ties_module(adapters: Sequence[LoRAWeights], weights: Sequence[float], module: str, density: float) -> Tensor:
    thresholds: list[float | None] = [None] * len(adapters)

    def contrib(i: int) -> Tensor:
        d = _dense_delta(adapters[i], module)
        if thresholds[i] is None:  # first pass: found while electing, reused by the second
            thresholds[i] = magnitude_threshold(d, density)
        return _ties_trim(d, thresholds[i]).mul_(weights[i])

    return _elected_merge(contrib, len(adapters))


def _dare_module(
    adapters: Sequence[LoRAWeights],
    weights: Sequence[float],
    module: str,
    module_index: int,
    drop_rate: float,
    seed: int,
    elect_sign: bool,
) -> Tensor:
    keep = 1.0 - drop_rate

    def contrib(i: int) -> Tensor:
        d = _dense_delta(adapters[i], module)
        if drop_rate > 0.0:
            mask = dare_mask(d.shape, drop_rate, seed, module_index, i)
            d = torch.where(mask, d, torch.zeros((), dtype=d.dtype)).div_(keep)
        return d.mul_(weights[i])

    if elect_sign:
        return _elected_merge(contrib, len(adapters))
    out = contrib(0)
    for i in range(1, len(adapters)):
        out.add_(contrib(i))
    return out


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


# -- vlora-style functions ----------------------------------------------------------


def task_arithmetic(
    adapters: Sequence[LoRAWeights],
    weights: Sequence[float] | None = None,
    *,
    rank: int | str | None = "exact",
    name: str | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelLike | None = None,
) -> LoRAWeights:
    """``Σ w_i ΔW_i``, weights used as given; by default ``1/N`` each: the mean update (the seed's meaning).

    ``rank="exact"`` concatenates (PEFT's ``cat``); an int truncates by SVD (PEFT's
    ``svd``, same definition). See :func:`merge_adapters` for the errors. Unlike the
    seed, the updates ΔW are merged, not A and B separately (docs/MIGRATING.md).

    Raises:
        ValueError: no adapters (``"need at least one adapter"``) or a weight count
            that does not match (``"weights length"``).
    """
    return merge_adapters(
        adapters, "task_arithmetic", weights=weights, rank=rank, name=name, progress=progress, cancel=cancel
    ).weights


def linear_merge(
    adapters: Sequence[LoRAWeights],
    weights: Sequence[float] | None = None,
    *,
    rank: int | str | None = "exact",
    name: str | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelLike | None = None,
) -> LoRAWeights:
    """Weighted mean ``Σ w_i ΔW_i / Σ w_i`` of the updates (default: the plain mean).

    Unlike PEFT's ``combination_type="linear"``, which averages A and B
    separately (only right when all but one factor agree), this averages ΔW.
    """
    return merge_adapters(
        adapters, "linear", weights=weights, rank=rank, name=name, progress=progress, cancel=cancel
    ).weights


def cat_merge(
    adapters: Sequence[LoRAWeights],
    weights: Sequence[float] | None = None,
    *,
    name: str | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelLike | None = None,
) -> LoRAWeights:
    """Exact ``Σ w_i ΔW_i`` at rank ``Σ r_i``: PEFT's ``combination_type="cat"``."""
    return merge_adapters(adapters, "cat", weights=weights, name=name, progress=progress, cancel=cancel).weights


def ties_merge(
    adapters: Sequence[LoRAWeights],
    density: float = 0.5,
    weights: Sequence[float] | None = None,
    *,
    rank: int | str | None = None,
    name: str | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelLike | None = None,
) -> LoRAWeights:
    """TIES: trim each ΔW to its top ``density`` entries by magnitude, elect a sign, disjoint mean.

    Per entry: ``τ_i = w_i · trim(ΔW_i)``, the elected sign is that of ``Σ τ_i``
    (``+`` on a tie), and the result is the mean of the ``τ_i`` that carry it.
    Then truncated to ``rank`` (default: the largest input rank) by SVD.

    Where this differs from PEFT's ``ties_svd``: PEFT elects the sign from the
    *unweighted* trimmed tensors and applies the weights afterwards; we weight
    first (as the TIES paper and mergekit do), so a negative weight really
    flips a task. With equal positive weights the two agree exactly.
    """
    return merge_adapters(
        adapters, "ties", weights=weights, rank=rank, density=density, name=name, progress=progress, cancel=cancel
    ).weights


def dare_merge(
    adapters: Sequence[LoRAWeights],
    drop_rate: float = 0.5,
    weights: Sequence[float] | None = None,
    seed: int | None = None,
    *,
    rank: int | str | None = None,
    elect_sign: bool = False,
    name: str | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelLike | None = None,
) -> LoRAWeights:
    """DARE: drop each entry of each ΔW with probability ``drop_rate``, rescale, then sum.

    ``τ_i = w_i · mask_i ⊙ ΔW_i / (1 − drop_rate)`` with ``w_i = 1/N`` by default (the
    seed's weighted average); the result is ``Σ τ_i``
    (DARE-linear, PEFT's ``dare_linear_svd``) or, with ``elect_sign``, TIES' sign
    election and disjoint mean (DARE-TIES, PEFT's ``dare_ties_svd``; the same
    weighting caveat as :func:`ties_merge`). The expectation over masks equals
    task arithmetic. Masks come from per-(module, adapter) generators seeded by
    ``seed`` (:func:`dare_mask`), not from torch's global RNG as in PEFT.
    """
    return merge_adapters(
        adapters,
        "dare",
        weights=weights,
        rank=rank,
        drop_rate=drop_rate,
        seed=seed,
        elect_sign=elect_sign,
        name=name,
        progress=progress,
        cancel=cancel,
    ).weights


#: The seed's registry: name → merge function (``"average"`` is task arithmetic's weighted average).
MERGE_METHODS = {
    "average": task_arithmetic,
    "ties": ties_merge,
    "dare": dare_merge,
}


__all__ = [
    "MERGE_METHODS",
    "METHOD_NAMES",
    "MergeResult",
    "cat_merge",
    "dare_mask",
    "dare_merge",
    "linear_merge",
    "magnitude_threshold",
    "merge_adapters",
    "svd_truncate_dense",
    "task_arithmetic",
    "ties_merge",
    "truncate_factors",
]
