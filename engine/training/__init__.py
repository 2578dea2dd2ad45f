"""Training new tasks inside a shared subspace, and routing inputs to a blend of its tasks.

Names resolve lazily, so that ``engine.training`` imports transformers only when
``VLoRACallback`` is asked for.
"""

from __future__ import annotations


from ..lazy import lazy_exports

_EXPORTS = {
    "orthogonal_init": ".trainer",
    "task_template": ".trainer",
    "SubspaceTrainer": ".trainer",
    "VLoRACallback": ".callback",
    "TaskRouter": ".router",
    "RoutedBlend": ".router",
    "evaluate": ".evaluate",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
