"""Ours: one column basis U (out×k) and one row basis V (in×k) per module, shared by all tasks.

Each task's update is ``ΔŴ_i = U Σ_i Vᵀ`` with ``Σ_i = Uᵀ ΔW_i V`` (k×k, stored as
is or as rank-r factors when smaller). With orthonormal U and V,
``‖ΔW_i − UΣ_iVᵀ‖² = ‖ΔW_i‖² − ‖Σ_i‖²``, so errors for every k come from r×r
products. ``U`` spans the top eigenvectors of ``Σ_i ΔW_iΔW_iᵀ``, computed from the
thin factors ``s·B_i·R_iᵀ`` (``A_iᵀ = Q_i R_i``) — blind to LoRA's r×r
ambiguity ``B→BG, A→G⁻¹A`` — then optionally refined by alternating updates
(Gabrielsson et al., "Compress then Serve", arXiv:2407.00066). The ``share``
variant builds U and V from the factors B_i and A_i themselves (the Share
paper's per-side column spaces); it only differs in the basis.

Everything runs in passes over an :class:`AdapterSource`, so the streaming
build (one adapter in memory) and the in-memory build are one code path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .. import ops
from ..progress import tick
from .common import AdapterSource, ModuleBasis, TaskProjection, config_template, effective_factors


class Sketch:
    """Streaming thin SVD of a tall matrix given column blocks: keeps ``Y = U·diag(s)`` of at most ``cap`` columns.

    Exact (``YYᵀ`` equals the Gram matrix of all columns) while the columns span at
    most ``cap`` dimensions; beyond that it keeps the top ``cap`` directions.
    """

    def __init__(self, dim: int, cap: int) -> None:
        self.dim = dim
        self.cap = max(1, min(dim, cap))
        self.y: Tensor | None = None
        self.pending: list[Tensor] = []
        self.width = 0
        self.u: Tensor | None = None
        self.s: Tensor | None = None

    def add(self, cols: Tensor) -> None:
        if cols.shape[1] == 0:
            return
        self.pending.append(cols)
        self.width += cols.shape[1]
        if self.width > 2 * self.cap:
            self._compress()

    def _compress(self) -> None:
        blocks = ([self.y] if self.y is not None else []) + self.pending
        if not blocks:
            return
        z = torch.cat(blocks, dim=1)
        q, r = torch.linalg.qr(z)
        u, s, _ = torch.linalg.svd(r, full_matrices=False)
        k = min(self.cap, s.numel())
        self.u, self.s = q @ u[:, :k], s[:k]
        self.y = self.u * self.s
        self.pending = []
        self.width = k

    def basis(self, rtol: float = 1e-9) -> tuple[Tensor, Tensor]:
        """``(U dim×K, s (K,))``: directions with singular value above ``rtol·s_max``."""
        self._compress()
        if self.y is None:
            return torch.zeros(self.dim, 0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
        u, s = self.u, self.s  # columns of y are orthogonal after _compress
        keep = int((s > rtol * s[0]).sum()) if s.numel() and s[0] > 0 else 0
        return u[:, :keep], s[:keep]


def joint_factors(u: Tensor, v: Tensor, coeffs: dict[str, Tensor], rank: int) -> tuple[Tensor, Tensor]:
    """Effective factors ``(B_eff out×q, A q×in)`` of ``U Σ Vᵀ`` with ``q ≤ rank`` (float32 math in float64)."""
    if "c" in coeffs:
        c, d = coeffs["c"].double(), coeffs["d"].double()
        kk = c.shape[0]
        return u[:, :kk].double() @ c, d @ v[:, :kk].double().T
    sigma = coeffs["sigma"].double()
    kk = sigma.shape[0]
    if kk == 0:
        return u.new_zeros(u.shape[0], 0, dtype=torch.float64), v.new_zeros(0, v.shape[0], dtype=torch.float64)
    p, s, qh = torch.linalg.svd(sigma)
    q = min(rank, kk, int((s > s[0] * 1e-12).sum()) if s[0] > 0 else 0)
    return u[:, :kk].double() @ (p[:, :q] * s[:q]), qh[:q] @ v[:, :kk].double().T


def encode_joint(u: Tensor, v: Tensor, sb: Tensor, a: Tensor, rank: int, dtype: torch.dtype) -> tuple[dict[str, Tensor], float]:
    """Coefficients of ``ΔW = sb·a`` in the (stored) basis ``u``, ``v``, rounded to ``dtype``, and the measured error."""
    ud, vd = u.double(), v.double()
    k = ud.shape[1]
    sigma = (ud.T @ sb) @ (a @ vd)
    coeffs: dict[str, Tensor]
    if k and 2 * k * min(rank, k) < k * k:
        p, s, qh = torch.linalg.svd(sigma)
        q = min(rank, k)
        coeffs = {"c": (p[:, :q] * s[:q]).to(dtype), "d": qh[:q].to(dtype)}
    else:
        coeffs = {"sigma": sigma.to(dtype)}
    b_hat, a_hat = joint_factors(u, v, coeffs, rank)
    return coeffs, ops.lowrank_rel_error(sb, a, b_hat, a_hat)


def encode_separate(sb: Tensor, a: Tensor, max_error: float | None, q_fixed: int | None, dtype: torch.dtype) -> tuple[dict[str, Tensor], float]:
    """A task's module stored alone: its truncated SVD, rank the smallest meeting ``max_error`` (or ``q_fixed``)."""
    uu, s, vh = ops.lowrank_svd(sb, a)
    q = q_fixed if q_fixed is not None else rank_for_error(s, max_error if max_error is not None else 0.0)
    q = min(q, s.numel())
    coeffs = {"b": (uu[:, :q] * s[:q]).to(dtype), "a": vh[:q].to(dtype)}
    return coeffs, ops.lowrank_rel_error(sb, a, coeffs["b"], coeffs["a"])


