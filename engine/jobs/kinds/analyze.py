"""The ``analyze`` job kind: similarity of the updates ΔW, clusters, outliers and shared structure."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...progress import CancelLike, ProgressFn, StagedProgress
from ...registry import Param
from ..base import JobKind, JobOutput
from ..params import ADAPTERS, EXCLUDE
from ..results import Result, optional


@dataclass(frozen=True)
class Cluster(Result):
    """One cluster of adapters: their indices and names."""

    members: list[int] = field(default_factory=list)
    names: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Outlier(Result):
    """An adapter whose largest |cosine| to the others is below the outlier threshold."""

    index: int = 0
    name: str = ""


@dataclass(frozen=True)
class VarianceSummary(Result):
    """Shared structure: energy of all ΔW captured by the top-k shared directions
    (:meth:`engine.analysis.spectra.ExplainedVariance.to_dict`); ``mean``: k → share over modules."""

    side: str = "column"
    ks: list[int] = field(default_factory=list)
    mean: dict[str, float] = field(default_factory=dict)
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class AnalyzeResult(Result):
    """``analyze``: the cosine similarity of the adapters' ΔW, clusters, outliers and shared structure.

    ``modules`` (per-module matrices) only with ``per_module``; ``paths`` (each adapter's folder, in
    ``names``' order) is never in the job's data: the TUI's view adds it.
    """

    names: list[str] = field(default_factory=list)
    similarity: list[list[float | None]] = field(default_factory=list)
    norms: list[float] = field(default_factory=list)
    clusters: list[Cluster] = field(default_factory=list)
    threshold: float = 0.5
    linkage: str = "average"
    outliers: list[Outlier] = field(default_factory=list)
    outlier_threshold: float = 0.1
    max_similarity: list[float] = field(default_factory=list)
    mean_similarity: list[float] = field(default_factory=list)
    variance: VarianceSummary = field(default_factory=VarianceSummary)
    compared_modules: list[str] = field(default_factory=list)
    left_out: dict[str, list[str]] = field(default_factory=dict)
    modules: dict[str, dict[str, Any]] | None = optional()
    paths: list[str] | None = optional()


def run_analyze(params: dict[str, Any], *, progress: ProgressFn | None = None, cancel: CancelLike | None = None) -> JobOutput:
    """Similarity of the adapters' updates ΔW, clusters, outliers, and shared structure.

    Cosines go through r×r products (no d×d update is formed). The Gram matrix is a
    map-reduce over blocks of adapters (:mod:`engine.analysis.gram`): in this process,
    or with ``engine`` ``dask`` on a cluster whose workers read the adapters from
    their paths (and explained variance here reads every adapter's factors of one chunk of
    modules at a time, rather than all adapters whole).

    data: ``{"names": [str…], "similarity": N×N list (overall cosine of ΔW), "norms": [‖ΔW‖…],
    "clusters": [{"members": [i…], "names": [str…]}…] (largest first), "threshold", "linkage",
    "outliers": [{"index", "name"}…], "outlier_threshold", "max_similarity": [per adapter],
    "mean_similarity": [per adapter], "variance": {"side": "column", "ks", "mean": {k: share},
    "modules": {module: {"cumulative", "at_k", "k90", "k99"}}},
    "modules": {module: {"matrix", "norms"}} (only with ``per_module``),
    "compared_modules": [module…], "left_out": {adapter: [module…]}}``

    Adapters with different target modules are compared on the modules they all
    have (same shape); ``left_out`` lists, per adapter, the modules that leaves out
    (empty when every adapter has the same modules).
    """
    from ...analysis import explained_variance, find_clusters, outlier_report, similarity_report
    from ...io.local import common_modules
    from ...subspace.common import restrict_modules
    from ..common import load_adapters, resolve_local_paths
    from .compress import _engine_kwargs

    engine_kw = _engine_kwargs(params)
    stages = StagedProgress(progress, {"load": 2, "similarity": 2, "variance": 1})
    exclude = params.get("exclude")
    if engine_kw:  # the workers read the adapters from their paths; here, a chunk of modules at a time
        from ...analysis.gram import header_overlap
        from ...analysis.spectra import explained_variance_paths

        pairs = resolve_local_paths(params["adapters"], progress=stages.stage("load"), cancel=cancel, exclude=exclude)
        names, paths = [n for n, _ in pairs], [p for _, p in pairs]
        if len(paths) < 2:
            raise ValueError(f"adapters: analyze needs at least 2 adapters, got {len(paths)}")
        overlap = header_overlap(names, paths)
        sim = similarity_report(paths, names=names, modules=overlap.modules, per_module=params["per_module"],
                                progress=stages.stage("similarity"), cancel=cancel, **engine_kw)
        variance = explained_variance_paths(paths, names, overlap.modules, progress=stages.stage("variance"),
                                            cancel=cancel)
    else:
        adapters = load_adapters(params["adapters"], progress=stages.stage("load"), cancel=cancel, exclude=exclude)
        if len(adapters) < 2:
            raise ValueError(f"adapters: analyze needs at least 2 adapters, got {len(adapters)}")
        overlap = common_modules(adapters)
        if not overlap.complete:
            adapters = [restrict_modules(a, overlap.modules) for a in adapters]
        sim = similarity_report(adapters, per_module=params["per_module"], progress=stages.stage("similarity"),
                                cancel=cancel)
        variance = explained_variance(adapters, progress=stages.stage("variance"), cancel=cancel)
    clusters = find_clusters(sim, params["threshold"], linkage=params["linkage"])
    outliers = outlier_report(sim, params["outlier_threshold"])
    stages.done()
    sd = sim.to_dict(modules=params["per_module"])
    od = outliers.to_dict()
    result = AnalyzeResult.from_dict({
        "names": sd["names"], "similarity": sd["matrix"], "norms": sd["norms"],
        "clusters": clusters.to_dict()["clusters"], "threshold": clusters.threshold, "linkage": clusters.linkage,
        "outliers": od["outliers"], "outlier_threshold": od["threshold"], "max_similarity": od["max_similarity"],
        "mean_similarity": od["mean_similarity"], "variance": variance.to_dict(), **overlap.to_dict(),
        "modules": sd["modules"] if params["per_module"] else None,
    })
    multi = sum(1 for c in clusters if len(c) > 1)
    summary = f"{len(sim)} adapters: {len(clusters)} cluster(s) ({multi} with several members), {len(outliers)} outlier(s)"
    if not overlap.complete:
        summary += (f"; compared on the {len(overlap.modules)} modules all share "
                    f"({len(overlap.left_out)} adapter(s) have modules left out)")
    return JobOutput(summary=summary, data=result.to_dict())


KIND = JobKind(
    "analyze", "Analyze collection", "similarity of the updates ΔW, clusters, outliers and shared structure",
    (
        ADAPTERS,
        EXCLUDE,
        Param("threshold", "float", 0.5, "similarity at which adapters cluster together", minimum=-1.0, maximum=1.0),
        Param("outlier_threshold", "float", 0.1, "an adapter whose largest |cosine| to the others is below this is an outlier",
              minimum=0.0, maximum=1.0),
        Param("linkage", "choice", "average", "clustering linkage", ("average", "single")),
        Param("per_module", "bool", False, "also report per-module similarity matrices"),
        Param("engine", "choice", "inprocess", "where the similarity matrix is computed: inprocess, or dask (a "
              "LocalCluster of the CPU cores, or --scheduler's cluster; workers read the adapters from their paths, "
              "block by block; pip install 'vlora-tui[dask]')", ("inprocess", "dask")),
        Param("scheduler", "str", None, "with engine dask: a running Dask scheduler's address tcp://HOST:PORT "
              "(default: start a LocalCluster)"),
    ),
    func=run_analyze,
    positionals=("adapters",), min_adapters=2, form_rank=5, view="analysis",
    result=AnalyzeResult,
)
