"""The joint/share build's statistics in bounded memory, whatever the number of adapters.

The held statistics (:func:`.passes.statistics`) keep every task's projections onto
the sketched spaces (K×r and r×K per task: N·K·r numbers per side and module), so
that the Ritz step, the error tables and the refinement read them from memory. Past
``memory_budget_mb`` (thousands of adapters, or one module alone larger than the
budget) the build keeps sums instead and reads the adapters once more where a step
needs every task (:func:`bounded_statistics`, :func:`bounded_refine`):

* *Gram sums* (instead of pass 2): ``M_u = Σ_i P_i(A_iA_iᵀ)P_iᵀ``, ``M_v = Σ_i R_iᵀ(sB_iᵀsB_i)R_i``
  (K×K; ``P_i = Q_uᵀsB_i``, ``R_i = A_iQ_v``) and each task's ‖ΔW_i‖² and prior (N
  scalars): all the Rayleigh–Ritz step needs;
* *error tables*: every task projected onto the Ritz directions, its error for each
  (k_u, k_v) (or k) folded at once into the worst and the summed error (combine: max, sum);
* *refinement* (``refine`` rounds): per round one pass for ``Σ_i ΔW_iV(ΔW_iV)ᵀ`` and
  one for ``Σ_i ΔW_iᵀU(ΔW_iᵀU)ᵀ`` (K×K, in the sketched coordinates), then one pass for the
  residual, worst and summed errors before and after (what ``_better`` compares).

Held per module: the sketch (``dim × width`` per side, twice in pass 1), K×K sums and
tables, one buffer of factors, and N scalars; every map returns sums, so Dask moves
small results. The arithmetic per task is the held build's (same products, same
buffering), so the results agree with it to float rounding. The cost: 2–5 more passes
over the adapters (tables; with ``refine`` 2 per round and 1 for the errors).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .common import AdapterSource
from .passes import (
    BUFFER_COLUMNS,
    Reader,
    _Buffer,
    _ModStats,
    _one_thread,
    _singular_values,
    _top_eig,
    rank_for_error,
    read,
    sketch_spaces,
    task_errors,
    task_target,
)

if TYPE_CHECKING:
    from .joint import JointParams

_F64 = torch.float64


def bounded_passes(p: Any, *, k_only: bool = False) -> int:
    """Passes over the adapters the bounded statistics add to the held build's (tables; refinement)."""
    if p.separate_only:
        return 0
    extra = 1  # the error tables
    if not k_only and p.basis == "delta" and p.refine > 0:
        extra += 2 * p.refine + 1
    return extra


def _projected(shard: AdapterSource, modules: list[str], spaces: dict[str, tuple[Tensor, ...]], tick: Any,
               label: str) -> Iterator[tuple[str, str, Tensor, Tensor, Tensor, Tensor]]:
    """``(module, task, sB_i, A_i, Q_uᵀsB_i, A_iQ_v)`` for every task of the shard, in task order per module.

    The products are made :data:`BUFFER_COLUMNS` factor columns at a time, as pass 2 of the held build makes them.
    """
    bufs = {m: _Buffer(BUFFER_COLUMNS) for m in modules}
    tids: dict[str, list[str]] = {m: [] for m in modules}

    def flush(m: str) -> Iterator[tuple[str, str, Tensor, Tensor, Tensor, Tensor]]:
        if not bufs[m].ranks:
            return
        sbs, as_, sb, a = bufs[m].take()
        q_u, q_v = spaces[m][0], spaces[m][1]
        pu, rv = q_u.T @ sb, a @ q_v
        off = 0
        for tid, sbi, ai in zip(tids[m], sbs, as_):
            c = ai.shape[0]
            yield m, tid, sbi, ai, pu[:, off:off + c], rv[off:off + c]
            off += c
        tids[m] = []

    for _, tid, ad in read(shard):
        if tick is not None:
            tick(f"{label}: {tid}")
        for m in modules:
            bufs[m].put(ad, m)
            tids[m].append(tid)
            if bufs[m].full:
                yield from flush(m)
    for m in modules:
        yield from flush(m)


