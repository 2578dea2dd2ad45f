"""Merging LoRA adapters: linear, task arithmetic, cat, TIES and DARE.

Every method merges the *updates* ``ΔW_i = scale_i · B_i @ A_i``, never A and B
separately: the mean of the Bs times the mean of the As is not the mean of the
products (PEFT's ``combination_type="linear"`` does the factor-wise thing; our
``linear`` does not).

Output rank:

* ``"exact"`` (linear, task arithmetic, cat): the weighted sum of low-rank
  updates is itself low rank, so it is written exactly by concatenation,
  ``B = [w_1 s_1 B_1, …, w_N s_N B_N]``, ``A = [A_1; …; A_N]``, rank ``Σ r_i``.
* an integer ``k``: the best rank-``k`` approximation. For the exact-representable
  methods it is computed from the stacked factors through two thin QRs and an
  SVD of a ``Σr × Σr`` core, never forming ``out × in``. TIES and DARE act on
  single entries of ΔW, so they form the dense updates of *one module at a time*
  (a few ``out × in`` buffers) and truncate that module's merged ΔW by SVD.
* ``"auto"`` / ``None``: ``"exact"`` where possible, else the largest input rank
  (PEFT's default ``svd_rank``).

The relative ΔW error of the truncation, ``‖ΔW − ΔW_k‖_F / ‖ΔW‖_F``, is reported
per module in :class:`MergeResult`.

The vlora-style functions (:func:`task_arithmetic`, :func:`ties_merge`,
:func:`dare_merge`, :func:`linear_merge`, :func:`cat_merge`) return the merged
:class:`~engine.types.LoRAWeights`; :func:`merge_adapters` returns the full
:class:`MergeResult` (weights, errors, parameters, warnings).

Modules: ``driver`` (:func:`merge_adapters`, :class:`MergeResult`), ``lowrank``
(stacked factors, truncation), ``entrywise`` (TIES, DARE), ``methods`` (the
vlora-style functions). Everything public is importable from ``engine.merge``.
"""

from __future__ import annotations

from .driver import METHOD_NAMES, MergeResult, merge_adapters
from .entrywise import dare_mask, magnitude_threshold
from .lowrank import svd_truncate_dense, truncate_factors
from .methods import MERGE_METHODS, cat_merge, dare_merge, linear_merge, task_arithmetic, ties_merge

__all__ = [
    "MERGE_METHODS",
    "METHOD_NAMES",
    "MergeResult",
    "cat_merge",
    "dare_mask",
    "dare_merge",
    "linear_merge",
    "magnitude_threshold",
    "merge_adapters",
    "svd_truncate_dense",
    "task_arithmetic",
    "ties_merge",
    "truncate_factors",
]
