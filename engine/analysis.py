"""Analysis of adapter collections: similarity, clusters, outliers, diffs, coverage, explained variance.

Everything goes through small products of the LoRA factors and never forms an
``out × in`` update: with ``ΔW = s·B A``,

* ``⟨ΔW_1, ΔW_2⟩_F = s_1 s_2 · tr((B_1ᵀB_2)(A_2A_1ᵀ))``; for N adapters at once,
  stacking ``B = [s_1B_1 … s_NB_N]`` and ``A = [A_1; …; A_N]``, the whole N×N
  Gram matrix of one module is the block sums of ``(BᵀB) ∘ (AAᵀ)`` (R×R, R = Σr).
* the column space of the stacked updates ``[ΔW_1 … ΔW_N]`` has the spectrum of
  ``CᵀC`` with ``C = [s_i B_i (A_iA_iᵀ)^{1/2}]`` (R×R).
* the energy a column basis ``U`` and row basis ``V`` capture is
  ``‖s·(UᵀB)(AV)‖_F²`` (k×k).

Results are plain dataclasses whose ``to_dict()`` is JSON-ready (the TUI draws its
heatmap from it, ``--batch analyze --json`` prints it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import ops
from .errors import IncompatibleAdaptersError
from .io.local import check_compatible
from .progress import CancelLike, ProgressFn, tick
from .types import LoRAWeights

_DTYPE = torch.float64


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _matrix_list(t: Tensor) -> list[list[float]]:
    return [[float(v) for v in row] for row in t.tolist()]


def _label(a: LoRAWeights, i: int) -> str:
    return a.name or a.source or f"adapter #{i}"


def _cosine_from_gram(gram: Tensor) -> Tensor:
    norms = gram.diagonal().clamp(min=0).sqrt()
    denom = norms[:, None] * norms[None, :]
    cos = torch.where(denom > 0, gram / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(gram))
    cos = cos.clamp(-1.0, 1.0)
    idx = torch.arange(gram.shape[0])
    cos[idx, idx] = (norms > 0).to(cos.dtype)
    return cos


def module_gram(adapters: Sequence[LoRAWeights], module: str, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """N×N Gram matrix ``⟨ΔW_i, ΔW_j⟩_F`` of one module, through the Gram matrices of the stacked factors.

    Entry ``(i, j)`` is the sum of block ``(i, j)`` of ``(BᵀB) ∘ (AAᵀ)`` with the
    stacked factors ``B = [s_iB_i]``, ``A = [A_i]``. Only the upper block triangle
    is computed, in row chunks of about 512 factor columns (half the work of the
    full R×R products, and a bounded buffer). ``dtype`` is the dtype of the big
    products (float32 keeps 100 7B-shaped adapters fast); block sums are float64.
    """
    n = len(adapters)
    b = torch.cat([a.lora_b[module].to(dtype) * a.scale(module) for a in adapters], dim=1)
    a = torch.cat([ad.lora_a[module].to(dtype) for ad in adapters], dim=0)
    ranks = [ad.module_rank(module) for ad in adapters]
    offs = [0]
    for r in ranks:
        offs.append(offs[-1] + r)
    owner = torch.repeat_interleave(torch.arange(n), torch.tensor(ranks))
    gram = torch.zeros(n, n, dtype=_DTYPE)
    step = max(1, 512 // max(1, max(ranks)))
    for start in range(0, n, step):
        stop = min(n, start + step)
        i0, i1 = offs[start], offs[stop]
        h = ((b[:, i0:i1].T @ b[:, i0:]) * (a[i0:i1] @ a[i0:].T)).to(_DTYPE)
        # block sums: rows by owning adapter, then columns
        by_row = torch.zeros(stop - start, h.shape[1], dtype=_DTYPE).index_add_(0, owner[i0:i1] - start, h)
        gram[start:stop, start:] = torch.zeros(stop - start, n - start, dtype=_DTYPE).index_add_(1, owner[i0:] - start, by_row)
    upper = torch.triu(gram)
    return upper + torch.triu(gram, 1).T


# -- similarity -------------------------------------------------------------------


@dataclass
class SimilarityResult:
    """Cosine similarity of adapters' updates, overall and per module.

    Attributes:
        names: Adapter names, in input order.
        matrix: N×N cosine of the full updates (all modules as one vector).
        per_module: Module → N×N cosine of that module's ΔW.
        norms: ``‖ΔW‖_F`` of each adapter over all modules.
        module_norms: Module → ``‖ΔW‖_F`` per adapter.
    """

    names: list[str]
    matrix: Tensor
    per_module: dict[str, Tensor] = field(default_factory=dict)
    norms: list[float] = field(default_factory=list)
    module_norms: dict[str, list[float]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.names)

    def to_dict(self, *, modules: bool = True) -> dict[str, Any]:
        """JSON-ready: ``names``, ``matrix`` (list of rows), ``norms``, and per-module matrices when ``modules``."""
        out: dict[str, Any] = {"names": list(self.names), "matrix": _matrix_list(self.matrix), "norms": list(self.norms)}
        if modules:
            out["modules"] = {
                m: {"matrix": _matrix_list(t), "norms": list(self.module_norms.get(m, []))} for m, t in self.per_module.items()
            }
        return out


def compute_similarity_matrix(
    adapters: Sequence[LoRAWeights],
    *,
    progress: ProgressFn | None = None,
    cancel: CancelLike | None = None,
) -> Tensor:
    """The seed's call: the N×N cosine similarity of the adapters (a float32 tensor).

    The cosine is of the updates ΔW (all modules as one vector), not of the
    flattened factors as in the seed (docs/MIGRATING.md); :func:`similarity_report`
    returns the same matrix with names, norms and per-module matrices.

    Raises:
        ValueError: fewer than 2 adapters.
        IncompatibleAdaptersError: different base models, modules or shapes.
    """
    adapters = list(adapters)
    if len(adapters) < 2:
        raise ValueError(f"Need at least 2 adapters for similarity, got {len(adapters)}")
    return similarity_report(adapters, progress=progress, cancel=cancel).matrix.to(torch.float32)


def similarity_report(
    adapters: Sequence[LoRAWeights],
    *,
    progress: ProgressFn | None = None,
    cancel: CancelLike | None = None,
) -> SimilarityResult:
    """Cosine similarity of the adapters' updates ΔW, per module and overall.

    The overall similarity treats all modules of an adapter as one vector
    (``Σ_m ⟨ΔW_i^m, ΔW_j^m⟩`` over the product of norms). An all-zero update has
    similarity 0 with everything (and 0 on the diagonal).

    Raises:
        IncompatibleAdaptersError: different base models, modules or shapes.
        ValueError: no adapters.
    """
    adapters = list(adapters)
    report = check_compatible(adapters)
    n = len(adapters)
    total = torch.zeros(n, n, dtype=_DTYPE)
    per_module: dict[str, Tensor] = {}
    module_norms: dict[str, list[float]] = {}
    for i, m in enumerate(report.modules):
        tick(progress, cancel, i, len(report.modules), f"similarity: {m}")
        g = module_gram(adapters, m)
        total += g
        per_module[m] = _cosine_from_gram(g)
        module_norms[m] = [float(v) for v in g.diagonal().clamp(min=0).sqrt()]
    tick(progress, cancel, len(report.modules), len(report.modules), "similarity: done")
    return SimilarityResult(
        names=[_label(a, i) for i, a in enumerate(adapters)],
        matrix=_cosine_from_gram(total),
        per_module=per_module,
        norms=[float(v) for v in total.diagonal().clamp(min=0).sqrt()],
        module_norms=module_norms,
    )


def _as_matrix(sim: SimilarityResult | Tensor | Any) -> tuple[Tensor, list[str]]:
    if isinstance(sim, SimilarityResult):
        return sim.matrix.to(_DTYPE), list(sim.names)
    t = torch.as_tensor(sim, dtype=_DTYPE) if not isinstance(sim, Tensor) else sim.to(_DTYPE)
    if t.ndim != 2 or t.shape[0] != t.shape[1]:
        raise ValueError(f"sim: expected a square similarity matrix, got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError("sim: the similarity matrix holds NaN or Inf")
    return t, [f"adapter #{i}" for i in range(t.shape[0])]


# -- clusters and outliers -------------------------------------------------------


@dataclass
class ClusterResult:
    """Groups of similar adapters.

    Behaves as the list of clusters (lists of adapter indices), largest first.

    Attributes:
        clusters: Adapter indices per cluster, each sorted, largest cluster first.
        names: Adapter names (index → name).
        threshold: The similarity threshold used.
        linkage: ``average`` or ``single``.
    """

    clusters: list[list[int]]
    names: list[str]
    threshold: float
    linkage: str

    def __iter__(self):
        return iter(self.clusters)

    def __len__(self) -> int:
        return len(self.clusters)

    def __getitem__(self, i: int) -> list[int]:
        return self.clusters[i]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ClusterResult):
            return (self.clusters, self.names, self.threshold, self.linkage) == (
                other.clusters, other.names, other.threshold, other.linkage)
        if isinstance(other, list):
            return self.clusters == other
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def labels(self) -> list[int]:
        """Cluster number of each adapter."""
        out = [0] * len(self.names)
        for c, members in enumerate(self.clusters):
            for i in members:
                out[i] = c
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "linkage": self.linkage,
            "clusters": [{"members": list(c), "names": [self.names[i] for i in c]} for c in self.clusters],
        }


def find_clusters(sim: SimilarityResult | Tensor | Any, threshold: float = 0.9, *, linkage: str = "average") -> ClusterResult:
    """Agglomerative clustering of adapters by similarity.

    With ``average`` linkage two clusters merge while the mean similarity between
    their members is at least ``threshold`` (no chaining through one shared
    neighbour); ``single`` joins any pair at or above it (connected components).

    Args:
        sim: A :class:`SimilarityResult` or an N×N matrix (tensor, array, nested lists).
        threshold: Similarity at which adapters belong together (default 0.9, the seed's).
        linkage: ``average`` or ``single``.

    The result behaves as the seed's ``list[list[int]]`` (iterates, indexes and
    compares equal to it).
    """
    if linkage not in ("average", "single"):
        raise ValueError(f"linkage: expected 'average' or 'single', got {linkage!r}")
    mat, names = _as_matrix(sim)
    n = mat.shape[0]
    members: list[list[int]] = [[i] for i in range(n)]
    # cluster-level score: sum of pairwise similarities (average) or max (single)
    score = mat.clone()
    alive = torch.ones(n, dtype=torch.bool)
    sizes = torch.ones(n, dtype=_DTYPE)
    while int(alive.sum()) > 1:
        link = score / (sizes[:, None] * sizes[None, :]) if linkage == "average" else score.clone()
        mask = alive[:, None] & alive[None, :]
        mask.fill_diagonal_(False)
        link = torch.where(mask, link, torch.full_like(link, -math.inf))
        flat = int(torch.argmax(link))
        i, j = divmod(flat, n)
        if not (float(link[i, j]) >= threshold):
            break
        i, j = min(i, j), max(i, j)
        if linkage == "average":
            score[i, :] += score[j, :]
            score[:, i] += score[:, j]
        else:
            score[i, :] = torch.maximum(score[i, :], score[j, :])
            score[:, i] = torch.maximum(score[:, i], score[:, j])
        sizes[i] += sizes[j]
        alive[j] = False
        members[i].extend(members[j])
        members[j] = []
    clusters = sorted((sorted(c) for c in members if c), key=lambda c: (-len(c), c[0]))
    return ClusterResult(clusters=clusters, names=names, threshold=float(threshold), linkage=linkage)


@dataclass
class OutlierResult:
    """Adapters unlike every other one.

    Attributes:
        outliers: Indices whose largest |similarity| to any other adapter is below ``threshold``.
        names: Adapter names.
        max_similarity: Per adapter, the largest |cosine| to any other adapter.
        mean_similarity: Per adapter, the mean cosine to the others.
        threshold: The threshold used.
    """

    outliers: list[int]
    names: list[str]
    max_similarity: list[float]
    mean_similarity: list[float]
    threshold: float

    def __iter__(self):
        return iter(self.outliers)

    def __len__(self) -> int:
        return len(self.outliers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "outliers": [{"index": i, "name": self.names[i]} for i in self.outliers],
            "max_similarity": list(self.max_similarity),
            "mean_similarity": list(self.mean_similarity),
            "names": list(self.names),
        }


def find_outliers(
    adapters: Sequence[LoRAWeights],
    threshold: float = 2.0,
    *,
    progress: ProgressFn | None = None,
    cancel: CancelLike | None = None,
) -> list[dict[str, Any]]:
    """The seed's call: adapters far from the group's centroid, by z-score.

    Each adapter's distance to the mean update is ``‖ΔW_i − mean_j ΔW_j‖_F`` (all
    modules as one vector, through the Gram matrix of the updates; the seed uses the
    flattened factors, docs/MIGRATING.md). An adapter whose distance is more than
    ``threshold`` standard deviations (unbiased) above the mean distance is an outlier.

    Returns:
        One dict per outlier, ``{"index", "distance", "z_score", "name"}``, in input
        order; ``[]`` for fewer than 3 adapters or when all distances are equal.
    """
    adapters = list(adapters)
    if len(adapters) < 3:
        return []
    report = check_compatible(adapters)
    n = len(adapters)
    gram = torch.zeros(n, n, dtype=_DTYPE)
    for i, m in enumerate(report.modules):
        tick(progress, cancel, i, len(report.modules), f"outliers: {m}")
        gram += module_gram(adapters, m, dtype=_DTYPE)
    tick(progress, cancel, len(report.modules), len(report.modules), "outliers: done")
    # ‖x_i − x̄‖² = G_ii − 2/N Σ_j G_ij + 1/N² Σ_jk G_jk
    d2 = gram.diagonal() - 2.0 * gram.mean(dim=1) + gram.mean()
    dist = d2.clamp(min=0).sqrt()
    mean, std = float(dist.mean()), float(dist.std())
    if std < 1e-8 * max(1.0, mean):
        return []
    out = []
    for i in range(n):
        z = (float(dist[i]) - mean) / std
        if z > threshold:
            out.append({"index": i, "distance": float(dist[i]), "z_score": z, "name": _label(adapters[i], i)})
    return out


def outlier_report(
    adapters_or_sim: Sequence[LoRAWeights] | SimilarityResult | Tensor | Any,
    threshold: float = 0.1,
    *,
    progress: ProgressFn | None = None,
    cancel: CancelLike | None = None,
) -> OutlierResult:
    """Adapters whose update is nearly orthogonal to every other adapter's.

    An adapter is an outlier when ``max_j≠i |cos(ΔW_i, ΔW_j)|`` is below
    ``threshold`` (a negated copy of an adapter is related, hence the absolute
    value). With a single adapter nothing is an outlier.

    Args:
        adapters_or_sim: Adapters (the similarity is computed) or a similarity result/matrix.
        threshold: Largest similarity that still counts as unrelated.
    """
    if isinstance(adapters_or_sim, (list, tuple)) and adapters_or_sim and isinstance(adapters_or_sim[0], LoRAWeights):
        sim: Any = similarity_report(adapters_or_sim, progress=progress, cancel=cancel)
    else:
        sim = adapters_or_sim
    mat, names = _as_matrix(sim)
    n = mat.shape[0]
    if n < 2:
        return OutlierResult([], names, [0.0] * n, [0.0] * n, float(threshold))
    off = ~torch.eye(n, dtype=torch.bool)
    absmat = torch.where(off, mat.abs(), torch.full_like(mat, -math.inf))
    max_sim = absmat.max(dim=1).values
    mean_sim = torch.where(off, mat, torch.zeros_like(mat)).sum(dim=1) / (n - 1)
    outliers = [i for i in range(n) if float(max_sim[i]) < threshold]
    return OutlierResult(
        outliers=outliers,
        names=names,
        max_similarity=[float(v) for v in max_sim],
        mean_similarity=[float(v) for v in mean_sim],
        threshold=float(threshold),
    )


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
    return ExplainedVariance(side=side, spectra=spectra, ks=ks_list)


__all__ = [
    "ClusterResult",
    "CoverageResult",
    "DiffResult",
    "ExplainedVariance",
    "ModuleDiff",
    "OutlierResult",
    "SimilarityResult",
    "adapter_diff",
    "compute_similarity_matrix",
    "coverage_report",
    "diff_report",
    "explained_variance",
    "find_clusters",
    "find_outliers",
    "module_gram",
    "outlier_report",
    "similarity_report",
    "subspace_coverage",
]
