"""The one progress combinator (engine/progress.py): stages, counted parts, a ticker."""

from __future__ import annotations

import threading

import pytest

from engine.errors import JobCancelled
from engine.progress import Progress, StagedProgress, counted, ticker


def test_weighted_stages_map_onto_one_bar() -> None:
    got: list[Progress] = []
    bar = StagedProgress(got.append, {"load": 1, "build": 3})
    bar.stage("build")(Progress(1, 2, "m"))  # a quarter in, then half of three quarters
    bar.done()
    assert [(p.step, p.total, p.message) for p in got] == [(round(1000 * (0.25 + 0.75 * 0.5)), 1000, "m"), (1000, 1000, "done")]
    assert StagedProgress(None, {"a": 1}).stage("a") is None


def test_counted_parts_follow_each_other_and_clamp() -> None:
    got: list[Progress] = []
    bar = counted(got.append, 10)
    first = bar.part(4, " [a]")
    first(Progress(2, 4, "x"))
    first(Progress(9, 4, "y"))  # past its own end: clamped to the part
    bar.part(6)(Progress(1, 6, "z"))
    assert [(p.step, p.total, p.message) for p in got] == [(2, 10, "x [a]"), (4, 10, "y [a]"), (5, 10, "z")]


def test_ticker_counts_calls_and_checks_cancel() -> None:
    got: list[Progress] = []
    t = ticker(got.append, None, 3)
    t("a")
    t("b")
    assert [(p.step, p.total, p.message) for p in got] == [(0, 3, "a"), (1, 3, "b")]
    ev = threading.Event()
    ev.set()
    with pytest.raises(JobCancelled):
        ticker(None, ev, 2)("c")
