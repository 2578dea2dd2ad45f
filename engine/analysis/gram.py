"""The similarity Gram matrix as map-reduce over blocks of adapters (in this process, or on Dask).

The N adapters are cut into ``b`` consecutive blocks; one map per block pair
``(I, J)``, ``I ≤ J``, reads those blocks' adapters (from their paths: only the
tensors of one chunk of modules at a time, ``safetensors.safe_open`` through
:func:`engine.io.local.load_adapter`) and returns the ``|I|×|J|`` block of
``⟨ΔW_i, ΔW_j⟩_F`` through r×r products (:func:`module_gram` on a diagonal block,
:func:`cross_gram` off it), summed over modules, and per module when asked. The
combine concatenates the blocks (associative, in order); the caller assembles
the N×N matrices and turns them into cosines. The driver holds the matrices and,
in this process, one block pair of one module chunk; on Dask the workers read the
adapters and only the blocks travel.

With one block (the in-process default while a module's factors of every adapter
fit ``memory_budget_mb``) the result is :func:`module_gram` on all adapters, as
before. The map functions are module-level so that they pickle.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import AdapterFormatError, VloraError
from ..subspace.common import AdapterSource, restrict_modules
from ..types import LoRAWeights
from .similarity import _DTYPE, module_gram

#: Default bound on the adapter factors one map holds at once (a block pair, one module chunk).
DEFAULT_BLOCK_MB = 1024.0


def cross_gram(left: Sequence[LoRAWeights], right: Sequence[LoRAWeights], module: str, *,
               dtype: torch.dtype = torch.float32) -> Tensor:
    """``|left|×|right|`` matrix ``⟨ΔW_i, ΔW_j⟩_F`` of one module: block sums of ``(B_LᵀB_R) ∘ (A_L A_Rᵀ)``.

    The off-diagonal counterpart of :func:`module_gram` (same products and dtypes),
    in row chunks of about 512 factor columns of ``left``.
    """
    def stack(ads: Sequence[LoRAWeights]) -> tuple[Tensor, Tensor, Tensor, list[int]]:
        b = torch.cat([a.lora_b[module].to(dtype) * a.scale(module) for a in ads], dim=1)
        a = torch.cat([ad.lora_a[module].to(dtype) for ad in ads], dim=0)
        ranks = [ad.module_rank(module) for ad in ads]
        return b, a, torch.repeat_interleave(torch.arange(len(ads)), torch.tensor(ranks)), ranks

    bl, al, own_l, ranks = stack(left)
    br, ar, own_r, _ = stack(right)
    offs = [0]
    for r in ranks:
        offs.append(offs[-1] + r)
    nl, nr = len(left), len(right)
    out = torch.zeros(nl, nr, dtype=_DTYPE)
    step = max(1, 512 // max(1, max(ranks, default=1)))
    for start in range(0, nl, step):
        stop = min(nl, start + step)
        i0, i1 = offs[start], offs[stop]
        h = ((bl[:, i0:i1].T @ br) * (al[i0:i1] @ ar.T)).to(_DTYPE)
        by_row = torch.zeros(stop - start, h.shape[1], dtype=_DTYPE).index_add_(0, own_l[i0:i1] - start, h)
        out[start:stop] = torch.zeros(stop - start, nr, dtype=_DTYPE).index_add_(1, own_r, by_row)
    return out


@dataclass
class GramTask:
    """One map: the block pair ``left × right`` (``right`` ``None``: the diagonal block ``left × left``)."""

    left: AdapterSource
    right: AdapterSource | None
    row: int  # index of left's first adapter
    col: int  # index of right's first adapter (``row`` on the diagonal)

    def __len__(self) -> int:
        return len(self.left) + (len(self.right) if self.right is not None else 0)

    def label(self, i: int) -> str:
        if i < len(self.left) or self.right is None:
            return self.left.label(min(i, len(self.left) - 1))
        return self.right.label(i - len(self.left))


@dataclass(frozen=True)
class GramPlan:
    """What every map shares: the module chunks (in report order) and whether per-module blocks are wanted."""

    chunks: tuple[tuple[str, ...], ...]
    per_module: bool


#: A map's (and the combine's) result: ``(row, col, summed block, {module: block} or None)`` per block pair.
Blocks = list[tuple[int, int, Tensor, dict[str, Tensor] | None]]


def read_block(source: AdapterSource, modules: Sequence[str]) -> list[LoRAWeights]:
    """The source's adapters restricted to ``modules``; from paths, only those tensors (checked finite).

    A failure reading one adapter is one error naming it (its path).
    """
    if source.adapters is not None:
        return [restrict_modules(a, modules) for a in source.adapters]
    from ..io.local import load_adapter

    assert source.paths is not None
    out = []
    for i, (t, p) in enumerate(zip(source.task_ids, source.paths)):
        try:
            out.append(load_adapter(p, name=t, modules=modules))
        except (VloraError, ValueError, KeyboardInterrupt):
            raise
        except Exception as exc:  # a torn file, an I/O error on a worker…
            raise AdapterFormatError(f"{source.label(i)}: cannot read the adapter ({type(exc).__name__}: {exc})") from exc
        missing = [m for m in modules if m not in out[-1].lora_a]
        if missing:
            raise AdapterFormatError(f"{source.label(i)}: lacks module '{missing[0]}' (the file changed since it was checked?)")
    return out


def map_block(task: GramTask, plan: GramPlan, tick: Any) -> Blocks:
    """The map: ``task``'s Gram block, module chunk after module chunk (``tick`` once per module in this process)."""
    nl = len(task.left)
    nr = nl if task.right is None else len(task.right)
    total = torch.zeros(nl, nr, dtype=_DTYPE)
    per: dict[str, Tensor] | None = {} if plan.per_module else None
    for chunk in plan.chunks:
        left = read_block(task.left, chunk)
        right = left if task.right is None else read_block(task.right, chunk)
        for m in chunk:
            g = module_gram(left, m) if task.right is None else cross_gram(left, right, m)
            total += g
            if per is not None:
                per[m] = g
            if tick is not None:
                tick(f"similarity: {m}")
        del left, right
    return [(task.row, task.col, total, per)]


