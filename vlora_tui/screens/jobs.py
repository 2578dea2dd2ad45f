"""The jobs panel: the queue, the selected job's progress, log and result; cancel with x."""

from __future__ import annotations

from typing import Any, ClassVar

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import DataTable, Footer, Header, Label, ProgressBar, RichLog, Static

from ..config import tildify
from ..widgets.plots import DataPlot
from .base import VloraScreen

#: Fixed widths of the queue's columns; the job title takes what is left.
FIXED_WIDTHS = {"id": 5, "status": 9, "progress": 4, "time": 6}
STATUS_STYLE = {"queued": "dim", "running": "bold", "done": "green", "failed": "bold red", "cancelled": "yellow"}


class JobsScreen(VloraScreen):
    """Every job of the session; the highlighted one's progress, log and result."""

    BINDINGS: ClassVar = [
        Binding("n", "new", "New job…", tooltip="Pick a job kind and fill in its form", id="jobs-new"),
        Binding("x", "cancel", "Cancel job", tooltip="Cancel the highlighted job (or the running one)", id="jobs-cancel"),
        Binding("o", "open_result", "Open result", tooltip="Open the highlighted job's result in its view", id="jobs-open"),
        Binding("e", "error", "Error", tooltip="Show the highlighted job's error in full", id="jobs-error"),
        Binding("A", "add_output", "Add to collection", tooltip="Add the adapter the highlighted export/merge wrote to the collection", id="jobs-add"),
    ]

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal():
            with Vertical(id="queue-pane"):
                yield Label("Queue", classes="pane-title")
                yield DataTable(id="queue", cursor_type="row")
            with Vertical(id="job-pane"):
                yield Static("No jobs yet: n starts one; every screen launches its own.", id="job-status")
                yield ProgressBar(id="job-progress", total=100, show_eta=False)
                # shown only for a job whose progress measures a number (train: the loss per step)
                yield DataPlot(empty="loss", id="job-plot")
                yield Label("Log", classes="pane-title")
                yield RichLog(id="job-log", wrap=True, markup=False, auto_scroll=True)
                yield Label("Result", classes="pane-title")
                with VerticalScroll(id="result-pane"):
                    yield Static("", id="job-result")
        yield Footer(show_command_palette=False)

    def on_mount(self) -> None:
        table = self.query_one("#queue", DataTable)
        self._title_width = 20
        self.app.state_signal.subscribe(self, self._on_state)
        self._log_shown: tuple[str, int] | None = None
        self._plot_shown: tuple[str, int] | None = None
        self._followed: str | None = None
        self._refresh()
        table.focus()
        self.call_after_refresh(self._fit_columns)

    def on_resize(self) -> None:
        self.call_after_refresh(self._fit_columns)

    def _fit_columns(self) -> None:
        """Give the title column what the fixed columns leave, so status, progress and time stay in view."""
        table = self.query_one("#queue", DataTable)
        # room for the vertical scrollbar is kept, so a long queue does not push the time column out
        width = table.content_region.width - table.styles.scrollbar_size_vertical
        if width <= 0:
            return
        title = max(8, width - sum(FIXED_WIDTHS.values()) - 2 * table.cell_padding * (len(FIXED_WIDTHS) + 1))
        if title != self._title_width:
            self._title_width = title
            self._refresh()

    def _on_state(self, topic: str) -> None:
        if topic == "jobs" and self.app.screen is self:
            self._refresh()
        elif topic == "progress" and self.app.screen is self:
            self._refresh_progress()

    def _refresh_progress(self) -> None:
        """Update only the running jobs' progress cells and the shown job (no table rebuild)."""
        table = self.query_one("#queue", DataTable)
        for j in self.jobs:
            if j.status == "running" and j.total and j.job_id in table.rows:
                table.update_cell(j.job_id, "progress", f"{100 * j.step / j.total:.0f}%")
        self._show(self.selected())

    def on_screen_resume(self) -> None:
        self._followed = None  # coming back: show the running job again
        self._refresh()
        self.query_one("#queue", DataTable).focus()

    @property
    def jobs(self) -> list[Any]:
        return self.app.jobs

    def selected(self) -> Any:
        jobs = self.jobs
        if not jobs:
            return None
        row = self.query_one("#queue", DataTable).cursor_row
        return jobs[row] if 0 <= row < len(jobs) else jobs[-1]

    def _refresh(self) -> None:
        table = self.query_one("#queue", DataTable)
        row = table.cursor_row
        table.clear(columns=True)
        for label in ("id", "job", "status", "progress", "time"):
            table.add_column(label, key=label, width=FIXED_WIDTHS.get(label, self._title_width))
        for j in self.jobs:
            pct = f"{100 * j.step / j.total:.0f}%" if j.total else ("100%" if j.status == "done" else "—")
            secs = "" if j.seconds is None else f"{j.seconds:.1f}s"
            table.add_row(j.job_id, j.title, Text(j.status, style=STATUS_STYLE.get(j.status, "")), pct, secs, key=j.job_id)
        if self.jobs:
            running = next((i for i, j in enumerate(self.jobs) if j.status == "running"), None)
            if running is not None and self.jobs[running].job_id != self._followed:
                # follow a job as it starts; the cursor stays wherever the user puts it meanwhile
                self._followed = self.jobs[running].job_id
                row = running
            elif self._followed is None:
                row = len(self.jobs) - 1
                self._followed = self.jobs[row].job_id
            table.move_cursor(row=min(max(row, 0), len(self.jobs) - 1))
        self._show(self.selected())

    @on(DataTable.RowHighlighted, "#queue")
    def _highlighted(self) -> None:
        self._show(self.selected())

    def _show(self, job: Any) -> None:
        status = self.query_one("#job-status", Static)
        bar = self.query_one("#job-progress", ProgressBar)
        log = self.query_one("#job-log", RichLog)
        result = self.query_one("#job-result", Static)
        if job is None:
            status.update("No jobs yet: n starts one; every screen launches its own.")
            bar.update(total=100, progress=0)
            log.clear()
            result.update("")
            self._log_shown = None
            self._show_plot(None)
            return
        status.update(Text.assemble((f"{job.title}  ", "bold"), (job.status, STATUS_STYLE.get(job.status, "")),
                                    f"  {job.message}" if job.status == "running" else ""))
        if job.status == "done":
            bar.update(total=100, progress=100)
        elif job.total:
            bar.update(total=job.total, progress=job.step)
        else:
            bar.update(total=100, progress=0)
        key = (job.job_id, len(job.log))
        if self._log_shown is None or self._log_shown[0] != job.job_id:
            log.clear()
            for line in job.log:
                log.write(line)
        elif self._log_shown[1] < len(job.log):
            for line in job.log[self._log_shown[1]:]:
                log.write(line)
        self._log_shown = key
        result.update(result_text(job))
        self._show_plot(job)

    def _show_plot(self, job: Any) -> None:
        """The job's measured values (the loss of a ``train`` job) as a line, redrawn when new ones came."""
        plot = self.query_one("#job-plot", DataPlot)
        values = list(job.values) if job is not None else []
        plot.display = bool(values)
        key = (job.job_id, len(values)) if values else None
        if not values or key == self._plot_shown:
            return
        self._plot_shown = key
        xs, ys = [s for s, _ in values], [v for _, v in values]
        plot.draw_lines({"loss": (xs, ys)}, f"{job.kind}: loss {ys[0]:.4g} → {ys[-1]:.4g}", "step", "loss")

    def action_cancel(self) -> None:
        job = self.selected()
        if job is None or job.finished:
            self.app.action_cancel_job()
        else:
            self.app.cancel_job(job)

    def action_new(self) -> None:
        self.app.action_pick_job()

    def action_open_result(self) -> None:
        job = self.selected()
        if job is None or job.status != "done":
            self.notify("Highlight a finished job", severity="warning")
            return
        job.open_result = True
        self.app._open_result(job)

    def action_add_output(self) -> None:
        """Add the adapters the highlighted export/merge job wrote to the working collection."""
        job = self.selected()
        outputs = [str(o) for o in (getattr(job.result, "outputs", None) or [])] if job is not None and job.status == "done" else []
        adapters = [o for o in outputs if o in self.app.offered or job.kind in ("export", "merge")]
        if not adapters:
            self.notify("Highlight a finished export or merge job", title="Add to collection", severity="warning")
            return
        self.app.action_add_offered(adapters)

    def action_error(self) -> None:
        job = self.selected()
        if job is None or job.status not in ("failed", "cancelled"):
            self.notify("Highlight a failed job", severity="warning")
            return
        from ..dialogs.error import ErrorScreen

        details = getattr(job.result, "traceback", None)
        self.app.push_screen(ErrorScreen(job.error_title or "Job failed", job.error or "", details))


def result_text(job: Any) -> Text:
    """A finished job's outcome: summary, outputs, and the top-level keys of its data."""
    if job.status in ("failed", "cancelled"):
        return Text.assemble((f"{job.error_title or 'Failed'}: ", "bold red" if job.status == "failed" else "yellow"),
                             tildify(job.error or ""))
    if job.status != "done" or job.result is None:
        return Text("")
    r = job.result
    parts = [Text(tildify(r.summary or "done"), style="green")]
    for o in r.outputs or []:
        parts.append(Text(f"→ {tildify(str(o))}"))
    parts.append(Text("o opens it in its view", style="italic"))
    return Text("\n").join(parts)
