"""Rank and storage precision chosen together: the fewest bytes that meet an error target.

A candidate is a rank (or the shared form's core) plus a precision per stored
tensor: ``fp16`` or symmetric per-block integers (``int8`` … ``int3``, fp16
block scales, :func:`engine.subspace.quant.quantize_tensor`). Candidates are
ranked by the bytes they store and evaluated in that order; the first whose
error *after rounding* meets the target is kept, so the result is the cheapest
candidate that meets it (the same as trying them all). Errors go through small
products only: for factors ``B̂ (out×q)``, ``Â (q×in)`` the relative error
``‖sB·A − B̂Â‖/‖sB·A‖`` is ``tr`` of r×r and q×q Gram products
(:func:`engine.ops.lowrank_rel_error`); a rank whose truncation error alone
(Eckart–Young: no rank-q matrix does better) misses the target is skipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .. import ops
from .packing import packed_nbytes
from .quant import QuantizedTensor, fake_quantize, quantize_tensor

#: Storage precisions the search tries, from widest to narrowest. ``nf4`` (QLoRA's normal-float
#: levels, fp16 block scales) costs what ``int4`` does and has a smaller error on bell-shaped
#: values: it is kept where ``int4`` misses the target at those bytes.
PRECISIONS = ("fp16", "int8", "int6", "int5", "int4", "nf4", "int3")
BITS = {"fp16": 16, "int8": 8, "int6": 6, "int5": 5, "int4": 4, "nf4": 4, "int3": 3}
#: Values per fp16 scale of the integer precisions.
DEFAULT_BLOCK_SIZE = 64
#: ``precision`` values a build takes: ``fp16`` (every tensor at the storage dtype, as before) or ``auto``.
PRECISION_MODES = ("fp16", "auto")
#: Bytes a quantised tensor costs beyond its codes and scales: in the packed layout (format version 2)
#: only its spec in the manifest is a character longer (``int6`` vs ``f16``); format 1's header and
#: ``quantized`` entries (228 bytes on the demo collection) are gone.
QUANT_OVERHEAD_BYTES = 1


def check_precision(precision: str, block_size: int) -> None:
    """``ValueError`` naming the bad argument."""
    if precision not in PRECISION_MODES:
        raise ValueError(f"precision must be one of {', '.join(PRECISION_MODES)}, got {precision!r}")
    if block_size < 2 or block_size % 2:
        raise ValueError(f"block_size must be an even number >= 2, got {block_size}")


def tensor_bytes(numel: int, precision: str, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """Bytes a tensor of ``numel`` values costs at ``precision`` (the quantiser's codes + scales + overhead)."""
    if numel == 0 or precision == "fp16":
        return 2 * numel
    return packed_nbytes(numel, BITS[precision]) + 2 * math.ceil(numel / block_size) + QUANT_OVERHEAD_BYTES


@dataclass
class Stored:
    """One tensor at a precision: ``value`` is what the math (and a load) sees; ``qt`` what is written when quantised."""

    value: Tensor
    precision: str
    qt: QuantizedTensor | None = None
    block_size: int = DEFAULT_BLOCK_SIZE
    source: Tensor | None = None  # a trial's unrounded tensor, for :func:`finish`

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.value.numel(), self.precision, self.block_size)


def store(t: Tensor, precision: str, block_size: int = DEFAULT_BLOCK_SIZE, *, trial: bool = False) -> Stored:
    """``t`` rounded to ``precision``: fp16, or quantised and dequantised exactly as a load will.

    ``trial``: the values only (:func:`~engine.subspace.quant.fake_quantize`, the same bits), no codes;
    :func:`finish` makes the codes of the one kept.
    """
    if precision == "fp16" or t.numel() == 0:
        return Stored(t.to(torch.float16), "fp16", block_size=block_size)
    method = "nf4" if precision == "nf4" else "symmetric"
    if trial and method == "symmetric":
        return Stored(fake_quantize(t, BITS[precision], block_size), precision, block_size=block_size, source=t)
    qt = quantize_tensor(t.float(), bits=BITS[precision], method=method, block_size=block_size,
                         scale_dtype=torch.float16)
    return Stored(qt.dequantize(torch.float32), precision, qt, block_size)


def finish(s: Stored) -> Stored:
    """A trial :class:`Stored` with its codes made (the same values)."""
    if s.qt is not None or s.precision == "fp16" or s.source is None:
        return s
    return store(s.source, s.precision, s.block_size)


