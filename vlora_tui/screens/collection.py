"""The collection: similarity heatmap (``analyze`` job), clusters and outliers, diff of two adapters."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from rich.table import Table
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Footer, Header, Label, SelectionList, Static

from engine.jobs.kinds.analyze import AnalyzeResult
from engine.jobs.kinds.diff import DiffReport, ModuleDiffRow

from ..widgets.heatmap import SimilarityHeatmap
from ..widgets.plots import DataPlot
from .base import VloraScreen


class CollectionScreen(VloraScreen):
    """Pick adapters (space), analyze them (a), read the heatmap, diff the pair under the cursor (d)."""

    BINDINGS: ClassVar = [
        Binding("a", "analyze", "Analyze", tooltip="Run the analyze job on the selected adapters", id="collection-analyze"),
        Binding("n", "most_similar", "Most similar", tooltip="Move the heatmap cursor to the most similar pair", id="collection-similar"),
        Binding("d", "diff", "Diff pair", tooltip="Run the diff job on the pair under the heatmap cursor", id="collection-diff"),
        Binding("c", "compress", "Compress…", tooltip="Compress the selected adapters into a shared subspace", id="collection-compress"),
        Binding("m", "merge", "Merge…", tooltip="Merge the selected adapters into one adapter", id="collection-merge"),
        Binding("u", "deselect_incompatible", "Deselect incompatible", tooltip="Unselect adapters whose modules or shapes differ from the majority", id="collection-deselect-incompatible"),
    ]

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal():
            with Vertical(id="members-pane"):
                yield Label("Adapters (space toggles)", classes="pane-title", id="members-title")
                yield SelectionList[str](id="members")
                yield Static("", id="members-notice", classes="notice")
            with Vertical(id="analysis-pane"):
                yield SimilarityHeatmap(id="heatmap")
                with Horizontal(id="analysis-row"):
                    yield DataPlot(empty="similarity: press a to analyze", id="heatmap-plot")
                    with VerticalScroll(id="clusters-pane"):
                        yield Static("Clusters and outliers appear after the analyze job.", id="clusters")
                    with VerticalScroll(id="diff-pane"):
                        yield Static("Diff: move the heatmap cursor to a pair and press d.", id="diff")
        yield Footer(show_command_palette=False)

    def on_mount(self) -> None:
        self._signatures: dict[str, Any] = {}
        self.incompatible: dict[str, str] = {}
        """Spec → why it cannot share a basis with the majority of the collection."""
        self.app.state_signal.subscribe(self, self._on_state)
        self._refresh_members()
        self._refresh_analysis()
        self._refresh_diff()

    def _on_state(self, topic: str) -> None:
        if topic == "collection":
            self._refresh_members()
        elif topic == "analysis":
            self._refresh_analysis()
        elif topic == "diff":
            self._refresh_diff()

    # -- members -----------------------------------------------------------------------
    def _refresh_members(self) -> None:
        from engine.io.scan import spec_name

        sl = self.query_one("#members", SelectionList)
        previous = set(sl.selected)
        known = {str(o.value) for o in (sl.get_option_at_index(i) for i in range(sl.option_count))}
        self._check_compatibility()
        highlighted = sl.highlighted
        sl.clear_options()
        for spec in self.app.collection:
            label: Any = spec_name(spec)
            if spec in self.incompatible:
                label = Text(f"⚠ {label}", style="bold yellow")
            sl.add_option((label, spec, spec in previous or spec not in known))
        if highlighted is not None and sl.option_count:
            sl.highlighted = min(highlighted, sl.option_count - 1)
        notice = self.query_one("#members-notice", Static)
        if self.incompatible:
            names = ", ".join(spec_name(s) for s in self.incompatible)
            notice.update(f"⚠ {len(self.incompatible)} incompatible with the rest ({names}): u deselects them")
        else:
            notice.update("")

    def _check_compatibility(self) -> None:
        """Mark adapters whose modules/shapes differ from the majority (headers only, read once per adapter)."""
        from engine.io.compat import incompatible_with_majority
        from engine.io.header import read_adapter_summary
        from engine.io.scan import is_hub_spec

        for spec in self.app.collection:
            if spec not in self._signatures and not is_hub_spec(spec):  # a Hub adapter: not downloaded yet
                try:
                    self._signatures[spec] = read_adapter_summary(spec)
                except Exception:  # the engine reads it again and says why ("cannot read: …")
                    self._signatures[spec] = spec
        known = [s for s in self.app.collection if s in self._signatures]
        self.incompatible = (incompatible_with_majority([self._signatures[s] for s in known], names=known)
                             if len(known) >= 2 else {})

    def selected_specs(self) -> list[str]:
        sl = self.query_one("#members", SelectionList)
        chosen = set(sl.selected)
        return [s for s in self.app.collection if s in chosen]

    # -- analysis -------------------------------------------------------------------------
    @property
    def analysis(self) -> AnalyzeResult | None:
        """The ``analyze`` job's data (``app.analysis``, with the view's ``paths``), typed."""
        data = self.app.analysis
        return AnalyzeResult.from_dict(data) if data else None

    def _refresh_analysis(self) -> None:
        data = self.analysis
        heat = self.query_one(SimilarityHeatmap)
        plot = self.query_one("#heatmap-plot", DataPlot)
        clusters = self.query_one("#clusters", Static)
        if not data:
            heat.clear(columns=True)
            plot.draw_empty()
            clusters.update("Clusters and outliers appear after the analyze job (a).")
            return
        names = list(data.names)
        matrix = data.similarity
        heat.set_matrix(names, matrix)
        plot.draw_heatmap(matrix, names, "cosine similarity of ΔW")  # the analyze job's one metric
        clusters.update(self._clusters_text(data))

    @staticmethod
    def _clusters_text(data: AnalyzeResult | Mapping[str, Any]) -> Table:
        """Clusters and outliers of the ``analyze`` job's result (a dict is read as an :class:`AnalyzeResult`)."""
        if isinstance(data, Mapping):
            data = AnalyzeResult.from_dict(data)
        t = Table(title="Clusters", expand=True, show_edge=False, box=None)
        t.add_column("#", justify="right", width=3)
        t.add_column("members", overflow="fold")  # long names wrap, never end in an ellipsis
        for i, cluster in enumerate(data.clusters):
            t.add_row(str(i + 1), ", ".join(map(str, cluster.names)))
        if data.outliers:
            t.add_row("⚠", Text("outliers: " + ", ".join(o.name for o in data.outliers), style="bold"))
        return t

    def _refresh_diff(self) -> None:
        data = self.app.diff
        box = self.query_one("#diff", Static)
        if not data:
            box.update("Diff: move the heatmap cursor to a pair and press d.")
            return
        box.update(diff_table(data))

    # -- actions ---------------------------------------------------------------------------
    def action_deselect_incompatible(self) -> None:
        """Unselect the adapters that cannot share a basis with the majority."""
        sl = self.query_one("#members", SelectionList)
        chosen = [s for s in self.incompatible if s in set(sl.selected)]
        if not self.incompatible:
            self.notify("Every adapter matches the others' modules and shapes", title="Compatibility")
            return
        for spec in chosen:
            sl.deselect(spec)
        from engine.io.scan import spec_name

        self.notify(f"Deselected {len(chosen)}: " + "; ".join(f"{spec_name(s)}: {self.incompatible[s]}" for s in chosen)
                    if chosen else "The incompatible adapters are not selected", title="Compatibility")

    def action_analyze(self) -> None:
        specs = self.selected_specs()
        if len(specs) < 2:
            self.notify("Select at least two adapters to analyze", title="Analyze", severity="warning")
            return
        self.app.submit_job("analyze", {"adapters": specs}, title=f"analyze {len(specs)} adapters")

    def action_most_similar(self) -> None:
        heat = self.query_one(SimilarityHeatmap)
        pair = heat.most_similar_pair()
        if pair is None:
            self.notify("Analyze the collection first (a)", severity="warning")
            return
        heat.move_to_pair(*pair)
        heat.focus()  # the pair and its value show in the heatmap's border, not in a toast over the panes

    def action_diff(self) -> None:
        heat = self.query_one(SimilarityHeatmap)
        pair = heat.pair_at_cursor()
        data = self.analysis
        paths = list(data.paths or []) if data else []
        if pair is None or not paths:
            self.notify("Move the heatmap cursor onto a pair first", title="Diff", severity="warning")
            return
        i, j = pair
        if i == j:
            self.notify("Pick two different adapters (off the diagonal)", title="Diff", severity="warning")
            return
        self.app.submit_job(
            "diff", {"a": paths[i], "b": paths[j]}, title=f"diff {heat.labels[i]} / {heat.labels[j]}"
        )

    def action_compress(self) -> None:
        self.app.action_new_job("compress", {"adapters": self.selected_specs()})

    def action_merge(self) -> None:
        self.app.action_new_job("merge", {"adapters": self.selected_specs()})

    @on(SimilarityHeatmap.CellHighlighted, "#heatmap")
    def _cell(self, event: SimilarityHeatmap.CellHighlighted) -> None:
        heat = self.query_one(SimilarityHeatmap)
        pair = heat.pair_at_cursor()
        if pair is not None and heat.labels:
            i, j = pair
            v = heat.matrix[i][j]
            heat.border_subtitle = f"{heat.labels[i]} ~ {heat.labels[j]}: {'—' if v is None else f'{v:.3f}'}"


def diff_table(data: DiffReport | Mapping[str, Any]) -> Table:
    """The ``diff`` job's result as a table: overall figures, then every module (a dict is read as a :class:`DiffReport`)."""
    if isinstance(data, Mapping):
        data = DiffReport.from_dict(data)
    t = Table(title=f"{data.a or 'A'} vs {data.b or 'B'}", expand=True, show_edge=False, box=None, pad_edge=False)
    t.add_column("module")
    t.add_column("cos", justify="right")
    t.add_column("rel.diff", justify="right")

    def row(m: ModuleDiffRow, label: str, style: str = "") -> None:
        t.add_row(Text(short(label), style=style), _num(m.cosine, ".3f"), _num(m.relative_difference, ".3f"))

    if data.overall:
        row(data.overall, "overall", "bold")
    for m in data.modules:
        row(m, str(m.module or "overall"))
    for side in ("only_in_a", "only_in_b"):
        if getattr(data, side):
            t.add_row(Text(f"{side}: {', '.join(getattr(data, side))}", style="bold"), "", "")
    return t


def _num(v: Any, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def short(name: str) -> str:
    parts = name.split(".")
    layer = next((p for p in parts if p.isdigit()), "")
    return f"{layer}.{parts[-1]}" if layer else name
