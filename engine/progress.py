"""Progress and cancellation protocols shared by every long operation."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from .errors import JobCancelled


@dataclass(frozen=True)
class Progress:
    """One progress event: ``step`` of ``total`` done, with a short message.

    ``value``: a number the step measured, for a front end to plot (the ``train``
    job's loss); ``None`` for most events.
    """

    step: int
    total: int
    message: str = ""
    value: float | None = None

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


class StagedProgress:
    """One monotone progress bar over the successive parts of a long operation.

    The one progress combinator of the engine, in three views of the same bar:

    * :meth:`stage` — weighted named stages (``StagedProgress(progress, {"load": 1, "build": 4})``):
      each stage's own ``step/total`` is mapped onto its share of :attr:`TOTAL` steps;
    * :meth:`part` — counted parts (``StagedProgress(progress, total=n)``): consecutive runs,
      each with its own ``0 … steps-1`` ticks, placed one after another on ``n`` steps;
    * :meth:`ticker` — one step per call: ``t = StagedProgress(progress, total=n).ticker(cancel)``,
      then ``t("message")`` checks ``cancel`` and reports the next step.
    """

    TOTAL = 1000

    def __init__(self, progress: ProgressFn | None, stages: Mapping[str, float] | None = None, *,
                 total: int | None = None) -> None:
        self.progress = progress
        self.total = self.TOTAL if total is None else total
        self.done_steps = 0
        self.start: dict[str, float] = {}
        self.width: dict[str, float] = {}
        weights = dict(stages or {})
        acc, whole = 0.0, sum(weights.values()) or 1.0
        for name, w in weights.items():
            self.start[name] = acc / whole
            self.width[name] = w / whole
            acc += w

    def stage(self, name: str) -> ProgressFn | None:
        """A progress function for stage ``name`` (``None`` when there is no callback)."""
        if self.progress is None:
            return None
        start, width, outer, total = self.start[name], self.width[name], self.progress, self.total

        def fn(p: Progress) -> None:
            frac = start + width * p.fraction
            outer(Progress(int(round(frac * total)), total, p.message))

        return fn

    def part(self, steps: int, label: str = "") -> ProgressFn | None:
        """A progress function for the next ``steps`` steps; ``label`` is appended to its messages."""
        offset = self.done_steps
        self.done_steps += steps
        if self.progress is None:
            return None
        outer, total = self.progress, self.total

        def fn(p: Progress) -> None:
            outer(Progress(offset + min(p.step, steps), total, f"{p.message}{label}"))

        return fn

    def ticker(self, cancel: CancelLike | None) -> Callable[[str], None]:
        """A function that, per call, checks ``cancel`` and reports the next step with its message."""

        def t(message: str) -> None:
            tick(self.progress, cancel, self.done_steps, self.total, message)
            self.done_steps += 1

        return t

    def done(self, message: str = "done") -> None:
        """Report the whole bar as done."""
        if self.progress is not None:
            self.progress(Progress(self.total, self.total, message))


def ticker(progress: ProgressFn | None, cancel: CancelLike | None, total: int) -> Callable[[str], None]:
    """``StagedProgress(progress, total=total).ticker(cancel)``: one step of ``total`` per call."""
    return StagedProgress(progress, total=total).ticker(cancel)


def counted(progress: ProgressFn | None, total: int) -> StagedProgress:
    """``StagedProgress(progress, total=total)``: a bar of ``total`` steps split with :meth:`~StagedProgress.part`."""
    return StagedProgress(progress, total=total)
