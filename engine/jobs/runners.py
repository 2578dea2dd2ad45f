"""Runners: run a :class:`JobRequest` in this thread or in a child process.

Both return a :class:`JobResult` and never raise for a job's own failure:
errors become ``status="failed"`` (with ``error_kind``), cancellation becomes
``status="cancelled"``. The process runner isolates work that can take the
interpreter down (a segfault, ``os._exit``, the OOM killer): the caller gets
``status="failed", error_kind="crash"`` and carries on.
"""

from __future__ import annotations

import os
import queue as queue_mod
import signal
import time
from pathlib import Path
from typing import Any

from ..errors import JobCancelled
from ..progress import CancelLike, Progress, ProgressFn
from .base import JobRequest, JobResult
from .catalog import get_kind, run_job

#: Test-only hook: when this environment variable is set in a job's child process, the
#: child crashes on purpose before running the job (``exit`` → ``os._exit(3)``,
#: ``segfault`` → a null-pointer read, ``kill`` → SIGKILL to itself, ``hang`` → sleeps).
CRASH_ENV = "VLORA_TUI_TEST_CRASH_CHILD"
#: Test-only hook: seconds to sleep at each progress event, so tests can interrupt a job
#: midway deterministically (both runners honour it).
DELAY_ENV = "VLORA_TUI_TEST_PROGRESS_DELAY"


def _with_test_delay(progress: ProgressFn | None) -> ProgressFn | None:
    raw = os.environ.get(DELAY_ENV, "").strip()
    if not raw:
        return progress
    delay = float(raw)

    def slow(p: Progress) -> None:
        if progress is not None:
            progress(p)
        time.sleep(delay)

    return slow


def leave_one_core() -> int:
    """Thread count that leaves one core to a UI: ``max(1, cpu_count − 1)``."""
    return max(1, (os.cpu_count() or 1) - 1)


def prepare_torch(threads: int | None) -> None:
    """Import torch, cap its intra-op threads, and run one tiny op.

    The first torch call in a fresh thread can hold the GIL for a few hundred ms, and
    OpenMP threads that outnumber free cores spin-wait on small ops; doing this
    once, before the job, keeps both out of the job's (and the UI's) way.
    """
    if threads is None:
        return
    import torch

    torch.set_num_threads(max(1, int(threads)))
    torch.ones(2).sum()


class InlineRunner:
    """Run jobs in the calling thread (``--batch``, and the TUI's thread worker).

    Args:
        threads: Cap torch's threads before the first job (``None``: leave torch's default).
            Only jobs that need torch should be run with a cap (it imports torch).
    """

    def __init__(self, *, threads: int | None = None) -> None:
        self.threads = threads
        self._prepared = False

    def run(
        self, req: JobRequest, *, progress: ProgressFn | None = None, cancel: CancelLike | None = None
    ) -> JobResult:
        """Run ``req``; errors and cancellation come back as a result, never raised.

        ``KeyboardInterrupt`` is turned into a ``cancelled`` result too (outputs are
        written through temporary folders, so nothing half-written is left).
        """
        t0 = time.perf_counter()
        try:
            if not self._prepared and self.threads is not None and get_kind(req.kind).name != "info":
                prepare_torch(self.threads)
                self._prepared = True
            return run_job(req, progress=_with_test_delay(progress), cancel=cancel)
        except (Exception, KeyboardInterrupt) as exc:
            return JobResult.from_exception(req, exc, time.perf_counter() - t0)


def _crash_if_asked() -> None:
    how = os.environ.get(CRASH_ENV, "").strip().lower()
    if not how:
        return
    if how == "exit":
        os._exit(3)
    if how == "segfault":
        import ctypes

        ctypes.string_at(0)
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "hang":
        time.sleep(3600)


class _Terminated(BaseException):
    """Raised in the child by SIGTERM so that temporary output folders get removed."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated()


def _child_main(req_dict: dict[str, Any], events: Any, cancel: Any, threads: int | None = None) -> None:
    """Entry point of the child process (top level, so ``spawn`` can import it)."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    # the parent owns Ctrl-C: it sets ``cancel`` and then terminates us
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    req = JobRequest.from_dict(req_dict)

    def progress(p: Progress) -> None:
        events.put(("progress", (p.step, p.total, p.message, p.value)))

    t0 = time.perf_counter()
    try:
        _crash_if_asked()
        prepare_torch(threads)
        result = run_job(req, progress=_with_test_delay(progress), cancel=cancel)
    except _Terminated:
        result = JobResult.from_exception(req, JobCancelled("terminated"), time.perf_counter() - t0)
    except Exception as exc:
        result = JobResult.from_exception(req, exc, time.perf_counter() - t0)
    events.put(("result", result.to_dict()))


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "did not exit"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (segmentation fault)" if -code == signal.SIGSEGV else " (killed; out of memory?)" if -code == signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    return f"exited with code {code}"


