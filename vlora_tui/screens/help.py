"""The help screen: every key of the screen underneath, and the app's global keys."""

from __future__ import annotations

from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen, Screen
from textual.widgets import DataTable, Label, Static

INTRO = (
    "vlora-tui is keyboard first: every key below is also in the command palette (ctrl+p), "
    "which offers only what fits now. Tab moves between panes; the focused pane is outlined."
)


KEY_WIDTH = 12
ACTION_WIDTH = 20


class HelpScreen(ModalScreen[None]):
    """Lists the bindings active on ``target`` (the screen help was opened from)."""

    BINDINGS: ClassVar = [
        Binding("escape,q,question_mark,f1", "close", "Close", tooltip="Back to the screen", id="help-close"),
    ]

    def __init__(self, target: Screen) -> None:
        super().__init__()
        self.target = target

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog help-dialog"):
            yield Label(f"Keys — {self.target.__class__.__name__.removesuffix('Screen')}", classes="dialog-title")
            yield Static(INTRO, classes="dialog-help")
            yield DataTable(id="help-keys", cursor_type="row", zebra_stripes=True)

    def on_mount(self) -> None:
        self.query_one(DataTable).focus()
        self.call_after_refresh(self._fill)

    def ordered_bindings(self) -> list[tuple[str, list[Binding]]]:
        """Sections of ``(title, bindings)``: this screen's keys, the app's, then the built-in ones (widgets, Textual)."""
        own_ids = {b.id for b in getattr(type(self.target), "BINDINGS", []) if isinstance(b, Binding) and b.id}
        app_ids = {b.id for b in getattr(type(self.app), "BINDINGS", []) if isinstance(b, Binding) and b.id}
        sections: dict[str, list[Binding]] = {"This screen": [], "Everywhere": [], "Built in": []}
        seen: set[tuple[str, str]] = set()
        for active in self.target.active_bindings.values():
            b = active.binding
            if not b.description:
                continue
            key = (self.app.get_key_display(b), b.description)
            if key in seen:
                continue
            seen.add(key)
            if b.id in own_ids and active.node is self.target:
                sections["This screen"].append(b)
            elif b.id in app_ids and active.node is self.app:
                sections["Everywhere"].append(b)
            else:
                sections["Built in"].append(b)
        return [(title, bs) for title, bs in sections.items() if bs]

    def _fill(self) -> None:
        table = self.query_one(DataTable)
        # the description column takes the rest of the width and wraps: nothing is cut
        rest = max(20, table.scrollable_content_region.width - KEY_WIDTH - ACTION_WIDTH - 6 * table.cell_padding - 2)
        table.clear(columns=True)
        table.add_column("Key", width=KEY_WIDTH, key="key")
        table.add_column("Action", width=ACTION_WIDTH, key="action")
        table.add_column("What it does", width=rest, key="what")
        for title, bindings in self.ordered_bindings():
            table.add_row(Text(title, style="bold"), "", "", key=f"section-{title}", height=None)
            for b in bindings:
                table.add_row(self.app.get_key_display(b), Text(b.description), Text(b.tooltip or ""), height=None)
        table.move_cursor(row=1)

    def action_close(self) -> None:
        self.dismiss(None)
