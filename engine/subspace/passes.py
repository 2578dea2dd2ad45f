"""The statistics passes of the joint/share build as map-reduce: per shard of adapters, a map to sufficient statistics.

Pass 1 (range sketch) maps a shard to ``Σ_i ΔW_iΔW_iᵀΩ`` and ``Σ_i ΔW_iᵀΔW_iΩ``
per module (combine: sum); its finalize orthonormalizes them. Pass 2 maps a shard
to every task's projections onto the sketched spaces and its r×r Gram matrices
(combine: concatenate in task order); its finalize is the Rayleigh–Ritz step and
the error tables of :func:`_ritz`. The passes run through an
:class:`~engine.executors.Executor` (:class:`Reader`): in this process, where one
shard is step for step the build that streamed the adapters in one loop, or on Dask.
The map functions are module-level so that they pickle. (Above 450 lines: the
numerical helpers of the sketch and the Ritz step, and the factor buffer the maps
fill, sit with the passes that use them.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .. import ops
from ..errors import AdapterFormatError, VloraError
from ..executors import Executor, InProcessExecutor
from ..memory import trim
from .common import AdapterSource

if TYPE_CHECKING:
    from .joint import JointParams


@dataclass
class Reader:
    """One chunk's adapters, read pass after pass through ``executor``.

    Attributes:
        source: The adapters, restricted to the chunk's modules.
        executor: Where the maps run.
        shapes: Module → (out, in) of the chunk.
        checked: ``(source, shapes, check)`` → the source to read (validates what it reads with ``check``).
        check: The next pass validates shapes and finiteness (the first pass of a chunk).
        cancel: The job's cancel token (polled by executors that run elsewhere).
    """

    source: AdapterSource
    executor: Executor = field(default_factory=InProcessExecutor)
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    checked: Callable[[AdapterSource, dict[str, tuple[int, int]], bool], AdapterSource] | None = None
    check: bool = False
    cancel: Any = None
    #: Statistics of bounded size (:mod:`.bounded`): sums instead of every task's projections, more passes.
    bounded: bool = False

    def __len__(self) -> int:
        return len(self.source)

    @property
    def task_ids(self) -> list[str]:
        return self.source.task_ids

    def run(self, fn: Callable[[Any, Any, Any], Any], combine: Callable[[Any, Any], Any], shared: Any, tick: Any,
            prefix: str) -> Any:
        """One pass: ``fn`` over the shards, combined; ``tick(f"{prefix}: {task}")`` once per adapter."""
        shards = self.source.split(self.executor.shard_count(len(self.source)))
        if self.checked is not None:
            shards = [self.checked(s, self.shapes, self.check) for s in shards]
        self.check = False

        def on_done(j: int) -> None:
            for tid in shards[j].task_ids:
                tick(f"{prefix}: {tid}")

        out = self.executor.map_reduce(fn, shards, combine, shared=shared, tick=tick, on_done=on_done,
                                       cancel=self.cancel)
        trim()  # the pass's temporaries: back to the OS before the finalize
        return out


def as_reader(source: AdapterSource | Reader, shapes: dict[str, tuple[int, int]]) -> Reader:
    return source if isinstance(source, Reader) else Reader(source, InProcessExecutor(), shapes)


def read(shard: AdapterSource) -> Iterator[tuple[int, str, Any]]:
    """The shard's adapters; an unexpected failure reading one becomes one error naming it (e.g. its path)."""
    it = iter(shard)
    pos = 0
    while True:
        try:
            item = next(it)
        except StopIteration:
            return
        except (VloraError, ValueError, KeyboardInterrupt):
            raise
        except Exception as exc:  # a torn file, an I/O error on a worker…
            raise AdapterFormatError(f"{shard.label(pos)}: cannot read the adapter ({type(exc).__name__}: {exc})") from exc
        pos += 1
        yield item


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


def task_target(target: float | None, offset: float, scale: float) -> float | None:
    """The error a task of prior ``(offset, scale)`` may have so that ``offset + scale·error`` meets ``target``."""
    if target is None or (offset == 0.0 and scale == 1.0):
        return target
    return max(0.0, target - offset) / scale if scale > 0 else target