def rank_for_error(s: Tensor, target: float) -> int:
    """Smallest q with ``sqrt(Σ_{j≥q} s_j²)/‖s‖ ≤ target``."""
    e = s.double() ** 2
    total = float(e.sum())
    if total <= 0:
        return 0
    tail = torch.flip(torch.cumsum(torch.flip(e, [0]), 0), [0])  # tail[q] = Σ_{j≥q}
    tail = torch.cat([tail, tail.new_zeros(1)])
    ok = ((tail / total).clamp_min(0).sqrt() <= target + 1e-12).nonzero()
    return int(ok[0, 0]) if ok.numel() else int(s.numel())


@dataclass
class JointParams:
    """Parameters of a joint/share build."""

    basis: str = "delta"  # "delta" (joint) or "factors" (share)
    num_components: int | None = None
    variance_threshold: float = 0.6
    adaptive_k: bool = False
    max_error: float | None = None
    refine: int = 1
    hybrid: bool = True
    sketch_rank: int = 1024
    dtype: torch.dtype = torch.float16
    separate_only: bool = False  # the "svd" baseline: every module stored alone


@dataclass
class _ModStats:
    sketch_u: Sketch
    sketch_v: Sketch
    norm2_sum: float = 0.0
    rank_sum: int = 0
    sep_rank_sum: int = 0
    energy: Tensor | None = None
    max_err: Tensor | None = None
    u: Tensor | None = None
    v: Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _choose_k(m: str, st: _ModStats, p: JointParams, limit: int) -> int:
    kmax = st.u.shape[1] if st.u is not None else 0
    if kmax == 0:
        return 0
    if p.max_error is not None:
        ok = (st.max_err <= p.max_error + 1e-12).nonzero()
        return int(ok[0, 0]) + 1 if ok.numel() else kmax
    if p.num_components is not None and not p.adaptive_k:
        if p.num_components > limit:
            raise ValueError(
                f"num_components={p.num_components} is too large for module '{m}': at most {limit} "
                "(min of out_features, in_features and the summed ranks)"
            )
        return min(p.num_components, kmax)
    ev = st.energy / st.norm2_sum if st.norm2_sum > 0 else torch.ones(kmax, dtype=torch.float64)
    ok = (ev >= p.variance_threshold - 1e-12).nonzero()
    return int(ok[0, 0]) + 1 if ok.numel() else kmax


