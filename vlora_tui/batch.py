"""Headless ``vlora-tui --batch <command> …``: one job, results on stdout, diagnostics on stderr.

Subcommands and their flags are built from the job kinds' typed parameters
(:func:`engine.jobs.job_kinds`), so the TUI's forms and these flags stay in sync.
Never imports Textual; imports rich only when writing to a terminal.

Output:
    * a terminal: a rich progress bar on stderr and rich tables on stdout;
    * not a terminal: plain lines (progress, throttled, on stderr);
    * ``--json``: one JSON document on stdout (the job result: ``job_id``, ``kind``,
      ``status``, ``summary``, ``outputs``, ``data``, ``error``…), also on failure.

Exit codes:
    * 0 — the job succeeded;
    * 1 — the job ran and failed (an unexpected error, the Hub unreachable,
      ``validate`` found invalid or incompatible adapters);
    * 2 — usage or bad input: a bad flag or value, a missing path, a corrupt
      adapter or subspace, an unknown task, incompatible adapters, or an output
      that exists without ``--force`` (checked before any work). One line on
      stderr names the file and the problem; ``--debug`` adds the traceback;
    * 130 — interrupted (Ctrl-C / SIGINT); outputs are written through a temporary
      folder and renamed at the end, so nothing half-written is left.

``add`` updates the subspace in place (atomically, and only with ``--force``) unless
``-o`` names another folder; it reports every task's error before → after and refuses
(exit 1, nothing written) a result that breaks the subspace's error target unless
``--allow-worse``. Warnings a job returns (``add`` accepting a break, ``quantize``
breaking the target) go to stderr, one line each.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from typing import Any

#: Parameters given as positional arguments, per command (the seed CLI's order).
POSITIONALS: dict[str, tuple[str, ...]] = {
    "info": ("path",),
    "inspect": ("adapter",),
    "validate": ("adapters",),
    "analyze": ("adapters",),
    "diff": ("a", "b"),
    "compress": ("adapters",),
    "add": ("subspace", "adapter"),
    "export": ("subspace", "task_id"),
    "merge": ("adapters",),
    "quantize": ("subspace",),
    "benchmark": ("adapters",),
}
#: Short flags kept from the seed CLI.
SHORT_FLAGS: dict[str, str] = {"output": "-o", "num_components": "-k"}
#: List parameters given one value per flag, repeated (``--exclude a --exclude b``), so they
#: cannot swallow a positional argument that follows them.
REPEATABLE: dict[str, str] = {"exclude": "PATTERN"}

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exits 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        raise SystemExit(EXIT_USAGE)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_param(sub: argparse.ArgumentParser, p: Any, positional: bool) -> None:
    help_text = p.help or ""
    if p.default not in (None, False, (), []) and p.type != "bool":
        help_text += f" (default: {p.default})"
    kw: dict[str, Any] = {"help": help_text}
    if p.type in ("paths", "strs", "floats"):
        kw["nargs"] = "+"
    elif p.type == "int":
        kw["type"] = int
    elif p.type == "float":
        kw["type"] = float
    elif p.type == "choice":
        kw["choices"] = list(p.choices)
        if p.choices and all(isinstance(c, int) for c in p.choices):
            kw["type"] = int
    if positional:
        kw["metavar"] = p.name.upper()
        sub.add_argument(p.name, **kw)
        return
    flags = [_flag(p.name)]
    if p.name in REPEATABLE:
        sub.add_argument(*flags, dest=p.name, action="append", default=None, metavar=REPEATABLE[p.name], help=help_text)
        return
    if p.name in SHORT_FLAGS:
        flags.insert(0, SHORT_FLAGS[p.name])
    if p.type == "bool":
        if p.default is None:  # unset means "the method's default": offer --x and --no-x
            sub.add_argument(*flags, dest=p.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            sub.add_argument(*flags, dest=p.name, action="store_true", help=help_text)
        return
    if p.type in ("paths", "strs", "floats") or p.type not in ("int", "float", "choice"):
        kw["metavar"] = p.name.upper().replace("_", "-") if p.type != "choice" else None
        if kw["metavar"] is None:
            del kw["metavar"]
    sub.add_argument(*flags, dest=p.name, required=bool(p.required), default=None, **kw)


def build_parser() -> argparse.ArgumentParser:
    """The ``--batch`` parser, one subcommand per job kind."""
    from engine.jobs import job_kinds

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print one JSON document on stdout")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of errors")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress output")
    parser = _Parser(
        prog="vlora-tui --batch",
        description="Run one vlora-tui job headless. Exit 0 ok, 1 failed, 2 usage or bad input, 130 interrupted.",
        parents=[common],
    )
    # no set_defaults here: the parents share their action objects, so it would give the
    # subcommands' copies a False default that overwrites a flag given before the subcommand;
    # main() fills the defaults in after parsing
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subs.required = True
    for name, kind in job_kinds().items():
        sub = subs.add_parser(name, help=kind.help, description=f"{kind.title}: {kind.help}.", parents=[common])
        positional = POSITIONALS.get(name, ())
        for pname in positional:
            _add_param(sub, kind.param(pname), True)
        for p in kind.params:
            if p.name not in positional:
                _add_param(sub, p, False)
    return parser


# -- progress ---------------------------------------------------------------------


class _PlainProgress:
    """Throttled ``[ 42%] message`` lines on stderr, from one second after the first event on.

    Quick jobs print nothing, so a failure is one line on stderr.
    """

    def __init__(self, interval: float = 0.5, quiet_for: float = 1.0) -> None:
        self.interval = interval
        self.start: float | None = None  # the first event, not start-up: importing torch is not progress
        self.quiet_for = quiet_for
        self.last = 0.0
        self.last_pct = -1

    def __call__(self, p: Any) -> None:
        pct = int(100 * p.fraction)
        now = time.monotonic()
        if self.start is None:
            self.start = now
        if now - self.start < self.quiet_for:
            return
        if pct == self.last_pct or (now - self.last < self.interval and pct < 100):
            return
        self.last, self.last_pct = now, pct
        sys.stderr.write(f"[{pct:3d}%] {p.message}\n")
        sys.stderr.flush()

    def close(self) -> None:
        pass


class _RichProgress:
    """A rich progress bar on stderr."""

    def __init__(self, title: str) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

        self.bar = Progress(
            TextColumn("[bold]{task.fields[title]}"),
            BarColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.description}"),
            console=Console(stderr=True),
            transient=True,
        )
        self.task = self.bar.add_task("", total=1.0, title=title)
        self.bar.start()

    def __call__(self, p: Any) -> None:
        self.bar.update(self.task, completed=p.fraction, description=p.message[:60])

    def close(self) -> None:
        self.bar.stop()


# -- rendering ----------------------------------------------------------------------

Block = tuple  # ("kv", title, [(key, value)]) | ("table", title, [columns], [[cells]]) | ("lines", title, [str])


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v) if v else "-"
    return str(v)


def _bytes(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return _fmt(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def render_blocks(kind: str, data: dict[str, Any], summary: str) -> list[Block]:
    """Turn a job's ``data`` into key/value blocks and tables for display."""
    fn = _RENDERERS.get(kind)
    try:
        blocks = fn(data) if fn else []
    except (KeyError, TypeError, ValueError, IndexError):  # a figure missing from data: show the summary
        blocks = []
    return blocks or [("lines", None, [summary])]


