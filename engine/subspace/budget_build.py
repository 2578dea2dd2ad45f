"""The build's hook for a per-task ``mean_error`` (precision ``auto``): candidate tables, one allocation, a store pass.

With ``mean_error`` and ``precision="auto"`` the coefficient pass of
:func:`engine.subspace.joint.build_joint` becomes two passes over the adapters:

1. *tables*: per module stored per task, each task's candidates on the bytes/error
   frontier (:func:`~engine.subspace.precision.separate_table`: rank and precision
   of B and A); per shared module, every (basis precision, core precision) pair
   with each task's error after rounding. Only these tables (candidates × tasks
   floats) and the candidate bases are kept, none of the pass statistics.
2. :func:`~engine.subspace.budget.allocate` spends every task's budget
   (``E_i ≤ mean_error`` over its modules, weighted by ‖ΔW‖²; with ``max_error``
   every module of every task within it too) on the fewest bytes;
3. *store*: each chosen candidate is made again from the adapter (same values).

A build in chunks of modules allocates per chunk: each chunk meets every task's
budget on its own modules, so the whole does (stricter than one allocation over all).
The shared form's cores take one precision for all tasks of a module (a candidate
is the pair basis precision × core precision).
"""

from __future__ import annotations

import math
from typing import Any

from .. import ops
from .budget import Allocation, Group, allocate
from .common import AdapterSource, ModuleBasis, TaskProjection, config_template, effective_factors
from .precision import PRECISIONS, SharedBasis, choose_core, finish, separate_at, separate_table


def budgeted(p: Any) -> bool:
    """Whether a build's ``mean_error`` is met per task through :class:`BudgetTables` (``auto`` precision)."""
    return getattr(p, "precision", "fp16") == "auto" and getattr(p, "mean_error", None) is not None


def _max_target(max_error: float | None, off: float, sc: float) -> float | None:
    if max_error is None:
        return None
    return max(0.0, max_error - off) / sc if sc > 0 else max_error


