"""Typed job results: each kind's result is a frozen dataclass, JSON-able both ways. Torch-free.

A job builds its result (``SubspaceInfo(...)``) and returns ``JobOutput(data=result.to_dict())``:
plain data, so it crosses the process boundary and is what ``--batch --json`` prints. The UI gets
the dataclass back with ``JobResult.typed()`` (the kind's ``result.from_dict``) and reads attributes.

``to_dict`` writes the fields in declared order (declare them in the JSON's order); a field made
with :func:`optional` is left out while it is ``None``. ``from_dict`` is tolerant: a missing key
takes the field's default (``None`` where it has none), an unknown key is ignored; a field typed as
a :class:`Result` (alone, ``| None``, ``list[...]`` or ``dict[str, ...]``) is built from its dict.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

R = TypeVar("R", bound="Result")


def optional(default: Any = None) -> Any:
    """A field left out of :meth:`Result.to_dict` while it is ``None`` (a key the JSON has only sometimes)."""
    return field(default=default, metadata={"omit_none": True})


@dataclass(frozen=True)
class Result:
    """Base of the job results (and of the tables nested in them)."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able dict, keys in field order (what ``--json`` prints under ``data``)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.metadata.get("omit_none"):
                continue
            out[f.name] = _plain(value)
        return out

    @classmethod
    def from_dict(cls: type[R], d: Mapping[str, Any]) -> R:
        """The result from its dict (``to_dict``'s, or a partial one: missing keys take defaults)."""
        hints = _hints(cls)
        kw: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in d:
                kw[f.name] = _typed(hints.get(f.name), d[f.name])
            elif f.default is MISSING and f.default_factory is MISSING:
                kw[f.name] = None
        return cls(**kw)


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = get_type_hints(cls)
    return _HINTS[cls]


def _result_class(hint: Any) -> type[Result] | None:
    return hint if isinstance(hint, type) and issubclass(hint, Result) else None


def _typed(hint: Any, value: Any) -> Any:
    """``value`` (plain data) as ``hint`` asks: Result classes from their dicts, anything else as it is."""
    if value is None or hint is None:
        return value
    cls = _result_class(hint)
    if cls is not None:
        return cls.from_dict(value) if isinstance(value, Mapping) else value
    origin = get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        for arg in get_args(hint):
            if _result_class(arg) is not None and isinstance(value, Mapping):
                return _typed(arg, value)
        return value
    args = get_args(hint)
    if origin is list and args and isinstance(value, list):
        return [_typed(args[0], v) for v in value]
    if origin is dict and len(args) == 2 and isinstance(value, Mapping) and _result_class(args[1]) is not None:
        return {k: _typed(args[1], v) for k, v in value.items()}
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, Result):
        return value.to_dict()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