def _render_demo(d: dict[str, Any]) -> list[Block]:
    rows = [[fam, len(tasks), ", ".join(tasks)] for fam, tasks in d["families"].items()]
    return [("kv", "Demo collection", [("path", d["path"]), ("adapters", len(d["adapters"]))]),
            ("table", "Families", ["family", "tasks", "names"], rows)]


def _render_adapter_info(d: dict[str, Any]) -> list[Block]:
    kv = [
        ("path", d["path"]), ("base model", d["base_model"]), ("rank", d["rank"]), ("lora_alpha", d["lora_alpha"]),
        ("rsLoRA", d["use_rslora"]), ("target modules", d["target_modules"]), ("modules", d["num_modules"]),
        ("parameters", d["num_params"]), ("size", _bytes(d["bytes"])), ("dtypes", d["dtypes"]),
    ]
    if d.get("extra_tensors"):
        kv.append(("extra tensors", len(d["extra_tensors"])))
    rows = [[m["name"], m["rank"], m["out_features"], m["in_features"], m["dtype"]] for m in d["modules"]]
    return [("kv", "Adapter", kv), ("table", "Modules", ["module", "rank", "out", "in", "dtype"], rows)]


def _render_collection_info(d: dict[str, Any]) -> list[Block]:
    rows = [
        [a["name"], a.get("rank"), a.get("num_modules"), a.get("num_params"), _bytes(a.get("bytes")),
         a.get("base_model") if a["ok"] else "ERROR: " + str(a.get("error"))]
        for a in d["adapters"]
    ]
    blocks: list[Block] = [
        ("kv", "Collection", [("path", d["path"]), ("adapters", d["count"]), ("base models", d["base_models"]),
                              ("ranks", d["ranks"]), ("total size", _bytes(d["total_bytes"]))]),
        ("table", "Adapters", ["name", "rank", "modules", "params", "size", "base model"], rows),
    ]
    if d["problems"]:
        blocks.append(("lines", "Problems", [f"- {p}" for p in d["problems"]]))
    return blocks


