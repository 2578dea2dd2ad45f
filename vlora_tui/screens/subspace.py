"""A subspace: variance explained per module and k, ΔW fidelity per task and module, stats, quantization."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from rich.table import Table
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Footer, Header, Label, Static

from engine.jobs.kinds.compare import BaseCompareResult, CompareResult, Compared
from engine.jobs.kinds.train import HeldOut
from engine.jobs.reports import SubspaceInfo

from ..config import tildify
from ..widgets.plots import DataPlot
from .base import VloraScreen


class SubspaceScreen(VloraScreen):
    """Shows the ``info`` job's data on a subspace; launches export/merge/quantize/add from it."""

    BINDINGS: ClassVar = [
        Binding("o", "open", "Open…", tooltip="Open a saved subspace folder", id="subspace-open"),
        Binding("left_square_bracket", "module(-1)", "Prev module", key_display="[", tooltip="Variance plot: previous module", id="subspace-prev"),
        Binding("right_square_bracket", "module(1)", "Next module", key_display="]", tooltip="Variance plot: next module", id="subspace-next"),
        Binding("e", "export", "Export…", tooltip="Export the highlighted task as a PEFT adapter", id="subspace-export"),
        Binding("space", "mark", "Mark", tooltip="Mark the highlighted task for merge", id="subspace-mark"),
        Binding("m", "merge", "Merge…", tooltip="Merge the marked tasks' adapters (or the highlighted and next)", id="subspace-merge"),
        Binding("q", "quantize", "Quantize…", tooltip="Quantize this subspace's loadings", id="subspace-quantize"),
        Binding("a", "add", "Add…", tooltip="Project more adapters into this subspace", id="subspace-add"),
        Binding("c", "compare", "Compare…", tooltip="Run original adapters and their reconstructions on a base model: KL, top-1, perplexity", id="subspace-compare"),
        Binding("t", "train", "Train…", tooltip="Train a new task inside this subspace on JSONL data", id="subspace-train"),
    ]

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical():
            with Horizontal(id="subspace-top"):
                yield Static("No subspace open: compress the collection (3, c) or open one (o).", id="subspace-stats")
                yield DataPlot(empty="variance explained", id="variance-plot")
            with Horizontal(id="subspace-bottom"):
                with Vertical(id="fidelity-pane"):
                    yield Label("ΔW fidelity: relative error per task and module (space marks)", classes="pane-title")
                    yield DataTable(id="fidelity", cursor_type="row", zebra_stripes=True)
                    # shown once a compare job on this subspace has finished
                    yield Label("Output fidelity (compare): original adapter vs reconstruction", classes="pane-title",
                                id="compare-title")
                    yield DataTable(id="compare", cursor_type="row", zebra_stripes=True)
                yield DataPlot(empty="fidelity per task", id="fidelity-plot")
        yield Footer(show_command_palette=False)

    def on_mount(self) -> None:
        self._module_index = 0
        self.marked: set[str] = set()
        self.app.state_signal.subscribe(self, self._on_state)
        self._refresh()

    def _on_state(self, topic: str) -> None:
        if topic == "subspace":
            self._refresh()

    _info_data: dict[str, Any] | None = None
    _info: SubspaceInfo | None = None

    @property
    def info(self) -> SubspaceInfo | None:
        """The ``info`` job's data on the open subspace (``app.subspace_info``), typed."""
        data = self.app.subspace_info
        if data is not self._info_data:
            self._info_data, self._info = data, SubspaceInfo.from_dict(data) if data else None
        return self._info

    def tasks(self) -> list[str]:
        info = self.info
        return [t.task_id for t in info.tasks] if info else []

    def highlighted_task(self) -> str | None:
        table = self.query_one("#fidelity", DataTable)
        tasks = self.tasks()
        if not tasks:
            return None
        row = table.cursor_row
        return tasks[row] if 0 <= row < len(tasks) else tasks[0]

    def _refresh(self) -> None:
        info = self.info
        stats = self.query_one("#subspace-stats", Static)
        table = self.query_one("#fidelity", DataTable)
        table.clear(columns=True)
        self.marked = set()
        if not info:
            self._show_comparison()
            stats.update("No subspace open: compress the collection (3, c) or open one (o).")
            self.query_one("#variance-plot", DataPlot).draw_empty()
            self.query_one("#fidelity-plot", DataPlot).draw_empty()
            return
        stats.update(stats_table(info, self.app.subspace_path))
        self._show_comparison()
        self._draw_variance()
        fidelity = info.fidelity
        modules = [m.name for m in info.modules]
        # one column per module (short names: layer.proj), errors per task
        table.add_column(" ", key="mark")
        table.add_column("task", key="task")
        table.add_column("mean", key="mean")
        table.add_column("max", key="max")
        for m in modules:
            table.add_column(short_module(m), key=m)
        rows = info.tasks
        for t in rows:
            per_module = fidelity.get(t.task_id) or {}
            table.add_row(" ", t.task_id, _f(t.mean_error), _f(t.max_error),
                          *[_f(per_module.get(m), ".3g") for m in modules], key=t.task_id)
        self.query_one("#fidelity-plot", DataPlot).draw_bars(
            [str(i + 1) for i in range(len(rows))], [t.mean_error or 0.0 for t in rows],
            "mean ΔW error per task (task #)", "relative error",
        )

    def _show_comparison(self) -> None:
        """The last ``compare`` job's per-task table (or a ``train`` job's held-out before → after), for the open subspace."""
        data = self.app.comparison
        table = self.query_one("#compare", DataTable)
        shown = bool(data) and str(data.get("subspace")) == str(self.app.subspace_path)
        table.display = shown
        title = self.query_one("#compare-title", Label)
        title.display = shown
        table.clear(columns=True)
        if not shown:
            return
        heading, cols, rows = comparison_table(data)
        title.update(heading)
        for label in cols:
            table.add_column(label, key=label)
        for key, row in rows:
            table.add_row(*row, key=key)

    def _draw_variance(self) -> None:
        info = self.info
        variance = info.variance if info else {}
        modules = info.modules if info else []
        plot = self.query_one("#variance-plot", DataPlot)
        if not variance or not modules:
            plot.draw_empty()
            return
        self._module_index %= len(modules)
        mod = modules[self._module_index]
        curve = list(variance.get(mod.name) or [])
        series = {"cumulative": (list(range(1, len(curve) + 1)), curve)}
        k = mod.k
        if k:
            series[f"k={k}"] = ([k, k], [0.0, 1.0])
        plot.draw_lines(series, f"variance explained: {short_module(mod.name)} ({self._module_index + 1}/{len(modules)})",
                        "components", "share", (0.0, 1.0))

    def action_module(self, step: int) -> None:
        self._module_index += step
        self._draw_variance()

    def action_open(self) -> None:
        self.app.action_open_subspace_prompt()

    def _need(self) -> bool:
        if self.app.subspace_path is None:
            self.notify("Open a subspace first (o)", severity="warning")
            return False
        return True

    def action_export(self) -> None:
        if self._need():
            task = self.highlighted_task()
            out = self.app.unique_output(f"export-{task}")
            self.app.action_new_job("export", {"subspace": self.app.subspace_path, "task_id": task, "output": out})

    def action_mark(self) -> None:
        """Mark or unmark the highlighted task (merge takes the marked tasks)."""
        task = self.highlighted_task()
        if task is None:
            return
        self.marked ^= {task}
        table = self.query_one("#fidelity", DataTable)
        table.update_cell(task, "mark", "✓" if task in self.marked else " ")

    def action_merge(self) -> None:
        """Merge the marked tasks' source adapters (or the highlighted one and the next)."""
        if not self._need():
            return
        from engine.io.scan import spec_name

        tasks = self.tasks()
        chosen = [t for t in tasks if t in self.marked]
        if len(chosen) < 2:
            task = self.highlighted_task()
            i = tasks.index(task) if task in tasks else 0
            chosen = tasks[i:i + 2] if i + 1 < len(tasks) else tasks[-2:]
        by_name = {spec_name(s): s for s in self.app.collection}
        missing = [t for t in chosen if t not in by_name]
        if missing:
            self.notify(f"no source adapter in the collection for {', '.join(missing)}", title="Merge", severity="error")
            return
        out = self.app.unique_output("merge-" + "+".join(chosen))
        self.app.action_new_job("merge", {"adapters": [by_name[t] for t in chosen], "output": out})

    def action_quantize(self) -> None:
        if self._need():
            self.app.action_new_job("quantize", {"subspace": self.app.subspace_path})

    def action_add(self) -> None:
        if self._need():
            from engine.io.scan import spec_name

            spec = self.app.current_adapter
            values = {"subspace": self.app.subspace_path, "adapter": spec, "task_id": spec_name(spec) if spec else None}
            self.app.action_new_job("add", values)

    def action_compare(self) -> None:
        if self._need():
            self.app.action_new_job("compare", {"subspace": self.app.subspace_path})

    def action_train(self) -> None:
        if self._need():
            self.app.action_new_job("train", {"subspace": self.app.subspace_path})

    @on(DataTable.RowSelected, "#fidelity")
    def _task_selected(self) -> None:
        self.action_export()