class BudgetTables:
    """The tables pass, the allocation and the store pass of one build (or one chunk of modules)."""

    def __init__(self, p: Any, bases: dict[str, ModuleBasis], cands: dict[str, list[SharedBasis]]) -> None:
        self.p = p
        self.bases = bases
        self.cands = cands
        self.groups: list[Group] = []
        self.keys: list[tuple[str, str, Any]] = []  # per group: ("sep", module, (task, specs)) / ("shared", module, None)
        self.allocation: Allocation | None = None

    def run(self, source: AdapterSource, modules: list[str], tasks: dict[str, TaskProjection],
            norms2: dict[str, list[float]], t: Any) -> None:
        p = self.p
        n = len(source)
        shared_err: dict[str, list[list[list[float]]]] = {m: [[[0.0] * n for _ in PRECISIONS] for _ in cs]
                                                          for m, cs in self.cands.items()}
        shared_bytes: dict[str, list[list[int]]] = {m: [[c.u.nbytes + c.v.nbytes] * len(PRECISIONS) for c in cs]
                                                    for m, cs in self.cands.items()}
        shared_w: dict[str, list[float]] = {m: [0.0] * n for m in self.cands}
        fixed: dict[str, tuple[list[int], list[float], list[float]]] = {}
        for idx, tid, ad in source:
            t(f"error tables: {tid}")
            ranks = {m: ad.module_rank(m) for m in modules}
            orig = sum(ad.lora_a[m].numel() * ad.lora_a[m].element_size()
                       + ad.lora_b[m].numel() * ad.lora_b[m].element_size() for m in modules)
            proj = TaskProjection(tid, {}, ranks=ranks, template=config_template(ad, tid), original_bytes=orig)
            tasks[tid] = proj
            for m in modules:
                sb, a = effective_factors(ad, m)
                n2 = norms2[m][idx] if m in norms2 else float(ops.lowrank_sqnorm(sb, a))
                proj.norms[m] = n2 ** 0.5
                off, sc = p.prior_of(tid, m)
                w = n2 / (sc * sc) if sc > 0 else n2  # ‖ΔW‖² of the original (a prior's reconstruction is scaled)
                b = self.bases[m]
                if b.kind == "separate":
                    tab = separate_table(sb, a, _max_target(p.max_error, off, sc), block_size=p.block_size)
                    self.groups.append(Group([idx], [w], [c for c, _, _ in tab], [[off + sc * e] for _, e, _ in tab]))
                    self.keys.append(("sep", m, (tid, [spec for _, _, spec in tab])))
                elif m in self.cands:
                    shared_w[m][idx] = w
                    for bi, cand in enumerate(self.cands[m]):
                        for pi, pc in enumerate(PRECISIONS):
                            ch = choose_core(cand, sb, a, ranks[m], math.inf, n2, precisions=(pc,), block_size=p.block_size)
                            shared_err[m][bi][pi][idx] = off + sc * ch.error
                            shared_bytes[m][bi][pi] += ch.nbytes
                else:  # a shared module of k = 0: nothing stored, the whole update is the error
                    err = 0.0 if n2 == 0 else 1.0
                    ids, ws, es = fixed.setdefault(m, ([], [], []))
                    ids.append(idx)
                    ws.append(w)
                    es.append(off + sc * err)
                    proj.fidelity[m] = err
        for m in self.cands:
            pairs = [(bi, pi) for bi in range(len(self.cands[m])) for pi in range(len(PRECISIONS))]
            self.groups.append(Group(list(range(n)), shared_w[m], [shared_bytes[m][bi][pi] for bi, pi in pairs],
                                     [shared_err[m][bi][pi] for bi, pi in pairs]))
            self.keys.append(("shared", m, pairs))
        for m, (ids, ws, es) in fixed.items():
            self.groups.append(Group(ids, ws, [0], [es]))
            self.keys.append(("fixed", m, None))
        self.allocation = allocate(self.groups, n, p.mean_error, p.max_error)
        self._store(source, modules, tasks, t)

    def _store(self, source: AdapterSource, modules: list[str], tasks: dict[str, TaskProjection], t: Any) -> None:
        p = self.p
        assert self.allocation is not None
        sep: dict[tuple[str, str], tuple[int, str, str]] = {}
        core: dict[str, tuple[int, str]] = {}
        for (kind, m, extra), c in zip(self.keys, self.allocation.choice):
            if kind == "sep":
                tid, specs = extra
                sep[(tid, m)] = specs[c]
            elif kind == "shared":
                bi, pi = extra[c]
                core[m] = (bi, PRECISIONS[pi])
        for m, (bi, _) in core.items():
            best = self.cands[m][bi]
            self.bases[m].tensors = {"U": best.u.value, "V": best.v.value}
            for key, st_ in (("U", finish(best.u)), ("V", finish(best.v))):
                if st_.qt is not None:
                    p.quantized_out[(m, key)] = st_.qt
        for _, tid, ad in source:
            t(f"storing: {tid}")
            proj = tasks[tid]
            for m in modules:
                if (tid, m) in sep:
                    sb, a = effective_factors(ad, m)
                    ch = separate_at(sb, a, *sep[(tid, m)], block_size=p.block_size)
                elif m in core:
                    sb, a = effective_factors(ad, m)
                    bi, pc = core[m]
                    ch = choose_core(self.cands[m][bi], sb, a, proj.ranks[m], math.inf, proj.norms[m] ** 2,
                                     precisions=(pc,), block_size=p.block_size)
                else:
                    import torch

                    u = self.bases[m].tensors["U"]
                    v = self.bases[m].tensors["V"]
                    proj.coeffs[m] = {"sigma": torch.zeros(u.shape[1], v.shape[1], dtype=p.dtype)}
                    continue
                proj.coeffs[m], proj.fidelity[m] = ch.coeffs(), ch.error
                p.quantized_out.update({(tid, m, k): qt for k, qt in ch.quantized().items()})