def _render_info(d: dict[str, Any]) -> list[Block]:
    if d.get("type") == "collection":
        return _render_collection_info(d)
    if d.get("type") == "subspace":
        return _render_subspace_info(d)
    return _render_adapter_info(d)


def _disk_kv(disk: dict[str, Any] | None) -> list[tuple[str, Any]]:
    """The engine's one ratio (engine.subspace.size.size_on_disk), as it gives it."""
    if not disk:
        return [("ratio", "n/a")]
    kv = [("inputs on disk", _bytes(disk["input_bytes"]) if disk["input_bytes"] is not None else "not recorded"),
          ("size on disk", _bytes(disk["bytes"])), ("ratio", disk["text"])]
    return kv + ([("note", disk["note"])] if disk.get("note") else [])


def _stats_kv(st: dict[str, Any]) -> list[tuple[str, Any]]:
    err = st["error"]
    kv = [("method", st["method"]), ("tasks", st["num_tasks"]), ("modules", st["num_modules"]), ("dtype", st["dtype"]),
          *_disk_kv(st.get("disk")), ("ΔW error mean", err["mean"]), ("ΔW error max", err["max"])]
    if err.get("is_bound"):
        kv.append(("errors are", "upper bounds"))
    q = st.get("quantization")
    kv.append(("quantization", f"{q['bits']}-bit {q['method']}" + (" + double quant" if q.get("double_quant") else "") if q else None))
    return kv


def _task_rows(per_task: dict[str, Any]) -> list[list[Any]]:
    return [[t, e["mean"], e["max"]] for t, e in per_task.items()]


def _module_table(modules: list[dict[str, Any]]) -> Block:
    rows = [[m["name"], m["stored"], f"{m['out_features']}×{m['in_features']}",
             f"{m['explained_at_k']:.1%}" if m["explained_at_k"] is not None else "-", m["mean_error"], m["max_error"]]
            for m in modules]
    return ("table", "Modules (shared k_u×k_v, or stored per task at a rank)",
            ["module", "stored", "shape", "explained at k", "mean error", "max error"], rows)


def _storage_lines(st: dict[str, Any]) -> Block:
    return ("lines", None, [st["storage"]["summary"]])


def _render_subspace_info(d: dict[str, Any]) -> list[Block]:
    st = d["stats"]
    kv = [("path", d["path"]), ("base model", d["base_model"]), ("format", d["format_version"]), *_stats_kv(st)]
    tasks = [[t["task_id"], t["rank"], t["mean_error"], t["max_error"], "bound" if t["error_is_bound"] else ""] for t in d["tasks"]]
    return [("kv", "Subspace", kv),
            ("table", "Tasks (relative ΔW error)", ["task", "rank", "mean", "max", ""], tasks),
            _module_table(d["modules"]), _storage_lines(st)]