@dataclass
class _Sums:
    """One module's partial sums over a shard (any pass): K×K matrices, tables, and per-task scalars in task order."""

    mu: Tensor | None = None
    mv: Tensor | None = None
    n2: list[float] = field(default_factory=list)
    prior: list[tuple[float, float]] = field(default_factory=list)
    norm2_sum: float = 0.0
    sep_rank_sum: int = 0
    energy: Tensor | None = None
    max_err: Tensor | None = None
    sum_err: Tensor | None = None
    #: errors before/after refinement: [residual, worst counted, summed counted] each
    before: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    after: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return b if a is None else a if b is None else a + b


def sums_combine(x: dict[str, _Sums], y: dict[str, _Sums]) -> dict[str, _Sums]:
    """Two neighbouring shards' sums: added (worst errors: the larger), per-task scalars ``x``'s first."""
    out = {}
    for m, a in x.items():
        b = y[m]
        mx = a.max_err if b.max_err is None else b.max_err if a.max_err is None else torch.maximum(a.max_err, b.max_err)
        out[m] = _Sums(_add(a.mu, b.mu), _add(a.mv, b.mv), a.n2 + b.n2, a.prior + b.prior, a.norm2_sum + b.norm2_sum,
                       a.sep_rank_sum + b.sep_rank_sum, _add(a.energy, b.energy), mx, _add(a.sum_err, b.sum_err),
                       [a.before[0] + b.before[0], max(a.before[1], b.before[1]), a.before[2] + b.before[2]],
                       [a.after[0] + b.after[0], max(a.after[1], b.after[1]), a.after[2] + b.after[2]])
    return out


def grams_map(shard: AdapterSource, shared: Any, tick: Any) -> dict[str, _Sums]:
    """The Ritz step's Gram sums over a shard, and every task's ‖ΔW‖², prior and separate rank (``shared``: modules, spaces, params)."""
    modules, spaces, p = shared
    delta, target = p.basis == "delta", p.target
    parts = {m: _Sums(torch.zeros(spaces[m][0].shape[1], spaces[m][0].shape[1], dtype=_F64),
                      torch.zeros(spaces[m][1].shape[1], spaces[m][1].shape[1], dtype=_F64)) for m in modules}
    for m, tid, sb, a, pp, rr in _projected(shard, modules, spaces, tick, "statistics"):
        s = parts[m]
        ga, gb = a @ a.T, sb.T @ sb
        n2 = float((ga * gb).sum())
        s.n2.append(n2)
        s.norm2_sum += n2
        off, sc = p.prior_of(tid, m)
        s.prior.append((off, sc))
        if target is not None and p.hybrid:
            with _one_thread():
                s.sep_rank_sum += rank_for_error(_singular_values(ga, gb), task_target(target, off, sc))
        if delta:  # as _ritz sums them
            s.mu.addmm_(pp, ga @ pp.T)
            s.mv.addmm_(rr.T, gb @ rr)
        else:
            s.mu.addmm_(pp, pp.T)
            s.mv.addmm_(rr.T, rr, alpha=float(gb.trace()) / max(float(ga.trace()), 1e-300))
    return parts


def _ritz_projections(m: str, spaces: dict[str, tuple[Tensor, ...]], pp: Tensor, rr: Tensor) -> tuple[Tensor, Tensor]:
    wu, wv = spaces[m][2], spaces[m][3]
    return wu.T @ pp, rr @ wv


