"""The vlora-tui application: state, the job queue, and the screens (one per mode).

The app owns everything the screens share: the working collection, the results
of the last jobs, and the job queue. Jobs go through ``engine.jobs`` runners in
a Textual thread worker (``group="engine"``), one at a time; progress comes
back as :class:`~vlora_tui.messages.JobProgress` messages and the outcome
through ``Worker.StateChanged``. Screens subscribe to :attr:`VloraApp.state_signal`
and redraw the part that changed. Nothing here imports torch.

At ~480 lines this module is a little above the house's ~450: it keeps the job
queue's worker, progress and Worker.StateChanged handlers together with the
state they change (``@on`` handlers must live on the App class itself); forms
are in :mod:`.forms`, the queue's record in :mod:`.jobrecord`, result views in
:mod:`.results`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from textual import on, work
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import Screen
from textual.signal import Signal
from textual.worker import Worker, WorkerState, get_current_worker

from engine.io.scan import spec_name

from .commands import VloraCommands
from .config import AppConfig, tildify
from .forms import FormsMixin
from .jobrecord import JobRecord, _AnyEvent, job_title, tui_message
from .messages import AddToCollection, JobProgress

__all__ = ["TOPICS", "JobRecord", "VloraApp", "job_title", "spec_name", "tui_message"]

#: Topics published on ``state_signal``.
TOPICS = ("collection", "adapter", "jobs", "progress", "analysis", "diff", "subspace", "inspect", "root")


class VloraApp(FormsMixin, App[int]):
    """A keyboard-first workbench for collections of LoRA adapters."""

    TITLE = "vlora-tui"
    SUB_TITLE = "LoRA collections"
    CSS_PATH = "app.tcss"
    COMMANDS = App.COMMANDS | {VloraCommands}
    ENABLE_COMMAND_PALETTE = True

    MODES: ClassVar[dict[str, str | Callable[[], Screen]]] = {}

    SCREENS_GROUP = Binding.Group("Screens", compact=True)

    BINDINGS: ClassVar = [
        Binding("ctrl+p", "command_palette", "Palette", tooltip="Search every action that fits now", id="palette"),
        Binding("question_mark,f1", "help", "Help", key_display="?", tooltip="List the keys of this screen", id="help"),
        Binding("f8", "screenshot", "Shot", tooltip="Save an SVG screenshot of this screen", id="screenshot"),
        Binding("ctrl+q", "quit", "Quit", tooltip="Cancel running jobs and leave", id="quit", priority=True),
        Binding("1", "show('browser')", "Browse", tooltip="Adapter folders, HF cache, Hub search", id="mode-browser", group=SCREENS_GROUP),
        Binding("2", "show('adapter')", "Adapter", tooltip="Config, modules and norms of one adapter", id="mode-adapter", group=SCREENS_GROUP),
        Binding("3", "show('collection')", "Collection", tooltip="Similarity heatmap, clusters, diff", id="mode-collection", group=SCREENS_GROUP),
        Binding("4", "show('subspace')", "Subspace", tooltip="Variance explained, fidelity, stats", id="mode-subspace", group=SCREENS_GROUP),
        Binding("5", "show('jobs')", "Jobs", tooltip="Queue, progress, log and results", id="mode-jobs", group=SCREENS_GROUP),
    ]

    def __init__(self, config: AppConfig | None = None, *, runner_factory: Callable[[str], Any] | None = None) -> None:
        """Args:
        config: What to open; defaults to the current folder.
        runner_factory: ``kind -> runner`` (tests inject failing runners); defaults to
            ``ProcessRunner`` for the kinds that run in a process (``JobKind.process``,
            :data:`~vlora_tui.config.PROCESS_KINDS`) and ``InlineRunner`` otherwise.
        """
        from .screens.adapter import AdapterScreen
        from .screens.browser import BrowserScreen
        from .screens.collection import CollectionScreen
        from .screens.jobs import JobsScreen
        from .screens.subspace import SubspaceScreen

        self.MODES = {
            "browser": BrowserScreen,
            "adapter": AdapterScreen,
            "collection": CollectionScreen,
            "subspace": SubspaceScreen,
            "jobs": JobsScreen,
        }
        super().__init__()
        self.config = config or AppConfig()
        self._runner_factory = runner_factory
        self.state_signal: Signal[str] = Signal(self, "vlora-state")
        """Published with one of :data:`TOPICS` when that part of the state changes."""
        self.collection: list[str] = []
        """The working collection: adapter specs (folders or ``hf://`` ids), in order added."""
        self.current_adapter: str | None = None
        """The adapter the detail screen shows."""
        self.inspections: dict[str, dict] = {}
        """Spec → data of its ``inspect`` job (norms per module)."""
        self.validations: dict[str, dict] = {}
        """Spec → data of its ``validate`` job."""
        self.analysis: dict | None = None
        """Data of the last ``analyze`` job (similarity, clusters, outliers)."""
        self.diff: dict | None = None
        """Data of the last ``diff`` job."""
        self.subspace_path: str | None = None
        """The subspace the subspace screen shows."""
        self.subspace_info: dict | None = None
        """Data of the ``info`` job on :attr:`subspace_path`."""
        self.comparison: dict | None = None
        """Data of the last ``compare`` job (output fidelity per task), shown on the subspace screen."""
        self.jobs: list[JobRecord] = []
        """Every job of this session, oldest first."""
        self.offered: list[str] = []
        """Adapters written by export/merge jobs, offered for the collection (never added unasked)."""
        self.browser_root: Path | None = None
        """Set (with the ``root`` topic) to re-root the browser's folder tree, e.g. at the demo once built."""
        self._progress_pending = False

    # -- start-up -----------------------------------------------------------
    def on_mount(self) -> None:
        self.switch_mode("browser")
        if self.config.demo:
            self.open_demo()
        elif self.config.path is not None:
            self._open_start_path(Path(self.config.path))

    def _open_start_path(self, path: Path) -> None:
        from engine.io.scan import is_adapter_dir, is_subspace_dir, scan_local_adapters

        try:
            if is_subspace_dir(path):
                self.open_subspace(str(path))
            elif is_adapter_dir(path):
                self.add_to_collection([str(path)])
            elif path.is_dir():
                found = scan_local_adapters(path, max_depth=1)
                if found:
                    self.add_to_collection([str(p) for p in found])
        except Exception as exc:  # a bad start path is a notice, never a crash
            self.notify(str(exc), title="Cannot open", severity="error")

    def open_demo(self) -> None:
        """Build (or reuse) the demo collection in a worker and open it."""
        from engine.demo import default_demo_dir, demo_is_current
        from engine.io.scan import scan_local_adapters

        root = Path(self.config.demo_dir or default_demo_dir())
        if demo_is_current(root):  # built before by this version: open it without a job
            self._demo_ready([str(p) for p in scan_local_adapters(root, max_depth=1)])
            return
        self.notify(f"Building the demo collection in {root}", title="Demo")
        self.submit_job("demo", {"output": str(root), "force": True}, title="demo collection", open_result=True)

    def _demo_ready(self, specs: list[str]) -> None:
        if specs:  # the tree was rooted before the demo existed: show its adapters at once
            self.browser_root = Path(specs[0]).parent
            self.state_signal.publish("root")
        self.add_to_collection(specs)
        if self.current_mode != "collection":
            self.switch_mode("collection")
        if len(self.collection) >= 2 and "analyze" in self.job_kinds():
            self.submit_job("analyze", {"adapters": list(self.collection)}, title="analyze demo", open_result=True)

    # -- collection -----------------------------------------------------------
    def add_to_collection(self, specs: list[str]) -> int:
        """Add specs not already present; returns how many were added."""
        added = [s for s in dict.fromkeys(specs) if s not in self.collection]
        self.collection.extend(added)
        if added:
            if self.current_adapter is None:
                self.current_adapter = added[0]
                self.state_signal.publish("adapter")
            self.state_signal.publish("collection")
        return len(added)

    def remove_from_collection(self, spec: str) -> None:
        if spec in self.collection:
            self.collection.remove(spec)
            if self.current_adapter == spec:
                self.current_adapter = self.collection[0] if self.collection else None
                self.state_signal.publish("adapter")
            self.state_signal.publish("collection")

    def clear_collection(self) -> None:
        self.collection.clear()
        self.current_adapter = None
        self.analysis = None
        self.diff = None
        for topic in ("collection", "adapter", "analysis", "diff"):
            self.state_signal.publish(topic)

    @on(AddToCollection)
    def _on_add_to_collection(self, event: AddToCollection) -> None:
        n = self.add_to_collection(event.specs)
        what = spec_name(event.specs[0]) if len(event.specs) == 1 else f"{len(event.specs)} adapters"
        if n:
            self.notify(f"Added {what} ({len(self.collection)} in the collection)", title="Collection")
        else:
            self.notify(f"{what} already in the collection", title="Collection", severity="warning")

    def show_adapter(self, spec: str, *, switch: bool = True) -> None:
        """Make ``spec`` the current adapter (adding it to the collection) and show it."""
        self.add_to_collection([spec])
        self.current_adapter = spec
        self.state_signal.publish("adapter")
        if switch:
            self.switch_mode("adapter")

    def open_subspace(self, path: str, *, switch: bool = True) -> JobRecord | None:
        """Run the ``info`` job on a saved subspace and show it in the subspace screen."""
        self.subspace_path = path
        return self.submit_job("info", {"path": path}, title=f"info {Path(path).name}", open_result=switch)

    # -- actions ------------------------------------------------------------------
    def action_show(self, mode: str) -> None:
        """Switch to one of the screens."""
        self.switch_mode(mode)

    def action_help(self) -> None:
        from .screens.help import HelpScreen

        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen(self.screen))

    def notify(self, message: str, *, title: str = "", **kw: Any) -> None:
        """Every toast writes paths under the home folder as ``~/…``."""
        super().notify(tildify(str(message)), title=tildify(title), **kw)

    def action_screenshot(self) -> None:
        """Save an SVG of the current screen under the output folder."""
        folder = self.config.output_dir / "screenshots"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = self.save_screenshot(path=str(folder))
        except OSError as exc:
            self.notify(str(exc), title="Screenshot failed", severity="error")
            return
        self.notify(path, title="Screenshot saved")

    def action_cancel_job(self) -> None:
        """Cancel the running job (or the newest queued one)."""
        job = self.running_job or next((j for j in reversed(self.jobs) if j.status == "queued"), None)
        if job is None:
            self.notify("No job is running", title="Cancel", severity="warning")
            return
        self.cancel_job(job)

    def get_system_commands(self, screen: Screen) -> Any:
        yield from super().get_system_commands(screen)
        yield SystemCommand("Help: keys of this screen", "Show every key binding", self.action_help)

    async def action_quit(self) -> None:
        for job in self.jobs:
            job.cancel_event.set()
        self.exit(0)

    def action_analyze(self) -> None:
        """Analyze the whole working collection."""
        if len(self.collection) < 2:
            self.notify("Add at least two adapters first", title="Analyze", severity="warning")
            return
        self.submit_job("analyze", {"adapters": list(self.collection)}, title=f"analyze {len(self.collection)} adapters")

    def action_open_subspace_prompt(self) -> None:
        """Ask for a subspace folder and open it."""
        from .dialogs.prompt import PromptScreen

        def opened(path: str | None) -> None:
            if path:
                from engine.io.scan import is_subspace_dir

                if not is_subspace_dir(path):
                    self.notify(f"{path} is not a saved subspace (no subspace.json)", title="Cannot open", severity="error")
                    return
                self.open_subspace(path)

        self.push_screen(PromptScreen("Open a subspace", "Folder of a saved subspace (holds subspace.json)",
                                      self.subspace_path or str(self.config.output_dir)), opened)

    # -- jobs -----------------------------------------------------------------------
    @property
    def running_job(self) -> JobRecord | None:
        return next((j for j in self.jobs if j.status == "running"), None)

    def job_kinds(self) -> dict[str, Any]:
        """``engine.jobs.job_kinds()`` (imported on first use, torch-free)."""
        from engine.jobs import job_kinds

        return job_kinds()

    def runner_for(self, kind: str) -> Any:
        """The runner a job of ``kind`` goes through."""
        if self._runner_factory is not None:
            return self._runner_factory(kind)
        from engine.jobs import InlineRunner, ProcessRunner
        from engine.jobs.runners import leave_one_core

        # torch gets all cores but one, so the UI keeps painting while a job runs
        threads = leave_one_core()
        return ProcessRunner(threads=threads) if kind in self.config.process_kinds else InlineRunner(threads=threads)

    def submit_job(
        self, kind: str, params: dict[str, Any], *, title: str | None = None, open_result: bool = True
    ) -> JobRecord | None:
        """Validate a request and queue it; returns its record, or ``None`` if invalid (notified)."""
        from engine.jobs import JobRequest, validate_request

        try:
            coerced = validate_request(JobRequest(kind, dict(params)))
        except (ValueError, KeyError) as exc:
            self.notify(tui_message(str(exc)), title=f"Cannot start {kind}", severity="error")
            return None
        # the title counts from the checked params (a form gives the adapters as one string)
        record = JobRecord(request=JobRequest(kind, coerced, job_id=f"job{len(self.jobs) + 1}"),
                           title=title or job_title(kind, coerced), open_result=open_result)
        record.log.append(tildify(f"queued: {record.title}"))
        self.jobs.append(record)
        self.state_signal.publish("jobs")
        self._start_next()
        return record

    def cancel_job(self, job: JobRecord) -> None:
        """Ask a job to stop; a queued job is dropped at once."""
        if job.finished:
            return
        job.cancel_event.set()
        if job.status == "queued":
            self._finish(job, "cancelled", error="cancelled before it started", error_title="Cancelled")
        else:
            job.log.append("cancel requested")
            self.notify(f"Cancelling {job.title}…", title="Cancel")
            self.state_signal.publish("jobs")

    def _start_next(self) -> None:
        if self.running_job is not None:
            return
        job = next((j for j in self.jobs if j.status == "queued"), None)
        if job is None:
            return
        job.status = "running"
        job.started = time.monotonic()
        job.log.append(f"started ({type(self.runner_for(job.kind)).__name__})")
        job.worker = self._run_job(job)
        self.state_signal.publish("jobs")

    @work(thread=True, exit_on_error=False, group="engine", name="job")
    def _run_job(self, job: JobRecord) -> Any:
        """Run one job through its runner (in a worker thread)."""

        last = [""]

        def progress(p: Any) -> None:
            text = str(p.message)
            if text and text != last[0]:  # the log gets every step, even when redraws are collapsed
                last[0] = text
                job.log.append(tildify(f"[{p.step}/{p.total}] {text}" if p.total else text))
            value = getattr(p, "value", None)
            if value is not None:  # every one, even when redraws are collapsed: the Jobs screen plots them
                job.values.append((int(p.step), float(value)))
            self.post_message(JobProgress(job.job_id, int(p.step), int(p.total), text))

        worker = get_current_worker()
        cancel = _AnyEvent(job.cancel_event, worker.cancelled_event)  # the app's shutdown cancels workers too
        return self.runner_for(job.kind).run(job.request, progress=progress, cancel=cancel)

    @on(JobProgress)
    def _on_job_progress(self, event: JobProgress) -> None:
        job = self.find_job(event.job_id)
        if job is None or job.finished:
            return
        job.step, job.total = event.step, event.total
        job.message = event.text
        if not self._progress_pending:  # redraw at most ten times a second, however fast the engine reports
            self._progress_pending = True
            self.set_timer(0.1, self._flush_progress)

    def _flush_progress(self) -> None:
        self._progress_pending = False
        self.state_signal.publish("progress")

    def find_job(self, job_id: str) -> JobRecord | None:
        return next((j for j in self.jobs if j.job_id == job_id), None)

    @on(Worker.StateChanged)
    def _on_worker_state(self, event: Worker.StateChanged) -> None:
        """Map a job worker's end to its record: result, failure or cancel."""
        if event.worker.group != "engine":
            return
        from .results import view_of

        job = next((j for j in self.jobs if j.worker is event.worker), None)
        if job is None or job.finished:
            return
        if event.state == WorkerState.SUCCESS:
            result = event.worker.result
            status = str(getattr(result, "status", "done"))
            if status in ("ok", "done", "success", "succeeded"):
                job.result = result
                self._finish(job, "done")
                self._open_result(job)
            elif status == "cancelled":
                job.result = result
                self._finish(job, "cancelled", error=result.error or "cancelled", error_title="Cancelled")
            else:
                job.result = result
                self._finish(job, "failed", error=result.error or "failed", error_title=result.error_title or "Job failed")
                shown = view_of(self, job.kind)
                if shown is not None and shown.on_failure and result.data:
                    self._open_result(job)
        elif event.state == WorkerState.ERROR:
            from engine.errors import JobCancelled

            err = event.worker.error
            if isinstance(err, JobCancelled):
                self._finish(job, "cancelled", error=str(err), error_title="Cancelled")
            else:
                title = getattr(err, "title", None) or ("Invalid parameter" if isinstance(err, ValueError) else "Job crashed")
                self._finish(job, "failed", error=f"{err}" or type(err).__name__, error_title=title)
        elif event.state == WorkerState.CANCELLED:
            self._finish(job, "cancelled", error="cancelled", error_title="Cancelled")

    def _finish(self, job: JobRecord, status: str, *, error: str | None = None, error_title: str | None = None) -> None:
        job.status = status
        error = tui_message(error) if error else error
        job.error, job.error_title = error, error_title
        job.seconds = time.monotonic() - job.started if job.started is not None else 0.0
        if status == "done":
            summary = getattr(job.result, "summary", "") or "done"
            job.log.append(tildify(f"done: {summary}"))
            # a result that opens in its own view needs no toast over it; the rest say they are done
            if job.open_result and not self._shows_result(job.kind):
                self.notify(summary, title=f"{job.title} finished", timeout=4)
        elif status == "cancelled":
            job.log.append(tildify(f"cancelled: {error}"))
            self.notify(f"{job.title}: {error}", title="Job cancelled", severity="warning")
        else:
            job.log.append(tildify(f"{error_title}: {error}"))
            self.notify(error or "failed", title=f"{error_title or 'Job failed'} ({job.title})", severity="error", timeout=8)
        self.state_signal.publish("jobs")
        self._start_next()

    # -- results ------------------------------------------------------------------------
    def _shows_result(self, kind: str) -> bool:
        """Whether a finished job of ``kind`` switches to a view that shows it (no toast needed over it)."""
        from .results import view_of

        shown = view_of(self, kind)
        return shown is not None and shown.shows

    def _open_result(self, job: JobRecord) -> None:
        """Store a finished job's data where its kind's view looks, and switch to that view."""
        from .results import view_of

        shown = view_of(self, job.kind)
        target = shown.show(self, job) if shown is not None else None
        if target and job.open_result and self.current_mode != target:
            self.switch_mode(target)

    def offer_outputs(self, adapters: list[str]) -> None:
        """Offer written adapters for the working collection (a later compress must not pick them up unasked)."""
        new = [a for a in adapters if a not in self.collection]
        if not new:
            return
        self.offered = [a for a in self.offered if a not in new] + new
        names = ", ".join(spec_name(a) for a in new)
        self.notify(f"{names} written. Add to the collection: A on the Jobs screen (5), or ctrl+p → Add written adapters",
                    title="Not in the collection", timeout=8)

    def action_add_offered(self, adapters: list[str] | None = None) -> None:
        """Add offered adapters (default: all of them) to the working collection."""
        chosen = [a for a in (adapters if adapters is not None else self.offered) if a not in self.collection]
        self.offered = [a for a in self.offered if a not in chosen]
        if not chosen:
            self.notify("Nothing to add: no written adapters outside the collection", title="Collection", severity="warning")
            return
        self.post_message(AddToCollection(chosen))