def _f(v: Any, spec: str = ".4f") -> str:
    return "—" if v is None else format(v, spec)


def short_module(name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` → ``3.q_proj``."""
    parts = name.split(".")
    layer = next((p for p in parts if p.isdigit()), "")
    return f"{layer}.{parts[-1]}" if layer else parts[-1]


def k_labels(info: SubspaceInfo | Mapping[str, Any]) -> list[str]:
    """The distinct k of the modules: ``k_u×k_v`` where a joint basis has them differ, else ``k``
    (the stats' k per module where the info has no module rows; a dict is read as a :class:`SubspaceInfo`)."""
    if isinstance(info, Mapping):
        info = SubspaceInfo.from_dict(info)
    labels: list[str] = []
    if info.modules:
        for m in info.modules:
            k, ku, kv = m.k, m.k_u, m.k_v
            label = f"{ku}×{kv}" if ku is not None and kv is not None and ku != kv else str(k if k is not None else ku)
            if label not in labels:
                labels.append(label)
    else:
        labels = [str(k) for k in sorted(set((info.stats.k or {}).values()))]

    def order(label: str) -> tuple[int, ...]:
        return tuple(int(x) for x in label.split("×") if x.isdigit())

    return sorted(labels, key=order)


def stats_table(info: SubspaceInfo, path: str | None) -> Table:
    """Compression stats and quantization state of a subspace (the ``info`` job's result on it)."""
    t = Table.grid(padding=(0, 2))
    t.add_column(style="bold")
    t.add_column()
    st = info.stats
    ks = k_labels(info)
    t.add_row("subspace", tildify(str(path or info.path or "—")))
    t.add_row("method", f"{info.method or st.method or '—'}  ({st.dtype or info.dtype or '—'})")
    t.add_row("base model", str(info.base_model or "—"))
    t.add_row("tasks / modules", f"{st.num_tasks if st.num_tasks is not None else len(info.tasks)} / "
                                 f"{st.num_modules if st.num_modules is not None else '—'}")
    t.add_row("k per module", ", ".join(ks) if ks else "—")
    disk = st.disk
    if disk:
        # the engine's one ratio (engine.subspace.size.size_on_disk), shown as the engine words it
        inputs = f"{disk.input_bytes:,} B" if disk.input_bytes is not None else "not recorded"
        t.add_row("on disk", f"{inputs} → {disk.bytes:,} B")
        t.add_row("compression", str(disk.text or "n/a"))
    if st.storage.summary:
        t.add_row("stored", str(st.storage.summary))
    if info.tasks:
        # the engine's own figures; the screen only picks the worst task's name to show
        worst = max(info.tasks, key=lambda x: x.max_error or 0.0)
        t.add_row("ΔW error", f"mean {st.error.mean:.3f}, worst {st.error.max:.3f} ({worst.task_id})")
    q = info.quantization
    if not q and st.precision == "auto":
        t.add_row("precision", "auto: rank and bits per module (fp16, int8…int3, nf4)")
    elif not q:
        t.add_row("quantization", "none")
    else:
        bits, method = q.get("bits"), q.get("method")
        extra = " + double quant" if q.get("double_quant") else ""
        t.add_row("quantization", f"{bits}-bit {method}{extra}" if bits else str(method))
    return t


def comparison_table(data: CompareResult | BaseCompareResult | Mapping[str, Any]) -> tuple[str, list[str], list[tuple[str, list[str]]]]:
    """``(title, columns, [(key, cells)])`` of the table under the ΔW fidelity: a ``compare`` job's per-task
    output fidelity (original vs reconstruction, or each task vs the base model), or a ``train`` job's
    held-out figures before → after training (a ``compare`` dict is read as its result class)."""
    if isinstance(data, Mapping) and data.get("mode") == "train":  # the view's dict: a HeldOut plus task_id
        held = HeldOut.from_dict(data)
        rows = [("loss", ["loss per " + str(held.unit), _f(held.before.loss, ".4g"), _f(held.after.loss, ".4g")])]
        if held.before.accuracy is not None:
            rows.append(("accuracy", ["accuracy", _f(held.before.accuracy, ".3f"), _f(held.after.accuracy, ".3f")]))
        return (f"Train {data.get('task_id')}: held out ({held.examples} examples), before → after",
                ["metric", "before", "after"], rows)
    result = Compared.from_dict(data) if isinstance(data, Mapping) else data
    causal = result.task_type == "CAUSAL_LM"
    if isinstance(result, BaseCompareResult):
        acc = any(t.accuracy_task is not None for t in result.tasks)
        cols = ["task", "KL(task ‖ base)", "top-1 = base", *(("ppl base", "ppl task") if causal else ()),
                *(("acc before", "acc task") if acc else ())]
        rows = []
        for b in result.tasks:
            ppl = [_f(b.ppl_base, ".4g"), _f(b.ppl_task, ".4g")] if causal else []
            ac = [_f(b.accuracy_before, ".3f"), _f(b.accuracy_task, ".3f")] if acc else []
            rows.append((b.task_id, [b.task_id, _f(b.kl_mean, ".3g"), _f(b.top1_agreement, ".3f"), *ppl, *ac]))
        return "Output change (compare): each task vs the base model", cols, rows
    cols = ["task", "KL mean", "KL max", "top-1", *(("ppl orig", "ppl ours", "ppl Δ") if causal else ()), "ΔW error"]
    rows = []
    for t in result.tasks:
        ppl = [_f(t.ppl_original, ".4g"), _f(t.ppl_reconstructed, ".4g"), _f(t.ppl_change, "+.2%")] if causal else []
        rows.append((t.task_id, [t.task_id, _f(t.kl_mean, ".3g"), _f(t.kl_max, ".3g"), _f(t.top1_agreement, ".3f"), *ppl,
                                 _f(t.delta_w_error, ".3g")]))
    return "Output fidelity (compare): original adapter vs reconstruction", cols, rows
