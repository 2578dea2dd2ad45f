"""Ours: one column basis U (out×k_u) and one row basis V (in×k_v) per module, shared by all tasks.

Each task's update is ``ΔŴ_i = U Σ_i Vᵀ`` with ``Σ_i = Uᵀ ΔW_i V`` (k_u×k_v, stored
as is or as rank-r factors when smaller). With orthonormal U and V,
``‖ΔW_i − UΣ_iVᵀ‖² = ‖ΔW_i‖² − ‖Σ_i‖²``, so errors for every (k_u, k_v) come from
r×r products, and an error target picks the pair storing the fewest numbers. ``U`` spans the top eigenvectors of ``Σ_i ΔW_iΔW_iᵀ`` (``V``: of
``Σ_i ΔW_iᵀΔW_i``), found from the thin factors without forming d×d: a
randomized range sketch (exact when the summed ranks fit in ``sketch_rank``),
then a Rayleigh–Ritz step. The bases are blind to LoRA's r×r ambiguity
``B→BG, A→G⁻¹A``; they are then optionally refined by alternating updates
(Gabrielsson et al., "Compress then Serve", arXiv:2407.00066). The ``share``
variant builds U and V from the factors B_i and A_i themselves (the Share
paper's per-side column spaces); it only differs in the basis.

Everything runs in passes over an :class:`AdapterSource`, so the streaming
build (one adapter in memory) and the in-memory build are one code path. Each
pass is a map over shards of adapters, a combine and a finalize, run by an
:class:`~engine.executors.Executor` (in this process, or on Dask): passes 1–2 in
:mod:`.passes`, the coefficients' pass (:func:`coefficients_map`) here. (Above
450 lines: the basis choice, refinement and the coefficients' pass share the
per-module statistics and are one algorithm.)
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from .. import ops
from ..progress import ticker as _ticker  # the one progress combinator (engine/progress.py)
from .common import (
    AdapterSource,
    ModuleBasis,
    TaskProjection,
    config_template,
    effective_factors,
)
from .passes import (
    BUFFER_COLUMNS,
    Reader,
    _ModStats,
    _one_thread,
    _top_eig,
    as_reader,
    error_target,
    rank_for_error,
    read,
    sketch_widths,
    statistics,
    task_target,
)
from .precision import choose_core, choose_separate, finish, shared_bases
from .budget_build import BudgetTables, budgeted
from .bounded import bounded_passes, bounded_refine, bounded_statistics

__all__ = ["BUFFER_COLUMNS", "JointParams", "build_joint", "encode_joint", "encode_separate", "error_target",
           "extend_for_task", "joint_factors", "joint_module_k", "joint_steps", "one_k_for_all", "rank_for_error",
           "sketch_widths", "task_target"]


def _core(coeffs: dict[str, Tensor], rank: int) -> tuple[Tensor, Tensor]:
    """The task's core ``Σ̂ = L·R`` in the basis (float64): ``c``/``d`` as stored, ``sigma`` truncated to ``rank``."""
    if "c" in coeffs:
        return coeffs["c"].double(), coeffs["d"].double()
    sigma = coeffs["sigma"].double()
    if sigma.numel() == 0:
        return sigma.new_zeros(sigma.shape[0], 0), sigma.new_zeros(0, sigma.shape[1])
    p, s, qh = torch.linalg.svd(sigma, full_matrices=False)
    q = min(rank, s.numel(), int((s > s[0] * 1e-12).sum()) if s[0] > 0 else 0)
    return p[:, :q] * s[:q], qh[:q]


def joint_factors(u: Tensor, v: Tensor, coeffs: dict[str, Tensor], rank: int) -> tuple[Tensor, Tensor]:
    """Effective factors ``(B_eff out×q, A q×in)`` of ``U Σ Vᵀ`` with ``q ≤ rank`` (float32 math in float64)."""
    left, right = _core(coeffs, rank)  # ku×q, q×kv: the core may be rectangular
    if left.shape[1] == 0:
        return u.new_zeros(u.shape[0], 0, dtype=torch.float64), v.new_zeros(0, v.shape[0], dtype=torch.float64)
    return u[:, : left.shape[0]].double() @ left, right @ v[:, : right.shape[1]].double().T


