"""Helpers for the TUI tests: a fixed-path demo collection, the app factory, waiting on jobs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlora_tui.app import VloraApp
from vlora_tui.config import AppConfig

SIZE = (120, 36)
#: A fixed place for the demo collection under the session's temp HOME (tests/conftest.py), so
#: snapshots show the same ``~/…`` paths on every run and no test reads a cache from an earlier one.
FIXED_ROOT = Path.home() / "fixtures"


def ensure_demo(root: Path) -> Path:
    """Build the (deterministic) demo collection at ``root`` unless it is there."""
    from engine.demo import demo_is_current, make_demo_collection

    if not demo_is_current(root):
        make_demo_collection(root, force=True)
    return root


def make_app(demo_dir: Path, out: Path, *, demo: bool = False, path: Path | None = None, **kw: Any) -> VloraApp:
    """The app as ``vlora-tui`` builds it, with test-friendly settings (no Hub, no auto-inspect)."""
    import multiprocessing.resource_tracker as resource_tracker

    resource_tracker.ensure_running()  # as cli.run_app does, before Textual swaps stderr
    runner_factory = kw.pop("runner_factory", None)
    cfg = AppConfig(
        path=path if path is not None else demo_dir,
        demo=demo,
        output_dir=out,
        demo_dir=demo_dir,
        hub_search=kw.pop("hub_search", False),
        auto_inspect=kw.pop("auto_inspect", False),
        process_kinds=kw.pop("process_kinds", frozenset()),
        output_stamp=kw.pop("output_stamp", "20260101-000000"),  # output names in forms are the same every run
        **kw,
    )
    return VloraApp(cfg, runner_factory=runner_factory)


async def wait_jobs(app: VloraApp, pilot: Any) -> None:
    """Wait on every job's own worker until the queue is empty."""
    while True:
        pending = [j for j in app.jobs if not j.finished]
        if not pending:
            break
        job = pending[0]
        if job.worker is None:
            await pilot.pause(0.05)
            continue
        try:
            await job.worker.wait()
        except Exception:  # WorkerFailed: the app maps it in Worker.StateChanged
            pass
        await pilot.pause()
    await pilot.pause()


def settle_for_snapshot(app: VloraApp) -> None:
    """Fixed job times and no toasts, so a snapshot does not depend on the machine."""
    for j in app.jobs:
        if j.seconds is not None:
            j.seconds = 1.0
    app.clear_notifications()
    app.state_signal.publish("jobs")
