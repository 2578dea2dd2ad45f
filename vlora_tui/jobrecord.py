"""A job in the app's queue (:class:`JobRecord`), its title, and how its messages read in the TUI."""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from typing import Any

from textual.worker import Worker

from engine.io.scan import spec_name


@dataclass
class JobRecord:
    """One job in the queue, as the jobs panel shows it.

    Attributes:
        request: The validated ``engine.jobs.JobRequest``.
        title: One line for the queue ("compress 14 adapters").
        status: ``queued``, ``running``, ``done``, ``failed`` or ``cancelled``.
        step: Last progress step.
        total: Last progress total (0 = unknown).
        message: Last progress message.
        log: Progress and outcome lines, oldest first.
        result: The ``JobResult`` once finished.
        error: One-line error of a failed job.
        error_title: Heading for the error.
        open_result: Switch to the result's view when it finishes.
        cancel_event: Set to ask the runner to stop.
        worker: The thread worker running it.
        started: ``time.monotonic()`` at start.
        seconds: Wall time once finished.
        values: ``(step, value)`` of every progress event that measured a number (``train``: the loss).
    """

    request: Any
    title: str
    status: str = "queued"
    step: int = 0
    total: int = 0
    message: str = ""
    log: list[str] = field(default_factory=list)
    result: Any = None
    error: str | None = None
    error_title: str | None = None
    open_result: bool = True
    cancel_event: threading.Event = field(default_factory=threading.Event)
    worker: Worker | None = None
    started: float | None = None
    seconds: float | None = None
    values: list[tuple[int, float]] = field(default_factory=list)

    @property
    def job_id(self) -> str:
        return str(self.request.job_id)

    @property
    def kind(self) -> str:
        return str(self.request.kind)

    @property
    def finished(self) -> bool:
        return self.status in ("done", "failed", "cancelled")


def tui_message(text: str) -> str:
    """An engine message without its command-line advice (``--force``): the TUI asks instead."""
    text = re.sub(r"\s*\(use --force[^)]*\)", " (pick another output folder, or tick force in the form to overwrite it)", text)
    return re.sub(r"use --force to (\w+) it", r"tick force in the form to \1 it", text)


class _AnyEvent:
    """Set when any of its events is set (``is_set()`` is all the engine calls)."""

    def __init__(self, *events: threading.Event) -> None:
        self.events = events

    def is_set(self) -> bool:
        return any(e.is_set() for e in self.events)


def job_title(kind: str, params: dict[str, Any]) -> str:
    """One line naming a job for the queue (adapters counted, whether a list or one string of paths)."""
    adapters = params.get("adapters")
    if isinstance(adapters, str):
        adapters = adapters.split()
    if adapters:
        return f"{kind} {len(adapters)} adapter{'s' if len(adapters) != 1 else ''}"
    for key in ("task", "adapter", "subspace", "path"):
        if params.get(key):
            return f"{kind} {spec_name(str(params[key]))}"
    return kind
