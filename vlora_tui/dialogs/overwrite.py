"""Asked when a job's output folder exists: overwrite it, or write under a new name."""

from __future__ import annotations

from typing import ClassVar

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Label, Static


class OverwriteScreen(ModalScreen[str | None]):
    """Dismisses with ``"overwrite"``, ``"rename"`` (to ``suggestion``) or ``None`` (cancel).

    Args:
        path: The output folder that exists.
        suggestion: The fresh name ``rename`` writes to.
        can_overwrite: Whether the job kind can overwrite (has a ``force`` parameter).
    """

    BINDINGS: ClassVar = [
        Binding("r", "choose('rename')", "New name", tooltip="Write to a new, unused folder instead", id="overwrite-rename"),
        Binding("o", "choose('overwrite')", "Overwrite", tooltip="Replace the existing folder when the job finishes", id="overwrite-overwrite"),
        Binding("escape", "choose(None)", "Cancel", tooltip="Do not start the job", id="overwrite-cancel"),
    ]

    def __init__(self, path: str, suggestion: str, *, can_overwrite: bool = True) -> None:
        super().__init__()
        self.path = path
        self.suggestion = suggestion
        self.can_overwrite = can_overwrite

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="overwrite-dialog"):
            yield Label("Output exists", classes="dialog-title")
            yield Static(Text.assemble(("This output folder exists already:\n", ""), (self.path, "bold")), id="overwrite-path")
            yield Static(Text.assemble("New name: ", (self.suggestion, "bold")), classes="dialog-help", id="overwrite-suggestion")
            with Horizontal(classes="dialog-buttons"):
                yield Button("New name (r)", variant="primary", id="rename")
                yield Button("Overwrite (o)", variant="warning", id="overwrite", disabled=not self.can_overwrite)
                yield Button("Cancel (esc)", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#rename", Button).focus()

    def action_choose(self, answer: str | None) -> None:
        if answer == "overwrite" and not self.can_overwrite:
            return
        self.dismiss(answer)

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.action_choose(None if event.button.id == "cancel" else event.button.id)