def one_k_for_all(p: JointParams) -> bool:
    """Whether every module gets the largest k any module needs (k by variance, not per module)."""
    return not p.separate_only and not p.adaptive_k and p.max_error is None and p.num_components is None


def joint_steps(p: JointParams, n: int, n_modules: int, *, k_only: bool = False) -> int:
    """Progress steps of :func:`build_joint` (or :func:`joint_module_k` with ``k_only``) over ``n`` adapters."""
    if k_only:
        return 2 * n + n_modules
    n_passes = (3 if not p.separate_only else 1) + (2 * p.refine if p.basis == "delta" and not p.separate_only else 0)
    return n_passes * n + n_modules


def _statistics(source: AdapterSource, modules: list[str], shapes: dict[str, tuple[int, int]], p: JointParams,
                t: Any) -> dict[str, _ModStats]:
    """Passes 1 and 2: the candidate bases per module and their per-k energies and worst errors."""
    stats = {m: _ModStats(Sketch(shapes[m][0], p.sketch_rank), Sketch(shapes[m][1], p.sketch_rank)) for m in modules}
    if p.separate_only:
        return stats
    # pass 1: column/row sketches and norms
    for _, tid, ad in source:
        t(f"basis: {tid}")
        for m in modules:
            sb, a = effective_factors(ad, m)
            st = stats[m]
            qa, ra = torch.linalg.qr(a.T)
            qb, rb = torch.linalg.qr(sb)
            if p.basis == "delta":
                st.sketch_u.add(sb @ ra.T)
                st.sketch_v.add(a.T @ rb.T)
            else:
                st.sketch_u.add(sb)
                st.sketch_v.add(a.T * (sb.norm() / max(a.norm().item(), 1e-30)))
            st.norm2_sum += float((rb @ ra.T).pow(2).sum())
            st.rank_sum += a.shape[0]
    for m in modules:
        st = stats[m]
        u, su = st.sketch_u.basis()
        v, sv = st.sketch_v.basis()
        kk = min(u.shape[1], v.shape[1])
        st.u, st.v = u[:, :kk], v[:, :kk]
        st.energy = torch.zeros(kk, dtype=torch.float64)
        st.max_err = torch.zeros(kk, dtype=torch.float64)
        st.sketch_u = st.sketch_v = None  # type: ignore[assignment]

    # pass 2: per-k energies → explained variance and the worst task's error per k
    for _, tid, ad in source:
        t(f"statistics: {tid}")
        for m in modules:
            st = stats[m]
            sb, a = effective_factors(ad, m)
            kk = st.u.shape[1]
            n2 = float(ops.lowrank_sqnorm(sb, a))
            if kk:
                pm = st.u.T @ sb  # K×r
                qm = a @ st.v  # r×K
                gp = torch.cumsum(pm[:, :, None] * pm[:, None, :], 0)
                gq = torch.cumsum(qm.T[:, :, None] * qm.T[:, None, :], 0)
                e = torch.einsum("kij,kji->k", gp, gq)
                st.energy += e
                if n2 > 0:
                    st.max_err = torch.maximum(st.max_err, ((n2 - e).clamp_min(0) / n2).sqrt())
            if p.max_error is not None and p.hybrid:
                _, s, _ = ops.lowrank_svd(sb, a)
                st.sep_rank_sum += rank_for_error(s, p.max_error)
    return stats


def _choose_all(modules: list[str], shapes: dict[str, tuple[int, int]], stats: dict[str, _ModStats], p: JointParams,
                t: Any) -> dict[str, int]:
    """Each module's own k (before :func:`one_k_for_all` raises them to one)."""
    chosen: dict[str, int] = {}
    for m in modules:
        t(f"choosing k: {m}")
        if p.separate_only:
            continue
        o, i = shapes[m]
        st = stats[m]
        chosen[m] = _choose_k(m, st, p, min(o, i, st.rank_sum))
    return chosen


def _ticker(progress: Any, cancel: Any, total: int) -> Any:
    step = [0]

    def t(msg: str) -> None:
        tick(progress, cancel, step[0], total, msg)
        step[0] += 1

    return t