def error_target(max_error: float | None, mean_error: float | None) -> float | None:
    """The stricter of the two error rules (``None`` when neither is set)."""
    ts = [t for t in (max_error, mean_error) if t is not None]
    return min(ts) if ts else None


@dataclass
class _ModStats:
    """One module's statistics over the passes (float64)."""

    width_u: int
    width_v: int
    z_u: Tensor | None = None  # pass 1: Σ_i Y_i Y_iᵀ Ω (range sketch of the column space)
    z_v: Tensor | None = None
    q_u: Tensor | None = None  # after pass 1: orthonormal candidate spaces
    q_v: Tensor | None = None
    p: list[Tensor] = field(default_factory=list)  # pass 2, per task: Q_uᵀ·sB (K_u×r)
    r: list[Tensor] = field(default_factory=list)  # pass 2, per task: A·Q_v (r×K_v)
    ga: list[Tensor] = field(default_factory=list)  # per task A·Aᵀ
    gb: list[Tensor] = field(default_factory=list)  # per task (sB)ᵀ·sB
    n2: list[float] = field(default_factory=list)  # per task ‖ΔW‖²
    prior: list[tuple[float, float]] = field(default_factory=list)  # per task (offset, scale): JointParams.prior
    norm2_sum: float = 0.0
    rank_sum: int = 0
    sep_rank_sum: int = 0
    energy: Tensor | None = None  # Σ_i ‖U_kᵀ ΔW_i V_k‖² per k (square cores)
    max_err: Tensor | None = None  # worst task's error per (k_u, k_v); with no error target, per k
    sum_err: Tensor | None = None  # summed task errors, the same
    u: Tensor | None = None  # candidate bases (out×K, in×K) in order of importance
    v: Tensor | None = None
    feasible: bool = True  # an error target is met by some (k_u, k_v) within the sketch
    ritz: tuple[Tensor, Tensor, Tensor, Tensor] | None = None  # bounded statistics: (Q_u, Q_v, W_u, W_v), U = Q_u·W_u


_psd_sqrt = ops.psd_sqrt  # ``L`` with ``L·Lᵀ = g`` (one toolkit: engine/ops.py)


def _singular_values(ga: Tensor, gb: Tensor) -> Tensor:
    """Singular values of ``sB·A`` (descending) from ``AAᵀ`` and ``(sB)ᵀsB``: ``s² = eig(Lᵀ·(sB)ᵀsB·L)``, ``AAᵀ = LLᵀ``."""
    lo, info = torch.linalg.cholesky_ex(ga)
    if int(info) != 0:  # singular AAᵀ (rank-deficient A)
        lo = _psd_sqrt(ga)
    return torch.linalg.eigvalsh(lo.T @ gb @ lo).flip(0).clamp_min(0).sqrt()


def _omega(cache: dict[tuple[int, int], Tensor], dim: int, width: int) -> Tensor:
    """The Gaussian test matrix of a dimension and width: fixed (seeded), shared by modules of that shape."""
    key = (dim, width)
    if key not in cache:
        g = torch.Generator().manual_seed(1_000_003 * dim + width)
        cache[key] = torch.randn(dim, width, generator=g, dtype=torch.float64)
    return cache[key]


def _orth(z: Tensor, rtol: float = 1e-14) -> Tensor:
    """Orthonormal basis of the numerical range of ``z`` (Householder QR, then an SVD of R)."""
    if z.shape[1] == 0:
        return z
    q, r = torch.linalg.qr(z)
    with _one_thread():
        u, s, _ = torch.linalg.svd(r)
    keep = int((s > rtol * s[0]).sum()) if s.numel() and s[0] > 0 else 0
    return q @ u[:, :keep]


def _top_eig(m: Tensor, k: int | None = None, rtol: float = 1e-18) -> Tensor:
    """Eigenvectors of a symmetric PSD matrix by decreasing eigenvalue (those above ``rtol·max``, at most ``k``)."""
    w, e = torch.linalg.eigh((m + m.T) / 2)
    w, e = w.flip(0), e.flip(1)
    keep = int((w > rtol * w[0]).sum()) if w.numel() and w[0] > 0 else 0
    return e[:, : keep if k is None else min(k, keep)]


def _cum_grams(x: Tensor) -> Tensor:
    """``Σ_{j≤k} x_j x_jᵀ`` for every row index k of ``x`` (K×r → K×r×r)."""
    return torch.cumsum(x[:, :, None] * x[:, None, :], 0)


