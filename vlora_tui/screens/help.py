"""The help screen: every key of the screen underneath, and the app's global keys."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen, Screen
from textual.widgets import DataTable, Label, Static

INTRO = (
    "vlora-tui is keyboard first: every key below is also in the command palette (ctrl+p), "
    "which offers only what fits now. Tab moves between panes; the focused pane is outlined."
)


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
        table = self.query_one(DataTable)
        table.add_columns("Key", "Action", "What it does")
        seen: set[tuple[str, str]] = set()
        for key, active in self.target.active_bindings.items():
            b = active.binding
            if not b.description:
                continue
            shown = self.app.get_key_display(b)
            if (shown, b.description) in seen:
                continue
            seen.add((shown, b.description))
            table.add_row(shown, b.description, b.tooltip or "")
        table.focus()

    def action_close(self) -> None:
        self.dismiss(None)
