"""SVG snapshots, one per screen state, on fixed data at fixed paths (no ETA, no mid-job capture)."""

from __future__ import annotations

from pathlib import Path

from tui_helpers import FIXED_ROOT, SIZE, make_app, settle_for_snapshot, wait_jobs

OUT = FIXED_ROOT / "out"


def app_for(fixed_demo: Path, **kw):
    return make_app(fixed_demo, OUT, **kw)


def test_browser(snap_compare, fixed_demo: Path) -> None:
    async def run_before(pilot) -> None:
        await pilot.pause(0.3)
        await pilot.press("down", "down")
        await pilot.pause(0.2)
        settle_for_snapshot(pilot.app)

    assert snap_compare(app_for(fixed_demo), terminal_size=SIZE, run_before=run_before)


def test_adapter_detail_with_norms(snap_compare, fixed_demo: Path) -> None:
    async def run_before(pilot) -> None:
        await pilot.press("2", "i")
        await wait_jobs(pilot.app, pilot)
        settle_for_snapshot(pilot.app)

    assert snap_compare(app_for(fixed_demo), terminal_size=SIZE, run_before=run_before)


def test_collection_heatmap_and_diff(snap_compare, fixed_demo: Path) -> None:
    async def run_before(pilot) -> None:
        await pilot.press("3", "a")
        await wait_jobs(pilot.app, pilot)
        await pilot.press("n", "d")
        await wait_jobs(pilot.app, pilot)
        settle_for_snapshot(pilot.app)

    assert snap_compare(app_for(fixed_demo), terminal_size=SIZE, run_before=run_before)


def test_subspace(snap_compare, fixed_demo: Path, fixed_subspace: Path) -> None:
    async def run_before(pilot) -> None:
        await wait_jobs(pilot.app, pilot)
        settle_for_snapshot(pilot.app)

    assert snap_compare(app_for(fixed_demo, path=fixed_subspace), terminal_size=SIZE, run_before=run_before)


def test_jobs_panel_with_failed_job(snap_compare, fixed_demo: Path) -> None:
    async def run_before(pilot) -> None:
        app = pilot.app
        app.submit_job("inspect", {"adapter": str(fixed_demo / "sql-duckdb")}, title="inspect sql-duckdb")
        app.submit_job("inspect", {"adapter": str(fixed_demo / "missing")}, title="inspect missing")
        await wait_jobs(app, pilot)
        await pilot.press("5")
        await pilot.pause()
        settle_for_snapshot(app)
        await pilot.pause()

    assert snap_compare(app_for(fixed_demo), terminal_size=SIZE, run_before=run_before)


def test_compress_form(snap_compare, fixed_demo: Path) -> None:
    async def run_before(pilot) -> None:
        await pilot.press("3", "c")
        await pilot.pause()
        settle_for_snapshot(pilot.app)

    assert snap_compare(app_for(fixed_demo), terminal_size=SIZE, run_before=run_before)


def test_help(snap_compare, fixed_demo: Path) -> None:
    async def run_before(pilot) -> None:
        await pilot.press("3", "question_mark")
        await pilot.pause()

    assert snap_compare(app_for(fixed_demo), terminal_size=SIZE, run_before=run_before)
