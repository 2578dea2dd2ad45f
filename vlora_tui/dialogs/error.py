"""An error report: title, one-line message, and details (a traceback) when there are any."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Label, Static


class ErrorScreen(ModalScreen[None]):
    """Shows one failure; escape or enter closes it."""

    BINDINGS: ClassVar = [
        Binding("escape,enter", "close", "Close", tooltip="Close this report", id="error-close"),
    ]

    def __init__(self, title: str, message: str, details: str | None = None) -> None:
        super().__init__()
        self.title_text = title
        self.message = message
        self.details = details

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog error-dialog"):
            yield Label(self.title_text, classes="dialog-title")
            yield Static(self.message, id="error-message", markup=False)
            if self.details:
                with VerticalScroll(id="error-details"):
                    yield Static(self.details, markup=False)

    def action_close(self) -> None:
        self.dismiss(None)
