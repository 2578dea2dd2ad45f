"""Clusters and outliers of a collection, from its similarity matrix (:mod:`engine.analysis.similarity`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..io.compat import check_compatible
from ..progress import CancelLike, ProgressFn, tick
from ..types import LoRAWeights
from .similarity import _as_matrix, _DTYPE, _label, module_gram, SimilarityResult, similarity_report

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
