"""App configuration: what the command line asked for and where outputs go.

Everything here is plain data so tests and the screenshot script build the app
the same way ``vlora-tui`` does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path



def process_kinds() -> frozenset[str]:
    """Job kinds that run in a child process (a crash there cannot take the UI down): ``JobKind.process``."""
    from engine.jobs import job_kinds

    return frozenset(name for name, kind in job_kinds().items() if kind.process)


#: :func:`process_kinds`, read once (the job layer is torch-free).
PROCESS_KINDS: frozenset[str] = process_kinds()


def default_home() -> Path:
    """``$VLORA_TUI_HOME`` or ``~/.cache/vlora-tui`` (shared with the demo cache)."""
    base = os.environ.get("VLORA_TUI_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vlora-tui"
    )
    return Path(base)


def tildify(text: str) -> str:
    """``text`` with the user's home folder written as ``~`` (shorter, and the same on every machine)."""
    home = os.path.expanduser("~").rstrip(os.sep)
    if not home or home == os.sep:
        return text
    return text.replace(home + os.sep, "~" + os.sep)


def expand_tilde(text: str) -> str:
    """Undo :func:`tildify` in a form field: each word that starts with ``~`` becomes a full path."""
    if "~" not in text:
        return text
    return " ".join(os.path.expanduser(w) if w.startswith("~") else w for w in text.split())


@dataclass
class AppConfig:
    """How one run of the app is set up.

    Attributes:
        path: Folder (or adapter) to open in the browser; ``None`` = current folder.
        demo: Build (or reuse) the demo collection and open it.
        output_dir: Default parent folder for job outputs (subspaces, exports, merges).
        demo_dir: Where the demo collection lives; ``None`` = ``engine.demo.default_demo_dir()``.
        hub_search: Allow Hub search (off in tests so nothing touches the network).
        hub_timeout: Seconds before a Hub search is reported as unreachable.
        process_kinds: Job kinds run through the process runner.
        auto_inspect: Run the ``inspect`` job when an adapter is first shown.
        output_stamp: Fixed ``YYYYMMDD-HHMMSS`` in new output names (snapshots); ``None`` = the clock.
    """

    path: Path | None = None
    demo: bool = False
    output_dir: Path = field(default_factory=lambda: default_home() / "outputs")
    demo_dir: Path | None = None
    hub_search: bool = True
    hub_timeout: float = 20.0
    process_kinds: frozenset[str] = PROCESS_KINDS
    auto_inspect: bool = True
    output_stamp: str | None = None

    @property
    def start_path(self) -> Path:
        """The folder the browser's tree is rooted at."""
        if self.path is None and self.demo:
            from engine.demo import default_demo_dir

            p = Path(self.demo_dir or default_demo_dir())
            return p if p.is_dir() else p.parent if p.parent.is_dir() else Path.cwd()
        p = Path(self.path) if self.path is not None else Path.cwd()
        return p if p.is_dir() else p.parent
