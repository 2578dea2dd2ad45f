"""Pilot tests: every screen and flow, cancel, failing and crashing jobs, responsiveness."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

from textual.widgets import DataTable, OptionList, Static

from engine.jobs import InlineRunner, JobResult, ProcessRunner
from vlora_tui.app import VloraApp
from vlora_tui.commands import VloraCommands
from vlora_tui.dialogs.job_form import JobFormScreen
from vlora_tui.screens.help import HelpScreen
from vlora_tui.widgets.adapter_tree import AdapterTree

from tui_helpers import SIZE, make_app, wait_jobs


async def test_browser_marks_adapters_and_adds_on_enter(fixed_demo: Path, tmp_path: Path) -> None:
    app = make_app(fixed_demo, tmp_path, path=fixed_demo.parent)
    async with app.run_test(size=SIZE) as pilot:
        # the start path is a parent of the demo collection: nothing added yet
        assert app.collection == []
        tree = app.screen.query_one(AdapterTree)
        await pilot.pause(0.3)
        assert tree.kind_of(fixed_demo) == "collection"
        assert tree.kind_of(fixed_demo / "sql-duckdb") == "adapter"
        # cursor to the demo folder, expand it, go to its first adapter and add it
        line = next(n for n in tree.root.children if n.data.path == fixed_demo).line
        tree.move_cursor_to_line(line)
        await pilot.press("space")
        await pilot.pause(0.3)
        await pilot.press("down")
        await pilot.press("enter")
        await pilot.pause()
        assert len(app.collection) == 1
        assert "Working collection (1)" in str(app.screen.query_one("#collection-title").render())
        # the whole collection folder with a
        tree.move_cursor_to_line(line)
        await pilot.press("a")
        await pilot.pause()
        assert len(app.collection) == 14
        # remove from the collection list
        app.screen.query_one("#collection-list").focus()
        await pilot.press("x")
        await pilot.pause()
        assert len(app.collection) == 13


async def test_start_path_opens_collection_and_adapter_detail_with_norms(fixed_demo: Path, tmp_path: Path) -> None:
    app = make_app(fixed_demo, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        assert len(app.collection) == 14
        await pilot.press("2")
        assert app.current_mode == "adapter"
        table = app.screen.query_one("#modules", DataTable)
        assert table.row_count == 16
        assert table.get_row_at(0)[4] == "—"  # no norms before the inspect job
        await pilot.press("i")
        await wait_jobs(app, pilot)
        job = app.jobs[-1]
        assert job.kind == "inspect" and job.status == "done"
        assert float(table.get_row_at(0)[6]) > 0
        assert "no problems" in str(app.screen.query_one("#adapter-problems", Static).render())
        # another adapter from the side list
        app.screen.query_one("#adapter-list", OptionList).focus()
        await pilot.press("down")
        await pilot.pause()
        assert app.current_adapter == app.collection[1]


async def test_help_lists_keys_and_closes(fixed_demo: Path, tmp_path: Path) -> None:
    app = make_app(fixed_demo, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("3")
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        table = app.screen.query_one(DataTable)
        actions = {str(table.get_row_at(i)[1]) for i in range(table.row_count)}
        assert {"Analyze", "Diff pair", "Compress…", "Palette", "Quit", "Help", "Shot"} <= actions
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)
        await pilot.press("f1")
        assert isinstance(app.screen, HelpScreen)


async def test_every_binding_has_label_tooltip_and_id(fixed_demo: Path, tmp_path: Path) -> None:
    from vlora_tui.screens.adapter import AdapterScreen
    from vlora_tui.screens.browser import BrowserScreen
    from vlora_tui.screens.collection import CollectionScreen
    from vlora_tui.screens.jobs import JobsScreen
    from vlora_tui.screens.subspace import SubspaceScreen

    for cls in (VloraApp, BrowserScreen, AdapterScreen, CollectionScreen, SubspaceScreen, JobsScreen, HelpScreen, JobFormScreen):
        for b in cls.BINDINGS:
            assert b.description and b.tooltip and b.id, (cls.__name__, b.key)


async def test_palette_offers_what_fits_the_state(fixed_demo: Path, tmp_path: Path) -> None:
    app = make_app(fixed_demo, tmp_path, path=tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        texts = {t for t, _, _ in VloraCommands(app.screen)._commands()}
        assert "Open the demo collection" in texts
        assert "Analyze the collection" not in texts
        assert not any(t.startswith("New job: Compress") for t in texts)
        assert not any(t.startswith("Cancel job") for t in texts)
        app.add_to_collection([str(p) for p in sorted(fixed_demo.iterdir()) if p.is_dir()][:3])
        await pilot.press("3")
        texts = {t for t, _, _ in VloraCommands(app.screen)._commands()}
        assert "Analyze the collection" in texts
        assert "Diff pair (d)" in texts  # the screen's own keys are there too
        # run one through the palette UI
        await pilot.press("ctrl+p")
        await pilot.press(*"go to jobs")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await pilot.pause(0.2)
        assert app.current_mode == "jobs"


class FailingRunner:
    """A runner whose job raises inside the worker (an engine bug)."""

    def run(self, req, *, progress=None, cancel=None):
        raise RuntimeError("engine exploded")


class BlockingRunner:
    """Reports progress, then waits until cancelled (checks the event like the engine)."""

    def __init__(self) -> None:
        self.started = threading.Event()

    def run(self, req, *, progress=None, cancel=None):
        from engine.progress import Progress

        self.started.set()
        for step in range(10_000):
            if cancel is not None and cancel.is_set():
                return JobResult(req.job_id, req.kind, "cancelled", "cancelled", error="cancelled by user", error_title="Cancelled")
            if progress is not None:
                progress(Progress(1 + step % 99, 100, f"step {step}"))  # never 0: the test reads "step > 0"
            time.sleep(0.01)
        return JobResult(req.job_id, req.kind, "ok", "finished")


async def test_failing_job_shows_error_and_app_keeps_running(fixed_demo: Path, tmp_path: Path) -> None:
    app = make_app(fixed_demo, tmp_path, runner_factory=lambda kind: FailingRunner())
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("2", "i")
        await wait_jobs(app, pilot)
        job = app.jobs[-1]
        assert job.status == "failed" and "engine exploded" in job.error
        assert any(n.severity == "error" and "engine exploded" in n.message for n in app._notifications)
        await pilot.press("5", "e")
        await pilot.pause()
        assert "engine exploded" in str(app.screen.query_one("#error-message").render())
        await pilot.press("escape")
        await pilot.press("1")
        assert app.is_running and app.current_mode == "browser"


async def test_crashing_child_process_is_a_failed_job(fixed_demo: Path, tmp_path: Path, monkeypatch) -> None:
    from engine.jobs import CRASH_ENV

    monkeypatch.setenv(CRASH_ENV, "exit")
    app = make_app(fixed_demo, tmp_path, runner_factory=lambda kind: ProcessRunner())
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("2", "i")
        await wait_jobs(app, pilot)
        job = app.jobs[-1]
        assert job.status == "failed", job.error
        assert job.result is not None, job.error
        assert job.result.error_kind == "crash"
        await pilot.press("5")
        assert app.is_running


async def test_cancel_running_job_with_a_key_and_ui_stays_responsive(fixed_demo: Path, tmp_path: Path) -> None:
    runner = BlockingRunner()
    app = make_app(fixed_demo, tmp_path, runner_factory=lambda kind: runner)
    modes = {"1": "browser", "2": "adapter", "3": "collection", "4": "subspace", "5": "jobs"}

    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("2", "i", "5")
        assert runner.started.wait(5)
        job = app.jobs[-1]
        assert job.status == "running"
        # the UI answers while the job runs: every key switches the screen before the job ends
        # (order of events, not wall time: a blocked loop would handle no key until the job stopped)
        for key in "1234512345":
            await pilot.press(key)
            await pilot.pause()
            assert app.current_mode == modes[key]
            assert job.status == "running", f"job ended before key {key!r} was handled"
        assert job.status == "running" and job.step > 0
        await pilot.press("x")
        await job.worker.wait()
        await pilot.pause()
        assert job.status == "cancelled"
        assert "cancelled" in job.log[-1]
        # a second job runs afterwards: the queue goes on
        await pilot.press("2", "i")
        await pilot.pause(0.2)
        assert app.jobs[-1].status == "running"
        await pilot.press("5", "x")
        await wait_jobs(app, pilot)
        assert app.jobs[-1].status == "cancelled"


async def test_job_form_validates_before_start(fixed_demo: Path, tmp_path: Path) -> None:
    app = make_app(fixed_demo, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        app.action_new_job("validate")
        await pilot.pause()
        assert isinstance(app.screen, JobFormScreen)
        field = app.screen.query_one("#param-adapters")
        assert len(field.value.split()) == 14
        field.value = ""
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert isinstance(app.screen, JobFormScreen)
        assert "adapters" in str(app.screen.query_one("#form-error").render())
        assert app.jobs == []
        field.value = str(fixed_demo / "sql-duckdb")
        await pilot.press("ctrl+s")
        await wait_jobs(app, pilot)
        assert app.jobs[-1].kind == "validate" and app.jobs[-1].status == "done"


async def test_hub_search_offline_shows_notice(fixed_demo: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    app = make_app(fixed_demo, tmp_path, hub_search=True, hub_timeout=5)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("slash")
        await pilot.press(*"llama", "enter")
        worker = next((w for w in app.screen.workers if w.group == "hub-search"), None)
        if worker is not None:  # an offline search may already be over (and removed)
            await worker.wait()
        await pilot.pause()
        notice = str(app.screen.query_one("#hub-notice").render())
        assert "unavailable" in notice and "offline" in notice.lower()


async def test_hf_cache_tab_lists_cached_adapters(fixed_demo: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    app = make_app(fixed_demo, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        from textual.widgets import TabbedContent

        app.screen.query_one("#sources", TabbedContent).active = "cache"
        await pilot.pause(0.2)
        worker = next((w for w in app.screen.workers if w.group == "hub-cache"), None)
        if worker is not None:
            await worker.wait()
        await pilot.pause()
        assert "No adapters" in str(app.screen.query_one("#cache-notice").render()) or "adapters in" in str(
            app.screen.query_one("#cache-notice").render()
        )


def test_first_paint_does_not_import_torch() -> None:
    code = (
        "import asyncio, sys\n"
        "from vlora_tui.app import VloraApp\n"
        "from vlora_tui.config import AppConfig\n"
        "async def main():\n"
        "    app = VloraApp(AppConfig(hub_search=False))\n"
        "    async with app.run_test(size=(120, 36)) as pilot:\n"
        "        await pilot.pause()\n"
        "        for k in '12345':\n"
        "            await pilot.press(k)\n"
        "    print('torch' in sys.modules)\n"
        "asyncio.run(main())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"
