"""Write SVG screenshots of every screen of the real app on the demo collection.

    python scripts/make_screenshots.py [--out screenshots]

Runs the app as a new user gets it: in a fresh, temporary HOME (so paths read
``~/.cache/vlora-tui/…`` and nothing from this machine's cache shows), ``vlora-tui
--demo`` builds the demo collection and opens it, and the script drives it by
keyboard: the collection after ``analyze`` with a diff, the adapter detail with
norms, the browser, the compress form and the subspace it gives with its
defaults, the export form, the jobs panel and the help screen.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing.resource_tracker as resource_tracker
import os
import tempfile
from pathlib import Path

from vlora_tui.app import VloraApp
from vlora_tui.config import AppConfig

SIZE = (120, 36)


async def wait_jobs(app: VloraApp, pilot) -> None:
    """Wait on each job's own worker until nothing is queued or running."""
    while any(not j.finished for j in app.jobs):
        job = next(j for j in app.jobs if not j.finished)
        if job.worker is None:
            await pilot.pause(0.05)
            continue
        try:
            await job.worker.wait()
        except Exception:
            pass
        await pilot.pause()
    await pilot.pause(0.2)


async def shoot(out: Path, demo_dir: Path | None) -> list[Path]:
    cfg = AppConfig(demo=True, demo_dir=demo_dir, hub_search=False, auto_inspect=False)
    app = VloraApp(cfg)
    written: list[Path] = []

    def save(name: str) -> None:
        for j in app.jobs:  # machine-independent times
            if j.seconds is not None:
                j.seconds = round(j.seconds, 0)
        app.clear_notifications()
        written.append(Path(app.save_screenshot(filename=f"{name}.svg", path=str(out))))

    async with app.run_test(size=SIZE) as pilot:
        await wait_jobs(app, pilot)
        await pilot.press("n", "d")
        await wait_jobs(app, pilot)
        save("collection")
        await pilot.press("2", "i")
        await wait_jobs(app, pilot)
        save("adapter")
        await pilot.press("1")
        await pilot.pause(0.5)
        await pilot.press("down", "down", "down")
        await pilot.pause(0.2)
        save("browser")
        await pilot.press("3", "c")
        await pilot.pause()
        save("compress-form")
        await pilot.press("ctrl+s")
        await wait_jobs(app, pilot)
        save("subspace")
        await pilot.press("e")
        await pilot.pause()
        save("export-form")
        await pilot.press("escape", "5")
        await pilot.pause()
        app.state_signal.publish("jobs")
        await pilot.pause()
        save("jobs")
        await pilot.press("question_mark")
        await pilot.pause()
        save("help")
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="screenshots", help="folder for the SVGs")
    ap.add_argument("--demo-dir", default=None, help="demo collection folder (default: the app's cache in the fresh HOME)")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    resource_tracker.ensure_running()  # as cli.run_app does, before Textual swaps stderr
    with tempfile.TemporaryDirectory(prefix="vlora-shots-home-") as home:
        os.environ["HOME"] = home
        for var in ("XDG_CACHE_HOME", "VLORA_TUI_HOME"):
            os.environ.pop(var, None)
        for p in asyncio.run(shoot(out, Path(args.demo_dir) if args.demo_dir else None)):
            print(p)


if __name__ == "__main__":
    main()