class ProcessRunner:
    """Run each job in a fresh ``spawn``-ed child process.

    Progress events come back over a queue and are passed to ``progress`` in the
    calling thread. When ``cancel`` is set, the child's own cancel event is set; if
    it has not stopped after ``grace`` seconds it is terminated (SIGTERM, then
    SIGKILL), and any temporary output folder it left is removed.

    Args:
        grace: Seconds a cancelled child gets to stop by itself.
        poll: Seconds between checks of ``cancel`` and of the child's liveness.
        threads: torch threads in the child (``None``: torch's default; the TUI passes
            :func:`leave_one_core` so the UI keeps a core).
    """

    def __init__(self, *, grace: float = 2.0, poll: float = 0.05, threads: int | None = None) -> None:
        import multiprocessing as mp  # here, not at import: ``--batch info`` never needs it

        self.grace = grace
        self.poll = poll
        self.threads = threads
        self._ctx = mp.get_context("spawn")

    def run(
        self, req: JobRequest, *, progress: ProgressFn | None = None, cancel: CancelLike | None = None
    ) -> JobResult:
        """Run ``req`` in a child; returns its result, or a failed/cancelled one."""
        t0 = time.perf_counter()
        try:
            get_kind(req.kind)  # fail fast, in the caller, on an unknown kind
        except ValueError as exc:
            return JobResult.from_exception(req, exc)
        events = self._ctx.Queue()
        child_cancel = self._ctx.Event()
        proc = self._ctx.Process(target=_child_main, args=(req.to_dict(), events, child_cancel, self.threads),
                                 daemon=True)
        proc.start()
        result: JobResult | None = None
        cancel_at: float | None = None
        try:
            while result is None:
                try:
                    tag, payload = events.get(timeout=self.poll)
                except queue_mod.Empty:
                    tag, payload = None, None
                except (EOFError, OSError):
                    tag, payload = None, None
                if tag == "progress" and progress is not None:
                    progress(Progress(*payload))
                elif tag == "result":
                    result = JobResult.from_dict(payload)
                    break
                if cancel is not None and cancel.is_set() and cancel_at is None:
                    child_cancel.set()
                    cancel_at = time.perf_counter()
                if cancel_at is not None and time.perf_counter() - cancel_at > self.grace:
                    self._stop(proc)
                    result = JobResult.from_exception(req, JobCancelled(), time.perf_counter() - t0)
                    break
                if tag is None and not proc.is_alive():
                    result = self._drain(events)
                    if result is None:
                        proc.join(1.0)
                        msg = f"the worker process {_describe_exit(proc.exitcode)} while running '{req.kind}'"
                        result = JobResult(
                            job_id=req.job_id,
                            kind=req.kind,
                            status="failed",
                            summary=msg,
                            error=msg,
                            error_title="Worker crashed",
                            seconds=time.perf_counter() - t0,
                            error_kind="crash",
                            error_type="WorkerCrashed",
                        )
                    break
        except KeyboardInterrupt:
            child_cancel.set()
            self._stop(proc)
            self._sweep(req)
            raise
        finally:
            if proc.is_alive():
                proc.join(self.grace)
            if proc.is_alive():
                self._stop(proc)
            events.close()
            events.join_thread()
        if not result.ok:
            self._sweep(req)
        return result

    @staticmethod
    def _drain(events: Any) -> JobResult | None:
        """The child's result if it posted one just before exiting."""
        deadline = time.perf_counter() + 0.5
        while time.perf_counter() < deadline:
            try:
                tag, payload = events.get(timeout=0.05)
            except (queue_mod.Empty, EOFError, OSError):
                continue
            if tag == "result":
                return JobResult.from_dict(payload)
        return None

    def _stop(self, proc: Any) -> None:
        if not proc.is_alive():
            return
        proc.terminate()
        proc.join(self.grace)
        if proc.is_alive():
            proc.kill()
            proc.join(5.0)

    @staticmethod
    def _sweep(req: JobRequest) -> None:
        """Clean up beside the job's outputs after a killed child (its pid is gone now).

        The same sweep every later write does (:func:`engine.io.local.sweep_siblings`):
        temporary folders of dead writers are removed, an output hidden mid-swap is put back.
        """
        from ..io.local import sweep_siblings

        try:
            kind = get_kind(req.kind)
        except ValueError:
            return
        for name in (*kind.writes, *kind.modifies):
            target = req.params.get(name)
            if target:
                sweep_siblings(Path(str(target)))
