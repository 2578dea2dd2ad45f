"""A form built from a job kind's typed parameters, checked before the job starts."""

from __future__ import annotations

from typing import Any, ClassVar

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Checkbox, Input, Label, Select, Static

from ..config import expand_tilde, tildify


def to_text(value: Any) -> str:
    """A parameter value as the form's input shows it."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return tildify(" ".join(str(v) for v in value))
    return tildify(str(value))


class JobFormScreen(ModalScreen[dict | None]):
    """One field per ``Param`` of a job kind; dismisses with the checked params, or ``None``.

    Args:
        kind: An ``engine.jobs.JobKind``.
        values: Initial values by parameter name (defaults fill the rest).
    """

    BINDINGS: ClassVar = [
        Binding("ctrl+s", "start", "Start", tooltip="Check the parameters and queue the job", id="form-start"),
        Binding("escape", "cancel", "Cancel", tooltip="Close without starting", id="form-cancel"),
    ]

    def __init__(self, kind: Any, values: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.kind = kind
        self.values = dict(values or {})

    def compose(self) -> ComposeResult:
        with Vertical(id="form", classes="dialog"):
            yield Label(f"{self.kind.title}", classes="dialog-title")
            yield Static(self.kind.help, classes="dialog-help")
            with VerticalScroll(id="form-fields"):
                for p in self.kind.params:
                    value = self.values.get(p.name, p.default)
                    label = f"{p.name}{' *' if p.required else ''}"
                    with Horizontal(classes="field"):
                        yield Label(label, classes="field-label")
                        if p.type == "bool" and p.default is None:  # unset means "the method's own default"
                            yield Select(
                                [("yes", True), ("no", False)],
                                value=Select.NULL if value is None else bool(value),
                                prompt="(method default)",
                                id=f"param-{p.name}",
                            )
                        elif p.type == "bool":
                            yield Checkbox(p.help or p.name, bool(value), id=f"param-{p.name}")
                        elif p.type == "choice" and p.choices:
                            yield Select(
                                [(str(c), c) for c in p.choices],
                                value=value if value in p.choices else Select.NULL,
                                allow_blank=not p.required,
                                id=f"param-{p.name}",
                            )
                        else:
                            yield Input(to_text(value), placeholder=p.help or p.type, id=f"param-{p.name}", tooltip=p.help)
            yield Static("", id="form-error")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Start (ctrl+s)", variant="primary", id="start")
                yield Button("Cancel (esc)", id="cancel")

    def collect(self) -> dict[str, Any]:
        """The form's values by parameter name (empty inputs are left to defaults)."""
        out: dict[str, Any] = {}
        for p in self.kind.params:
            widget = self.query_one(f"#param-{p.name}")
            if isinstance(widget, Checkbox):
                out[p.name] = widget.value
            elif isinstance(widget, Select):
                out[p.name] = None if widget.value is Select.NULL else widget.value
            elif isinstance(widget, Input):
                text = expand_tilde(widget.value.strip())
                out[p.name] = text if text else None
        return out

    def action_start(self) -> None:
        from engine.jobs import JobRequest, validate_request

        params = self.collect()
        try:
            validate_request(JobRequest(self.kind.name, params))
        except (ValueError, KeyError) as exc:
            self.query_one("#form-error", Static).update(f"✗ {exc}")
            self.add_class("-invalid")
            name = str(exc).split(":", 1)[0].strip()
            try:
                self.query_one(f"#param-{name}").focus()
            except Exception:  # the message does not start with a field name
                pass
            return
        self.dismiss({k: v for k, v in params.items() if v is not None})

    def action_cancel(self) -> None:
        self.dismiss(None)

    @on(Button.Pressed, "#start")
    def _start(self) -> None:
        self.action_start()

    @on(Button.Pressed, "#cancel")
    def _cancel(self) -> None:
        self.action_cancel()

    @on(Input.Submitted)
    def _submitted(self) -> None:
        self.action_start()
