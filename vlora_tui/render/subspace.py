"""Renderers of the jobs on subspaces (and ``info``, which may describe an adapter or a collection too)."""

from __future__ import annotations

from typing import Any

from engine.jobs.kinds.add import AddResult
from engine.jobs.kinds.benchmark import BenchmarkResult
from engine.jobs.kinds.compress import CompressResult, GroupedCompressResult
from engine.jobs.kinds.info import AdapterInfo, CollectionInfo
from engine.jobs.kinds.quantize import QuantizeResult
from engine.jobs.reports import DiskFigures, ErrorPair, ModuleRow, SubspaceInfo, SubspaceStats, TaskChange

from .adapters import render_adapter_info, render_collection_info
from .base import Block, fmt, fmt_bytes, fmt_ratio, renderer


@renderer("info")
def _render_info(r: AdapterInfo | CollectionInfo | SubspaceInfo) -> list[Block]:
    if isinstance(r, CollectionInfo):
        return render_collection_info(r)
    if isinstance(r, SubspaceInfo):
        return _render_subspace_info(r)
    return render_adapter_info(r)


def _disk_kv(disk: DiskFigures | None) -> list[tuple[str, Any]]:
    """The engine's one ratio (engine.subspace.size.size_on_disk), as it gives it."""
    if not disk:
        return [("ratio", "n/a")]
    kv = [("inputs on disk", fmt_bytes(disk.input_bytes) if disk.input_bytes is not None else "not recorded"),
          ("size on disk", fmt_bytes(disk.bytes)), ("ratio", disk.text)]
    return kv + ([("note", disk.note)] if disk.note else [])


def _stats_kv(st: SubspaceStats) -> list[tuple[str, Any]]:
    err = st.error
    kv = [("method", st.method), ("tasks", st.num_tasks), ("modules", st.num_modules), ("dtype", st.dtype),
          *_disk_kv(st.disk), ("ΔW error mean", err.mean), ("ΔW error max", err.max)]
    if err.is_bound:
        kv.append(("errors are", "upper bounds"))
    q = st.quantization
    if q and q.get("method") == "auto":
        kv.append(("quantization", "auto: rank and precision per module meeting the target (quantize), see Modules"))
    elif q:
        kv.append(("quantization", f"{q['bits']}-bit {q['method']}" + (" + double quant" if q.get("double_quant") else "")))
    elif st.precision == "auto":
        kv.append(("quantization", "auto: rank and precision per module (fp16, int8…int3, nf4), see Modules"))
    else:
        kv.append(("quantization", None))
    return kv


def _task_rows(per_task: dict[str, Any]) -> list[list[Any]]:
    return [[t, e["mean"], e["max"]] for t, e in per_task.items()]


def _bits_text(bits: dict[str, list[int]] | None) -> str:
    """``U6 V6 c8 d8`` from ``{"U": [6], …}``; ``fp16`` when nothing is quantised; ranges as ``c4-8``."""
    if not bits:
        return "fp16"
    return " ".join(f"{k}{v[0]}" if len(v) == 1 else f"{k}{min(v)}-{max(v)}" for k, v in sorted(bits.items()))


def _module_table(modules: list[ModuleRow]) -> Block:
    rows = [[m.name, m.stored, _bits_text(m.bits), f"{m.out_features}×{m.in_features}",
             f"{m.explained_at_k:.1%}" if m.explained_at_k is not None else "-", m.mean_error, m.max_error]
            for m in modules]
    return ("table", "Modules (shared k_u×k_v, or stored per task at a rank; bits per stored tensor)",
            ["module", "stored", "bits", "shape", "explained at k", "mean error", "max error"], rows)


def _storage_lines(st: SubspaceStats) -> Block:
    return ("lines", None, [st.storage.summary])


def _render_subspace_info(r: SubspaceInfo) -> list[Block]:
    st = r.stats
    kv = [("path", r.path), ("base model", r.base_model), ("format", r.format_version), *_stats_kv(st)]
    tasks = [[t.task_id, t.rank, t.mean_error, t.max_error, "bound" if t.error_is_bound else ""] for t in r.tasks]
    return [("kv", "Subspace", kv),
            ("table", "Tasks (relative ΔW error)", ["task", "rank", "mean", "max", ""], tasks),
            _module_table(r.modules), _storage_lines(st)]


@renderer("compress")
def _render_compress(r: CompressResult | GroupedCompressResult) -> list[Block]:
    if isinstance(r, GroupedCompressResult):
        rows = [[s["name"], s["path"], len(s["tasks"]), s["num_modules"], ", ".join(s["tasks"]),
                 f"{s['stats']['ratio']:.2f}x", s["stats"]["error"]["mean"], s["stats"]["error"]["max"]] for s in r.sets]
        return [("kv", "Subspaces written (one per compatible set, OUTPUT/<set name>)",
                 [("path", r.path), ("method", r.method), ("sets", len(r.sets)), ("tasks", len(r.tasks))]),
                ("table", "Sets (relative ΔW error)", ["set", "path", "tasks", "modules", "members", "ratio", "mean", "max"], rows)]
    st = r.stats
    return [("kv", "Subspace written", [("path", r.path), *_stats_kv(st)]),
            ("table", "Tasks (relative ΔW error)", ["task", "mean", "max"], _task_rows(st.error.per_task)),
            _module_table(r.modules), _storage_lines(st)]


