"""Training new tasks inside a shared subspace, and routing inputs to a blend of its tasks.

Names resolve lazily, so that ``engine.training`` imports transformers only when
``VLoRACallback`` is asked for.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "orthogonal_init": ".trainer",
    "task_template": ".trainer",
    "SubspaceTrainer": ".trainer",
    "VLoRACallback": ".callback",
    "TaskRouter": ".router",
    "RoutedBlend": ".router",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