def _render_compress(d: dict[str, Any]) -> list[Block]:
    if d.get("grouped"):
        rows = [[s["name"], s["path"], len(s["tasks"]), s["num_modules"], ", ".join(s["tasks"]),
                 f"{s['stats']['ratio']:.2f}x", s["stats"]["error"]["mean"], s["stats"]["error"]["max"]] for s in d["sets"]]
        return [("kv", "Subspaces written (one per compatible set, OUTPUT/<set name>)",
                 [("path", d["path"]), ("method", d["method"]), ("sets", len(d["sets"])), ("tasks", len(d["tasks"]))]),
                ("table", "Sets (relative ΔW error)", ["set", "path", "tasks", "modules", "members", "ratio", "mean", "max"], rows)]
    st = d["stats"]
    return [("kv", "Subspace written", [("path", d["path"]), *_stats_kv(st)]),
            ("table", "Tasks (relative ΔW error)", ["task", "mean", "max"], _task_rows(st["error"]["per_task"])),
            _module_table(d["modules"]), _storage_lines(st)]


def _target_text(rule: dict[str, Any] | None) -> str:
    if not rule:
        return "-"
    parts = [f"{k} {rule[k]:g}" for k in ("max_error", "mean_error") if rule.get(k) is not None]
    if not parts:
        parts = [f"k = {rule['num_components']} (no error target)" if rule["rule"] == "num_components"
                 else f"variance {rule.get('variance_threshold') or 0.6:g} (no error target)"]
    return ", ".join(parts) + (" (inferred)" if rule.get("inferred") else "")


def _before_after(b: Any, a: Any) -> str:
    return f"{_fmt(b)} → {_fmt(a)}" if b is not None else f"(new) {_fmt(a)}"


def _render_add(d: dict[str, Any]) -> list[Block]:
    t = d["task"]
    kv = [("path", d["path"]), ("task", d["task_id"]), ("mode", d["mode"]), ("target", _target_text(d.get("target"))),
          ("ΔW error mean", t["mean_error"]), ("ΔW error max", t["max_error"])]
    if "before" in d:
        kv += [("stored tasks mean", _before_after(d["before"]["mean"], d["stored_after"]["mean"])),
               ("stored tasks max", _before_after(d["before"]["max"], d["stored_after"]["max"]))]
    kv += [("tasks now", d["stats"]["num_tasks"]), *_disk_kv(d["stats"].get("disk"))]
    blocks: list[Block] = [("kv", "Task added", kv)]
    if d.get("tasks"):
        rows = [[r["task_id"], _before_after(r["before"]["mean"] if r["before"] else None, r["after"]["mean"]),
                 _before_after(r["before"]["max"] if r["before"] else None, r["after"]["max"]),
                 ("BREAKS TARGET " if r["breaks_target"] else "") + ("bound" if r["error_is_bound"] else "")]
                for r in d["tasks"]]
        blocks.append(("table", "Tasks (relative ΔW error, before → after)", ["task", "mean", "max", ""], rows))
    blocks.append(_storage_lines(d["stats"]))
    return blocks


def _render_export(d: dict[str, Any]) -> list[Block]:
    kv = [("path", d["path"]), ("task", d["task_id"]), ("rank", d["rank"]), ("lora_alpha", d["lora_alpha"]),
          ("base model", d["base_model"]), ("target modules", d["target_modules"]), ("dtype", d["dtype"]),
          ("Modelfile", d["modelfile"]), ("ΔW error mean", d["mean_error"]), ("ΔW error max", d["max_error"])]
    if d.get("target"):
        kv.insert(2, ("target", d["target"]))
    blocks: list[Block] = [("kv", "Adapter exported", kv)]
    if d.get("target_warnings"):
        blocks.append(("lines", "Warnings", [f"- {w}" for w in d["target_warnings"]]))
    return blocks


def _render_quantize(d: dict[str, Any]) -> list[Block]:
    q = d["quantization"]
    b, a = d["before"], d["after"]
    rows = [["size on disk", _bytes(b.get("disk_bytes")), _bytes(a.get("disk_bytes"))],
            ["ratio", _ratio(b["ratio"]), _ratio(a["ratio"])],
            ["ΔW error mean", b["mean_error"], a["mean_error"]], ["ΔW error max", b["max_error"], a["max_error"]]]
    return [("kv", "Quantized subspace", [("path", d["path"]), ("bits", q["bits"]), ("method", q["method"]),
                                          ("double quant", q["double_quant"]), ("loadings quantized", q["quantize_loadings"]),
                                          ("target", _target_text(d.get("target")))]),
            ("table", "Before / after", ["", "before", "after"], rows)]