def _target_text(rule: dict[str, Any] | None) -> str:
    if not rule:
        return "-"
    parts = [f"{k} {rule[k]:g}" for k in ("max_error", "mean_error") if rule.get(k) is not None]
    if not parts:
        parts = [f"k = {rule['num_components']} (no error target)" if rule["rule"] == "num_components"
                 else f"variance {rule.get('variance_threshold') or 0.6:g} (no error target)"]
    return ", ".join(parts) + (" (inferred)" if rule.get("inferred") else "")


def _before_after(b: Any, a: Any) -> str:
    return f"{fmt(b)} → {fmt(a)}" if b is not None else f"(new) {fmt(a)}"


def _change_cells(c: TaskChange) -> list[Any]:
    before = c.before or ErrorPair()
    return [c.task_id, _before_after(before.mean, c.after.mean), _before_after(before.max, c.after.max),
            ("BREAKS TARGET " if c.breaks_target else "") + ("bound" if c.error_is_bound else "")]


@renderer("add")
def _render_add(r: AddResult) -> list[Block]:
    t = r.task
    kv = [("path", r.path), ("task", r.task_id), ("mode", r.mode), ("target", _target_text(r.target)),
          ("ΔW error mean", t.mean_error), ("ΔW error max", t.max_error)]
    if r.before is not None and r.stored_after is not None:
        kv += [("stored tasks mean", _before_after(r.before.mean, r.stored_after.mean)),
               ("stored tasks max", _before_after(r.before.max, r.stored_after.max))]
    kv += [("tasks now", r.stats.num_tasks), *_disk_kv(r.stats.disk)]
    blocks: list[Block] = [("kv", "Task added", kv)]
    if r.tasks:
        blocks.append(("table", "Tasks (relative ΔW error, before → after)", ["task", "mean", "max", ""],
                       [_change_cells(c) for c in r.tasks]))
    blocks.append(_storage_lines(r.stats))
    return blocks


@renderer("quantize")
def _render_quantize(r: QuantizeResult) -> list[Block]:
    q = r.quantization or {}
    b, a = r.before, r.after
    rows = [["size on disk", fmt_bytes(b.disk_bytes), fmt_bytes(a.disk_bytes)],
            ["ratio", fmt_ratio(b.ratio), fmt_ratio(a.ratio)],
            ["ΔW error mean", b.mean_error, a.mean_error], ["ΔW error max", b.max_error, a.max_error]]
    if q.get("method") == "auto":  # an error target: rank and precision chosen per module
        how = {"exact": "measured against the original adapters", "bound": "upper bounds (stored error + change)",
               "mixed": "exact where the original adapter was given, else upper bounds"}.get(r.errors or "", r.errors)
        kv = [("path", r.path), ("precision", "cheapest rank and precision per module (fp16, int8…int3, nf4)"),
              ("target", _target_text(r.target)), ("errors", how), ("block size", q.get("block_size"))]
        tasks = [[t["task_id"], _before_after(t["before"]["max"], t["after"]["max"]),
                  _before_after(t["before"]["overall"], t["after"]["overall"]),
                  f"{fmt_bytes(t['bytes_before'])} → {fmt_bytes(t['bytes_after'])}", "HELD (over target before)" if t["held"] else ""]
                 for t in r.tasks or []]
        return [("kv", "Quantized subspace", kv), ("table", "Before / after", ["", "before", "after"], rows),
                ("table", "Tasks (relative ΔW error and own bytes, before → after)",
                 ["task", "max", "overall", "bytes", ""], tasks)]
    return [("kv", "Quantized subspace", [("path", r.path), ("bits", q["bits"]), ("method", q["method"]),
                                          ("double quant", q["double_quant"]), ("loadings quantized", q["quantize_loadings"]),
                                          ("target", _target_text(r.target))]),
            ("table", "Before / after", ["", "before", "after"], rows)]


@renderer("benchmark")
def _render_benchmark(r: BenchmarkResult) -> list[Block]:
    fp32 = r.input_bytes_fp16 is not None and r.input_bytes_fp16 != r.input_bytes
    rows = [[x.method, x.k, fmt_bytes(x.stored_bytes) if x.stored_bytes is not None else "-", fmt_ratio(x.ratio),
             *([fmt_ratio(x.ratio_vs_fp16)] if fp32 else []), x.mean_error, x.max_error,
             f"{x.seconds:.2f}" if x.seconds is not None else "-", (x.error or "")[:60]] for x in r.rows]
    kv = [("adapters", len(r.tasks)),
          ("inputs on disk", fmt_bytes(r.input_bytes) if r.input_bytes is not None else "not recorded")]
    blocks: list[Block] = [
        ("kv", "Benchmark", kv),
        ("table", "Fidelity and size over k (bytes on disk; relative ΔW error; svd = each task alone, the baseline)",
         ["method", "k", "on disk", "ratio", *(["vs fp16 inputs"] if fp32 else []), "mean error", "max error", "s", "note"],
         rows)]
    if r.skipped:
        blocks.append(("lines", "Skipped", [f"- {s.method}: {s.reason}" for s in r.skipped]))
    return blocks
