"""Entry point: ``vlora-tui [PATH] [--demo]`` opens the app; ``vlora-tui --batch CMD …`` runs headless.

``--batch`` is routed before anything imports Textual, so headless runs never load it.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point. Returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--batch" in args:
        i = args.index("--batch")
        from .batch import main as batch_main

        return batch_main(args[:i] + args[i + 1 :])
    if args and args[0] in ("--version", "-V"):
        from . import __version__

        print(f"vlora-tui {__version__}")
        return 0
    from .cli import run_app

    return run_app(args)


if __name__ == "__main__":
    sys.exit(main())