def _energies(p: Tensor, r: Tensor) -> Tensor:
    """``‖P[:k]·R[:, :k]‖²`` for k = 1…K, through cumulative r×r Gram matrices."""
    return torch.einsum("kij,kji->k", _cum_grams(p), _cum_grams(r.T))


def sketch_widths(shape: tuple[int, int], rank_sum: int, sketch_rank: int) -> tuple[int, int]:
    """Widths of the column and row range sketches: exact (the whole range) when ``rank_sum`` fits."""
    o, i = shape
    return min(o, rank_sum, sketch_rank), min(i, rank_sum, sketch_rank)


class _Buffer:
    """Factors of one module from consecutive adapters, held until they fill ``cap`` columns.

    Products with the d×K sketches are memory-bound one adapter at a time; a
    buffer of adapters makes them one matrix product (the sketch read once). The
    factors are copied (float64, B scaled) into one block per module that is
    reused from flush to flush, rows ``(sB_i)ᵀ`` and ``A_i``: no per-adapter
    float64 temporaries on the heap, where the long-lived per-task statistics
    would fragment them (the build's resident memory grew ~1 MiB per adapter).
    """

    def __init__(self, cap: int) -> None:
        self.cap = max(1, cap)
        self.sbt: Tensor | None = None  # capacity × out: rows (sB_i)ᵀ
        self.at: Tensor | None = None  # capacity × in: rows A_i
        self.ranks: list[int] = []
        self.cols = 0

    def put(self, adapter: Any, module: str) -> tuple[Tensor, Tensor]:
        """Buffer one adapter's ``(scale·B, A)`` of ``module`` (as :func:`effective_factors`); views of them."""
        b, a = adapter.lora_b[module], adapter.lora_a[module]
        r, end = a.shape[0], self.cols + a.shape[0]
        if self.sbt is None or self.at is None or end > self.sbt.shape[0]:
            # grown by doubling up to cap + r (then reused): a shard of few adapters holds no more than it reads
            have = 0 if self.sbt is None else self.sbt.shape[0]
            size = max(end, min(2 * have, self.cap + r))
            sbt = torch.empty(size, b.shape[0], dtype=torch.float64)
            at = torch.empty(size, a.shape[1], dtype=torch.float64)
            if self.cols and self.sbt is not None and self.at is not None:
                sbt[: self.cols] = self.sbt[: self.cols]
                at[: self.cols] = self.at[: self.cols]
            self.sbt, self.at = sbt, at
        sbt_i, a_i = self.sbt[self.cols:end], self.at[self.cols:end]
        sbt_i.copy_(b.T)
        sbt_i.mul_(adapter.scale(module))
        a_i.copy_(a)
        self.ranks.append(r)
        self.cols = end
        return sbt_i.T, a_i

    @property
    def full(self) -> bool:
        return self.cols >= self.cap

    def take(self) -> tuple[list[Tensor], list[Tensor], Tensor, Tensor]:
        """``(sB_i per task, A_i per task, sB, A)``: views of the block, valid until the next :meth:`put`."""
        sbs: list[Tensor] = []
        as_: list[Tensor] = []
        off = 0
        if self.sbt is None or self.at is None:
            return sbs, as_, torch.zeros(0, 0, dtype=torch.float64), torch.zeros(0, 0, dtype=torch.float64)
        for r in self.ranks:
            sbs.append(self.sbt[off:off + r].T)
            as_.append(self.at[off:off + r])
            off += r
        self.ranks, self.cols = [], 0
        return sbs, as_, self.sbt[:off].T, self.at[:off]


#: Columns (summed ranks) of factors buffered per module before they meet the sketches.
BUFFER_COLUMNS = 256


@contextmanager
def _one_thread() -> Iterator[None]:
    """Small dense linear algebra (eigh/SVD of K×K, K ≲ 256) is several times faster on one thread."""
    n = torch.get_num_threads()
    if n > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n > 1:
            torch.set_num_threads(n)


