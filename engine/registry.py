"""One registry of methods (compress, merge, quantize, …) with their parameters.

The TUI builds forms and ``--batch`` builds flags from these descriptions
instead of hard-coding them (after mergekit's method registry).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: Types a parameter can have; front ends map each to a widget / argparse type.
PARAM_TYPES = ("int", "float", "str", "bool", "choice", "path", "paths", "floats", "strs")


@dataclass(frozen=True)
class Param:
    """One parameter of a method or job.

    Attributes:
        name: Python keyword name (CLI flag is ``--name-with-dashes``).
        type: One of :data:`PARAM_TYPES`.
        default: Default value (``None`` = unset/optional).
        help: One line for forms and ``--help``.
        choices: Allowed values for ``choice``.
        required: Must be given.
        minimum: Inclusive lower bound for numbers (exclusive with ``exclusive_minimum``).
        maximum: Inclusive upper bound for numbers.
        exclusive_minimum: The value must be strictly above ``minimum``.

    ``float`` and ``floats`` values must be finite: NaN and infinity are refused.
    """

    name: str
    type: str
    default: Any = None
    help: str = ""
    choices: tuple[Any, ...] = ()
    required: bool = False
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False

    def __post_init__(self) -> None:
        if self.type not in PARAM_TYPES:
            raise ValueError(f"Param {self.name!r}: unknown type {self.type!r}")

    def validate(self, value: Any) -> Any:
        """Coerce and check one value; raises ``ValueError`` naming the parameter."""
        if value is None:
            if self.required:
                raise ValueError(f"{self.name}: required")
            return None
        try:
            if self.type == "int":
                value = int(value)
            elif self.type == "float":
                value = float(value)
            elif self.type == "bool":
                value = value if isinstance(value, bool) else str(value).lower() in {"1", "true", "yes", "on"}
            elif self.type in ("str", "path", "choice"):
                value = str(value) if self.type != "choice" or not isinstance(value, (int, float)) else value
            elif self.type in ("paths", "strs"):
                value = [str(v) for v in (value.split() if isinstance(value, str) else value)]
            elif self.type == "floats":
                value = [float(v) for v in (value.replace(",", " ").split() if isinstance(value, str) else value)]
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{self.name}: expected {self.type}, got {value!r}") from exc
        if self.type == "choice" and self.choices and value not in self.choices:
            raise ValueError(f"{self.name}: {value!r} is not one of {', '.join(map(str, self.choices))}")
        if self.type in ("float", "floats"):
            bad = [v for v in (value if self.type == "floats" else [value]) if not math.isfinite(v)]
            if bad:
                raise ValueError(f"{self.name}: expected a finite number, got {bad[0]}")
        if self.type in ("int", "float"):
            if self.minimum is not None and self.exclusive_minimum and value <= self.minimum:
                raise ValueError(f"{self.name}: {value} must be above {self.minimum:g}")
            if self.minimum is not None and value < self.minimum:
                raise ValueError(f"{self.name}: {value} is below the minimum {self.minimum}")
            if self.maximum is not None and value > self.maximum:
                raise ValueError(f"{self.name}: {value} is above the maximum {self.maximum}")
        return value


@dataclass(frozen=True)
class MethodInfo:
    """A registered method: its kind (``compress``/``merge``/``quantize``), name, help, parameters.

    ``func`` runs it; a subclass may carry more (``engine.methods.compress.CompressMethod`` builds).
    """

    kind: str
    name: str
    help: str
    params: tuple[Param, ...] = ()
    func: Callable[..., Any] | None = field(default=None, compare=False, repr=False)


_REGISTRY: dict[str, dict[str, MethodInfo]] = {}


def register(kind: str, name: str, help: str, params: tuple[Param, ...] = ()) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register ``func`` as method ``name`` of ``kind``."""

    def deco(func: Callable[..., Any]) -> Callable[..., Any]:
        register_method(MethodInfo(kind, name, help, tuple(params), func))
        return func

    return deco


def register_method(method: MethodInfo) -> MethodInfo:
    """Register a method object (a :class:`MethodInfo` or subclass, e.g. a compression method that owns its build)."""
    _REGISTRY.setdefault(method.kind, {})[method.name] = method
    return method


def methods(kind: str) -> dict[str, MethodInfo]:
    """Registered methods of ``kind`` by name (imports the modules that register them)."""
    _load(kind)
    return dict(_REGISTRY.get(kind, {}))


def get_method(kind: str, name: str) -> MethodInfo:
    """One method; ``ValueError`` listing the known names if it is not registered."""
    found = methods(kind)
    if name not in found:
        raise ValueError(f"unknown {kind} method {name!r}; choose from {', '.join(sorted(found)) or '(none)'}")
    return found[name]


#: Modules that register each kind (imported on first use, so listing stays lazy).
_PROVIDERS: dict[str, tuple[str, ...]] = {
    "compress": ("engine.methods.compress",),
    "merge": ("engine.methods.merge",),
    "quantize": ("engine.methods.quantize",),
}


def _load(kind: str) -> None:
    import importlib

    for mod in _PROVIDERS.get(kind, ()):
        importlib.import_module(mod)
