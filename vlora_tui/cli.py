"""``vlora-tui [PATH] [--demo]``: parse the app's arguments and run it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="vlora-tui",
        description="A terminal workbench for collections of LoRA adapters (vlora-tui --batch … runs headless).",
    )
    p.add_argument("path", nargs="?", help="folder of adapters, an adapter folder, or a saved subspace to open")
    p.add_argument("--demo", action="store_true", help="build (once) and open the built-in demo collection")
    return p.parse_args(argv)


def run_app(argv: list[str]) -> int:
    """Run the app; returns its exit code."""
    args = parse_args(argv)
    path = Path(args.path).expanduser() if args.path else None
    if path is not None and not path.exists():
        print(f"vlora-tui: {path}: no such file or directory", file=sys.stderr)
        return 2
    # Textual replaces stderr with an object whose fileno() is -1; the process runner's
    # resource tracker must be started while the real stderr is still in place.
    import multiprocessing.resource_tracker as resource_tracker

    resource_tracker.ensure_running()
    from .app import VloraApp
    from .config import AppConfig

    app = VloraApp(AppConfig(path=path, demo=args.demo))
    code = app.run()
    return int(code or 0)
