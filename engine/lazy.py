"""One PEP 562 lazy-export helper for the engine's packages (``import engine`` stays cheap, torch loads on use)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, exports: dict[str, str], namespace: dict[str, Any]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: a name in ``exports`` is imported from its module on first use.

    Args:
        package: The package's ``__name__`` (relative module names resolve against it).
        exports: Public name → relative module that defines it.
        namespace: The package's ``globals()``: a resolved name is cached there.
    """
    names = sorted({*exports, *(n for n in namespace.get("__all__", ()))})

    def __getattr__(name: str) -> Any:
        if name in exports:
            value = getattr(importlib.import_module(exports[name], package), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return names

    return __getattr__, __dir__
