"""Spectra of a collection: how much of each update a subspace covers, and the variance top-k shared directions explain.

The column space of ``[ΔW_1 … ΔW_N]`` has the spectrum of ``CᵀC`` with
``C = [s_i B_i (A_iA_iᵀ)^{1/2}]`` (R×R); the energy a column basis ``U`` and row
basis ``V`` capture is ``‖s·(UᵀB)(AV)‖_F²`` (k×k).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .. import ops
from ..errors import IncompatibleAdaptersError
from ..io.compat import check_compatible
from ..progress import CancelLike, ProgressFn, tick
from ..types import LoRAWeights
from .similarity import _DTYPE, _label

# -- subspace coverage -------------------------------------------------------------


def _entry_to_uv(entry: Any) -> tuple[Tensor | None, Tensor | None]:
    """``(U, V)`` from one module's entry: a pair, a mapping with ``U``/``V``, or an object with ``.tensors``."""
    if entry is None:
        return None, None
    if isinstance(entry, (tuple, list)):
        if len(entry) != 2:
            raise ValueError(f"subspace: a module's bases must be a (U, V) pair, got {len(entry)} items")
        return entry[0], entry[1]
    tensors = getattr(entry, "tensors", entry)
    if isinstance(tensors, Mapping):
        return tensors.get("U"), tensors.get("V")
    raise ValueError(f"subspace: cannot read column/row bases from {type(entry).__name__}")


def _module_bases(subspace: Any, module: str) -> tuple[Tensor | None, Tensor | None]:
    """Column basis ``U`` (out×k) and row basis ``V`` (in×k) of ``module``, either may be ``None``.

    Accepted protocols, in order: a ``module_bases(module)`` method; a mapping
    (or a ``.bases`` / ``.modules`` mapping) from module to ``(U, V)``, ``{"U", "V"}``
    or an object with such ``.tensors`` — :class:`engine.subspace.SharedSubspace`'s
    ``modules`` of joint/share :class:`ModuleBasis`; ``components_b`` (out×k) /
    ``components_a`` (k×in) mappings as in vlora. A module whose basis has no
    column/row basis (the ``pca`` method's flattened-factor components, ``svd``'s
    per-task factors) gives ``(None, None)``.
    """
    fn = getattr(subspace, "module_bases", None)
    if callable(fn):
        return _entry_to_uv(fn(module))
    table = subspace if isinstance(subspace, Mapping) else getattr(subspace, "bases", None)
    if table is None and isinstance(getattr(subspace, "modules", None), Mapping):
        table = subspace.modules  # engine.subspace.SharedSubspace: module → ModuleBasis
    if isinstance(table, Mapping):
        return _entry_to_uv(table.get(module))
    comp_b = getattr(subspace, "components_b", None)
    comp_a = getattr(subspace, "components_a", None)
    if isinstance(comp_b, Mapping) or isinstance(comp_a, Mapping):
        u = comp_b.get(module) if isinstance(comp_b, Mapping) else None
        v = comp_a.get(module) if isinstance(comp_a, Mapping) else None
        return u, (v.T if v is not None else None)
    raise ValueError(
        f"subspace: {type(subspace).__name__} offers no column/row bases "
        "(expected module_bases(), a module → (U, V) mapping, .bases, or components_a/components_b)"
    )


def _orthonormal(basis: Tensor, dim: int, what: str, module: str) -> Tensor:
    basis = basis.to(_DTYPE)
    if basis.ndim != 2 or basis.shape[0] != dim:
        raise IncompatibleAdaptersError(
            f"module '{module}': {what} basis has shape {tuple(basis.shape)}, the adapter needs ({dim}, k)"
        )
    if basis.shape[1] == 0:
        return basis
    return torch.linalg.qr(basis).Q


@dataclass
class CoverageResult:
    """Share of an adapter's ΔW energy that a subspace's bases capture.

    Attributes:
        name: The adapter's name.
        modules: Module → ``‖UᵀΔW V‖²/‖ΔW‖²`` (1.0 for a zero update).
        overall: The same over all covered modules, energy-weighted.
        missing: Modules of the adapter the subspace has no column/row basis for.
    """

    name: str
    modules: dict[str, float]
    overall: float
    missing: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "overall": self.overall, "modules": dict(self.modules), "missing": list(self.missing)}