def plan_blocks(n: int, module_bytes: dict[str, int], shards: int, memory_budget_mb: float | None) -> tuple[list[int], list[list[str]]]:
    """``(bounds, chunks)``: block boundaries of the ``n`` adapters and the module chunks a map reads at once.

    ``module_bytes``: bytes one adapter's factors of a module take in a map (largest rank).
    Blocks are as large as the budget allows (fewest re-reads: each adapter is read
    once per block), at least enough for ``shards`` maps; chunks then fill the budget.
    """
    budget = (DEFAULT_BLOCK_MB if memory_budget_mb is None else float(memory_budget_mb)) * 2**20
    biggest = max(module_bytes.values(), default=1) or 1
    per_block = max(1, int(budget // (2 * biggest)))
    b = max(1, math.ceil(n / per_block))
    while b * (b + 1) // 2 < shards and b < n:
        b += 1
    b = min(b, n)
    bounds = [n * j // b for j in range(b + 1)]
    size = max(hi - lo for lo, hi in zip(bounds, bounds[1:]))
    return bounds, chunk_modules(2 * size, module_bytes, memory_budget_mb)


def chunk_modules(adapters: int, module_bytes: dict[str, int], memory_budget_mb: float | None) -> list[list[str]]:
    """Consecutive chunks of the modules whose factors of ``adapters`` adapters fit the budget (at least one module)."""
    budget = (DEFAULT_BLOCK_MB if memory_budget_mb is None else float(memory_budget_mb)) * 2**20
    chunks: list[list[str]] = []
    used = 0.0
    for m, nb in module_bytes.items():
        cost = adapters * nb
        if chunks and used + cost <= budget:
            chunks[-1].append(m)
            used += cost
        else:
            chunks.append([m])
            used = cost
    return chunks


def gram_map_reduce(source: AdapterSource, modules: Sequence[str], module_bytes: dict[str, int], *,
                    per_module: bool, executor: Any, memory_budget_mb: float | None = None,
                    progress: Any = None, cancel: Any = None) -> tuple[Tensor, dict[str, Tensor]]:
    """``(total, per_module)``: the N×N Gram matrix over all ``modules`` and, when ``per_module``, each module's.

    ``executor`` is an :class:`~engine.executors.Executor`; ``module_bytes`` as in :func:`plan_blocks`.
    """
    from ..progress import ticker

    n = len(source)
    bounds, chunks = plan_blocks(n, {m: module_bytes[m] for m in modules}, executor.shard_count(n), memory_budget_mb)
    blocks = [source.slice(lo, hi) for lo, hi in zip(bounds, bounds[1:])]
    tasks = [GramTask(blocks[i], None if i == j else blocks[j], bounds[i], bounds[j])
             for i in range(len(blocks)) for j in range(i, len(blocks))]
    plan = GramPlan(tuple(tuple(c) for c in chunks), per_module)
    t = ticker(progress, cancel, len(tasks) * len(modules) + 1)

    def on_done(j: int) -> None:
        for _ in modules:
            t(f"similarity: block {j + 1} of {len(tasks)}")

    parts: Blocks = executor.map_reduce(map_block, tasks, operator.add, shared=plan, tick=t, on_done=on_done,
                                        cancel=cancel)
    total = torch.zeros(n, n, dtype=_DTYPE)
    per = {m: torch.zeros(n, n, dtype=_DTYPE) for m in modules} if per_module else {}
    for row, col, blk, pm in parts:
        for dest, g in [(total, blk), *(((per[m], pm[m]) for m in pm) if pm is not None else ())]:
            dest[row:row + g.shape[0], col:col + g.shape[1]] = g
            if row != col:
                dest[col:col + g.shape[1], row:row + g.shape[0]] = g.T
    t("similarity: done")
    return total, per


def adapter_names(paths: Sequence[str | Path]) -> list[str]:
    """Default names of adapters given by path: the folder's name (of the folder holding a weights file)."""
    return [Path(p).name if Path(p).is_dir() else Path(p).parent.name for p in paths]


def header_overlap(names: Sequence[str], paths: Sequence[str | Path]) -> Any:
    """:func:`engine.io.compat.common_modules` of adapters at ``paths`` from their headers (no tensors read)."""
    from ..errors import IncompatibleAdaptersError
    from ..io.compat import ModuleOverlap, describe_sets, partition_compatible
    from ..io.header import read_adapter_summary

    shapes = [{m.name: (int(m.out_features), int(m.in_features)) for m in read_adapter_summary(p).modules} for p in paths]
    shared = dict(shapes[0])
    for mine in shapes[1:]:
        shared = {m: s for m, s in shared.items() if mine.get(m) == s}
    if not shared:
        raise IncompatibleAdaptersError(
            "no module is in every adapter with the same shape; " + describe_sets(partition_compatible(list(paths), names=names))
            + "; choose adapters with --exclude PATTERN"
        )
    left = {n: [m for m in sorted(mine) if m not in shared] for n, mine in zip(names, shapes)}
    return ModuleOverlap(modules=sorted(shared), left_out={k: v for k, v in left.items() if v})
