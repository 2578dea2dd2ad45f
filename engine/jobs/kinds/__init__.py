"""The job kinds, one module each; :data:`KINDS` lists them in menu order.

A kind's module holds its :class:`~engine.jobs.base.JobKind` (``KIND``): parameters,
``--batch`` positionals, whether the TUI runs it in a process, what a form of it needs,
its place in the palette, the TUI's result view, and the function that runs it.
Adding a kind is one module here and one line in :data:`KINDS`.
"""

from __future__ import annotations

from ..base import JobKind
from . import add, analyze, benchmark, compare, compress, demo, diff, export, info, inspect, merge, quantize, train, validate

#: Every kind, in menu order (``--batch --help`` lists them so).
KINDS: tuple[JobKind, ...] = (
    demo.KIND,
    info.KIND,
    inspect.KIND,
    validate.KIND,
    analyze.KIND,
    diff.KIND,
    compress.KIND,
    add.KIND,
    export.KIND,
    merge.KIND,
    quantize.KIND,
    benchmark.KIND,
    compare.KIND,
    train.KIND,
)

__all__ = ["KINDS"]
