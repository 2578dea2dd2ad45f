"""``quantize`` under an error target: the cheapest storage per module of a saved subspace that meets it.

The same (rank, precision) selection a build with precision ``auto`` makes
(:mod:`engine.subspace.precision`, :mod:`engine.subspace.budget`), applied to a
subspace that exists: per module stored per task, the rank and the precision of
its factors (candidates from the SVD of the stored factors, so never above the
stored rank); per shared module, the precision of ``U`` and ``V`` and of each
task's core. Every candidate's error is measured *after rounding*, against the
task's original update:

* with the original adapters (``adapters``): exactly, ``‖ΔW − ΔŴ_new‖/‖ΔW‖``;
* without: the stored error plus the change, ``e_stored + ‖ΔŴ_old − ΔŴ_new‖/‖ΔW‖``
  (the triangle inequality: never below the truth, so the target is never passed).

The current storage is always a candidate (at its current bytes and error), so a
module is never stored in more bytes than before. ``max_error`` caps every task in
every module; ``mean_error`` is met per task over its modules, weighted by
‖ΔW‖² (:func:`engine.subspace.budget.allocate`). A task already over the target
(in a module, for ``max_error``; overall, for ``mean_error``) keeps its current
storage, and so does every shared module it is in; :func:`requantize` reports it.
Modules of kind ``pca`` and empty shared modules keep their storage.

:func:`quantize_fixed` is the other way to quantise a subspace: one precision for
every basis (and per-task) tensor, the seed's ``quantize(bits, method)``. (Above 450
lines: both ways of quantising, which re-measure errors after rounding alike.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .tasks import check_adapter
from .. import ops
from ..progress import CancelLike, ProgressFn, tick
from ..types import LoRAWeights
from .budget import Group, allocate
from .common import ModuleBasis, effective_factors
from .joint import joint_factors
from .precision import (
    BITS,
    DEFAULT_BLOCK_SIZE,
    PRECISIONS,
    QUANT_OVERHEAD_BYTES,
    SharedBasis,
    choose_core,
    finish,
    separate_factors,
    shared_bases,
    store,
    tensor_bytes,
    truncation_errors,
)
from .rule import task_error

_TOL = 1e-12
KEEP = "keep"


def check_targets(max_error: float | None, mean_error: float | None) -> None:
    """``ValueError`` naming the bad target (each, when given, a number in (0, 1))."""
    if max_error is None and mean_error is None:
        raise ValueError("quantize needs max_error or mean_error (or bits for a fixed precision)")
    for name, v in (("max_error", max_error), ("mean_error", mean_error)):
        if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and 0 < v < 1):
            raise ValueError(f"{name} must be a relative error in (0, 1), got {v!r}")


@dataclass
class _Ref:
    """One task in one module: what its errors are measured against and how they count.

    A candidate's error is ``off + sc · ‖ref − candidate‖/‖ref‖``; ``now`` is the current storage's error.
    """

    sb: Tensor
    a: Tensor
    n2: float
    off: float
    sc: float
    now: float
    stored: tuple[Tensor, Tensor]

    def total(self, rel: float) -> float:
        return self.off + self.sc * rel


def _factors(b: ModuleBasis, coeffs: dict[str, Tensor], rank: int) -> tuple[Tensor, Tensor]:
    if b.kind == "separate":
        return coeffs["b"].double(), coeffs["a"].double()
    return joint_factors(b.tensors["U"], b.tensors["V"], coeffs, rank)


class _Requantizer:
    def __init__(self, sub: Any, max_error: float | None, mean_error: float | None,
                 originals: dict[str, LoRAWeights], block_size: int) -> None:
        self.sub = sub
        self.max_error, self.mean_error = max_error, mean_error
        self.originals = originals
        self.bs = block_size
        self.elem = torch.empty(0, dtype=sub.dtype).element_size()
        self.changed: set[tuple[str, str]] = set()  # (task, module) stored anew

    # -- bytes --------------------------------------------------------------------------
    def nb(self, numel: int, prec: str) -> int:
        """Bytes of ``numel`` values at ``prec`` (unquantised: at the subspace's dtype)."""
        return numel * self.elem if prec == "fp16" else tensor_bytes(numel, prec, self.bs)

    def now_bytes(self, key: tuple[str, ...], t: Tensor) -> int:
        qt = self.sub.quantized.get(key)
        return int(qt.nbytes) + QUANT_OVERHEAD_BYTES if qt is not None else t.numel() * self.elem

    def task_bytes(self, tid: str, m: str) -> int:
        return sum(self.now_bytes((tid, m, k), t) for k, t in self.sub.tasks[tid].coeffs[m].items())

    # -- references ---------------------------------------------------------------------
    def ref(self, tid: str, m: str) -> _Ref:
        sub = self.sub
        proj = sub.tasks[tid]
        b0, a0 = _factors(sub.modules[m], proj.coeffs[m], proj.ranks.get(m, sub.modules[m].k))
        orig = self.originals.get(tid)
        if orig is not None:
            sb, a = effective_factors(orig, m)
            return _Ref(sb, a, float(ops.lowrank_sqnorm(sb, a)), 0.0, 1.0, ops.lowrank_rel_error(sb, a, b0, a0), (b0, a0))
        n2 = float(ops.lowrank_sqnorm(b0, a0))
        norm = proj.norms.get(m, 0.0)
        e = proj.fidelity.get(m, math.nan)
        e = e if math.isfinite(e) else math.inf  # unknown: held at its storage
        return _Ref(b0, a0, n2, e, n2 ** 0.5 / norm if norm > 0 else 0.0, e, (b0, a0))

    # -- per-task modules ------------------------------------------------------------------
    def separate_table(self, r: _Ref, now_bytes: int, limit: float | None,
                       first: bool) -> list[tuple[int, float, Any]]:
        """The candidates on the bytes/error frontier, cheapest first (with ``first``: up to the first within ``limit``)."""
        uu, s, vh = separate_factors(*r.stored)
        q_max = s.numel()
        # Eckart–Young: no rank-q candidate is nearer the reference than its rank-q truncation
        lower = truncation_errors(s if r.sb is r.stored[0] else ops.lowrank_svd(r.sb, r.a)[1])
        out_f, in_f = r.stored[0].shape[0], r.stored[1].shape[1]
        order = {p: i for i, p in enumerate(PRECISIONS)}
        cands: list[tuple[int, int, int, int, Any]] = [(now_bytes, -1, 0, 0, KEEP)]
        for q in range(q_max + 1):
            for pb in PRECISIONS:
                for pa in PRECISIONS:
                    if q == 0 and (pb, pa) != (PRECISIONS[0], PRECISIONS[0]):
                        continue
                    cost = self.nb(out_f * q, pb) + self.nb(q * in_f, pa)
                    cands.append((cost, q, order[pb], order[pa], (q, pb, pa)))
        cands.sort(key=lambda c: c[:4])
        cache: dict[tuple[str, int, str], Tensor] = {}

        def side(key: str, q: int, prec: str) -> Tensor:
            if (key, q, prec) not in cache:
                t = uu[:, :q] if key == "b" else s[:q, None] * vh[:q]
                cache[(key, q, prec)] = store(t, prec, self.bs, trial=True).value.double()
            return cache[(key, q, prec)]

        out: list[tuple[int, float, Any]] = []
        best = math.inf
        for cost, q, _, _, spec in cands:
            if spec == KEEP:
                err = r.now
            else:
                if r.total(lower[q]) >= best or (limit is not None and r.total(lower[q]) > limit + _TOL):
                    continue
                err = r.total(ops.lowrank_rel_error(r.sb, r.a, side("b", q, spec[1]), side("a", q, spec[2])))
            if err < best and (limit is None or err <= limit + _TOL):
                out.append((cost, err, spec))
                best = err
                if first:
                    break
        if not any(spec == KEEP for _, _, spec in out) and (not out or r.now < out[-1][1]):
            out.append((now_bytes, r.now, KEEP))  # the current storage: always there to fall back on
        return out

    def store_separate(self, tid: str, m: str, r: _Ref, spec: tuple[int, str, str]) -> None:
        q, pb, pa = spec
        uu, s, vh = separate_factors(*r.stored)
        b, a = store(uu[:, :q], pb, self.bs), store(s[:q, None] * vh[:q], pa, self.bs)
        self.put_task(tid, m, {"b": b, "a": a})

    def put_task(self, tid: str, m: str, parts: dict[str, Any]) -> None:
        sub = self.sub
        for k in list(sub.tasks[tid].coeffs[m]):
            sub.quantized.pop((tid, m, k), None)
        coeffs = {}
        for k, st in parts.items():
            st = finish(st)
            coeffs[k] = st.value if st.qt is not None else st.value.to(sub.dtype)
            if st.qt is not None:
                sub.quantized[(tid, m, k)] = st.qt
        sub.tasks[tid].coeffs[m] = coeffs
        self.changed.add((tid, m))

    # -- shared modules -----------------------------------------------------------------------
    def shared_table(self, m: str, refs: dict[str, _Ref]) -> tuple[list[SharedBasis], dict[str, list[list[tuple[int, float]]]]]:
        """Basis candidates, and per task per basis per core precision: (bytes, error)."""
        b = self.sub.modules[m]
        bases = shared_bases(b.tensors["U"].double(), b.tensors["V"].double(), block_size=self.bs)
        table: dict[str, list[list[tuple[int, float]]]] = {}
        for tid, r in refs.items():
            rank = self.sub.tasks[tid].ranks.get(m, b.k)
            rows = []
            for cand in bases:
                row = []
                for pc in PRECISIONS:
                    ch = choose_core(cand, r.sb, r.a, rank, math.inf, r.n2, precisions=(pc,), block_size=self.bs)
                    row.append((sum(self.nb(s.value.numel(), pc) for s in ch.tensors.values()), r.total(ch.error)))
                rows.append(row)
            table[tid] = rows
        return bases, table

    def basis_bytes(self, m: str, cand: SharedBasis | None) -> int:
        b = self.sub.modules[m]
        if cand is None:
            return sum(self.now_bytes((m, k), b.tensors[k]) for k in ("U", "V"))
        return self.nb(cand.u.value.numel(), cand.u.precision) + self.nb(cand.v.value.numel(), cand.v.precision)

    def store_shared(self, m: str, refs: dict[str, _Ref], cand: SharedBasis, core_prec: dict[str, str]) -> None:
        sub = self.sub
        b = sub.modules[m]
        for key, st in (("U", finish(cand.u)), ("V", finish(cand.v))):
            sub.quantized.pop((m, key), None)
            b.tensors[key] = st.value if st.qt is not None else st.value.to(sub.dtype)
            if st.qt is not None:
                sub.quantized[(m, key)] = st.qt
        basis = SharedBasis(cand.u, cand.v, *(t.double().T @ t.double() for t in (b.tensors["U"], b.tensors["V"])))
        for tid, r in refs.items():
            ch = choose_core(basis, r.sb, r.a, sub.tasks[tid].ranks.get(m, b.k), math.inf, r.n2,
                             precisions=(core_prec[tid],), block_size=self.bs)
            self.put_task(tid, m, ch.tensors)

    # -- the measured error ---------------------------------------------------------------
    def measure(self, tid: str, m: str, r: _Ref) -> float:
        proj = self.sub.tasks[tid]
        after = _factors(self.sub.modules[m], proj.coeffs[m], proj.ranks.get(m, self.sub.modules[m].k))
        return r.total(ops.lowrank_rel_error(r.sb, r.a, *after))


def requantize(sub: Any, *, max_error: float | None = None, mean_error: float | None = None,
               adapters: dict[str, LoRAWeights] | Sequence[LoRAWeights] | None = None,
               block_size: int = DEFAULT_BLOCK_SIZE, progress: ProgressFn | None = None,
               cancel: CancelLike | None = None) -> dict[str, Any]:
    """Store each module of ``sub`` at the cheapest rank and precision meeting the target, in place.

    Returns:
        ``{"errors": "exact" | "bound" | "mixed" (some tasks exact), "tasks": [{"task_id", "before": {"mean", "max", "overall"},
        "after": {same}, "bytes_before", "bytes_after" (the task's own coefficients), "held"}],
        "held": [task ids kept at their storage: over the target before], "modules": {module: "kept" |
        "changed"}}``. ``overall`` is the task's error over all its modules, weighted by ‖ΔW‖².
    """
    check_targets(max_error, mean_error)
    if block_size < 2 or block_size % 2:
        raise ValueError(f"block_size must be an even number >= 2, got {block_size}")
    if sub.dtype not in (torch.float16, torch.float32):
        raise ValueError(f"quantize with an error target needs a float16 or float32 subspace, this one is {sub.dtype}")
    originals: dict[str, LoRAWeights] = {}
    if adapters is not None:
        originals = dict(adapters) if isinstance(adapters, dict) else dict(zip(sub.tasks, adapters))
        unknown = sorted(set(originals) - set(sub.tasks))
        if unknown:
            raise ValueError(f"adapters: no task {unknown[0]!r} in the subspace (tasks: {', '.join(sub.tasks)})")
        for tid, ad in originals.items():
            check_adapter(sub, ad, f"adapter {tid!r}")
    rq = _Requantizer(sub, max_error, mean_error, originals, block_size)
    tids = list(sub.tasks)
    mods = sorted(sub.modules)
    active = [m for m in mods if sub.modules[m].kind == "separate" or (sub.modules[m].kind == "joint" and sub.modules[m].k > 0)]
    refs: dict[str, dict[str, _Ref]] = {}
    bytes_before = {t: sum(rq.task_bytes(t, m) for m in mods) for t in tids}
    for j, m in enumerate(active):
        tick(progress, cancel, j, 2 * len(active), f"measuring {m}")
        refs[m] = {t: rq.ref(t, m) for t in tids}
    before = {t: {m: refs[m][t].now if m in refs else sub.tasks[t].fidelity.get(m, math.nan) for m in mods} for t in tids}
    norms = {t: dict(sub.tasks[t].norms) for t in tids}
    held_pairs = {(t, m) for m in active for t in tids
                  if max_error is not None and not refs[m][t].now <= max_error + _TOL}
    held_tasks = {t for t in tids if mean_error is not None and not task_error(before[t], norms[t]) <= mean_error + _TOL}

    def held(t: str, m: str) -> bool:
        return (t, m) in held_pairs or t in held_tasks

    kept: set[str] = set()
    if mean_error is None:
        _by_max(rq, active, tids, refs, held, kept, progress, cancel)
    else:
        _by_budget(rq, active, tids, refs, held, kept, progress, cancel)
    for m in active:
        for t in tids:
            if (t, m) in rq.changed:
                sub.tasks[t].fidelity[m] = rq.measure(t, m, refs[m][t])
            elif t in originals:
                sub.tasks[t].fidelity[m] = refs[m][t].now  # measured exactly now
    for t in tids:
        if t in originals:
            sub.tasks[t].error_is_bound = False
        elif any(p[0] == t for p in rq.changed):
            sub.tasks[t].error_is_bound = True
    held_tasks |= {t for t, _ in held_pairs}

    def figures(f: dict[str, float], norm: dict[str, float]) -> dict[str, float]:
        v = [e for e in f.values() if math.isfinite(e)]
        return {"mean": sum(v) / len(v) if v else 0.0, "max": max(v, default=0.0), "overall": task_error(f, norm)}

    report = [{"task_id": t, "before": figures(before[t], norms[t]), "after": figures(sub.tasks[t].fidelity, norms[t]),
               "bytes_before": bytes_before[t], "bytes_after": sum(rq.task_bytes(t, m) for m in mods),
               "held": t in held_tasks, "error_is_bound": sub.tasks[t].error_is_bound} for t in tids]
    sub.params.update({"max_error": max_error, "mean_error": mean_error, "k_rule_inferred": False})
    if mean_error is not None:
        sub.params["mean_over"] = "task"
    mode = "exact" if set(originals) == set(tids) else "bound" if not originals else "mixed"
    sub.quantization = {"bits": None, "method": "auto", "double_quant": False, "quantize_loadings": True,
                        "block_size": block_size, "max_error": max_error, "mean_error": mean_error, "errors": mode}
    sub.saved_path = None
    tick(progress, cancel, 1, 1, "quantized")
    return {"errors": mode, "tasks": report, "held": sorted(held_tasks),
            "modules": {m: ("kept" if m in kept or m not in active else "changed") for m in mods}}


def _by_max(rq: _Requantizer, active: list[str], tids: list[str], refs: dict[str, dict[str, _Ref]],
            held: Callable[[str, str], bool], kept: set[str], progress: ProgressFn | None,
            cancel: CancelLike | None) -> None:
    """``max_error`` alone: module by module, the cheapest storage meeting it for every task."""
    sub, target = rq.sub, rq.max_error
    assert target is not None
    for j, m in enumerate(active):
        tick(progress, cancel, len(active) + j, 2 * len(active), f"choosing {m}")
        if sub.modules[m].kind == "separate":
            for t in tids:
                if held(t, m):
                    continue
                best = rq.separate_table(refs[m][t], rq.task_bytes(t, m), target, first=True)[0]
                if best[2] != KEEP:
                    rq.store_separate(t, m, refs[m][t], best[2])
            continue
        if any(held(t, m) for t in tids):
            kept.add(m)
            continue
        bases, table = rq.shared_table(m, refs[m])
        choice: tuple[int, SharedBasis | None, dict[str, str]] = (
            rq.basis_bytes(m, None) + sum(rq.task_bytes(t, m) for t in tids), None, {})
        for bi, cand in enumerate(bases):
            total, precs = rq.basis_bytes(m, cand), {}
            for t in tids:
                ok = sorted((nb, pi) for pi, (nb, e) in enumerate(table[t][bi]) if e <= target + _TOL)
                if not ok:
                    break
                total += ok[0][0]
                precs[t] = PRECISIONS[ok[0][1]]
            else:
                if total < choice[0]:
                    choice = (total, cand, precs)
        if choice[1] is None:
            kept.add(m)
        else:
            rq.store_shared(m, refs[m], choice[1], choice[2])


def _by_budget(rq: _Requantizer, active: list[str], tids: list[str], refs: dict[str, dict[str, _Ref]],
               held: Callable[[str, str], bool], kept: set[str], progress: ProgressFn | None,
               cancel: CancelLike | None) -> None:
    """``mean_error`` (with or without ``max_error``): one allocation over every module's candidates."""
    sub = rq.sub
    idx = {t: i for i, t in enumerate(tids)}
    groups: list[Group] = []
    keys: list[tuple[str, str, Any]] = []
    for j, m in enumerate(active):
        tick(progress, cancel, len(active) + j, 2 * len(active), f"error tables: {m}")
        w = {t: sub.tasks[t].norms.get(m, 0.0) ** 2 for t in tids}
        if sub.modules[m].kind == "separate":
            for t in tids:
                r, nb = refs[m][t], rq.task_bytes(t, m)
                tab = [(nb, r.now, KEEP)] if held(t, m) else rq.separate_table(r, nb, rq.max_error, first=False)
                groups.append(Group([idx[t]], [w[t]], [c for c, _, _ in tab], [[e] for _, e, _ in tab]))
                keys.append(("sep", m, (t, [spec for _, _, spec in tab])))
            continue
        keep_bytes = rq.basis_bytes(m, None) + sum(rq.task_bytes(t, m) for t in tids)
        nbytes, errors, specs = [keep_bytes], [[refs[m][t].now for t in tids]], [None]
        if not any(held(t, m) for t in tids):
            bases, table = rq.shared_table(m, refs[m])
            for bi, cand in enumerate(bases):
                for pi in range(len(PRECISIONS)):
                    nbytes.append(rq.basis_bytes(m, cand) + sum(table[t][bi][pi][0] for t in tids))
                    errors.append([table[t][bi][pi][1] for t in tids])
                    specs.append((cand, PRECISIONS[pi]))
        groups.append(Group([idx[t] for t in tids], [w[t] for t in tids], nbytes, errors))
        keys.append(("shared", m, specs))
    assert rq.mean_error is not None
    alloc = allocate(groups, len(tids), rq.mean_error, rq.max_error)
    for (kind, m, extra), c in zip(keys, alloc.choice):
        if kind == "sep":
            t, specs = extra
            if specs[c] != KEEP:
                rq.store_separate(t, m, refs[m][t], specs[c])
        elif extra[c] is None:
            kept.add(m)
        else:
            cand, pc = extra[c]
            rq.store_shared(m, refs[m], cand, {t: pc for t in tids})


__all__ = ["BITS", "check_targets", "requantize"]


def quantize_fixed(sub: Any, bits: int, method: str, double_quant: bool, quantize_loadings: bool, *, block_size: int,
                   adapters: dict[str, LoRAWeights] | Sequence[LoRAWeights] | None, progress: ProgressFn | None,
                   cancel: CancelLike | None) -> Any:
    """``SharedSubspace.quantize`` at one precision (``bits``/``method``) for every basis (and per-task) tensor, in place.

    Errors re-measured after rounding: exactly against ``adapters`` when given, else as
    ``old error + change of the reconstruction`` (an upper bound). Returns ``sub``.
    """
    from .core import _module_factors
    from .quant import quantize_tensor

    if method == "nf4":
        bits = 4
    probe = torch.zeros(2)
    quantize_tensor(probe, bits=bits, method=method, block_size=block_size)  # validates the arguments
    originals: dict[str, LoRAWeights] = {}
    if adapters is not None:
        originals = dict(adapters) if isinstance(adapters, dict) else dict(zip(sub.tasks, adapters))
    mods = sorted(sub.modules)
    kw = dict(bits=bits, method=method, block_size=block_size, double_quant=double_quant)
    for j, m in enumerate(mods):
        tick(progress, cancel, j, len(mods), f"quantizing {m}")
        b = sub.modules[m]
        old = ModuleBasis(b.kind, b.shape, dict(b.tensors), rank=b.rank, explained=b.explained)
        old_coeffs: dict[str, dict[str, Tensor]] = {}
        # pca: the components, as the seed (its means stay at storage precision: they carry the factors' scale)
        keys = {"joint": ("U", "V"), "pca": ("comp_a", "comp_b")}.get(b.kind, ())
        for key in keys:
            if b.tensors[key].numel():
                qt = quantize_tensor(b.tensors[key], **kw)
                sub.quantized[(m, key)] = qt
                b.tensors[key] = qt.dequantize(torch.float32)
        if quantize_loadings or b.kind == "separate":
            for tid, proj in sub.tasks.items():
                old_coeffs[tid] = dict(proj.coeffs[m])
                for key, val in proj.coeffs[m].items():
                    if val.numel():
                        qt = quantize_tensor(val, **kw)
                        sub.quantized[(tid, m, key)] = qt
                        proj.coeffs[m][key] = qt.dequantize(torch.float32)
        # each task's new error in this module, one task at a time (memory O(1) in N)
        for tid, proj in sub.tasks.items():
            after = _module_factors(b, proj.coeffs[m], proj, m)
            orig = originals.get(tid)
            if orig is not None:
                sb, a = effective_factors(orig, m)
                proj.fidelity[m] = ops.lowrank_rel_error(sb, a, *after)
                continue
            b0, a0 = _module_factors(old, old_coeffs.get(tid, proj.coeffs[m]), proj, m)
            n0 = float(ops.lowrank_sqnorm(b0, a0)) ** 0.5
            change = ops.lowrank_rel_error(b0, a0, *after) * n0
            norm = proj.norms.get(m, 0.0)
            proj.fidelity[m] = proj.fidelity[m] + (change / norm if norm > 0 else 0.0)
            proj.error_is_bound = True
    for tid, proj in sub.tasks.items():
        if tid in originals:
            proj.error_is_bound = False
    sub.quantization = {"bits": bits, "method": method, "double_quant": double_quant,
                         "quantize_loadings": quantize_loadings, "block_size": block_size}
    sub.saved_path = None
    return sub