@dataclass
class Choice:
    """A module's chosen storage for one task (per-task form) or one task's core (shared form).

    Attributes:
        tensors: Key → stored tensor (``b``/``a``, or ``sigma`` / ``c``/``d``).
        error: Relative ΔW error after rounding.
        rank: The factors' rank (per-task form) or the core's.
        met: Whether ``error`` meets the target.
    """

    tensors: dict[str, Stored]
    error: float
    rank: int
    met: bool = True
    bits: dict[str, int] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.tensors.values())

    def coeffs(self) -> dict[str, Tensor]:
        return {k: s.value for k, s in self.tensors.items()}

    def quantized(self) -> dict[str, QuantizedTensor]:
        return {k: s.qt for k, s in self.tensors.items() if s.qt is not None}


def truncation_errors(s: Tensor) -> list[float]:
    """``‖ΔW − ΔW_q‖/‖ΔW‖`` of the best rank-q approximation for q = 0 … len(s)."""
    e = s.double() ** 2
    total = float(e.sum())
    if total <= 0:
        return [0.0] * (s.numel() + 1)
    tail = torch.flip(torch.cumsum(torch.flip(e, [0]), 0), [0]).tolist() + [0.0]
    return [max(0.0, t / total) ** 0.5 for t in tail]


def separate_candidates(out_f: int, in_f: int, max_rank: int, precisions: tuple[str, ...] = PRECISIONS,
                        block_size: int = DEFAULT_BLOCK_SIZE) -> list[tuple[int, int, str, str]]:
    """Every ``(bytes, q, precision of B, precision of A)`` of the per-task form, cheapest first (ties: lower rank, wider)."""
    order = {p: i for i, p in enumerate(precisions)}
    out = []
    for q in range(max_rank + 1):
        for pb in precisions:
            for pa in precisions:
                if q == 0 and (pb != precisions[0] or pa != precisions[0]):
                    continue
                cost = tensor_bytes(out_f * q, pb, block_size) + tensor_bytes(q * in_f, pa, block_size)
                out.append((cost, q, pb, pa))
    out.sort(key=lambda c: (c[0], c[1], order[c[2]], order[c[3]]))
    return out


