"""The coefficients of a subspace loaded with ``lazy=True``: read from its folder per task, on first use.

A lazily loaded subspace (:func:`engine.subspace.storage.load_subspace`, what a build with an
output folder returns) holds its bases and every task's manifest entry; a task's record holds
tensors on the ``meta`` device of the stored shapes and dtypes (and quantised tensors of meta
parts), so its bytes, errors, ranks and how each module is stored are known without reading
its file. ``SharedSubspace._task`` reads a task's file the first time the task is used
(:func:`read_task`, checksum verified then); operations on the whole collection (save
elsewhere, quantize, absorb, ``to``, ``copy``, serving and training) read every task first
(:func:`materialize`), so they work on a lazily loaded subspace as on one loaded whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import SubspaceFormatError
from . import layout
from .quant import QuantizedTensor
from .storage import SEP, _read_packed, _sha256, _task_record


class OnDisk:
    """Where the coefficients of a subspace loaded with ``lazy=True`` are, and which tasks are not read yet."""

    def __init__(self, path: Path, entries: dict[str, dict[str, Any]], layouts: dict[str, list[tuple[str, list[str]]]],
                 files: dict[str, dict[str, Any]]) -> None:
        self.path = path
        self.entries = entries
        self.layouts = layouts
        self.files = files
        self.unread: set[str] = set(entries)


def read_task(sub: Any, task_id: str) -> None:
    """Read ``task_id``'s coefficients into ``sub`` if it was loaded lazily and the task is not read yet."""
    od = getattr(sub, "on_disk", None)
    if od is None or task_id not in od.unread:
        return
    t = od.entries[task_id]
    fp = od.path / t["file"]
    if not fp.is_file() or _sha256(fp) != od.files[t["file"]]["sha256"]:
        raise SubspaceFormatError(f"{fp}: {'is missing' if not fp.is_file() else 'fails its sha256 checksum'} "
                                  "(the folder changed since it was loaded)")
    fresh: dict[tuple[str, ...], QuantizedTensor] = {}
    rec = _task_record(od.path, t, sub.modules, *_read_packed(fp, od.layouts[t["file"]]), fresh)
    for key in [k for k in sub.quantized if len(k) == 3 and k[0] == task_id]:
        del sub.quantized[key]
    sub.quantized.update(fresh)
    sub.tasks[task_id].coeffs = rec.coeffs
    if rec.template is not None and sub.tasks[task_id].template is not None:
        sub.tasks[task_id].template.extra_tensors = rec.template.extra_tensors
    od.unread.discard(task_id)


def materialize(sub: Any) -> None:
    """Read every task not read yet of a subspace loaded lazily (before an operation on the whole collection)."""
    od = getattr(sub, "on_disk", None)
    if od is None:
        return
    for tid in [t for t in sub.tasks if t in od.unread]:
        read_task(sub, tid)
    sub.on_disk = None


def meta_tensors(specs: list[tuple[str, list[str]]]) -> tuple[dict[str, Tensor], dict[str, QuantizedTensor]]:
    """What :func:`_read_packed` returns for these specs, as tensors on the ``meta`` device (no bytes read)."""
    plain: dict[str, Tensor] = {}
    qts: dict[str, QuantizedTensor] = {}
    for m, module_specs in specs:
        for s in module_specs:
            p = layout.parse_spec(s)
            name = f"{m}{SEP}{p['key']}"
            if "quant" in p:
                parts = {part: torch.empty(n, dtype=dt, device="meta") for part, dt, n in layout.part_layout(p)}
                qts[name] = QuantizedTensor.from_parts(p["quant"], parts)
                plain[name] = torch.empty(p["shape"], dtype=torch.float32, device="meta")
            else:
                plain[name] = torch.empty(p["shape"], dtype=p["dtype"], device="meta")
    return plain, qts
