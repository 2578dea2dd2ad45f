"""Headless ``vlora-tui --batch <command> …``: one job, results on stdout, diagnostics on stderr.

Subcommands and their flags are built from the job kinds' typed parameters and
positionals (:func:`engine.jobs.job_kinds`), so the TUI's forms and these flags stay
in sync; results are printed by the kind's renderer (:mod:`vlora_tui.render`).
Never imports Textual; imports rich only when writing to a terminal.

Output:
    * a terminal: a rich progress bar on stderr and rich tables on stdout;
    * not a terminal: plain lines (progress, throttled, on stderr);
    * ``--json``: one JSON document on stdout (the job result: ``job_id``, ``kind``,
      ``status``, ``summary``, ``outputs``, ``data``, ``error``…), also on failure.

Exit codes:
    * 0 — the job succeeded;
    * 1 — the job ran and failed (an unexpected error, the Hub unreachable,
      ``validate`` found invalid or incompatible adapters);
    * 2 — usage or bad input: a bad flag or value, a missing path, a corrupt
      adapter or subspace, an unknown task, incompatible adapters, or an output
      that exists without ``--force`` (checked before any work). One line on
      stderr names the file and the problem; ``--debug`` adds the traceback;
    * 130 — interrupted (Ctrl-C / SIGINT); outputs are written through a temporary
      folder and renamed at the end, so nothing half-written is left.

``add`` updates the subspace in place (atomically, and only with ``--force``) unless
``-o`` names another folder; it reports every task's error before → after and refuses
(exit 1, nothing written) a result that breaks the subspace's error target unless
``--allow-worse``. Warnings a job returns (``add`` accepting a break, ``quantize``
breaking the target) go to stderr, one line each.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from typing import Any

from .render import Block, render_blocks
from .render.base import fmt

#: Short flags kept from the seed CLI.
SHORT_FLAGS: dict[str, str] = {"output": "-o", "num_components": "-k"}
#: List parameters given one value per flag, repeated (``--exclude a --exclude b``), so they
#: cannot swallow a positional argument that follows them.
REPEATABLE: dict[str, str] = {"exclude": "PATTERN"}

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exits 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        raise SystemExit(EXIT_USAGE)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_param(sub: argparse.ArgumentParser, p: Any, positional: bool) -> None:
    help_text = p.help or ""
    if p.default not in (None, False, (), []) and p.type != "bool":
        help_text += f" (default: {p.default})"
    kw: dict[str, Any] = {"help": help_text}
    if p.type in ("paths", "strs", "floats"):
        kw["nargs"] = "+"
    elif p.type == "int":
        kw["type"] = int
    elif p.type == "float":
        kw["type"] = float
    elif p.type == "choice":
        kw["choices"] = list(p.choices)
        if p.choices and all(isinstance(c, int) for c in p.choices):
            kw["type"] = int
    if positional:
        kw["metavar"] = p.name.upper()
        if kw.get("nargs") == "+" and not p.required:
            kw["nargs"] = "*"  # an optional list (compare's ADAPTERS: none is the base-vs-task mode)
        sub.add_argument(p.name, **kw)
        return
    flags = [_flag(p.name)]
    if p.name in REPEATABLE:
        sub.add_argument(*flags, dest=p.name, action="append", default=None, metavar=REPEATABLE[p.name], help=help_text)
        return
    if p.name in SHORT_FLAGS:
        flags.insert(0, SHORT_FLAGS[p.name])
    if p.type == "bool":
        if p.default is None:  # unset means "the method's default": offer --x and --no-x
            sub.add_argument(*flags, dest=p.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            sub.add_argument(*flags, dest=p.name, action="store_true", help=help_text)
        return
    if p.type in ("paths", "strs", "floats") or p.type not in ("int", "float", "choice"):
        kw["metavar"] = p.name.upper().replace("_", "-") if p.type != "choice" else None
        if kw["metavar"] is None:
            del kw["metavar"]
    sub.add_argument(*flags, dest=p.name, required=bool(p.required), default=None, **kw)


def build_parser() -> argparse.ArgumentParser:
    """The ``--batch`` parser, one subcommand per job kind."""
    from engine.jobs import job_kinds

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print one JSON document on stdout")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of errors")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress output")
    parser = _Parser(
        prog="vlora-tui --batch",
        description="Run one vlora-tui job headless. Exit 0 ok, 1 failed, 2 usage or bad input, 130 interrupted.",
        parents=[common],
    )
    # no set_defaults here: the parents share their action objects, so it would give the
    # subcommands' copies a False default that overwrites a flag given before the subcommand;
    # main() fills the defaults in after parsing
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subs.required = True
    for name, kind in job_kinds().items():
        sub = subs.add_parser(name, help=kind.help, description=f"{kind.title}: {kind.help}.", parents=[common])
        positional = kind.positionals
        for pname in positional:
            _add_param(sub, kind.param(pname), True)
        for p in kind.params:
            if p.name not in positional:
                _add_param(sub, p, False)
    return parser


# -- progress ---------------------------------------------------------------------


class _PlainProgress:
    """Throttled ``[ 42%] message`` lines on stderr, from one second after the first event on.

    Quick jobs print nothing, so a failure is one line on stderr.
    """

    def __init__(self, interval: float = 0.5, quiet_for: float = 1.0) -> None:
        self.interval = interval
        self.start: float | None = None  # the first event, not start-up: importing torch is not progress
        self.quiet_for = quiet_for
        self.last = 0.0
        self.last_pct = -1

    def __call__(self, p: Any) -> None:
        pct = int(100 * p.fraction)
        now = time.monotonic()
        if self.start is None:
            self.start = now
        if now - self.start < self.quiet_for:
            return
        if pct == self.last_pct or (now - self.last < self.interval and pct < 100):
            return
        self.last, self.last_pct = now, pct
        sys.stderr.write(f"[{pct:3d}%] {p.message}\n")
        sys.stderr.flush()

    def close(self) -> None:
        pass


class _RichProgress:
    """A rich progress bar on stderr."""

    def __init__(self, title: str) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

        self.bar = Progress(
            TextColumn("[bold]{task.fields[title]}"),
            BarColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.description}"),
            console=Console(stderr=True),
            transient=True,
        )
        self.task = self.bar.add_task("", total=1.0, title=title)
        self.bar.start()

    def __call__(self, p: Any) -> None:
        self.bar.update(self.task, completed=p.fraction, description=p.message[:60])

    def close(self) -> None:
        self.bar.stop()


# -- rendering ----------------------------------------------------------------------


def _print_plain(blocks: list[Block]) -> None:
    out = sys.stdout
    for i, block in enumerate(blocks):
        kind, title = block[0], block[1]
        if i:
            out.write("\n")
        if title:
            out.write(f"{title}\n")
        if kind == "kv":
            width = max((len(k) for k, _ in block[2]), default=0)
            for k, v in block[2]:
                out.write(f"  {k:<{width}}  {fmt(v)}\n")
        elif kind == "table":
            cols, rows = block[2], [[fmt(c) for c in r] for r in block[3]]
            widths = [max([len(str(c))] + [len(r[j]) for r in rows]) for j, c in enumerate(cols)]
            out.write("  " + "  ".join(f"{c:<{w}}" for c, w in zip(cols, widths)).rstrip() + "\n")
            for r in rows:
                out.write("  " + "  ".join(f"{c:<{w}}" for c, w in zip(r, widths)).rstrip() + "\n")
        else:
            for line in block[2]:
                out.write(f"{line}\n")
    out.flush()


def _print_rich(blocks: list[Block]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for block in blocks:
        kind, title = block[0], block[1]
        if kind == "kv":
            t = Table(title=title, show_header=False, title_justify="left", box=None, padding=(0, 2))
            t.add_column(style="bold cyan")
            t.add_column()
            for k, v in block[2]:
                t.add_row(str(k), fmt(v))
            console.print(t)
        elif kind == "table":
            t = Table(title=title, title_justify="left", header_style="bold")
            for c in block[2]:
                t.add_column(str(c), overflow="fold")
            for r in block[3]:
                t.add_row(*[fmt(c) for c in r])
            console.print(t)
        else:
            if title:
                console.print(f"[bold]{title}[/bold]")
            for line in block[2]:
                console.print(line, markup=False, highlight=False)
        console.print()


# -- main ---------------------------------------------------------------------------------


def _exit_code(result: Any) -> int:
    if result.ok:
        return EXIT_OK
    if result.status == "cancelled":
        return EXIT_INTERRUPTED
    if result.error_kind == "input":
        return EXIT_USAGE
    return EXIT_FAILED


def main(argv: list[str]) -> int:
    """Run one ``--batch`` command; returns the exit code."""
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    for flag in ("json", "debug", "quiet"):  # global flags, given before or after the subcommand
        if not hasattr(args, flag):
            setattr(args, flag, False)
    from engine.jobs import InlineRunner, JobRequest, job_kinds

    kind = job_kinds()[args.command]
    params = {p.name: getattr(args, p.name, None) for p in kind.params}
    for p in kind.params:  # lists given as several words go to Param.validate as one string
        if p.type == "floats" and isinstance(params[p.name], list):
            params[p.name] = " ".join(params[p.name])
    req = JobRequest(args.command, params)

    cancel = threading.Event()
    interrupted = {"n": 0}

    def on_sigint(signum: int, frame: Any) -> None:
        interrupted["n"] += 1
        cancel.set()
        if interrupted["n"] > 1:
            raise KeyboardInterrupt
        sys.stderr.write("interrupted: cancelling (Ctrl-C again to stop now)\n")
        sys.stderr.flush()

    old_handler = signal.signal(signal.SIGINT, on_sigint) if threading.current_thread() is threading.main_thread() else None
    progress = None
    if not args.quiet:
        progress = _RichProgress(kind.title) if sys.stderr.isatty() else _PlainProgress()
    try:
        result = InlineRunner().run(req, progress=progress, cancel=cancel)
    finally:
        if progress is not None:
            progress.close()
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)
    if interrupted["n"] and result.status != "ok":
        result = result.__class__(**{**result.__dict__, "status": "cancelled", "error_kind": "cancelled"})
    code = _exit_code(result)

    try:
        if args.json:
            sys.stdout.write(json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n")
            sys.stdout.flush()
        elif result.ok or result.data:
            blocks = render_blocks(result.kind, result.data, result.summary)
            if sys.stdout.isatty():
                _print_rich(blocks)
            else:
                _print_plain(blocks)
    except BrokenPipeError:  # stdout closed early (``| head``): not an error of the job
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    if result.ok:  # warnings (a broken target, what an export dropped): a diagnostic, one line each
        data = result.data or {}
        for w in [*(data.get("warnings") or [] if kind.stderr_warnings else []), *data.get("target_warnings", [])]:
            sys.stderr.write(f"warning: {w}\n")
    if not result.ok:
        if code == EXIT_INTERRUPTED:
            sys.stderr.write("interrupted: nothing was written\n" if not result.outputs else "interrupted\n")
        else:
            sys.stderr.write(f"error: {result.error}\n")
            if args.debug and result.traceback:
                sys.stderr.write(result.traceback)
    sys.stderr.flush()
    return code