def subspace_coverage(
    subspace: Any,
    adapter: LoRAWeights,
    *,
    progress: ProgressFn | None = None,
    cancel: CancelLike | None = None,
) -> dict[str, dict[str, float]]:
    """The seed's call: module → ``{"coverage_a", "coverage_b", "coverage_mean"}``.

    Coverage of a side is ``1 − ‖x − P x‖/‖x‖`` (1.0 for a zero ``x``). On a ``pca``
    subspace (the seed's), ``x`` is the side's flattened factor minus the mean and ``P``
    the projection on its components, exactly as the seed. On a subspace with column and
    row bases (``joint``/``share``) ``x`` is ΔW: ``coverage_b`` is its column space
    (``P x = UUᵀΔW``, the B side) and ``coverage_a`` its row space (``ΔW VVᵀ``, the A
    side). Modules without a shared basis are left out. :func:`coverage_report` gives
    the ΔW energy share per module.
    """
    out: dict[str, dict[str, float]] = {}
    mods = getattr(subspace, "modules", None)
    names = [m for m in adapter.layer_names if not isinstance(mods, Mapping) or m in mods]
    for i, m in enumerate(names):
        tick(progress, cancel, i, len(names), f"coverage: {m}")
        basis = mods.get(m) if isinstance(mods, Mapping) else None
        if basis is not None and getattr(basis, "kind", None) == "pca":
            cov = {}
            for side, x in (("a", adapter.lora_a[m]), ("b", adapter.lora_b[m])):
                c = x.to(_DTYPE).reshape(-1) - basis.tensors[f"mean_{side}"].to(_DTYPE)
                comp = basis.tensors[f"comp_{side}"].to(_DTYPE)
                n = float(c.norm())
                cov[f"coverage_{side}"] = 1.0 if n < 1e-8 else 1.0 - float((c - (c @ comp.T) @ comp).norm()) / n
        else:
            u, v = _module_bases(subspace, m)
            if u is None and v is None:
                continue
            out_f, in_f = adapter.shapes(m)
            b = adapter.lora_b[m].to(_DTYPE) * adapter.scale(m)
            a = adapter.lora_a[m].to(_DTYPE)
            e = max(float(((b.T @ b) * (a @ a.T)).sum()), 0.0)
            cov = {}
            for side, basis_t, dim, what in (("b", u, out_f, "column"), ("a", v, in_f, "row")):
                if basis_t is None or e <= 0:
                    cov[f"coverage_{side}"] = 1.0 if e <= 0 else 0.0
                    continue
                q = _orthonormal(basis_t, dim, what, m)
                if side == "b":
                    p = q.T @ b  # k×r: ‖UᵀΔW‖² = tr((UᵀB)ᵀ(UᵀB) AAᵀ)
                    cap = float(((p.T @ p) * (a @ a.T)).sum())
                else:
                    p = a @ q  # r×k
                    cap = float(((b.T @ b) * (p @ p.T)).sum())
                cov[f"coverage_{side}"] = 1.0 - math.sqrt(max(e - cap, 0.0) / e)
        cov["coverage_mean"] = (cov["coverage_a"] + cov["coverage_b"]) / 2.0
        out[m] = cov
    tick(progress, cancel, len(names), len(names), "coverage: done")
    return out