def tables_map(shard: AdapterSource, shared: Any, tick: Any) -> dict[str, _Sums]:
    """Every task's energy per k and error per (k_u, k_v) (or k) over a shard: summed, and the worst (``shared``: modules, spaces, params)."""
    modules, spaces, p = shared
    grid = p.target is not None
    parts = {m: _Sums() for m in modules}
    for m, tid, sb, a, pp, rr in _projected(shard, modules, spaces, tick, "error tables"):
        pp, rr = _ritz_projections(m, spaces, pp, rr)
        if min(pp.shape[0], rr.shape[1]) == 0:
            continue
        n2 = float(((a @ a.T) * (sb.T @ sb)).sum())
        with _one_thread():
            e, err = task_errors(pp, rr, n2, *p.prior_of(tid, m), grid)
        s = parts[m]
        s.energy = e.clone() if s.energy is None else s.energy + e
        s.max_err = err if s.max_err is None else torch.maximum(s.max_err, err)
        s.sum_err = err if s.sum_err is None else s.sum_err + err
    return parts


def bounded_statistics(reader: Reader, modules: list[str], shapes: dict[str, tuple[int, int]], p: JointParams, t: Any,
                       rank_sums: dict[str, int] | None = None) -> dict[str, _ModStats]:
    """:func:`.passes.statistics` in bounded memory: pass 1, the Gram sums, the Ritz step, then the error tables' pass."""
    stats = sketch_spaces(reader, modules, shapes, p, t, rank_sums)
    if p.separate_only:
        return stats
    q = replace(p, quantized_out={})
    spaces = {m: (stats[m].q_u, stats[m].q_v) for m in modules}
    sums = reader.run(grams_map, sums_combine, (modules, spaces, q), t, "statistics")
    with _one_thread():
        for m in modules:
            st, s = stats[m], sums[m]
            st.n2, st.prior, st.norm2_sum, st.sep_rank_sum = s.n2, s.prior, s.norm2_sum, s.sep_rank_sum
            wu, wv = _top_eig(s.mu), _top_eig(s.mv)
            st.ritz = (st.q_u, st.q_v, wu, wv)
            st.u, st.v = st.q_u @ wu, st.q_v @ wv
            st.q_u = st.q_v = None
    del sums
    spaces = {m: stats[m].ritz for m in modules}
    tables = reader.run(tables_map, sums_combine, (modules, spaces, q), t, "error tables")
    grid = p.target is not None
    for m in modules:
        st, s = stats[m], tables[m]
        ku, kv = st.u.shape[1], st.v.shape[1]
        kk = min(ku, kv)
        st.energy = s.energy if s.energy is not None else torch.zeros(kk, dtype=_F64)
        shape = (ku, kv) if grid else (kk,)
        st.max_err = s.max_err if s.max_err is not None else torch.zeros(shape, dtype=_F64)
        st.sum_err = s.sum_err if s.sum_err is not None else torch.zeros(shape, dtype=_F64)
        if kk and s.max_err is not None:  # the held build starts the worst error at 0
            st.max_err = st.max_err.clamp_min(0)
    return stats


def refine_map(shard: AdapterSource, shared: Any, tick: Any) -> dict[str, _Sums]:
    """One half-round of the refinement over a shard (``shared``: modules, spaces, side, coordinates).

    ``side`` ``"u"``: ``Σ_i P_i T_iT_iᵀ P_iᵀ`` with ``T_i = R_i·V_c``; ``"v"``: ``Σ_i R_iᵀ T_iT_iᵀ R_i`` with ``T_i = P_iᵀ·U_c``.
    """
    modules, spaces, side, coords = shared
    parts = {m: _Sums() for m in modules}
    for m, _, _, _, pp, rr in _projected(shard, modules, spaces, tick, "refining"):
        pp, rr = _ritz_projections(m, spaces, pp, rr)
        s = parts[m]
        with _one_thread():
            if side == "u":
                tt = rr @ coords[m]
                if s.mu is None:
                    s.mu = torch.zeros(pp.shape[0], pp.shape[0], dtype=_F64)
                s.mu.addmm_(pp, (tt @ tt.T) @ pp.T)
            else:
                tt = pp.T @ coords[m]
                if s.mv is None:
                    s.mv = torch.zeros(rr.shape[1], rr.shape[1], dtype=_F64)
                s.mv.addmm_(rr.T, (tt @ tt.T) @ rr)
    return parts