def separate_factors(sb: Tensor, a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(U, s, Vh)`` of ``sB·A``; the stored factors at rank q are ``U[:, :q]`` and ``s[:q]·Vh[:q]``.

    The singular values go to A's rows so that B's per-block scales (blocks run along B's
    rows, across its columns) see columns of one magnitude and each of A's blocks lies in one row.
    """
    return ops.lowrank_svd(sb.double(), a.double())


def choose_separate(sb: Tensor, a: Tensor, target: float | None, *, q_fixed: int | None = None,
                    precisions: tuple[str, ...] = PRECISIONS, block_size: int = DEFAULT_BLOCK_SIZE) -> Choice:
    """The cheapest ``(rank, precision of B, precision of A)`` whose error after rounding is at most ``target``.

    ``q_fixed`` fixes the rank (a k rule without an error target): then only precisions are
    chosen, and, without a target, fp16 (today's storage). When nothing meets ``target``
    (a target below fp16's own rounding), the full rank at fp16.
    """
    sb, a = sb.double(), a.double()
    uu, s, vh = separate_factors(sb, a)
    r = s.numel()
    out_f, in_f = sb.shape[0], a.shape[1]

    cache: dict[tuple[str, int, str], Stored] = {}

    def side(key: str, q: int, prec: str) -> Stored:
        if (key, q, prec) not in cache:
            t = uu[:, :q] if key == "b" else s[:q, None] * vh[:q]
            cache[(key, q, prec)] = store(t, prec, block_size, trial=True)
        return cache[(key, q, prec)]

    def build(q: int, pb: str, pa: str) -> Choice:
        b, aa = side("b", q, pb), side("a", q, pa)
        err = ops.lowrank_rel_error(sb, a, b.value, aa.value)
        return Choice({"b": b, "a": aa}, err, q, bits={"b": BITS[pb], "a": BITS[pa]})

    def done(c: Choice) -> Choice:
        c.tensors = {k: finish(v) for k, v in c.tensors.items()}
        return c

    if target is None:
        return done(build(min(q_fixed if q_fixed is not None else r, r), "fp16", "fp16"))
    trunc = truncation_errors(s)
    tol = 1e-12
    for _, q, pb, pa in separate_candidates(out_f, in_f, r, precisions, block_size):
        if q_fixed is not None and q != min(q_fixed, r):
            continue
        if trunc[q] > target + tol:
            continue
        c = build(q, pb, pa)
        if c.error <= target + tol:
            return done(c)
    c = build(r if q_fixed is None else min(q_fixed, r), "fp16", "fp16")
    c.met = c.error <= target + tol
    return done(c)


def separate_table(sb: Tensor, a: Tensor, max_target: float | None = None, *,
                   precisions: tuple[str, ...] = PRECISIONS,
                   block_size: int = DEFAULT_BLOCK_SIZE) -> list[tuple[int, float, tuple[int, str, str]]]:
    """The per-task form's candidates ``(bytes, error after rounding, (q, precision of B, of A))`` on the
    bytes/error frontier (none cheaper and at least as precise), cheapest first, each within ``max_target``.

    The table a per-task error budget (:mod:`engine.subspace.budget`) chooses from; the full rank
    at the widest precision is always in it (the most precise), even above ``max_target``.
    """
    sb, a = sb.double(), a.double()
    uu, s, vh = separate_factors(sb, a)
    r = s.numel()
    trunc = truncation_errors(s)
    cache: dict[tuple[str, int, str], Tensor] = {}

    def side(key: str, q: int, prec: str) -> Tensor:
        if (key, q, prec) not in cache:
            t = uu[:, :q] if key == "b" else s[:q, None] * vh[:q]
            cache[(key, q, prec)] = store(t, prec, block_size, trial=True).value
        return cache[(key, q, prec)]

    out: list[tuple[int, float, tuple[int, str, str]]] = []
    best = math.inf
    cands = separate_candidates(sb.shape[0], a.shape[1], r, precisions, block_size)
    for cost, q, pb, pa in cands:
        if trunc[q] >= best or (max_target is not None and trunc[q] > max_target + 1e-12):
            continue  # no rounding makes it better than its truncation
        err = ops.lowrank_rel_error(sb, a, side("b", q, pb), side("a", q, pa))
        if err < best and (max_target is None or err <= max_target + 1e-12):
            out.append((cost, err, (q, pb, pa)))
            best = err
    if not out or out[-1][2] != (r, precisions[0], precisions[0]):
        top = (r, precisions[0], precisions[0])
        err = ops.lowrank_rel_error(sb, a, side("b", r, top[1]), side("a", r, top[2]))
        cost = tensor_bytes(sb.shape[0] * r, top[1], block_size) + tensor_bytes(r * a.shape[1], top[2], block_size)
        if not out or err < out[-1][1]:
            out.append((cost, err, top))
    return out


def separate_at(sb: Tensor, a: Tensor, q: int, pb: str, pa: str, block_size: int = DEFAULT_BLOCK_SIZE) -> Choice:
    """The per-task form stored at rank ``q`` with ``B`` at ``pb`` and ``A`` at ``pa`` (a :func:`separate_table` entry)."""
    sb, a = sb.double(), a.double()
    uu, s, vh = separate_factors(sb, a)
    q = min(q, s.numel())
    b, aa = store(uu[:, :q], pb, block_size), store(s[:q, None] * vh[:q], pa, block_size)
    err = ops.lowrank_rel_error(sb, a, b.value, aa.value)
    return Choice({"b": b, "a": aa}, err, q, bits={"b": BITS[pb], "a": BITS[pa]})


# -- the shared form ---------------------------------------------------------------------------


@dataclass
class SharedBasis:
    """One candidate basis of a shared module: ``U``, ``V`` at a precision, their Grams, and each task's best core."""

    u: Stored
    v: Stored
    gu: Tensor
    gv: Tensor
    cores: dict[str, Choice] = field(default_factory=dict)
    feasible: bool = True

    @property
    def nbytes(self) -> int:
        return self.u.nbytes + self.v.nbytes + sum(c.nbytes for c in self.cores.values())


def shared_bases(u: Tensor, v: Tensor, precisions: tuple[str, ...] = PRECISIONS,
                 block_size: int = DEFAULT_BLOCK_SIZE) -> list[SharedBasis]:
    """``u``, ``v`` stored at each precision (both sides alike), with their Grams in float64."""
    out = []
    for p in precisions:
        su, sv = store(u, p, block_size, trial=True), store(v, p, block_size, trial=True)
        ud, vd = su.value.double(), sv.value.double()
        out.append(SharedBasis(su, sv, ud.T @ ud, vd.T @ vd))
    return out


def core_error(sigma: Tensor, core: Tensor, gu: Tensor, gv: Tensor, n2: float) -> float:
    """``‖ΔW − Û·core·V̂ᵀ‖/‖ΔW‖`` from ``sigma = ÛᵀΔWV̂`` and the Grams: ``n2 − 2⟨σ, core⟩ + tr(coreᵀ·gu·core·gv)``."""
    cross = float((sigma * core).sum())
    h2 = float(((core.T @ gu) @ (core @ gv)).diagonal().sum())
    err2 = max(0.0, n2 - 2.0 * cross + h2)
    if n2 <= 0.0:
        return 0.0 if err2 <= 0.0 else float("inf")
    return (err2 / n2) ** 0.5


def choose_core(basis: SharedBasis, sb: Tensor, a: Tensor, rank: int, target: float | None, n2: float, *,
                precisions: tuple[str, ...] = PRECISIONS, block_size: int = DEFAULT_BLOCK_SIZE) -> Choice:
    """A task's core in a stored basis at the cheapest precision meeting ``target`` (fp16 without one).

    The core is ``Σ = ÛᵀΔWV̂`` (ku×kv), or its rank-q factors ``c``/``d`` where they are
    fewer numbers (q = min(rank, ku, kv)), as :func:`engine.subspace.joint.encode_joint` stores it.
    """
    ud, vd = basis.u.value.double(), basis.v.value.double()
    ku, kv = ud.shape[1], vd.shape[1]
    sigma = (ud.T @ sb.double()) @ (a.double() @ vd)
    q = min(rank, ku, kv)
    factored = bool(ku and kv and q * (ku + kv) < ku * kv)
    if factored:
        p_, s_, qh = torch.linalg.svd(sigma, full_matrices=False)
        parts = {"c": p_[:, :q] * s_[:q], "d": qh[:q]}
    else:
        parts = {"sigma": sigma}
    cands = sorted(((sum(tensor_bytes(t.numel(), p, block_size) for t in parts.values()), i, p)
                    for i, p in enumerate(precisions if target is not None else ("fp16",))))
    best: Choice | None = None
    for _, _, p in cands:
        st = {k: store(t, p, block_size, trial=True) for k, t in parts.items()}
        core = st["c"].value.double() @ st["d"].value.double() if factored else st["sigma"].value.double()
        err = core_error(sigma, core, basis.gu, basis.gv, n2)
        c = Choice(st, err, q if factored else min(ku, kv), bits={k: BITS[p] for k in st})
        if target is None or err <= target + 1e-12:
            c.tensors = {k: finish(v) for k, v in c.tensors.items()}
            return c
        if best is None or err < best.error:
            best = c
    assert best is not None
    best.met = False
    best.tensors = {k: finish(v) for k, v in best.tensors.items()}
    return best


def check_build_precision(precision: str, block_size: int, method: str, dtype: torch.dtype) -> None:
    """``ValueError`` when a build's ``precision`` does not fit its method or storage dtype."""
    check_precision(precision, block_size)
    if precision == "auto" and method == "pca":
        raise ValueError("precision='auto' needs method joint, share or svd (pca stores its loadings at dtype)")
    if precision == "auto" and dtype != torch.float16:
        raise ValueError(f"precision='auto' stores unquantised tensors at float16; got dtype {dtype} (use dtype float16)")


def module_breakdown(sub: Any) -> dict[str, dict[str, Any]]:
    """Per module of a :class:`~engine.subspace.core.SharedSubspace`: how many bits each stored tensor has and its bytes.

    Returns:
        ``{module: {"bits": {tensor key: [distinct bits over tasks]}, "bytes": tensor bytes of the module
        (its basis plus every task's coefficients, as stored: codes and scales of quantised tensors)}}``.
    """
    elem = torch.empty(0, dtype=sub.dtype).element_size()
    out: dict[str, dict[str, Any]] = {}
    for m, b in sorted(sub.modules.items()):
        bits: dict[str, set[int]] = {}
        total = 0

        def count(key: str, t: Tensor, qt: Any) -> None:
            nonlocal total
            if qt is not None:
                bits.setdefault(key, set()).add(int(qt.bits))
                total += int(qt.nbytes)
            else:
                e = t.element_size() if not t.is_floating_point() else elem
                bits.setdefault(key, set()).add(8 * e)
                total += t.numel() * e

        for key, t in b.tensors.items():
            if not key.startswith("sv_"):
                count(key, t, sub.quantized.get((m, key)))
        for tid, proj in sub.tasks.items():
            for key, t in proj.coeffs.get(m, {}).items():
                if t.numel():
                    count(key, t, sub.quantized.get((tid, m, key)))
        out[m] = {"bits": {k: sorted(v) for k, v in sorted(bits.items())}, "bytes": int(total)}
    return out