def _sketch_flush(st: _Sketch, buf: _Buffer, ou: Tensor, ov: Tensor, delta: bool) -> None:
    """``Z_u += Σ ΔW_iΔW_iᵀΩ_u`` and ``Z_v += Σ ΔW_iᵀΔW_iΩ_v`` over the buffered adapters (``factors``: of sB_i, A_i)."""
    if not buf.ranks:  # (adapters of rank 0 here still leave the buffer: the task order must hold)
        return
    sbs, as_, sb, a = buf.take()
    tu, tv = sb.T @ ou, a @ ov  # c×K_u, c×K_v
    off = 0
    for sbi, ai in zip(sbs, as_):
        sl = slice(off, off + ai.shape[0])
        off += ai.shape[0]
        if delta:  # ΔWΔWᵀΩ = sB·(AAᵀ)·(sBᵀΩ), ΔWᵀΔWΩ = Aᵀ·(sBᵀsB)·(AΩ)
            tu[sl] = (ai @ ai.T) @ tu[sl]
            tv[sl] = (sbi.T @ sbi) @ tv[sl]
        else:
            tv[sl] *= float(sbi.pow(2).sum()) / max(float(ai.pow(2).sum()), 1e-300)
    if st.z_u is None:
        st.z_u, st.z_v = sb @ tu, a.T @ tv
    else:
        st.z_u.addmm_(sb, tu)
        st.z_v.addmm_(a.T, tv)


def _project_flush(st: _Projections, buf: _Buffer, q_u: Tensor, q_v: Tensor) -> None:
    """Every buffered task's projections ``Q_uᵀ·sB_i`` and ``A_i·Q_v``."""
    if not buf.ranks:  # (adapters of rank 0 here still leave the buffer: the task order must hold)
        return
    _, as_, sb, a = buf.take()
    pu, rv = q_u.T @ sb, a @ q_v
    off = 0
    for ai in as_:  # copies, not views: a view pickles (to a Dask driver) the whole buffer's storage
        st.p.append(pu[:, off:off + ai.shape[0]].clone())
        st.r.append(rv[off:off + ai.shape[0]].clone())
        off += ai.shape[0]


@dataclass
class _Sketch:
    """Pass 1's partial result for one module: the range sketches summed over a shard, and its summed ranks."""

    z_u: Tensor | None = None
    z_v: Tensor | None = None
    rank_sum: int = 0


def sketch_map(shard: AdapterSource, shared: Any, tick: Any) -> dict[str, _Sketch]:
    """Pass 1 over a shard: ``Z_u = Σ ΔW_iΔW_iᵀΩ_u``, ``Z_v = Σ ΔW_iᵀΔW_iΩ_v`` per module (``shared``: modules, widths, delta)."""
    modules, widths, delta = shared
    parts = {m: _Sketch() for m in modules}
    omegas: dict[tuple[int, int], Tensor] = {}
    bufs = {m: _Buffer(BUFFER_COLUMNS) for m in modules}
    for _, tid, ad in read(shard):
        if tick is not None:
            tick(f"basis: {tid}")
        for m in modules:
            _, a = bufs[m].put(ad, m)
            parts[m].rank_sum += a.shape[0]
            if bufs[m].full:
                o, i, wu, wv = widths[m]
                _sketch_flush(parts[m], bufs[m], _omega(omegas, o, wu), _omega(omegas, i, wv), delta)
    for m in modules:
        o, i, wu, wv = widths[m]
        _sketch_flush(parts[m], bufs[m], _omega(omegas, o, wu), _omega(omegas, i, wv), delta)
    return parts


def sketch_combine(x: dict[str, _Sketch], y: dict[str, _Sketch]) -> dict[str, _Sketch]:
    """The sketches of two shards, summed into ``x`` (returned).

    In place: a partial result is read by one combine only (the executors' trees), and
    a second d×K sketch per module would be the largest thing a Dask worker holds.
    """
    for m, a in x.items():
        b = y[m]
        if a.z_u is None:
            a.z_u, a.z_v = b.z_u, b.z_v
        elif b.z_u is not None:
            a.z_u.add_(b.z_u)
            a.z_v.add_(b.z_v)
        a.rank_sum += b.rank_sum
    return x