def coverage_report(
    subspace: Any,
    adapter: LoRAWeights,
    *,
    progress: ProgressFn | None = None,
    cancel: CancelLike | None = None,
) -> CoverageResult:
    """How much of ``adapter``'s update lies in the subspace's column/row bases, per module.

    For a module with orthonormal column basis ``U`` (out×k) and row basis ``V``
    (in×k), coverage is ``‖UᵀΔW V‖_F² / ‖ΔW‖_F²``; with only one of them it is
    ``‖UᵀΔW‖²/‖ΔW‖²`` or ``‖ΔW V‖²/‖ΔW‖²``. Bases are orthonormalized (thin QR)
    first, so any spanning set works. Computed as k×k / r×r products.

    Args:
        subspace: See :func:`_module_bases` for the accepted shapes (the shared
            subspace's joint bases, a ``{module: (U, V)}`` mapping, …).
        adapter: The adapter to measure.

    Raises:
        IncompatibleAdaptersError: a basis does not fit the module's shape.
        ValueError: the subspace offers no bases at all for the adapter's modules.
    """
    cov: dict[str, float] = {}
    missing: list[str] = []
    cap_total = 0.0
    energy_total = 0.0
    names = adapter.layer_names
    for i, m in enumerate(names):
        tick(progress, cancel, i, len(names), f"coverage: {m}")
        u, v = _module_bases(subspace, m)
        if u is None and v is None:
            missing.append(m)
            continue
        out_f, in_f = adapter.shapes(m)
        s = adapter.scale(m)
        b = adapter.lora_b[m].to(_DTYPE) * s
        a = adapter.lora_a[m].to(_DTYPE)
        energy = float(((b.T @ b) * (a @ a.T)).sum())
        left = _orthonormal(u, out_f, "column", m).T @ b if u is not None else None  # k×r
        right = a @ _orthonormal(v, in_f, "row", m) if v is not None else None  # r×k
        if left is not None and right is not None:
            captured = float((left @ right).pow(2).sum())
        elif left is not None:
            captured = float(((left.T @ left) * (a @ a.T)).sum())
        else:
            assert right is not None
            captured = float(((b.T @ b) * (right @ right.T)).sum())
        energy = max(energy, 0.0)
        cov[m] = min(1.0, max(0.0, captured / energy)) if energy > 0 else 1.0
        cap_total += max(captured, 0.0)
        energy_total += energy
    tick(progress, cancel, len(names), len(names), "coverage: done")
    if not cov:
        method = getattr(subspace, "method", None)
        why = f" (a {method!r} subspace has no column/row bases)" if method in ("pca", "svd") else ""
        raise ValueError(f"subspace: no column/row bases for any module of {_label(adapter, 0)}{why}")
    overall = min(1.0, cap_total / energy_total) if energy_total > 0 else 1.0
    return CoverageResult(name=_label(adapter, 0), modules=cov, overall=overall, missing=missing)


# -- explained variance --------------------------------------------------------------


@dataclass
class ExplainedVariance:
    """Spectrum of a collection's stacked updates, per module.

    Attributes:
        side: ``column`` (output space, what a shared ``U`` must span) or ``row`` (input space).
        spectra: Module → squared singular values of ``[ΔW_1 … ΔW_N]`` (column)
            or ``[ΔW_1; …; ΔW_N]`` (row), descending.
        ks: The k values tabulated in :meth:`to_dict`.
    """

    side: str
    spectra: dict[str, list[float]]
    ks: list[int] = field(default_factory=list)

    def cumulative(self, module: str) -> list[float]:
        """Share of the energy captured by the top k directions, for k = 1, 2, …."""
        s = self.spectra[module]
        total = sum(s)
        out, acc = [], 0.0
        for v in s:
            acc += v
            out.append(acc / total if total > 0 else 1.0)
        return out

    def ratio(self, module: str, k: int) -> float:
        """Share of the energy captured by the top ``k`` directions."""
        c = self.cumulative(module)
        if k <= 0:
            return 0.0
        return c[min(k, len(c)) - 1] if c else 1.0

    def components_for(self, module: str, fraction: float) -> int:
        """Smallest k capturing at least ``fraction`` of the energy."""
        for i, v in enumerate(self.cumulative(module), start=1):
            if v >= fraction - 1e-12:
                return i
        return len(self.spectra[module])

    def mean_ratio(self, k: int) -> float:
        """Mean over modules of :meth:`ratio`."""
        return sum(self.ratio(m, k) for m in self.spectra) / len(self.spectra) if self.spectra else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "side": self.side,
            "ks": list(self.ks),
            "mean": {str(k): self.mean_ratio(k) for k in self.ks},
            "modules": {
                m: {
                    "cumulative": self.cumulative(m),
                    "at_k": {str(k): self.ratio(m, k) for k in self.ks},
                    "k90": self.components_for(m, 0.90),
                    "k99": self.components_for(m, 0.99),
                }
                for m in self.spectra
            },
        }