def _ratio(v: Any) -> str:
    return f"{v:.2f}x" if isinstance(v, (int, float)) else "-"


def _render_benchmark(d: dict[str, Any]) -> list[Block]:
    fp32 = d.get("input_bytes_fp16") is not None and d["input_bytes_fp16"] != d.get("input_bytes")
    rows = [[r["method"], r["k"], _bytes(r["stored_bytes"]) if r["stored_bytes"] is not None else "-", _ratio(r["ratio"]),
             *([_ratio(r.get("ratio_vs_fp16"))] if fp32 else []), r["mean_error"], r["max_error"],
             f"{r['seconds']:.2f}" if r["seconds"] is not None else "-", (r["error"] or "")[:60]] for r in d["rows"]]
    kv = [("adapters", len(d["tasks"])),
          ("inputs on disk", _bytes(d["input_bytes"]) if d.get("input_bytes") is not None else "not recorded")]
    blocks: list[Block] = [
        ("kv", "Benchmark", kv),
        ("table", "Fidelity and size over k (bytes on disk; relative ΔW error; svd = each task alone, the baseline)",
         ["method", "k", "on disk", "ratio", *(["vs fp16 inputs"] if fp32 else []), "mean error", "max error", "s", "note"],
         rows)]
    if d.get("skipped"):
        blocks.append(("lines", "Skipped", [f"- {s['method']}: {s['reason']}" for s in d["skipped"]]))
    return blocks


def _render_inspect(d: dict[str, Any]) -> list[Block]:
    kv = [("path", d["path"]), ("base model", d["base_model"]), ("rank", d["rank"]), ("lora_alpha", d["lora_alpha"]),
          ("rsLoRA", d["use_rslora"]), ("parameters", d["num_params"]), ("size", _bytes(d["bytes"])),
          ("‖ΔW‖ total", d["norm_delta_total"])]
    rows = [[m["name"], m["rank"], f"{m['out_features']}×{m['in_features']}", m["scale"], m["norm_a"], m["norm_b"],
             m["norm_delta"], m["stable_rank"]] for m in d["modules"]]
    blocks: list[Block] = [("kv", "Adapter", kv),
                           ("table", "Modules", ["module", "rank", "shape", "scale", "‖A‖", "‖B‖", "‖ΔW‖", "stable rank"], rows)]
    blocks.append(("lines", "Problems", [f"- {p}" for p in d["problems"]] or ["none"]))
    return blocks


def _render_validate(d: dict[str, Any]) -> list[Block]:
    rows = [[a["name"], "ok" if a["ok"] else "INVALID", a["error"] or "; ".join(a["warnings"]) or "-"] for a in d["adapters"]]
    lines = []
    if d["compatible"] is True:
        lines.append("compatible: yes" + (f" ({'; '.join(d['compat_warnings'])})" if d["compat_warnings"] else ""))
    elif d["compatible"] is False:
        lines.append(f"compatible: NO ({d['compatibility']})")
    blocks: list[Block] = [("table", "Adapters", ["adapter", "status", "problems"], rows)]
    if d.get("target"):
        found = [f"- {a['name']}: {p}" for a in d["adapters"] for p in a.get("target_problems", [])]
        blocks.append(("lines", f"For {d['target']}", found or ["nothing it refuses or misreads"]))
    lines.append("result: " + ("all valid" if d["ok"] else "FAILED"))
    return [*blocks, ("lines", None, lines)]


def _render_merge(d: dict[str, Any]) -> list[Block]:
    kv = [("output", d["path"]), ("method", d["method"]), ("inputs", d["inputs"]), ("rank", d["rank"]),
          ("parameters", d["num_params"]), ("max ΔW error", d["max_error"]), ("overall ΔW error", d["overall_error"])]
    kv += [(k, v) for k, v in d["params"].items() if k not in ("rank",)]
    blocks: list[Block] = [("kv", "Merged adapter", kv)]
    if not all(e == 0 for e in d["errors"].values()):
        rows = [[m, d["ranks"].get(m), d["norms"].get(m), e] for m, e in d["errors"].items()]
        blocks.append(("table", "Per-module truncation error", ["module", "rank", "‖ΔW‖", "rel. error"], rows))
    if d.get("heads"):
        blocks.append(("table", "Heads (modules_to_save, extra tensors)", ["head", "kept"],
                       [[h, v] for h, v in d["heads"].items()]))
    warnings = [*d["warnings"], *d.get("target_warnings", [])]
    if warnings:
        blocks.append(("lines", "Warnings", [f"- {w}" for w in warnings]))
    return blocks


