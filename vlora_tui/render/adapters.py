"""Renderers of the jobs on adapters: demo, inspect, validate, analyze, diff, merge, export."""

from __future__ import annotations

from typing import Any

from engine.jobs.kinds.analyze import AnalyzeResult
from engine.jobs.kinds.demo import DemoResult
from engine.jobs.kinds.diff import DiffReport
from engine.jobs.kinds.export import ExportResult
from engine.jobs.kinds.info import AdapterInfo, CollectionInfo
from engine.jobs.kinds.inspect import InspectResult
from engine.jobs.kinds.merge import MergedResult
from engine.jobs.kinds.validate import ValidateResult

from .base import Block, fmt_bytes, renderer


@renderer("demo")
def _render_demo(r: DemoResult) -> list[Block]:
    rows = [[fam, len(tasks), ", ".join(tasks)] for fam, tasks in r.families.items()]
    return [("kv", "Demo collection", [("path", r.path), ("adapters", len(r.adapters))]),
            ("table", "Families", ["family", "tasks", "names"], rows)]


def render_adapter_info(r: AdapterInfo) -> list[Block]:
    kv = [
        ("path", r.path), ("base model", r.base_model), ("rank", r.rank), ("lora_alpha", r.lora_alpha),
        ("rsLoRA", r.use_rslora), ("target modules", r.target_modules), ("modules", r.num_modules),
        ("parameters", r.num_params), ("size", fmt_bytes(r.bytes)), ("dtypes", r.dtypes),
    ]
    if r.extra_tensors:
        kv.append(("extra tensors", len(r.extra_tensors)))
    rows = [[m.name, m.rank, m.out_features, m.in_features, m.dtype] for m in r.modules]
    return [("kv", "Adapter", kv), ("table", "Modules", ["module", "rank", "out", "in", "dtype"], rows)]


def render_collection_info(r: CollectionInfo) -> list[Block]:
    rows = [  # a row of an adapter that failed to read has only name, path, ok and error
        [a["name"], a.get("rank"), a.get("num_modules"), a.get("num_params"), fmt_bytes(a.get("bytes")),
         a.get("base_model") if a["ok"] else "ERROR: " + str(a.get("error"))]
        for a in r.adapters
    ]
    blocks: list[Block] = [
        ("kv", "Collection", [("path", r.path), ("adapters", r.count), ("base models", r.base_models),
                              ("ranks", r.ranks), ("total size", fmt_bytes(r.total_bytes))]),
        ("table", "Adapters", ["name", "rank", "modules", "params", "size", "base model"], rows),
    ]
    if r.problems:
        blocks.append(("lines", "Problems", [f"- {p}" for p in r.problems]))
    return blocks


@renderer("inspect")
def _render_inspect(r: InspectResult) -> list[Block]:
    kv = [("path", r.path), ("base model", r.base_model), ("rank", r.rank), ("lora_alpha", r.lora_alpha),
          ("rsLoRA", r.use_rslora), ("parameters", r.num_params), ("size", fmt_bytes(r.bytes)),
          ("‖ΔW‖ total", r.norm_delta_total)]
    rows = [[m.name, m.rank, f"{m.out_features}×{m.in_features}", m.scale, m.norm_a, m.norm_b,
             m.norm_delta, m.stable_rank] for m in r.modules]
    blocks: list[Block] = [("kv", "Adapter", kv),
                           ("table", "Modules", ["module", "rank", "shape", "scale", "‖A‖", "‖B‖", "‖ΔW‖", "stable rank"], rows)]
    blocks.append(("lines", "Problems", [f"- {p}" for p in r.problems] or ["none"]))
    return blocks


@renderer("validate")
def _render_validate(r: ValidateResult) -> list[Block]:
    rows = [[a.name, "ok" if a.ok else "INVALID", a.error or "; ".join(a.warnings) or "-"] for a in r.adapters]
    lines = []
    if r.compatible is True:
        lines.append("compatible: yes" + (f" ({'; '.join(r.compat_warnings)})" if r.compat_warnings else ""))
    elif r.compatible is False:
        lines.append(f"compatible: NO ({r.compatibility})")
    blocks: list[Block] = [("table", "Adapters", ["adapter", "status", "problems"], rows)]
    if r.target:
        found = [f"- {a.name}: {p}" for a in r.adapters for p in a.target_problems]
        blocks.append(("lines", f"For {r.target}", found or ["nothing it refuses or misreads"]))
    lines.append("result: " + ("all valid" if r.ok else "FAILED"))
    return [*blocks, ("lines", None, lines)]