def explained_variance(
    adapters: Sequence[LoRAWeights],
    ks: Sequence[int] | None = None,
    *,
    side: str = "column",
    progress: ProgressFn | None = None,
    cancel: CancelLike | None = None,
) -> ExplainedVariance:
    """Variance (energy) of the collection's updates explained by the top-k shared directions, per module.

    ``column``: the spectrum of ``[ΔW_1 … ΔW_N]``, whose top-k left singular
    vectors are the best k-dimensional shared column basis; computed as the
    eigenvalues of ``CᵀC`` with ``C = [s_i B_i (A_iA_iᵀ)^{1/2}]`` (R×R, R = Σr).
    ``row`` is the same on the input side. Uncentered: energy, not variance
    about a mean, since an adapter's update is measured from zero.

    Args:
        adapters: Compatible adapters.
        ks: k values to tabulate in ``to_dict`` (default 1, 2, 4, 8, … up to Σr).
        side: ``column`` or ``row``.
    """
    if side not in ("column", "row"):
        raise ValueError(f"side: expected 'column' or 'row', got {side!r}")
    adapters = list(adapters)
    report = check_compatible(adapters)
    spectra: dict[str, list[float]] = {}
    max_r = 0
    for i, m in enumerate(report.modules):
        tick(progress, cancel, i, len(report.modules), f"explained variance: {m}")
        parts = []
        for a in adapters:
            b = a.lora_b[m].to(torch.float32) * a.scale(m)
            aa = a.lora_a[m].to(torch.float32)
            if side == "column":
                parts.append(b @ ops.psd_sqrt((aa @ aa.T).to(_DTYPE)).to(torch.float32))
            else:
                parts.append(aa.T @ ops.psd_sqrt((b.T @ b).to(_DTYPE)).to(torch.float32))
        c = torch.cat(parts, dim=1)
        ev = torch.linalg.eigvalsh((c.T @ c).to(_DTYPE)).clamp(min=0).flip(0)
        rank_cap = min(c.shape)
        spectra[m] = [float(v) for v in ev[:rank_cap]]
        max_r = max(max_r, rank_cap)
    tick(progress, cancel, len(report.modules), len(report.modules), "explained variance: done")
    return ExplainedVariance(side=side, spectra=spectra, ks=_ks(ks, max_r))


def _ks(ks: Sequence[int] | None, max_r: int) -> list[int]:
    """The k values to tabulate: ``ks`` checked, or 1, 2, 4, … up to ``max_r``."""
    if ks is None:
        ks_list, k = [], 1
        while k < max_r:
            ks_list.append(k)
            k *= 2
        ks_list.append(max_r)
    else:
        ks_list = [int(k) for k in ks]
        bad = [k for k in ks_list if k < 1]
        if bad:
            raise ValueError(f"ks: must be positive, got {bad}")
    return ks_list


def explained_variance_paths(paths: Sequence[Any], names: Sequence[str], modules: Sequence[str], *,
                             memory_budget_mb: float | None = None, progress: ProgressFn | None = None,
                             cancel: CancelLike | None = None) -> ExplainedVariance:
    """:func:`explained_variance` (column side) of adapters at ``paths`` on ``modules``, read a chunk of modules at a time.

    Every adapter's factors of one chunk (bounded by ``memory_budget_mb``, at least one
    module) are in memory at once: the spectrum of a module needs all N adapters' factors.
    """
    from ..io.compat import check_compatible
    from ..subspace.common import AdapterSource
    from .gram import chunk_modules, read_block

    report = check_compatible([_summary_on(p, modules) for p in paths])
    nbytes = {m: 8 * max(report.ranks[m], default=0) * sum(report.shapes[m]) for m in report.modules}
    chunks = chunk_modules(len(paths), nbytes, memory_budget_mb)
    source = AdapterSource(list(names), None, list(paths))
    spectra: dict[str, list[float]] = {}
    for i, chunk in enumerate(chunks):
        tick(progress, cancel, i, len(chunks), f"explained variance: {chunk[0]}")
        spectra.update(explained_variance(read_block(source, chunk), cancel=cancel).spectra)
    tick(progress, cancel, len(chunks), len(chunks), "explained variance: done")
    return ExplainedVariance(side="column", spectra=spectra, ks=_ks(None, max((len(v) for v in spectra.values()), default=0)))


def _summary_on(path: Any, modules: Sequence[str]) -> Any:
    from dataclasses import replace

    from ..io.header import read_adapter_summary

    s = read_adapter_summary(path)
    return replace(s, modules=[m for m in s.modules if m.name in set(modules)])
