"""The difference of two adapters, module by module, through r×r products."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..errors import IncompatibleAdaptersError
from ..progress import CancelLike, ProgressFn, tick
from ..types import LoRAWeights
from .similarity import _DTYPE, _finite, _label, module_gram

# -- diff ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ModuleDiff:
    """How one module of two adapters differs.

    Attributes:
        module: Module name.
        norm_a: ``‖ΔW_a‖_F``.
        norm_b: ``‖ΔW_b‖_F``.
        cosine: ``cos(ΔW_a, ΔW_b)`` (0 if either is zero).
        relative_difference: ``‖ΔW_a − ΔW_b‖_F / ‖ΔW_a‖_F`` (inf if only ΔW_a is zero, 0 if both are).
        rank_a: Rank of the module in ``a``.
        rank_b: Rank of the module in ``b``.
    """

    module: str
    norm_a: float
    norm_b: float
    cosine: float
    relative_difference: float
    rank_a: int
    rank_b: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "norm_a": self.norm_a,
            "norm_b": self.norm_b,
            "cosine": self.cosine,
            "relative_difference": _finite(self.relative_difference),
            "rank_a": self.rank_a,
            "rank_b": self.rank_b,
        }


@dataclass
class DiffResult:
    """Per-module and overall comparison of two adapters.

    Attributes:
        name_a: First adapter's name.
        name_b: Second adapter's name.
        modules: One :class:`ModuleDiff` per module both adapters have.
        overall: The same figures with all shared modules as one vector.
        only_in_a: Modules only ``a`` has.
        only_in_b: Modules only ``b`` has.
    """

    name_a: str
    name_b: str
    modules: list[ModuleDiff]
    overall: ModuleDiff
    only_in_a: list[str] = field(default_factory=list)
    only_in_b: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "a": self.name_a,
            "b": self.name_b,
            "overall": self.overall.to_dict(),
            "modules": [d.to_dict() for d in self.modules],
            "only_in_a": list(self.only_in_a),
            "only_in_b": list(self.only_in_b),
        }


def _diff_figures(module: str, gram: Tensor, rank_a: int, rank_b: int) -> ModuleDiff:
    na2, nb2, ab = float(gram[0, 0]), float(gram[1, 1]), float(gram[0, 1])
    na, nb = math.sqrt(max(na2, 0.0)), math.sqrt(max(nb2, 0.0))
    cos = max(-1.0, min(1.0, ab / (na * nb))) if na > 0 and nb > 0 else 0.0
    d2 = max(na2 + nb2 - 2.0 * ab, 0.0)
    if na > 0:
        rel = math.sqrt(d2) / na
    else:
        rel = 0.0 if nb == 0 else math.inf
    return ModuleDiff(module, na, nb, cos, rel, rank_a, rank_b)


def adapter_diff(
    a: LoRAWeights,
    b: LoRAWeights,
    *,
    progress: ProgressFn | None = None,
    cancel: CancelLike | None = None,
) -> dict[str, dict[str, float]]:
    """The seed's call: module → ``{"l2_distance", "cosine_sim"}`` for the modules both have.

    ``l2_distance = ‖ΔW_a − ΔW_b‖_F`` and ``cosine_sim = cos(ΔW_a, ΔW_b)`` (the seed
    compares the flattened factors, docs/MIGRATING.md); extra keys ``norm_a``,
    ``norm_b`` and ``relative_difference``. :func:`diff_report` gives the full result.
    """
    res = diff_report(a, b, progress=progress, cancel=cancel)
    out: dict[str, dict[str, float]] = {}
    for d in res.modules:
        l2 = math.sqrt(max(d.norm_a ** 2 + d.norm_b ** 2 - 2.0 * d.cosine * d.norm_a * d.norm_b, 0.0))
        out[d.module] = {"l2_distance": l2, "cosine_sim": d.cosine, "norm_a": d.norm_a, "norm_b": d.norm_b,
                         "relative_difference": d.relative_difference}
    return out


def diff_report(
    a: LoRAWeights,
    b: LoRAWeights,
    *,
    progress: ProgressFn | None = None,
    cancel: CancelLike | None = None,
) -> DiffResult:
    """Compare two adapters module by module: norms, cosine and relative difference of ΔW.

    Modules only one adapter has are listed, not compared.

    Raises:
        IncompatibleAdaptersError: a shared module has different shapes.
    """
    shared = sorted(set(a.layer_names) & set(b.layer_names))
    bad = [f"'{m}' is {a.shapes(m)} in {_label(a, 0)} but {b.shapes(m)} in {_label(b, 1)}" for m in shared
           if a.shapes(m) != b.shapes(m)]
    if bad:
        more = f"; and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise IncompatibleAdaptersError("module shapes differ: " + "; ".join(bad[:3]) + more)
    total = torch.zeros(2, 2, dtype=_DTYPE)
    diffs: list[ModuleDiff] = []
    for i, m in enumerate(shared):
        tick(progress, cancel, i, len(shared), f"diff: {m}")
        g = module_gram([a, b], m, dtype=_DTYPE)
        total += g
        diffs.append(_diff_figures(m, g, a.module_rank(m), b.module_rank(m)))
    tick(progress, cancel, len(shared), len(shared), "diff: done")
    return DiffResult(
        name_a=_label(a, 0),
        name_b=_label(b, 1),
        modules=diffs,
        overall=_diff_figures("(all)", total, int(a.rank), int(b.rank)),
        only_in_a=sorted(set(a.layer_names) - set(b.layer_names)),
        only_in_b=sorted(set(b.layer_names) - set(a.layer_names)),
    )
