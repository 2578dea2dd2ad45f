"""The job layer shared by the TUI and ``--batch``: job kinds, requests, results, runners.

Importable without torch: the TUI lists kinds and builds forms from
:func:`job_kinds` before torch loads.

Layout: :mod:`.base` (what a kind, a request and a result are), :mod:`.kinds` (one
module per kind, and the list of them), :mod:`.catalog` (kinds by name, checking and
running one request), :mod:`.runners` (in this thread or a child process),
:mod:`.params` and :mod:`.reports` (what several kinds share), :mod:`.common`
(loading adapters for a job).

Example::

    from engine.jobs import JobRequest, InlineRunner, job_kinds

    kinds = job_kinds()                      # name -> JobKind(name, title, help, params)
    req = JobRequest("compress", {"adapters": ["adapters/"], "output": "sub/", "num_components": 8})
    result = InlineRunner().run(req, progress=print, cancel=event)
    result.status, result.data["stats"]
"""

from __future__ import annotations

from .base import ERROR_KINDS, STATUSES, JobKind, JobOutput, JobRequest, JobResult, classify_error, to_jsonable
from .catalog import get_kind, job_kinds, run_job, validate_request
from .runners import CRASH_ENV, DELAY_ENV, InlineRunner, ProcessRunner

__all__ = [
    "CRASH_ENV",
    "DELAY_ENV",
    "ERROR_KINDS",
    "STATUSES",
    "InlineRunner",
    "JobKind",
    "JobOutput",
    "JobRequest",
    "JobResult",
    "ProcessRunner",
    "classify_error",
    "get_kind",
    "job_kinds",
    "run_job",
    "to_jsonable",
    "validate_request",
]