def joint_module_k(source: AdapterSource, shapes: dict[str, tuple[int, int]], p: JointParams, *,
                   progress: Any = None, cancel: Any = None) -> dict[str, int]:
    """Each module's own k, from passes 1 and 2 alone: for a build in chunks where :func:`one_k_for_all` holds."""
    modules = sorted(shapes)
    t = _ticker(progress, cancel, joint_steps(p, len(source), len(modules), k_only=True))
    return _choose_all(modules, shapes, _statistics(source, modules, shapes, p, t), p, t)


def build_joint(source: AdapterSource, shapes: dict[str, tuple[int, int]], p: JointParams, *,
                progress: Any = None, cancel: Any = None,
                k_all: int | None = None) -> tuple[dict[str, ModuleBasis], dict[str, TaskProjection]]:
    """Build the shared bases and every task's coefficients in passes over ``source``.

    ``k_all``: where :func:`one_k_for_all` holds, the k to raise every module to
    (the largest over all modules, known beforehand when modules are built in chunks);
    by default the largest over ``shapes``.
    """
    modules = sorted(shapes)
    n = len(source)
    t = _ticker(progress, cancel, joint_steps(p, n, len(modules)))
    templates: dict[str, Any] = {}
    ranks: dict[str, dict[str, int]] = {}
    norms: dict[str, dict[str, float]] = {}
    orig_bytes: dict[str, int] = {}
    bases: dict[str, ModuleBasis] = {}

    stats = _statistics(source, modules, shapes, p, t)
    # choose k and the form of each module
    chosen = _choose_all(modules, shapes, stats, p, t)
    if one_k_for_all(p) and chosen:
        # one k for all modules (as the seed): the largest any module needs
        kk = max(chosen.values()) if k_all is None else k_all
        chosen = {m: min(kk, stats[m].u.shape[1]) for m in modules}

    for m in modules:
        o, i = shapes[m]
        if p.separate_only:
            bases[m] = ModuleBasis("separate", (o, i))
            continue
        st = stats[m]
        k = chosen[m]
        ev = (st.energy / st.norm2_sum).tolist() if st.norm2_sum > 0 else [1.0] * st.u.shape[1]
        shared_est = k * (o + i) + n * min(k * k, 2 * k * max(1, st.rank_sum // max(n, 1)))
        if p.max_error is not None and p.hybrid and st.sep_rank_sum * (o + i) < shared_est:
            bases[m] = ModuleBasis("separate", (o, i), explained=ev)
            continue
        bases[m] = ModuleBasis("joint", (o, i), {"U": st.u[:, :k].clone(), "V": st.v[:, :k].clone()}, explained=ev)
    del stats  # the candidate bases (K columns) are no longer needed: the chosen ones were copied

    # alternating refinement (joint only): U from ΔW_i V, then V from ΔW_iᵀ U
    refined: dict[str, tuple[Tensor, Tensor]] = {}
    jm = [m for m in modules if bases[m].kind == "joint" and bases[m].k > 0]
    if p.basis == "delta" and not p.separate_only and p.refine > 0 and jm:
        cur = {m: (bases[m].tensors["U"], bases[m].tensors["V"]) for m in jm}
        for _ in range(p.refine):
            sk = {m: Sketch(shapes[m][0], max(p.sketch_rank, cur[m][0].shape[1])) for m in jm}
            for _, tid, ad in source:
                t(f"refining U: {tid}")
                for m in jm:
                    sb, a = effective_factors(ad, m)
                    sk[m].add(sb @ (a @ cur[m][1]))
            new_u = {m: _top(sk[m], cur[m][0]) for m in jm}
            sk = {m: Sketch(shapes[m][1], max(p.sketch_rank, cur[m][1].shape[1])) for m in jm}
            for _, tid, ad in source:
                t(f"refining V: {tid}")
                for m in jm:
                    sb, a = effective_factors(ad, m)
                    sk[m].add(a.T @ (sb.T @ new_u[m]))
            cur = {m: (new_u[m], _top(sk[m], cur[m][1])) for m in jm}
        refined = cur

    # final pass: coefficients at storage precision and measured errors, for each candidate basis
    stored = {m: (bases[m].tensors["U"].to(p.dtype), bases[m].tensors["V"].to(p.dtype)) for m in jm}
    stored_ref = {m: (refined[m][0].to(p.dtype), refined[m][1].to(p.dtype)) for m in refined}
    tasks: dict[str, TaskProjection] = {}
    alt: dict[str, dict[str, tuple[dict[str, Tensor], float]]] = {}
    score = {m: [0.0, 0.0, 0.0, 0.0] for m in refined}  # sum err² and max err: base, refined
    for _, tid, ad in source:
        t(f"coefficients: {tid}")
        templates[tid] = config_template(ad, tid)
        ranks[tid] = {m: ad.module_rank(m) for m in modules}
        orig_bytes[tid] = sum(ad.lora_a[m].numel() * ad.lora_a[m].element_size() + ad.lora_b[m].numel() * ad.lora_b[m].element_size() for m in modules)
        proj = TaskProjection(tid, {}, ranks=ranks[tid], template=templates[tid], original_bytes=orig_bytes[tid])
        alt[tid] = {}
        for m in modules:
            sb, a = effective_factors(ad, m)
            r = ad.module_rank(m)
            proj.norms[m] = float(ops.lowrank_sqnorm(sb, a)) ** 0.5
            b = bases[m]
            if b.kind == "separate":
                q_fixed = None
                if p.max_error is None:
                    _, s, _ = ops.lowrank_svd(sb, a)
                    q_fixed = _separate_rank(s, p, r)
                proj.coeffs[m], proj.fidelity[m] = encode_separate(sb, a, p.max_error, q_fixed, p.dtype)
                continue
            if b.k == 0:
                proj.coeffs[m] = {"sigma": torch.zeros(0, 0, dtype=p.dtype)}
                proj.fidelity[m] = 0.0 if proj.norms[m] == 0 else 1.0
                continue
            proj.coeffs[m], proj.fidelity[m] = encode_joint(*stored[m], sb, a, r, p.dtype)
            if m in stored_ref:
                c2, e2 = encode_joint(*stored_ref[m], sb, a, r, p.dtype)
                alt[tid][m] = (c2, e2)
                sc = score[m]
                sc[0] += proj.fidelity[m] ** 2 * proj.norms[m] ** 2
                sc[1] = max(sc[1], proj.fidelity[m])
                sc[2] += e2 ** 2 * proj.norms[m] ** 2
                sc[3] = max(sc[3], e2)
        tasks[tid] = proj
    for m in modules:
        b = bases[m]
        if b.kind != "joint":
            continue
        use_ref = False
        if m in score:
            sc = score[m]
            use_ref = sc[2] < sc[0] and (p.max_error is None or sc[3] <= max(p.max_error, sc[1]))
        if use_ref:
            b.tensors = {"U": stored_ref[m][0], "V": stored_ref[m][1]}
            for tid in tasks:
                tasks[tid].coeffs[m], tasks[tid].fidelity[m] = alt[tid][m]
        elif m in stored:
            b.tensors = {"U": stored[m][0], "V": stored[m][1]}
        else:
            b.tensors = {"U": b.tensors["U"].to(p.dtype), "V": b.tensors["V"].to(p.dtype)}
    return bases, tasks


def _separate_rank(s: Tensor, p: JointParams, r: int) -> int:
    if p.num_components is not None:
        return min(p.num_components, s.numel())
    ev = ops.explained_variance_ratio(s)
    ok = (ev >= p.variance_threshold - 1e-12).nonzero()
    return int(ok[0, 0]) + 1 if ok.numel() else s.numel()


def _top(sk: Sketch, like: Tensor) -> Tensor:
    u, _ = sk.basis()
    k = like.shape[1]
    if u.shape[1] < k:  # degenerate: keep the old directions to fill up
        u = ops.gram_schmidt(u.T, like.T.double()).T[:, :k]
    return u[:, :k]


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
        kk = min(nu.shape[1], nv.shape[1])
        nu, nv = nu[:, :kk].to(dtype), nv[:, :kk].to(dtype)
        c, e = encode_joint(nu, nv, sb, a, rank, dtype)
        best = (nu, nv, c, e)
        if e <= target:
            break
    return best