def _left_out_lines(left_out: dict[str, list[str]]) -> list[str]:
    lines = []
    for name, mods in left_out.items():
        kinds = sorted({m.rsplit(".", 1)[-1] for m in mods})
        lines.append(f"- {name}: {len(mods)} module(s) ({', '.join(kinds)})")
    return lines


def _render_analyze(d: dict[str, Any]) -> list[Block]:
    names = d["names"]
    short = [n if len(n) <= 10 else n[:9] + "…" for n in names]
    sim_rows = [[names[i], *[f"{v:.2f}" if v is not None else "-" for v in row]] for i, row in enumerate(d["similarity"])]
    cl_rows = [[i + 1, len(c["names"]), ", ".join(c["names"])] for i, c in enumerate(d["clusters"])]
    out_names = {o["name"] for o in d["outliers"]}
    per = [[n, d["max_similarity"][i], d["mean_similarity"][i], "outlier" if n in out_names else ""] for i, n in enumerate(names)]
    var = d["variance"]["mean"]
    blocks: list[Block] = [
        ("table", "Cosine similarity of ΔW", ["adapter", *short], sim_rows),
        ("table", f"Clusters (threshold {d['threshold']:g}, {d['linkage']} linkage)", ["#", "size", "members"], cl_rows),
        ("table", f"Outliers (max |cos| < {d['outlier_threshold']:g})", ["adapter", "max |cos|", "mean cos", ""], per),
        ("table", "Shared structure: energy of all ΔW captured by the top-k shared column directions (mean over modules)",
         ["k", *var.keys()], [["share", *[f"{v:.1%}" for v in var.values()]]]),
    ]
    if d.get("left_out"):
        blocks.append(("lines", f"Compared on the {len(d['compared_modules'])} modules every adapter has; left out:",
                       _left_out_lines(d["left_out"])))
    return blocks


def _render_diff(d: dict[str, Any]) -> list[Block]:
    rows = [[m["module"], m["rank_a"], m["rank_b"], m["norm_a"], m["norm_b"], m["cosine"], m["relative_difference"]]
            for m in d["modules"]]
    o = d["overall"]
    blocks: list[Block] = [
        ("kv", f"{d['a']} vs {d['b']}", [("cosine", o["cosine"]), ("relative difference", o["relative_difference"]),
                                         ("‖ΔW‖ a", o["norm_a"]), ("‖ΔW‖ b", o["norm_b"])]),
        ("table", "Per module", ["module", "rank a", "rank b", "‖ΔW_a‖", "‖ΔW_b‖", "cosine", "‖ΔW_a−ΔW_b‖/‖ΔW_a‖"], rows),
    ]
    if d["only_in_a"] or d["only_in_b"]:
        blocks.append(("kv", "Not shared", [("only in a", d["only_in_a"]), ("only in b", d["only_in_b"])]))
    return blocks


#: Kinds whose ``data["warnings"]`` are printed on stderr (one line each) after a success.
_WARNING_KINDS = ("add", "quantize")

_RENDERERS: dict[str, Any] = {
    "compress": _render_compress,
    "add": _render_add,
    "export": _render_export,
    "quantize": _render_quantize,
    "benchmark": _render_benchmark,
    "analyze": _render_analyze,
    "diff": _render_diff,
    "merge": _render_merge,
    "demo": _render_demo,
    "info": _render_info,
    "inspect": _render_inspect,
    "validate": _render_validate,
}


def _print_plain(blocks: list[Block]) -> None:
    out = sys.stdout
    for i, block in enumerate(blocks):
        kind, title = block[0], block[1]
        if i:
            out.write("\n")
        if title:
            out.write(f"{title}\n")
        if kind == "kv":
            width = max((len(k) for k, _ in block[2]), default=0)
            for k, v in block[2]:
                out.write(f"  {k:<{width}}  {_fmt(v)}\n")
        elif kind == "table":
            cols, rows = block[2], [[_fmt(c) for c in r] for r in block[3]]
            widths = [max([len(str(c))] + [len(r[j]) for r in rows]) for j, c in enumerate(cols)]
            out.write("  " + "  ".join(f"{c:<{w}}" for c, w in zip(cols, widths)).rstrip() + "\n")
            for r in rows:
                out.write("  " + "  ".join(f"{c:<{w}}" for c, w in zip(r, widths)).rstrip() + "\n")
        else:
            for line in block[2]:
                out.write(f"{line}\n")
    out.flush()