def basis_grams(u: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """``(UᵀU, VᵀV)`` of a stored (rounded, so not exactly orthonormal) basis, in float64."""
    ud, vd = u.double(), v.double()
    return ud.T @ ud, vd.T @ vd


def encode_joint(u: Tensor, v: Tensor, sb: Tensor, a: Tensor, rank: int, dtype: torch.dtype, *,
                 grams: tuple[Tensor, Tensor] | None = None, n2: float | None = None) -> tuple[dict[str, Tensor], float]:
    """Coefficients of ``ΔW = sb·a`` in the (stored) basis ``u``, ``v``, rounded to ``dtype``, and the measured error.

    The error ``‖ΔW − UΣ̂Vᵀ‖`` is exact for the stored ``u``, ``v`` and rounded ``Σ̂``,
    through k×k products: ``‖ΔW‖² − 2⟨UᵀΔWV, Σ̂⟩ + tr(Σ̂ᵀ·UᵀU·Σ̂·VᵀV)``
    (``grams`` = :func:`basis_grams` and ``n2`` = ``‖ΔW‖²`` when known).
    """
    ud, vd = u.double(), v.double()
    ku, kv = ud.shape[1], vd.shape[1]
    sigma = (ud.T @ sb) @ (a @ vd)
    coeffs: dict[str, Tensor]
    q = min(rank, ku, kv)
    if ku and kv and q * (ku + kv) < ku * kv:  # rank-q factors are smaller than the ku×kv core
        p, s, qh = torch.linalg.svd(sigma, full_matrices=False)
        coeffs = {"c": (p[:, :q] * s[:q]).to(dtype), "d": qh[:q].to(dtype)}
    else:
        coeffs = {"sigma": sigma.to(dtype)}
    if n2 is None:
        n2 = float(ops.lowrank_sqnorm(sb, a))
    left, right = _core(coeffs, rank)
    if left.shape[1] == 0:
        return coeffs, (0.0 if n2 <= 0 else 1.0)
    gu, gv = grams if grams is not None else basis_grams(u, v)
    core = left @ right
    cross = float((sigma * core).sum())
    h2 = float(((core.T @ gu) @ (core @ gv)).diagonal().sum())
    err2 = max(0.0, n2 - 2.0 * cross + h2)
    if n2 <= 0.0:
        return coeffs, 0.0 if err2 <= 0.0 else float("inf")
    return coeffs, (err2 / n2) ** 0.5


def encode_separate(sb: Tensor, a: Tensor, max_error: float | None, q_fixed: int | None, dtype: torch.dtype) -> tuple[dict[str, Tensor], float]:
    """A task's module stored alone: its truncated SVD, rank the smallest meeting ``max_error`` (or ``q_fixed``)."""
    uu, s, vh = ops.lowrank_svd(sb, a)
    q = q_fixed if q_fixed is not None else rank_for_error(s, max_error if max_error is not None else 0.0)
    q = min(q, s.numel())
    coeffs = {"b": (uu[:, :q] * s[:q]).to(dtype), "a": vh[:q].to(dtype)}
    return coeffs, ops.lowrank_rel_error(sb, a, coeffs["b"], coeffs["a"])


@dataclass
class JointParams:
    """Parameters of a joint/share build."""

    basis: str = "delta"  # "delta" (joint) or "factors" (share)
    num_components: int | None = None
    variance_threshold: float = 0.6
    adaptive_k: bool = False
    max_error: float | None = None
    mean_error: float | None = None
    refine: int = 1
    hybrid: bool = True
    sketch_rank: int = 256
    dtype: torch.dtype = torch.float16
    separate_only: bool = False  # the "svd" baseline: every module stored alone
    #: ``fp16``: every tensor at ``dtype``; ``auto``: with an error target, each module's rank/core and the
    #: precision of each stored tensor chosen together, the fewest bytes meeting it (:mod:`.precision`)
    precision: str = "fp16"
    block_size: int = 64  # values per fp16 scale of the integer precisions
    #: out: ``(module, key)`` / ``(task, module, key)`` → QuantizedTensor of the tensors ``auto`` quantised
    quantized_out: dict[tuple[str, ...], Any] = field(default_factory=dict)
    #: task → module → ``(offset, scale)``: a task's error counts as ``offset + scale·error`` against the
    #: target (``absorb``: a stored task enters as its reconstruction, whose own error is ``offset``, and
    #: ``scale`` = ‖reconstruction‖/‖original‖ turns an error relative to it into one relative to the original)
    prior: dict[str, dict[str, tuple[float, float]]] | None = None

    def prior_of(self, task_id: str, module: str) -> tuple[float, float]:
        """``(offset, scale)`` of a task's errors in a module (``(0, 1)``: a task of its own)."""
        if not self.prior:
            return 0.0, 1.0
        return self.prior.get(task_id, {}).get(module, (0.0, 1.0))

    @property
    def target(self) -> float | None:
        """The per-task error a module stored alone must meet (the stricter of the two rules)."""
        return error_target(self.max_error, self.mean_error)


def _choose_k(m: str, st: _ModStats, p: JointParams, limit: int, n: int, shape: tuple[int, int]) -> tuple[int, int]:
    """``(k_u, k_v)``: square by the k/variance rules; for error targets the pair storing fewest numbers."""
    kmax = min(st.u.shape[1], st.v.shape[1]) if st.u is not None else 0
    if p.max_error is not None or p.mean_error is not None:
        if st.max_err is None or st.max_err.numel() == 0:
            return 0, 0
        ok = torch.ones_like(st.max_err, dtype=torch.bool)
        if p.max_error is not None:
            ok &= st.max_err <= p.max_error + 1e-12
        if p.mean_error is not None and budgeted(p):
            # mean_error per task over its modules: only the cores' precisions join the task's budget, so
            # the basis itself must leave every task of this module within it (else a task with a large error
            # here can end above its whole-update budget whatever the other modules do)
            ok &= st.max_err <= p.mean_error + 1e-12
        elif p.mean_error is not None:
            ok &= st.sum_err / max(n, 1) <= p.mean_error + 1e-12
        if not bool(ok.any()):  # not within the sketched width: the best the basis can do
            st.feasible = False
            return st.max_err.shape[0], st.max_err.shape[1]
        o, i = shape
        ku = torch.arange(1, st.max_err.shape[0] + 1, dtype=torch.float64)[:, None]
        kv = torch.arange(1, st.max_err.shape[1] + 1, dtype=torch.float64)[None, :]
        r = max(1, st.rank_sum // max(n, 1))
        cost = ku * o + kv * i + n * torch.minimum(ku * kv, torch.minimum(ku, kv).clamp(max=r) * (ku + kv))
        cost = torch.where(ok, cost + 1e-6 * (ku + kv), torch.full_like(cost, float("inf")))
        flat = int(torch.argmin(cost))
        return flat // cost.shape[1] + 1, flat % cost.shape[1] + 1
    if p.num_components is not None and not p.adaptive_k:
        if p.num_components > limit:
            raise ValueError(
                f"num_components={p.num_components} is too large for module '{m}': at most {limit} "
                "(min of out_features, in_features and the summed ranks)"
            )
        if p.num_components > min(st.width_u, st.width_v):
            raise ValueError(f"num_components={p.num_components} is more than the sketch holds for module '{m}' "
                             f"(sketch_rank={p.sketch_rank}); raise sketch_rank")
        k = min(p.num_components, kmax)
        return k, k
    if kmax == 0:
        return 0, 0
    ev = st.energy / st.norm2_sum if st.norm2_sum > 0 else torch.ones(kmax, dtype=torch.float64)
    ok2 = (ev >= p.variance_threshold - 1e-12).nonzero()
    k = int(ok2[0, 0]) + 1 if ok2.numel() else kmax
    return k, k


def one_k_for_all(p: JointParams) -> bool:
    """Whether every module gets the largest k any module needs (k by variance, not per module)."""
    return (not p.separate_only and not p.adaptive_k and p.max_error is None and p.mean_error is None
            and p.num_components is None)


def joint_steps(p: JointParams, n: int, n_modules: int, *, k_only: bool = False, bounded: bool = False) -> int:
    """Progress steps of :func:`build_joint` (or :func:`joint_module_k` with ``k_only``) over ``n`` adapters.

    ``bounded``: with the statistics of :mod:`.bounded` (more passes).
    """
    extra = bounded_passes(p, k_only=k_only) * n if bounded else 0
    if k_only:
        return 2 * n + n_modules + extra
    return (1 if p.separate_only else 3) * n + n_modules + (n if budgeted(p) else 0) + extra


def _statistics(reader: Reader, modules: list[str], shapes: dict[str, tuple[int, int]], p: JointParams, t: Any,
                rank_sums: dict[str, int] | None) -> dict[str, _ModStats]:
    """The statistics passes: held (every task's projections) or, for a reader past the budget, bounded."""
    if reader.bounded:
        return bounded_statistics(reader, modules, shapes, p, t, rank_sums)
    return statistics(reader, modules, shapes, p, t, rank_sums)


def _choose_all(modules: list[str], shapes: dict[str, tuple[int, int]], stats: dict[str, _ModStats], p: JointParams,
                t: Any, n: int) -> dict[str, tuple[int, int]]:
    """Each module's own ``(k_u, k_v)`` (before :func:`one_k_for_all` raises them to one k)."""
    chosen: dict[str, tuple[int, int]] = {}
    for m in modules:
        t(f"choosing k: {m}")
        if p.separate_only:
            continue
        o, i = shapes[m]
        st = stats[m]
        chosen[m] = _choose_k(m, st, p, min(o, i, st.rank_sum), n, (o, i))
    return chosen


def joint_module_k(source: AdapterSource | Reader, shapes: dict[str, tuple[int, int]], p: JointParams, *,
                   progress: Any = None, cancel: Any = None, rank_sums: dict[str, int] | None = None) -> dict[str, int]:
    """Each module's own k, from passes 1 and 2 alone: for a build in chunks where :func:`one_k_for_all` holds."""
    modules = sorted(shapes)
    reader = as_reader(source, shapes)
    t = _ticker(progress, cancel, joint_steps(p, len(reader), len(modules), k_only=True, bounded=reader.bounded))
    chosen = _choose_all(modules, shapes, _statistics(reader, modules, shapes, p, t, rank_sums), p, t, len(reader))
    return {m: max(kp) for m, kp in chosen.items()}


def _refine(st: _ModStats, ku: int, kv: int, rounds: int) -> tuple[Tensor, Tensor]:
    """Alternating updates of the first ``ku``/``kv`` directions inside the candidate spaces, from the stored projections.

    ``U`` ← top-k_u of ``Σ_i ΔW_iV(ΔW_iV)ᵀ``, then ``V`` ← top-k_v of ``Σ_i ΔW_iᵀU(ΔW_iᵀU)ᵀ``
    (Gabrielsson et al. 2024), restricted to the sketched spaces so that no pass
    over the adapters is needed. Returns the new ``(U_c, V_c)`` as K_u×k_u and K_v×k_v coordinates.
    """
    nu, nv = st.u.shape[1], st.v.shape[1]
    uc, vc = torch.eye(nu, ku, dtype=torch.float64), torch.eye(nv, kv, dtype=torch.float64)
    for _ in range(rounds):
        mu = torch.zeros(nu, nu, dtype=torch.float64)
        for pp, rr in zip(st.p, st.r):
            tt = rr @ vc  # r×k_v: ΔW V in the task's own r coordinates
            mu.addmm_(pp, (tt @ tt.T) @ pp.T)
        new_u = _top_eig(mu, ku, rtol=0.0)
        mv = torch.zeros(nv, nv, dtype=torch.float64)
        for pp, rr in zip(st.p, st.r):
            tt = pp.T @ new_u
            mv.addmm_(rr.T, (tt @ tt.T) @ rr)
        new_v = _top_eig(mv, kv, rtol=0.0)
        if new_u.shape[1] < ku or new_v.shape[1] < kv:  # degenerate: keep the Ritz directions
            break
        uc, vc = new_u, new_v
    return uc, vc


def _errors_at(st: _ModStats, uc: Tensor, vc: Tensor) -> list[float]:
    errs = []
    for pp, rr, n2 in zip(st.p, st.r, st.n2):
        e = float((uc.T @ pp @ rr @ vc).pow(2).sum())
        errs.append(max(0.0, (n2 - e) / n2) ** 0.5 if n2 > 0 else 0.0)
    return errs


def _better(base: list[float], new: list[float], n2: list[float], p: JointParams,
            prior: list[tuple[float, float]] | None = None) -> bool:
    """Whether the refined basis lowers the residual energy without breaking an error target."""
    def residual(errs: list[float]) -> float:
        return sum(e * e * w for e, w in zip(errs, n2))

    if not residual(new) < residual(base) * (1 - 1e-9):
        return False
    if prior:  # the target is on the errors as counted (offset + scale·error)
        base = [o + s * e for e, (o, s) in zip(base, prior)]
        new = [o + s * e for e, (o, s) in zip(new, prior)]
    if p.max_error is not None and max(new, default=0.0) > max(p.max_error, max(base, default=0.0)):
        return False
    n = max(len(new), 1)
    return not (p.mean_error is not None and sum(new) / n > max(p.mean_error, sum(base) / n))


def build_joint(source: AdapterSource | Reader, shapes: dict[str, tuple[int, int]], p: JointParams, *,
                progress: Any = None, cancel: Any = None, k_all: int | None = None,
                rank_sums: dict[str, int] | None = None) -> tuple[dict[str, ModuleBasis], dict[str, TaskProjection]]:
    """Build the shared bases and every task's coefficients in three passes over ``source``.

    ``k_all``: where :func:`one_k_for_all` holds, the k to raise every module to
    (the largest over all modules, known beforehand when modules are built in chunks);
    by default the largest over ``shapes``. ``rank_sums``: module → summed ranks of
    the adapters (sizes the sketches; by default ``sketch_rank``).
    """
    modules = sorted(shapes)
    reader = as_reader(source, shapes)
    n = len(reader)
    t = _ticker(progress, cancel, joint_steps(p, n, len(modules), bounded=reader.bounded))
    bases: dict[str, ModuleBasis] = {}

    stats = _statistics(reader, modules, shapes, p, t, rank_sums)
    chosen = _choose_all(modules, shapes, stats, p, t, n)
    if one_k_for_all(p) and chosen:
        # one k for all modules (as the seed): the largest any module needs
        kk = max(max(kp) for kp in chosen.values()) if k_all is None else k_all
        chosen = {m: (min(kk, stats[m].u.shape[1], stats[m].v.shape[1]),) * 2 for m in modules}

    target = p.target

    def alone(m: str) -> bool:
        """Per-task storage when smaller, or when no shared basis within the sketch meets the target."""
        (o, i), st, (ku, kv) = shapes[m], stats[m], chosen[m]
        r_avg = max(1, st.rank_sum // max(n, 1))
        shared_est = ku * o + kv * i + n * min(ku * kv, min(ku, kv, r_avg) * (ku + kv))
        return target is not None and p.hybrid and (st.sep_rank_sum * (o + i) < shared_est or not st.feasible)

    refines = p.basis == "delta" and p.refine > 0 and not p.separate_only
    # bounded statistics: the refinement reads the adapters again, for all of the chunk's modules at once
    refined = bounded_refine(reader, stats, {m: chosen[m] for m in modules if not alone(m) and min(chosen[m]) > 0},
                             p, t) if reader.bounded and refines else {}
    for m in modules:
        o, i = shapes[m]
        if p.separate_only:
            bases[m] = ModuleBasis("separate", (o, i))
            continue
        st = stats[m]
        ku, kv = chosen[m]
        ev = (st.energy / st.norm2_sum).tolist() if st.norm2_sum > 0 else [1.0] * st.energy.numel()
        if alone(m):
            bases[m] = ModuleBasis("separate", (o, i), explained=ev)
            continue
        u, v = st.u[:, :ku], st.v[:, :kv]
        better = False
        if m in refined:
            uc, vc, better = refined[m]
        elif refines and ku > 0 and kv > 0:
            with _one_thread():
                uc, vc = _refine(st, ku, kv, p.refine)
                eu = torch.eye(st.u.shape[1], ku, dtype=torch.float64)
                evv = torch.eye(st.v.shape[1], kv, dtype=torch.float64)
                better = _better(_errors_at(st, eu, evv), _errors_at(st, uc, vc), st.n2, p, st.prior)
        if better:
            u, v = st.u @ uc, st.v @ vc
        bases[m] = ModuleBasis("joint", (o, i), {"U": u.to(p.dtype), "V": v.to(p.dtype)}, explained=ev)
    norms2 = {m: st.n2 for m, st in stats.items() if st.n2}
    del stats

    # final pass: coefficients in the stored (rounded) bases and the measured errors
    grams = {m: basis_grams(b.tensors["U"], b.tensors["V"]) for m, b in bases.items() if b.kind == "joint"}
    auto = p.precision == "auto" and target is not None
    cands = {m: shared_bases(b.tensors["U"].double(), b.tensors["V"].double(), block_size=p.block_size)
             for m, b in bases.items() if auto and b.kind == "joint" and b.k > 0}
    plain: dict[str, dict[str, Any]] = {m: {} for m in cands}
    if budgeted(p):  # mean_error per task over its modules: tables, one allocation, then the store pass
        # (runs in this process whatever the executor: the allocation needs every task's table)
        tasks: dict[str, TaskProjection] = {}
        BudgetTables(p, bases, cands).run(reader.source, modules, tasks, norms2, t)
        return bases, tasks
    shared = (modules, bases, grams, cands, {m: dict(zip(reader.task_ids, v)) for m, v in norms2.items()},
              replace(p, quantized_out={}))
    tasks, choices, quantized = reader.run(coefficients_map, coefficients_combine, shared, t, "coefficients")
    p.quantized_out.update(quantized)
    for m, per_task in choices.items():
        for tid, (per_cand, fp16) in per_task.items():
            for cand, ch in zip(cands[m], per_cand):
                cand.cores[tid] = ch
            plain[m][tid] = fp16
    for m, cs in cands.items():  # the shared module's cheapest basis and core precisions that meet the rule
        for c in cs:
            c.feasible = _meets_rule(p, [(c.cores[tid].error, *p.prior_of(tid, m)) for tid in c.cores])
        ok = [c for c in cs if c.feasible]
        if ok:
            best = min(ok, key=lambda c: c.nbytes)
        else:  # no precision meets it (nor fp16 does): stored as precision fp16 stores it
            best = cs[0]
            best.cores = plain[m]
        bases[m].tensors = {"U": best.u.value, "V": best.v.value}
        for key, st_ in (("U", finish(best.u)), ("V", finish(best.v))):
            if st_.qt is not None:
                p.quantized_out[(m, key)] = st_.qt
        for tid, ch in best.cores.items():
            tasks[tid].coeffs[m], tasks[tid].fidelity[m] = ch.coeffs(), ch.error
            p.quantized_out.update({(tid, m, k): qt for k, qt in ch.quantized().items()})
    return bases, tasks


def coefficients_map(shard: AdapterSource, shared: Any, tick: Any) -> tuple[dict[str, TaskProjection], dict, dict]:
    """The final pass over a shard: each task's coefficients in the stored (rounded) bases and its measured errors.

    Returns ``(tasks, choices, quantized)``: the shard's :class:`TaskProjection` records; for
    modules whose precision is chosen (``auto``), module → task → (the core chosen in each
    candidate basis, the fp16 core); the tensors quantised here (``JointParams.quantized_out``).
    """
    modules, bases, grams, cands, norms2, p = shared
    target = p.target
    tasks: dict[str, TaskProjection] = {}
    choices: dict[str, dict[str, Any]] = {m: {} for m in cands}
    quantized: dict[tuple[str, ...], Any] = {}
    for _, tid, ad in read(shard):
        if tick is not None:
            tick(f"coefficients: {tid}")
        ranks = {m: ad.module_rank(m) for m in modules}
        orig = sum(ad.lora_a[m].numel() * ad.lora_a[m].element_size() + ad.lora_b[m].numel() * ad.lora_b[m].element_size()
                   for m in modules)
        proj = TaskProjection(tid, {}, ranks=ranks, template=config_template(ad, tid), original_bytes=orig)
        for m in modules:
            sb, a = effective_factors(ad, m)
            r = ranks[m]
            n2 = norms2[m][tid] if m in norms2 else float(ops.lowrank_sqnorm(sb, a))
            proj.norms[m] = n2 ** 0.5
            b = bases[m]
            if b.kind == "separate":
                q_fixed = None
                if target is None:
                    _, s, _ = ops.lowrank_svd(sb, a)
                    q_fixed = _separate_rank(s, p, r)
                if p.precision == "auto" and target is not None:
                    ch = choose_separate(sb, a, task_target(target, *p.prior_of(tid, m)), q_fixed=q_fixed,
                                         block_size=p.block_size)
                    proj.coeffs[m], proj.fidelity[m] = ch.coeffs(), ch.error
                    quantized.update({(tid, m, k): qt for k, qt in ch.quantized().items()})
                    continue
                proj.coeffs[m], proj.fidelity[m] = encode_separate(sb, a, task_target(target, *p.prior_of(tid, m)),
                                                                   q_fixed, p.dtype)
                continue
            if m in cands:
                tt = task_target(target, *p.prior_of(tid, m))
                with _one_thread():
                    choices[m][tid] = ([choose_core(cand, sb, a, r, tt, n2, block_size=p.block_size) for cand in cands[m]],
                                       choose_core(cands[m][0], sb, a, r, None, n2))  # all fp16: as precision fp16 stores it
                continue
            if b.k == 0:
                proj.coeffs[m] = {"sigma": torch.zeros(b.tensors["U"].shape[1], b.tensors["V"].shape[1], dtype=p.dtype)}
                proj.fidelity[m] = 0.0 if proj.norms[m] == 0 else 1.0
                continue
            with _one_thread():
                proj.coeffs[m], proj.fidelity[m] = encode_joint(b.tensors["U"], b.tensors["V"], sb, a, r, p.dtype,
                                                                grams=grams[m], n2=n2)
        tasks[tid] = proj
    return tasks, choices, quantized


def coefficients_combine(x: tuple[dict, dict, dict], y: tuple[dict, dict, dict]) -> tuple[dict, dict, dict]:
    """Two neighbouring shards' records, the tasks of ``x`` first."""
    return ({**x[0], **y[0]}, {m: {**c, **y[1].get(m, {})} for m, c in x[1].items()}, {**x[2], **y[2]})


def _meets_rule(p: JointParams, errs: list[tuple[float, float, float]]) -> bool:
    """Whether ``(error, offset, scale)`` per task meet the build's rule: every counted error ≤ ``max_error``,
    their mean ≤ ``mean_error`` (a task's error counts as ``offset + scale·error``, see :attr:`JointParams.prior`)."""
    counted = [off + sc * e for e, off, sc in errs]
    if p.max_error is not None and any(e > p.max_error + 1e-12 for e in counted):
        return False
    return not (p.mean_error is not None and counted and sum(counted) / len(counted) > p.mean_error + 1e-12)


def _separate_rank(s: Tensor, p: JointParams, r: int) -> int:
    if p.num_components is not None:
        return min(p.num_components, s.numel())
    ev = ops.explained_variance_ratio(s)
    ok = (ev >= p.variance_threshold - 1e-12).nonzero()
    return int(ok[0, 0]) + 1 if ok.numel() else s.numel()


def extend_for_task(u: Tensor, v: Tensor, sb: Tensor, a: Tensor, rank: int, target: float, dtype: torch.dtype) -> tuple[Tensor, Tensor, dict[str, Tensor], float]:
    """Absorb one task without touching the others: append the fewest residual directions meeting ``target``.

    The existing columns of ``u`` and ``v`` are kept as they are, so every stored
    task's Σ stays valid (it just has zeros in the new rows and columns).

    Returns:
        ``(u', v', coeffs, error)``.
    """
    ud, vd = u.double(), v.double()
    coeffs, err = encode_joint(u, v, sb, a, rank, dtype)
    if err <= target or sb.shape[1] == 0:
        return u, v, coeffs, err
    res_b = sb - ud @ (ud.T @ sb)  # column residual factor (I−UUᵀ)·sB
    res_a = a - (a @ vd) @ vd.T  # row residual factor A·(I−VVᵀ)
    lu, _, _ = ops.lowrank_svd(res_b, a)
    _, _, rvh = ops.lowrank_svd(sb, res_a)
    best = (u, v, coeffs, err)
    for j in range(1, max(lu.shape[1], rvh.shape[0]) + 1):
        nu = ops.gram_schmidt(ud.T, lu[:, :j].T).T
        nv = ops.gram_schmidt(vd.T, rvh[:j]).T
        nu, nv = nu.to(dtype), nv.to(dtype)  # each side grows by what it needs (the core may be rectangular)
        c, e = encode_joint(nu, nv, sb, a, rank, dtype)
        best = (nu, nv, c, e)
        if e <= target:
            break
    return best
