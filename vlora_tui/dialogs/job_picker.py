"""Pick a job kind to launch (then its form opens)."""

from __future__ import annotations

from typing import Any, ClassVar

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label, OptionList
from textual.widgets.option_list import Option


class JobPickerScreen(ModalScreen[str | None]):
    """A list of job kinds with their help; dismisses with the chosen kind's name."""

    BINDINGS: ClassVar = [Binding("escape", "cancel", "Cancel", tooltip="Close without choosing", id="picker-cancel")]

    def __init__(self, kinds: list[Any]) -> None:
        super().__init__()
        self.kinds = kinds

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("New job", classes="dialog-title")
            yield OptionList(*[Option(f"{k.title:<22} {k.help}", id=k.name) for k in self.kinds], id="job-kinds")

    @on(OptionList.OptionSelected)
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)

    def action_cancel(self) -> None:
        self.dismiss(None)
