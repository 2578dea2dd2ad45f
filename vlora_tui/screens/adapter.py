"""Adapter detail: config, modules with shapes and ranks, norms (``inspect`` job), extras, problems."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from rich.table import Table
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import DataTable, Footer, Header, Label, OptionList, Static
from textual.widgets.option_list import Option

from engine.io.scan import is_hub_spec
from engine.jobs.kinds.inspect import InspectResult
from engine.jobs.kinds.validate import ValidateResult

from .base import VloraScreen


def _fmt(v: Any, spec: str = ".4g") -> str:
    return "—" if v is None else format(v, spec)


class AdapterScreen(VloraScreen):
    """One adapter of the working collection, read from its header; norms from ``inspect``."""

    BINDINGS: ClassVar = [
        Binding("i", "inspect", "Norms", tooltip="Run the inspect job: norms of A, B and ΔW per module", id="adapter-inspect"),
        Binding("v", "validate", "Validate", tooltip="Run the validate job on this adapter", id="adapter-validate"),
        Binding("delete,x", "remove", "Remove", tooltip="Remove this adapter from the working collection", id="adapter-remove"),
    ]

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal():
            with Vertical(id="adapter-side"):
                yield Label("Collection", classes="pane-title")
                yield OptionList(id="adapter-list")
            with VerticalScroll(id="adapter-detail"):
                yield Static("No adapter yet: add one in the browser (1).", id="adapter-config")
                yield Label("Modules", classes="pane-title")
                yield DataTable(id="modules", cursor_type="row", zebra_stripes=True)
                yield Static("", id="adapter-extras")
                yield Static("", id="adapter-problems")
        yield Footer(show_command_palette=False)

    def on_mount(self) -> None:
        self.query_one("#modules", DataTable).add_columns("module", "out × in", "rank", "dtype", "‖A‖", "‖B‖", "‖ΔW‖", "σ₁")
        self.app.state_signal.subscribe(self, self._on_state)
        self._shown: str | None = None
        self._refresh_list()
        self._refresh_detail()

    def on_screen_resume(self) -> None:
        self._maybe_inspect()

    def _on_state(self, topic: str) -> None:
        if topic == "collection":
            self._refresh_list()
        if topic in ("adapter", "inspect", "collection"):
            self._refresh_detail()
            if topic == "adapter" and self.app.screen is self:
                self._maybe_inspect()

    @property
    def spec(self) -> str | None:
        return self.app.current_adapter

    def _refresh_list(self) -> None:
        from engine.io.scan import spec_name

        coll = self.app.collection
        lst = self.query_one("#adapter-list", OptionList)
        lst.clear_options()
        lst.add_options([Option(spec_name(s), id=s) for s in coll])
        if self.spec in coll:
            lst.highlighted = coll.index(self.spec)

    @on(OptionList.OptionHighlighted, "#adapter-list")
    def _highlighted(self, event: OptionList.OptionHighlighted) -> None:
        spec = event.option.id
        if spec and spec != self.spec:
            self.app.current_adapter = spec
            self.app.state_signal.publish("adapter")

    def _maybe_inspect(self) -> None:
        app: Any = self.app
        spec = self.spec
        if not spec or not app.config.auto_inspect or spec in app.inspections:
            return
        if any(j.kind == "inspect" and j.request.params.get("adapter") == spec and not j.finished for j in app.jobs):
            return
        self.action_inspect(open_result=False)

    def _refresh_detail(self) -> None:
        app: Any = self.app
        spec = self.spec
        cfg = self.query_one("#adapter-config", Static)
        table = self.query_one("#modules", DataTable)
        extras = self.query_one("#adapter-extras", Static)
        problems = self.query_one("#adapter-problems", Static)
        table.clear()
        if spec is None:
            cfg.update("No adapter yet: add one in the browser (1).")
            extras.update("")
            problems.update("")
            return
        insp = InspectResult.from_dict(app.inspections[spec]) if app.inspections.get(spec) else None
        summary = None
        hub = is_hub_spec(spec)
        if not hub:
            from engine.errors import VloraError
            from engine.io.header import read_adapter_summary

            try:
                summary = read_adapter_summary(spec)
            except VloraError as exc:
                cfg.update(Text(f"✗ {exc}", style="bold red"))
                problems.update("")
                extras.update("")
                return
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold")
        grid.add_column()
        name = spec if hub else Path(spec).name
        grid.add_row("adapter", name)
        if summary is not None:
            tm = summary.target_modules if isinstance(summary.target_modules, str) else ", ".join(summary.target_modules)
            grid.add_row("base model", summary.base_model or "—")
            grid.add_row("rank / alpha", f"r={summary.rank}   lora_alpha={summary.lora_alpha:g}   scale={summary.lora_alpha / summary.rank:g}")
            grid.add_row("rsLoRA", "yes" if summary.use_rslora else "no")
            grid.add_row("target modules", tm)
            grid.add_row("size", f"{len(summary.modules)} modules, {summary.num_params:,} params, {summary.nbytes / 1024:,.0f} KiB ({', '.join(summary.dtypes)})")
        elif insp:
            grid.add_row("base model", str(insp.base_model or "—"))
            grid.add_row("rank / alpha", f"r={insp.rank}   lora_alpha={insp.lora_alpha}")
            grid.add_row("rsLoRA", "yes" if insp.use_rslora else "no")
        if insp:
            grid.add_row("‖ΔW‖ total", _fmt(insp.norm_delta_total))
        else:
            grid.add_row("norms", "press i to compute (inspect job)")
        cfg.update(grid)
        figures = {m.name: m for m in insp.modules} if insp else {}
        modules = summary.modules if summary is not None else []
        rows = [(m.name, m.out_features, m.in_features, m.rank, m.dtype) for m in modules] or [
            (m.name, m.out_features, m.in_features, m.rank, m.dtype) for m in figures.values()
        ]
        for name_, out_f, in_f, rank, dtype in rows:
            f = figures.get(name_)
            sv = f.singular_values if f else []
            table.add_row(
                name_, f"{out_f} × {in_f}", str(rank), str(dtype),
                _fmt(f.norm_a if f else None), _fmt(f.norm_b if f else None), _fmt(f.norm_delta if f else None),
                _fmt(sv[0] if sv else None), key=name_,
            )
        extra_keys = list(summary.extra_tensors) if summary is not None else list(insp.extra_tensors if insp else [])
        extras.update(
            "Extra tensors: " + ", ".join(extra_keys) if extra_keys else "Extra tensors: none (LoRA factors only)"
        )
        found: list[str] = list(insp.problems if insp else [])
        val = ValidateResult.from_dict(app.validations[spec]) if app.validations.get(spec) else None
        if val:
            for row in val.adapters:
                if row.error:
                    found.append(row.error)
                found.extend(w for w in row.warnings if w not in found)
        if found:
            problems.update(Text("Validation problems:\n" + "\n".join(f"  ⚠ {p}" for p in found), style="bold"))
        elif insp or val:
            problems.update("Validation: no problems found.")
        else:
            problems.update("")

    def action_inspect(self, open_result: bool = True) -> None:
        spec = self.spec
        if spec is None:
            self.notify("No adapter selected", severity="warning")
            return
        from engine.io.scan import spec_name

        self.app.submit_job("inspect", {"adapter": spec}, title=f"inspect {spec_name(spec)}", open_result=open_result)

    def action_validate(self) -> None:
        spec = self.spec
        if spec is None:
            self.notify("No adapter selected", severity="warning")
            return
        from engine.io.scan import spec_name

        self.app.submit_job("validate", {"adapters": [spec]}, title=f"validate {spec_name(spec)}")

    def action_remove(self) -> None:
        if self.spec is not None:
            self.app.remove_from_collection(self.spec)