@dataclass
class _Projections:
    """Pass 2's partial result for one module: per task of a shard (in order) its projections and Grams."""

    p: list[Tensor] = field(default_factory=list)
    r: list[Tensor] = field(default_factory=list)
    ga: list[Tensor] = field(default_factory=list)
    gb: list[Tensor] = field(default_factory=list)
    n2: list[float] = field(default_factory=list)
    prior: list[tuple[float, float]] = field(default_factory=list)
    norm2_sum: float = 0.0
    sep_rank_sum: int = 0


def project_map(shard: AdapterSource, shared: Any, tick: Any) -> dict[str, _Projections]:
    """Pass 2 over a shard: every task's ``Q_uᵀ·sB``, ``A·Q_v``, ``AAᵀ``, ``(sB)ᵀsB`` (``shared``: modules, spaces, params)."""
    modules, spaces, p = shared
    target = p.target
    parts = {m: _Projections() for m in modules}
    bufs = {m: _Buffer(BUFFER_COLUMNS) for m in modules}
    for _, tid, ad in read(shard):
        if tick is not None:
            tick(f"statistics: {tid}")
        for m in modules:
            st = parts[m]
            sb, a = bufs[m].put(ad, m)
            ga, gb = a @ a.T, sb.T @ sb
            n2 = float((ga * gb).sum())
            st.ga.append(ga)
            st.gb.append(gb)
            st.n2.append(n2)
            st.norm2_sum += n2
            off, sc = p.prior_of(tid, m)
            st.prior.append((off, sc))
            if target is not None and p.hybrid:
                with _one_thread():
                    st.sep_rank_sum += rank_for_error(_singular_values(ga, gb), task_target(target, off, sc))
            if bufs[m].full:
                _project_flush(st, bufs[m], *spaces[m])
    for m in modules:
        _project_flush(parts[m], bufs[m], *spaces[m])
    return parts


def project_combine(x: dict[str, _Projections], y: dict[str, _Projections]) -> dict[str, _Projections]:
    """The projections of two neighbouring shards: the tasks of ``x`` then those of ``y``."""
    return {m: _Projections(a.p + y[m].p, a.r + y[m].r, a.ga + y[m].ga, a.gb + y[m].gb, a.n2 + y[m].n2,
                            a.prior + y[m].prior, a.norm2_sum + y[m].norm2_sum, a.sep_rank_sum + y[m].sep_rank_sum)
            for m, a in x.items()}


def statistics(source: AdapterSource | Reader, modules: list[str], shapes: dict[str, tuple[int, int]], p: JointParams,
               t: Any, rank_sums: dict[str, int] | None = None) -> dict[str, _ModStats]:
    """Passes 1 and 2: the candidate bases per module and every task's error per k.

    Pass 1 sketches the column space of ``Σ_i ΔW_iΔW_iᵀ`` (row space: ``ΔW_iᵀΔW_i``)
    as ``Z = Σ_i ΔW_iΔW_iᵀΩ`` for a fixed Gaussian ``Ω``, through the factors
    (``ΔW_iΔW_iᵀΩ = sB_i·(A_iA_iᵀ)·(sB_iᵀΩ)``, blind to the r×r rotation of the
    factors): a randomized range finder with one power step (Halko et al. 2011),
    exact when the summed ranks fit in ``sketch_rank``. Pass 2 projects every task
    onto the sketched spaces; a Rayleigh–Ritz step there orders the directions,
    and each task's error for every k follows from r×r products.
    """
    reader = as_reader(source, shapes)
    stats = sketch_spaces(reader, modules, shapes, p, t, rank_sums)
    if p.separate_only:
        return stats
    delta = p.basis == "delta"
    spaces = {m: (stats[m].q_u, stats[m].q_v) for m in modules}
    proj = reader.run(project_map, project_combine, (modules, spaces, replace(p, quantized_out={})), t, "statistics")
    for m in modules:
        st, pr = stats[m], proj[m]
        st.p, st.r, st.ga, st.gb, st.n2, st.prior = pr.p, pr.r, pr.ga, pr.gb, pr.n2, pr.prior
        st.norm2_sum, st.sep_rank_sum = pr.norm2_sum, pr.sep_rank_sum
    del proj, spaces

    # Rayleigh–Ritz in the sketched spaces, then each task's energy for every k
    with _one_thread():
        for m in modules:
            _ritz(stats[m], delta, p.target is not None)
    return stats