@renderer("export")
def _render_export(r: ExportResult) -> list[Block]:
    kv = [("path", r.path), ("task", r.task_id), ("rank", r.rank), ("lora_alpha", r.lora_alpha),
          ("base model", r.base_model), ("target modules", r.target_modules), ("dtype", r.dtype),
          ("Modelfile", r.modelfile), ("ΔW error mean", r.mean_error), ("ΔW error max", r.max_error)]
    if r.target:
        kv.insert(2, ("target", r.target))
    blocks: list[Block] = [("kv", "Adapter exported", kv)]
    if r.target_warnings:
        blocks.append(("lines", "Warnings", [f"- {w}" for w in r.target_warnings]))
    return blocks


@renderer("merge")
def _render_merge(r: MergedResult) -> list[Block]:
    kv = [("output", r.path), ("method", r.method), ("inputs", r.inputs), ("rank", r.rank),
          ("parameters", r.num_params), ("max ΔW error", r.max_error), ("overall ΔW error", r.overall_error)]
    kv += [(k, v) for k, v in r.params.items() if k not in ("rank",)]
    blocks: list[Block] = [("kv", "Merged adapter", kv)]
    if not all(e == 0 for e in r.errors.values()):
        rows = [[m, r.ranks.get(m), r.norms.get(m), e] for m, e in r.errors.items()]
        blocks.append(("table", "Per-module truncation error", ["module", "rank", "‖ΔW‖", "rel. error"], rows))
    if r.heads:
        blocks.append(("table", "Heads (modules_to_save, extra tensors)", ["head", "kept"],
                       [[h, v] for h, v in r.heads.items()]))
    warnings = [*r.warnings, *r.target_warnings]
    if warnings:
        blocks.append(("lines", "Warnings", [f"- {w}" for w in warnings]))
    return blocks


def _left_out_lines(left_out: dict[str, list[str]]) -> list[str]:
    lines = []
    for name, mods in left_out.items():
        kinds = sorted({m.rsplit(".", 1)[-1] for m in mods})
        lines.append(f"- {name}: {len(mods)} module(s) ({', '.join(kinds)})")
    return lines


@renderer("analyze")
def _render_analyze(r: AnalyzeResult) -> list[Block]:
    names = r.names
    short = [n if len(n) <= 10 else n[:9] + "…" for n in names]
    sim_rows = [[names[i], *[f"{v:.2f}" if v is not None else "-" for v in row]] for i, row in enumerate(r.similarity)]
    cl_rows = [[i + 1, len(c.names), ", ".join(c.names)] for i, c in enumerate(r.clusters)]
    out_names = {o.name for o in r.outliers}
    per = [[n, r.max_similarity[i], r.mean_similarity[i], "outlier" if n in out_names else ""] for i, n in enumerate(names)]
    var = r.variance.mean
    blocks: list[Block] = [
        ("table", "Cosine similarity of ΔW", ["adapter", *short], sim_rows),
        ("table", f"Clusters (threshold {r.threshold:g}, {r.linkage} linkage)", ["#", "size", "members"], cl_rows),
        ("table", f"Outliers (max |cos| < {r.outlier_threshold:g})", ["adapter", "max |cos|", "mean cos", ""], per),
        ("table", "Shared structure: energy of all ΔW captured by the top-k shared column directions (mean over modules)",
         ["k", *var.keys()], [["share", *[f"{v:.1%}" for v in var.values()]]]),
    ]
    if r.left_out:
        blocks.append(("lines", f"Compared on the {len(r.compared_modules)} modules every adapter has; left out:",
                       _left_out_lines(r.left_out)))
    return blocks


@renderer("diff")
def _render_diff(r: DiffReport) -> list[Block]:
    rows = [[m.module, m.rank_a, m.rank_b, m.norm_a, m.norm_b, m.cosine, m.relative_difference] for m in r.modules]
    o = r.overall
    if o is None:  # a figure missing: the summary line
        return []
    blocks: list[Block] = [
        ("kv", f"{r.a} vs {r.b}", [("cosine", o.cosine), ("relative difference", o.relative_difference),
                                   ("‖ΔW‖ a", o.norm_a), ("‖ΔW‖ b", o.norm_b)]),
        ("table", "Per module", ["module", "rank a", "rank b", "‖ΔW_a‖", "‖ΔW_b‖", "cosine", "‖ΔW_a−ΔW_b‖/‖ΔW_a‖"], rows),
    ]
    if r.only_in_a or r.only_in_b:
        blocks.append(("kv", "Not shared", [("only in a", r.only_in_a), ("only in b", r.only_in_b)]))
    return blocks
