"""Analysis of adapter collections: similarity, clusters, outliers, diffs, coverage, explained variance, figures.

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

Modules: ``similarity`` (Gram and cosine matrices), ``clusters`` (clusters and
outliers), ``diff`` (two adapters), ``spectra`` (subspace coverage, explained
variance), ``figures`` (one adapter's per-module norms and spectrum). Everything
public is importable from ``engine.analysis``.
"""

from __future__ import annotations

from ..lazy import lazy_exports

# lazy, so that the torch-free parts (figures, for the job layer) load without torch
_EXPORTS = {
    "ClusterResult": ".clusters",
    "OutlierResult": ".clusters",
    "find_clusters": ".clusters",
    "find_outliers": ".clusters",
    "outlier_report": ".clusters",
    "DiffResult": ".diff",
    "ModuleDiff": ".diff",
    "adapter_diff": ".diff",
    "diff_report": ".diff",
    "module_figures": ".figures",
    "SimilarityResult": ".similarity",
    "compute_similarity_matrix": ".similarity",
    "module_gram": ".similarity",
    "similarity_report": ".similarity",
    "CoverageResult": ".spectra",
    "ExplainedVariance": ".spectra",
    "coverage_report": ".spectra",
    "explained_variance": ".spectra",
    "subspace_coverage": ".spectra",
}
__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
