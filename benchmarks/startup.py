"""Time to first paint of vlora-tui, and whether torch was imported by then.

Each run is a fresh interpreter (so imports are counted): it builds the app the
way ``vlora-tui`` does, runs it headless, and records the time from process
start until ``App.run_test`` hands over (the first screen is composed, mounted
and laid out). Then it visits every screen and checks ``sys.modules`` again.
Prints a table; exits 1 if the median exceeds the 1 s budget or torch is in
``sys.modules``.

    python benchmarks/startup.py [--runs 5] [--path DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = r"""
import time
t0 = time.perf_counter()
import asyncio, json, sys
from pathlib import Path
from vlora_tui.app import VloraApp
from vlora_tui.config import AppConfig
t_import = time.perf_counter() - t0

async def main():
    path = Path(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1] else None
    app = VloraApp(AppConfig(path=path, hub_search=False, auto_inspect=False))
    async with app.run_test(size=(120, 36)) as pilot:
        t_paint = time.perf_counter() - t0
        torch_at_paint = "torch" in sys.modules
        await pilot.press(*"12345")
        await pilot.pause()
        torch_after = "torch" in sys.modules
    print(json.dumps({"import": t_import, "paint": t_paint, "torch_at_paint": torch_at_paint, "torch_after_screens": torch_after}))

asyncio.run(main())
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--path", default="", help="folder to open (e.g. the demo collection)")
    args = ap.parse_args()
    rows = []
    for _ in range(args.runs):
        out = subprocess.run([sys.executable, "-c", CHILD, args.path], capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            print(out.stderr, file=sys.stderr)
            return 2
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    paint = [r["paint"] for r in rows]
    imp = [r["import"] for r in rows]
    torch_any = any(r["torch_at_paint"] or r["torch_after_screens"] for r in rows)
    print(f"{'metric':<34}{'median':>10}{'min':>10}{'max':>10}")
    print(f"{'import vlora_tui.app (s)':<34}{statistics.median(imp):>10.3f}{min(imp):>10.3f}{max(imp):>10.3f}")
    print(f"{'first paint from process start (s)':<34}{statistics.median(paint):>10.3f}{min(paint):>10.3f}{max(paint):>10.3f}")
    print(f"{'torch in sys.modules':<34}{str(torch_any):>10}")
    print(f"runs: {args.runs}   path: {args.path or '(current folder)'}   budget: 1.0 s")
    return 0 if statistics.median(paint) <= 1.0 and not torch_any else 1


if __name__ == "__main__":
    sys.exit(main())