def errors_map(shard: AdapterSource, shared: Any, tick: Any) -> dict[str, _Sums]:
    """Residual, worst and summed counted error of every task before and after refinement (``shared``: modules, spaces, params, coordinates)."""
    modules, spaces, p, coords = shared
    parts = {m: _Sums() for m in modules}
    for m, tid, sb, a, pp, rr in _projected(shard, modules, spaces, tick, "refining"):
        pp, rr = _ritz_projections(m, spaces, pp, rr)
        n2 = float(((a @ a.T) * (sb.T @ sb)).sum())
        off, sc = p.prior_of(tid, m)
        s = parts[m]
        for acc, (uc, vc) in ((s.before, coords[m][0]), (s.after, coords[m][1])):
            with _one_thread():
                e = float((uc.T @ pp @ rr @ vc).pow(2).sum())  # as joint._errors_at
            err = max(0.0, (n2 - e) / n2) ** 0.5 if n2 > 0 else 0.0
            counted = off + sc * err
            acc[0] += err * err * n2
            acc[1] = max(acc[1], counted)
            acc[2] += counted
    return parts


def bounded_refine(reader: Reader, stats: dict[str, _ModStats], chosen: dict[str, tuple[int, int]], p: JointParams,
                   t: Any) -> dict[str, tuple[Tensor, Tensor, bool]]:
    """:func:`.joint._refine` and :func:`.joint._better` for the modules of ``chosen`` (their ``(k_u, k_v)``), reading the adapters.

    Returns module → ``(U_c, V_c, better)`` as the held build's refinement gives them.
    """
    modules = sorted(chosen)
    if not modules:
        return {}
    spaces = {m: stats[m].ritz for m in modules}
    eye = {m: (torch.eye(stats[m].u.shape[1], chosen[m][0], dtype=_F64),
               torch.eye(stats[m].v.shape[1], chosen[m][1], dtype=_F64)) for m in modules}
    cur = dict(eye)
    live = list(modules)  # modules still refining (a degenerate round stops a module, as in _refine)
    for _ in range(p.refine):
        if not live:
            break
        mu = reader.run(refine_map, sums_combine, (live, spaces, "u", {m: cur[m][1] for m in live}), t, "refining")
        with _one_thread():
            new_u = {m: _top_eig(mu[m].mu, chosen[m][0], rtol=0.0) for m in live}
        mv = reader.run(refine_map, sums_combine, (live, spaces, "v", new_u), t, "refining")
        with _one_thread():
            new_v = {m: _top_eig(mv[m].mv, chosen[m][1], rtol=0.0) for m in live}
        still = []
        for m in live:
            if new_u[m].shape[1] < chosen[m][0] or new_v[m].shape[1] < chosen[m][1]:
                continue
            cur[m] = (new_u[m], new_v[m])
            still.append(m)
        live = still
    q = replace(p, quantized_out={})
    errs = reader.run(errors_map, sums_combine, (modules, spaces, q, {m: (eye[m], cur[m]) for m in modules}), t,
                      "refining")
    n = len(reader)
    return {m: (*cur[m], _better(errs[m], p, n)) for m in modules}


def _better(s: _Sums, p: JointParams, n: int) -> bool:
    """:func:`.joint._better` from the summed errors (residual, worst and summed counted error)."""
    (res_b, max_b, sum_b), (res_n, max_n, sum_n) = s.before, s.after
    if not res_n < res_b * (1 - 1e-9):
        return False
    if p.max_error is not None and max_n > max(p.max_error, max_b):
        return False
    n = max(n, 1)
    return not (p.mean_error is not None and sum_n / n > max(p.mean_error, sum_b / n))
