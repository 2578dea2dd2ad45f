"""A subspace: variance explained per module and k, ΔW fidelity per task and module, stats, quantization."""

from __future__ import annotations

from typing import Any, ClassVar

from rich.table import Table
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Label, Static

from ..widgets.plots import DataPlot


class SubspaceScreen(Screen):
    """Shows the ``info`` job's data on a subspace; launches export/merge/quantize/add from it."""

    BINDINGS: ClassVar = [
        Binding("o", "open", "Open…", tooltip="Open a saved subspace folder", id="subspace-open"),
        Binding("left_square_bracket", "module(-1)", "Prev module", key_display="[", tooltip="Variance plot: previous module", id="subspace-prev"),
        Binding("right_square_bracket", "module(1)", "Next module", key_display="]", tooltip="Variance plot: next module", id="subspace-next"),
        Binding("e", "export", "Export…", tooltip="Export the highlighted task as a PEFT adapter", id="subspace-export"),
        Binding("m", "merge", "Merge…", tooltip="Merge tasks of this subspace into one adapter", id="subspace-merge"),
        Binding("q", "quantize", "Quantize…", tooltip="Quantize this subspace's loadings", id="subspace-quantize"),
        Binding("a", "add", "Add…", tooltip="Project more adapters into this subspace", id="subspace-add"),
    ]

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical():
            with Horizontal(id="subspace-top"):
                yield Static("No subspace open: compress the collection (3, c) or open one (o).", id="subspace-stats")
                yield DataPlot(empty="variance explained", id="variance-plot")
            with Horizontal(id="subspace-bottom"):
                with Vertical(id="fidelity-pane"):
                    yield Label("ΔW fidelity per task (relative error)", classes="pane-title")
                    yield DataTable(id="fidelity", cursor_type="row", zebra_stripes=True)
                yield DataPlot(empty="fidelity per task", id="fidelity-plot")
        yield Footer(show_command_palette=False)

    def on_mount(self) -> None:
        self._module_index = 0
        self.app.state_signal.subscribe(self, self._on_state)  # type: ignore[attr-defined]
        self._refresh()

    def _on_state(self, topic: str) -> None:
        if topic == "subspace":
            self._refresh()

    @property
    def info(self) -> dict[str, Any] | None:
        return self.app.subspace_info  # type: ignore[attr-defined]

    def tasks(self) -> list[str]:
        info = self.info or {}
        return [t if isinstance(t, str) else str(t.get("name")) for t in info.get("tasks") or []]

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
        if not info:
            stats.update("No subspace open: compress the collection (3, c) or open one (o).")
            self.query_one("#variance-plot", DataPlot).draw_empty()
            self.query_one("#fidelity-plot", DataPlot).draw_empty()
            return
        stats.update(stats_table(info, self.app.subspace_path))  # type: ignore[attr-defined]
        self._draw_variance()
        fid = info.get("fidelity") or {}
        per_task = fid.get("per_task") or {}
        modules = list(fid.get("modules") or [])
        table.add_columns("task", "mean", "max", "worst module")
        tasks = self.tasks()
        for t in tasks:
            row = per_task.get(t) or {}
            table.add_row(t, _f(row.get("mean")), _f(row.get("max")), str(row.get("worst_module") or "—"), key=t)
        self.query_one("#fidelity-plot", DataPlot).draw_bars(
            [str(i + 1) for i in range(len(tasks))], [(per_task.get(t) or {}).get("mean") or 0.0 for t in tasks],
            "mean relative ΔW error per task (task #)", "error",
        )
        del modules

    def _draw_variance(self) -> None:
        info = self.info or {}
        ve = info.get("variance_explained") or {}
        plot = self.query_one("#variance-plot", DataPlot)
        if not ve:
            plot.draw_empty()
            return
        modules = sorted(ve)
        self._module_index %= len(modules)
        m = modules[self._module_index]
        series = {}
        for side, curve in (ve[m].items() if isinstance(ve[m], dict) else [("ΔW", ve[m])]):
            ys = list(curve or [])
            series[side] = (list(range(1, len(ys) + 1)), ys)
        plot.draw_lines(series, f"variance explained — {m} ({self._module_index + 1}/{len(modules)})", "k", "cumulative", (0.0, 1.0))

    def action_module(self, step: int) -> None:
        self._module_index += step
        self._draw_variance()

    def action_open(self) -> None:
        self.app.action_open_subspace_prompt()  # type: ignore[attr-defined]

    def _need(self) -> bool:
        if self.app.subspace_path is None:  # type: ignore[attr-defined]
            self.notify("Open a subspace first (o)", severity="warning")
            return False
        return True

    def action_export(self) -> None:
        if self._need():
            task = self.highlighted_task()
            self.app.action_new_job("export", {"subspace": self.app.subspace_path, "task": task})  # type: ignore[attr-defined]

    def action_merge(self) -> None:
        if self._need():
            self.app.action_new_job("merge", {"subspace": self.app.subspace_path})  # type: ignore[attr-defined]

    def action_quantize(self) -> None:
        if self._need():
            self.app.action_new_job("quantize", {"subspace": self.app.subspace_path})  # type: ignore[attr-defined]

    def action_add(self) -> None:
        if self._need():
            self.app.action_new_job("add", {"subspace": self.app.subspace_path})  # type: ignore[attr-defined]

    @on(DataTable.RowSelected, "#fidelity")
    def _task_selected(self) -> None:
        self.action_export()


def _f(v: Any) -> str:
    return "—" if v is None else f"{v:.4f}"


def stats_table(info: dict[str, Any], path: str | None) -> Table:
    """Compression stats and quantization state of a subspace."""
    t = Table.grid(padding=(0, 2))
    t.add_column(style="bold")
    t.add_column()
    st = info.get("stats") or {}
    t.add_row("subspace", str(path or info.get("path") or "—"))
    t.add_row("tasks", str(len(info.get("tasks") or [])))
    for key, label in (("num_components", "k (components)"), ("compression_ratio", "compression"),
                       ("original_bytes", "original bytes"), ("compressed_bytes", "compressed bytes")):
        if key in st:
            v = st[key]
            t.add_row(label, f"{v:.1f}×" if key == "compression_ratio" else f"{v:,}" if isinstance(v, int) else str(v))
    q = info.get("quantization")
    t.add_row("quantization", "none (fp32)" if not q else str(q if isinstance(q, str) else q.get("method", q)))
    return t