def sketch_spaces(reader: Reader, modules: list[str], shapes: dict[str, tuple[int, int]], p: JointParams, t: Any,
                  rank_sums: dict[str, int] | None) -> dict[str, _ModStats]:
    """Pass 1: per module the orthonormal candidate spaces ``Q_u``, ``Q_v`` of the range sketches (none for ``separate_only``)."""
    rank_sums = rank_sums or {}
    stats: dict[str, _ModStats] = {}
    for m in modules:
        wu, wv = sketch_widths(shapes[m], rank_sums.get(m) or p.sketch_rank, p.sketch_rank)
        stats[m] = _ModStats(wu, wv)
    if p.separate_only:
        return stats
    delta = p.basis == "delta"
    widths = {m: (*shapes[m], stats[m].width_u, stats[m].width_v) for m in modules}
    sketches = reader.run(sketch_map, sketch_combine, (modules, widths, delta), t, "basis")
    for m in modules:
        st, sk = stats[m], sketches[m]
        o, i = shapes[m]
        st.rank_sum = sk.rank_sum
        st.q_u = _orth(sk.z_u) if sk.z_u is not None else torch.zeros(o, 0, dtype=torch.float64)
        st.q_v = _orth(sk.z_v) if sk.z_v is not None else torch.zeros(i, 0, dtype=torch.float64)
    return stats


def _ritz(st: _ModStats, delta: bool, grid: bool) -> None:
    """Order the sketched directions (eigenvectors of the projected Gram sums) and tabulate the errors per k."""
    ku, kv = st.q_u.shape[1], st.q_v.shape[1]
    mu = torch.zeros(ku, ku, dtype=torch.float64)
    mv = torch.zeros(kv, kv, dtype=torch.float64)
    for pp, rr, ga, gb in zip(st.p, st.r, st.ga, st.gb):
        if delta:
            mu.addmm_(pp, ga @ pp.T)
            mv.addmm_(rr.T, gb @ rr)
        else:
            mu.addmm_(pp, pp.T)
            mv.addmm_(rr.T, rr, alpha=float(gb.trace()) / max(float(ga.trace()), 1e-300))
    wu, wv = _top_eig(mu), _top_eig(mv)
    ku, kv = wu.shape[1], wv.shape[1]
    st.u, st.v = st.q_u @ wu, st.q_v @ wv
    st.q_u = st.q_v = None
    for j, (pp, rr) in enumerate(zip(st.p, st.r)):  # in place: each old projection freed as its new one is made
        st.p[j], st.r[j] = wu.T @ pp, rr @ wv
    kk = min(ku, kv)
    st.energy = torch.zeros(kk, dtype=torch.float64)
    shape = (ku, kv) if grid else (kk,)
    st.max_err = torch.zeros(shape, dtype=torch.float64)
    st.sum_err = torch.zeros(shape, dtype=torch.float64)
    if not kk:
        return
    for pp, rr, n2, (off, sc) in zip(st.p, st.r, st.n2, st.prior):
        e, err = task_errors(pp, rr, n2, off, sc, grid)
        st.energy += e
        st.max_err = torch.maximum(st.max_err, err)
        st.sum_err += err


def task_errors(pp: Tensor, rr: Tensor, n2: float, off: float, sc: float, grid: bool) -> tuple[Tensor, Tensor]:
    """One task's energy ``‖U_kᵀΔW V_k‖²`` per k and its (counted) error per (k_u, k_v), or per k without ``grid``.

    ``pp`` (K_u×r), ``rr`` (r×K_v): the task's projections onto the Ritz directions.
    """
    ku, kv = pp.shape[0], rr.shape[1]
    kk = min(ku, kv)
    if grid:  # every (k_u, k_v): tr(Σ_{a<k_u} p_a p_aᵀ · Σ_{b<k_v} r_b r_bᵀ) as one matrix product
        e2 = _cum_grams(pp).reshape(ku, -1) @ _cum_grams(rr.T).reshape(kv, -1).T  # symmetric: tr(AB) = Σ A∘B
        e = e2.diagonal()[:kk]
    else:
        e2 = e = _energies(pp[:kk], rr[:, :kk])
    err = ((n2 - e2).clamp_min(0) / n2).sqrt() if n2 > 0 else torch.zeros_like(e2)
    return e, (off + sc * err if grid else err)
