"""Progress and cancellation protocols shared by every long operation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from .errors import JobCancelled


@dataclass(frozen=True)
class Progress:
    """One progress event: ``step`` of ``total`` done, with a short message."""

    step: int
    total: int
    message: str = ""

    @property
    def fraction(self) -> float:
        return 0.0 if self.total <= 0 else min(1.0, self.step / self.total)


class CancelLike(Protocol):
    """Anything with ``is_set()``: threading/multiprocessing events, Textual's cancelled_event."""

    def is_set(self) -> bool: ...


ProgressFn = Callable[[Progress], None]


def report(progress: ProgressFn | None, step: int, total: int, message: str = "") -> None:
    """Call ``progress`` if given."""
    if progress is not None:
        progress(Progress(step, total, message))


def check_cancel(cancel: CancelLike | None) -> None:
    """Raise ``JobCancelled`` if ``cancel`` is set."""
    if cancel is not None and cancel.is_set():
        raise JobCancelled()


def tick(progress: ProgressFn | None, cancel: CancelLike | None, step: int, total: int, message: str = "") -> None:
    """Check for cancellation, then report progress: the one call long loops make per step."""
    check_cancel(cancel)
    report(progress, step, total, message)
