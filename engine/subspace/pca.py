"""The seed method: per module and side, PCA of the N flattened factors.

Each task is a k-vector of loadings per side; the mean is stored, so at full
k (N−1) the factors come back exactly. Fidelity is still measured on ΔW.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .. import ops
from ..errors import IncompatibleAdaptersError
from ..progress import tick
from .common import (
    AdapterSource,
    ModuleBasis,
    TaskProjection,
    config_template,
    module_scale,
)


@dataclass
class PCAParams:
    """Parameters of a pca build."""

    num_components: int | None = None
    variance_threshold: float = 0.6
    adaptive_k: bool = False
    max_error: float | None = None
    dtype: torch.dtype = torch.float16
    mean_error: float | None = None
    #: task → module → ``(offset, scale)``: see :attr:`JointParams.prior <engine.subspace.joint.JointParams.prior>`
    prior: dict[str, dict[str, tuple[float, float]]] | None = None

    @property
    def by_error(self) -> bool:
        return self.max_error is not None or self.mean_error is not None


def pca_factors(basis: ModuleBasis, coeffs: dict[str, Tensor], template: Any, module: str) -> tuple[Tensor, Tensor]:
    """Effective factors ``(scale·B, A)`` of a task from its loadings (float64)."""
    t = basis.tensors
    out, inn = basis.shape
    r = basis.rank
    la, lb = coeffs["la"].double(), coeffs["lb"].double()
    a = t["mean_a"].double() + la @ t["comp_a"][: la.shape[0]].double()
    b = t["mean_b"].double() + lb @ t["comp_b"][: lb.shape[0]].double()
    return b.reshape(out, r) * module_scale(template, module, r), a.reshape(r, inn)


def encode_pca(basis: ModuleBasis, a_raw: Tensor, b_raw: Tensor, sb: Tensor, template: Any, module: str,
               dtype: torch.dtype) -> tuple[dict[str, Tensor], float]:
    """Loadings of one task (rounded to ``dtype``) and the measured ΔW error."""
    t = basis.tensors
    la = (a_raw.double().reshape(-1) - t["mean_a"].double()) @ t["comp_a"].double().T
    lb = (b_raw.double().reshape(-1) - t["mean_b"].double()) @ t["comp_b"].double().T
    coeffs = {"la": la.to(dtype), "lb": lb.to(dtype)}
    bh, ah = pca_factors(basis, coeffs, template, module)
    return coeffs, ops.lowrank_rel_error(sb, a_raw.double(), bh, ah)


def pca_steps(p: PCAParams, n: int, n_modules: int) -> int:
    """Progress steps of :func:`build_pca` over ``n`` adapters."""
    return (3 if p.by_error else 2) * n + n_modules


def build_pca(source: AdapterSource, shapes: dict[str, tuple[int, int]], p: PCAParams, *,
              progress: Any = None, cancel: Any = None) -> tuple[dict[str, ModuleBasis], dict[str, TaskProjection]]:
    """Build per-module, per-side PCA bases in passes over ``source`` (incremental SVD, exact without truncation)."""
    modules = sorted(shapes)
    n = len(source)
    if n < 2:
        raise ValueError("method 'pca' needs at least 2 adapters (it centres the stack); use method='joint' for one")
    step = [0]
    total = pca_steps(p, n, len(modules))

    def t(msg: str) -> None:
        tick(progress, cancel, step[0], total, msg)
        step[0] += 1

    state: dict[str, dict[str, Any]] = {}
    rank: dict[str, int] = {}
    for _, tid, ad in source:
        t(f"basis: {tid}")
        for m in modules:
            r = ad.module_rank(m)
            if m not in rank:
                rank[m] = r
            elif rank[m] != r:
                raise IncompatibleAdaptersError(
                    f"method 'pca' needs one rank per module: '{m}' has rank {rank[m]} in the first adapter and "
                    f"{r} in {source.label(_)}; use method='joint', which supports mixed ranks"
                )
            for side, x in (("a", ad.lora_a[m]), ("b", ad.lora_b[m])):
                flat = x.double().reshape(1, -1)
                key = f"{m}/{side}"
                if key not in state:
                    state[key] = {"c": torch.zeros(0, flat.shape[1], dtype=torch.float64),
                                  "s": torch.zeros(0, dtype=torch.float64), "mean": torch.zeros(flat.shape[1], dtype=torch.float64), "n": 0}
                st = state[key]
                st["c"], st["s"], st["mean"], st["n"] = ops.incremental_svd_update(st["c"], st["s"], st["mean"], st["n"], flat)

    bases: dict[str, ModuleBasis] = {}
    for m in modules:
        sa, sb_ = state[f"{m}/a"], state[f"{m}/b"]
        kk = max(sa["c"].shape[0], sb_["c"].shape[0])
        eva = ops.explained_variance_ratio(sa["s"]).tolist()
        evb = ops.explained_variance_ratio(sb_["s"]).tolist()
        ev = [(_at(eva, j) + _at(evb, j)) / 2 for j in range(kk)]
        bases[m] = ModuleBasis("pca", shapes[m], {
            "comp_a": sa["c"], "comp_b": sb_["c"], "mean_a": sa["mean"], "mean_b": sb_["mean"],
            "sv_a": sa["s"], "sv_b": sb_["s"]}, rank=rank[m], explained=ev)

    templates: dict[str, Any] = {}
    worst: dict[str, Tensor] = {}
    summed: dict[str, Tensor] = {}
    if p.by_error:
        worst = {m: torch.zeros(bases[m].k + 1, dtype=torch.float64) for m in modules}
        summed = {m: torch.zeros(bases[m].k + 1, dtype=torch.float64) for m in modules}
        for _, tid, ad in source:
            t(f"statistics: {tid}")
            tmpl = config_template(ad, tid)
            for m in modules:
                b = bases[m]
                sb = ad.lora_b[m].double() * ad.scale(m)
                for k in range(worst[m].numel()):
                    sub = _truncated(b, k)
                    _, e = encode_pca(sub, ad.lora_a[m], ad.lora_b[m], sb, tmpl, m, torch.float64)
                    if p.prior:
                        off, sc = p.prior.get(tid, {}).get(m, (0.0, 1.0))
                        e = off + sc * e
                    worst[m][k] = max(float(worst[m][k]), e)
                    summed[m][k] += e
                    if p.mean_error is None and e <= p.max_error:  # type: ignore[operator]
                        break  # larger k only add directions: stop at the first k meeting the target

    for m in modules:
        t(f"choosing k: {m}")
        b = bases[m]
        kmax = max(b.tensors["comp_a"].shape[0], b.tensors["comp_b"].shape[0])
        if p.by_error:
            good = torch.ones(worst[m].numel(), dtype=torch.bool)
            if p.max_error is not None:
                good &= worst[m] <= p.max_error + 1e-12
            if p.mean_error is not None:
                good &= summed[m] / n <= p.mean_error + 1e-12
            ok = good.nonzero()
            k = int(ok[0, 0]) if ok.numel() else kmax
        elif p.adaptive_k or p.num_components is None:
            k = max(ops.select_num_components(b.tensors["sv_a"], p.variance_threshold) if b.tensors["sv_a"].numel() else 0,
                    ops.select_num_components(b.tensors["sv_b"], p.variance_threshold) if b.tensors["sv_b"].numel() else 0)
        else:
            # the seed's k: min(num_components, N) — beyond the N−1 directions of the centred
            # stack the basis is completed with directions of zero variance, as its full SVD does
            k = min(p.num_components, n)
            if k > kmax:
                bases[m] = _completed(b, k)
                continue
        bases[m] = _truncated(b, min(k, kmax))
    if not p.by_error and not p.adaptive_k:
        kk = max(b.k for b in bases.values())
        bases = {m: _truncated(b, kk) for m, b in bases.items()}
    for b in bases.values():
        b.tensors = {k: v.to(p.dtype) for k, v in b.tensors.items()}

    tasks: dict[str, TaskProjection] = {}
    for _, tid, ad in source:
        t(f"loadings: {tid}")
        tmpl = templates.setdefault(tid, config_template(ad, tid))
        proj = TaskProjection(tid, {}, ranks={m: ad.module_rank(m) for m in modules}, template=tmpl,
                              original_bytes=sum(ad.lora_a[m].numel() * ad.lora_a[m].element_size()
                                                 + ad.lora_b[m].numel() * ad.lora_b[m].element_size() for m in modules))
        for m in modules:
            sb = ad.lora_b[m].double() * ad.scale(m)
            proj.norms[m] = float(ops.lowrank_sqnorm(sb, ad.lora_a[m])) ** 0.5
            proj.coeffs[m], proj.fidelity[m] = encode_pca(bases[m], ad.lora_a[m], ad.lora_b[m], sb, tmpl, m, p.dtype)
        tasks[tid] = proj
    return bases, tasks


def _at(seq: list[float], j: int) -> float:
    if not seq:
        return 1.0
    return seq[min(j, len(seq) - 1)]


def _completed(b: ModuleBasis, k: int) -> ModuleBasis:
    """``b`` with each side's basis completed to ``k`` orthonormal rows (at most the side's width)."""
    t = dict(b.tensors)
    g = torch.Generator().manual_seed(k)
    for side in ("a", "b"):
        comp = t[f"comp_{side}"].double()
        want = min(k, comp.shape[1])
        while comp.shape[0] < want:
            extra = torch.randn(want - comp.shape[0], comp.shape[1], generator=g, dtype=torch.float64)
            comp = ops.gram_schmidt(comp, extra)
        t[f"comp_{side}"] = comp[:want]
        sv = t[f"sv_{side}"].double()
        t[f"sv_{side}"] = torch.cat([sv, sv.new_zeros(want - sv.shape[0])])
    return ModuleBasis("pca", b.shape, t, rank=b.rank, explained=b.explained)


def _truncated(b: ModuleBasis, k: int) -> ModuleBasis:
    t = dict(b.tensors)
    for side in ("a", "b"):
        t[f"comp_{side}"] = t[f"comp_{side}"][:k]
        t[f"sv_{side}"] = t[f"sv_{side}"][:k]
    return ModuleBasis("pca", b.shape, t, rank=b.rank, explained=b.explained)
