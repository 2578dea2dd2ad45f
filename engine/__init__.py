"""vlora engine: shared low-rank subspaces for collections of LoRA adapters.

The public API follows the ``vlora`` package's names. Names resolve lazily
(PEP 562) so that ``import engine`` is cheap and torch loads only when a tensor
operation needs it. The engine never imports Textual or rich.
"""

from __future__ import annotations

import os

from .lazy import lazy_exports

# OpenMP threads that spin-wait for work make small LAPACK calls (the SVDs and QRs of
# r×r and k×k blocks this engine runs by the thousand) up to 100x slower whenever another
# process uses a core. Sleeping waiters cost nothing measurable on large ops. Set before
# torch loads (it loads lazily, after this); a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # types and errors
    "LoRAWeights": ".types",
    "AdapterSummary": ".types",
    "Progress": ".progress",
    "VloraError": ".errors",
    "AdapterFormatError": ".errors",
    "UnsupportedAdapterError": ".errors",
    "IncompatibleAdaptersError": ".errors",
    "SubspaceFormatError": ".errors",
    "UnknownTaskError": ".errors",
    "HubError": ".errors",
    "OutputExistsError": ".errors",
    "JobCancelled": ".errors",
    "ErrorTargetError": ".errors",
    "JobFailed": ".errors",
    # I/O
    "load_adapter": ".io.local",
    "save_adapter": ".io.local",
    "check_compatible": ".io.local",
    "load_adapter_from_hub": ".io.hub",
    "search_hub_adapters": ".io.hub",
    "list_cached_adapters": ".io.hub",
    "read_adapter_summary": ".io.header",
    "scan_local_adapters": ".io.scan",
    # demo
    "make_demo_collection": ".demo",
    "make_demo_adapters": ".demo",
    # merging
    "MergeResult": ".merge",
    "merge_adapters": ".merge",
    "task_arithmetic": ".merge",
    "linear_merge": ".merge",
    "cat_merge": ".merge",
    "ties_merge": ".merge",
    "dare_merge": ".merge",
    # analysis
    "compute_similarity_matrix": ".analysis",
    "find_clusters": ".analysis",
    "find_outliers": ".analysis",
    "adapter_diff": ".analysis",
    "subspace_coverage": ".analysis",
    "explained_variance": ".analysis",
    "similarity_report": ".analysis",
    "outlier_report": ".analysis",
    "diff_report": ".analysis",
    "coverage_report": ".analysis",
    "SimilarityResult": ".analysis",
    "DiffResult": ".analysis",
    # shared subspace
    "SharedSubspace": ".subspace",
    "TaskProjection": ".subspace",
    # inference
    "VLoRAModel": ".inference",
    # training and routing in the subspace
    "orthogonal_init": ".training",
    "SubspaceTrainer": ".training",
    "VLoRACallback": ".training",
    "TaskRouter": ".training",
    "RoutedBlend": ".training",
    # pipeline helpers and jobs
    "init_subspace": ".pipeline",
    "absorb_task": ".pipeline",
    "extract_adapter": ".pipeline",
    "JobRequest": ".jobs",
    "JobResult": ".jobs",
    "job_kinds": ".jobs",
    "run_job": ".jobs",
    "InlineRunner": ".jobs",
    "ProcessRunner": ".jobs",
}

__all__ = sorted([*_EXPORTS, "__version__"])


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