def _print_rich(blocks: list[Block]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for block in blocks:
        kind, title = block[0], block[1]
        if kind == "kv":
            t = Table(title=title, show_header=False, title_justify="left", box=None, padding=(0, 2))
            t.add_column(style="bold cyan")
            t.add_column()
            for k, v in block[2]:
                t.add_row(str(k), _fmt(v))
            console.print(t)
        elif kind == "table":
            t = Table(title=title, title_justify="left", header_style="bold")
            for c in block[2]:
                t.add_column(str(c), overflow="fold")
            for r in block[3]:
                t.add_row(*[_fmt(c) for c in r])
            console.print(t)
        else:
            if title:
                console.print(f"[bold]{title}[/bold]")
            for line in block[2]:
                console.print(line, markup=False, highlight=False)
        console.print()


# -- main ---------------------------------------------------------------------------------


def _exit_code(result: Any) -> int:
    if result.ok:
        return EXIT_OK
    if result.status == "cancelled":
        return EXIT_INTERRUPTED
    if result.error_kind == "input":
        return EXIT_USAGE
    return EXIT_FAILED


def main(argv: list[str]) -> int:
    """Run one ``--batch`` command; returns the exit code."""
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    for flag in ("json", "debug", "quiet"):  # global flags, given before or after the subcommand
        if not hasattr(args, flag):
            setattr(args, flag, False)
    from engine.jobs import InlineRunner, JobRequest, job_kinds

    kind = job_kinds()[args.command]
    params = {p.name: getattr(args, p.name, None) for p in kind.params}
    for p in kind.params:  # lists given as several words go to Param.validate as one string
        if p.type == "floats" and isinstance(params[p.name], list):
            params[p.name] = " ".join(params[p.name])
    req = JobRequest(args.command, params)

    cancel = threading.Event()
    interrupted = {"n": 0}

    def on_sigint(signum: int, frame: Any) -> None:
        interrupted["n"] += 1
        cancel.set()
        if interrupted["n"] > 1:
            raise KeyboardInterrupt
        sys.stderr.write("interrupted: cancelling (Ctrl-C again to stop now)\n")
        sys.stderr.flush()

    old_handler = signal.signal(signal.SIGINT, on_sigint) if threading.current_thread() is threading.main_thread() else None
    progress = None
    if not args.quiet:
        progress = _RichProgress(kind.title) if sys.stderr.isatty() else _PlainProgress()
    try:
        result = InlineRunner().run(req, progress=progress, cancel=cancel)
    finally:
        if progress is not None:
            progress.close()
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)
    if interrupted["n"] and result.status != "ok":
        result = result.__class__(**{**result.__dict__, "status": "cancelled", "error_kind": "cancelled"})
    code = _exit_code(result)

    try:
        if args.json:
            sys.stdout.write(json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n")
            sys.stdout.flush()
        elif result.ok or result.data:
            blocks = render_blocks(result.kind, result.data, result.summary)
            if sys.stdout.isatty():
                _print_rich(blocks)
            else:
                _print_plain(blocks)
    except BrokenPipeError:  # stdout closed early (``| head``): not an error of the job
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    if result.ok:  # warnings (a broken target, what an export dropped): a diagnostic, one line each
        data = result.data or {}
        for w in [*(data.get("warnings") or [] if result.kind in _WARNING_KINDS else []), *data.get("target_warnings", [])]:
            sys.stderr.write(f"warning: {w}\n")
    if not result.ok:
        if code == EXIT_INTERRUPTED:
            sys.stderr.write("interrupted: nothing was written\n" if not result.outputs else "interrupted\n")
        else:
            sys.stderr.write(f"error: {result.error}\n")
            if args.debug and result.traceback:
                sys.stderr.write(result.traceback)
    sys.stderr.flush()
    return code
