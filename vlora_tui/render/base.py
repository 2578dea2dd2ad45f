"""What the renderers share: the block type, the registry by job kind, number formats.

A renderer turns a job kind's result (its typed result, ``JobKind.result``, or the ``data``
dict of a kind without one) into blocks that ``--batch`` prints as
plain text or rich tables: ``("kv", title, [(key, value)])``, ``("table", title,
[columns], [[cells]])`` or ``("lines", title, [str])``. Never imports Textual.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Block = tuple  # ("kv", title, [(key, value)]) | ("table", title, [columns], [[cells]]) | ("lines", title, [str])
Renderer = Callable[[Any], list[Block]]

#: Renderers by job kind name (filled by :func:`renderer`).
RENDERERS: dict[str, Renderer] = {}


def renderer(kind: str) -> Callable[[Renderer], Renderer]:
    """Register the decorated function as the renderer of job kind ``kind``."""

    def register(fn: Renderer) -> Renderer:
        RENDERERS[kind] = fn
        return fn

    return register


def render_blocks(kind: str, data: dict[str, Any], summary: str) -> list[Block]:
    """Turn a job's ``data`` into key/value blocks and tables for display (the summary if no renderer)."""
    from engine.jobs.catalog import typed_data

    fn = RENDERERS.get(kind)
    try:
        blocks = fn(typed_data(kind, data)) if fn else []
    except (KeyError, TypeError, ValueError, IndexError, AttributeError):  # a figure missing: show the summary
        blocks = []
    return blocks or [("lines", None, [summary])]


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(fmt(x) for x in v) if v else "-"
    return str(v)


def fmt_bytes(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return fmt(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def fmt_ratio(v: Any) -> str:
    return f"{v:.2f}x" if isinstance(v, (int, float)) else "-"
