"""The job kinds by name, and running one request: check its parameters, refuse a taken output, run.

Torch-free: the kinds' implementations import torch inside their functions only.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import JobCancelled, OutputExistsError
from ..progress import CancelLike, ProgressFn
from .base import JobKind, JobRequest, JobResult, to_jsonable
from .kinds import KINDS

_BY_NAME: dict[str, JobKind] = {k.name: k for k in KINDS}


def job_kinds() -> dict[str, JobKind]:
    """Every job kind by name, in menu order (:data:`engine.jobs.kinds.KINDS`). Torch-free."""
    return dict(_BY_NAME)


def get_kind(name: str) -> JobKind:
    """One kind; ``ValueError`` listing the known ones if ``name`` is not a kind."""
    if name not in _BY_NAME:
        raise ValueError(f"unknown job kind {name!r}; choose from {', '.join(_BY_NAME)}")
    return _BY_NAME[name]


def typed_data(kind: str, data: Mapping[str, Any]) -> Any:
    """A job's ``data`` as its kind's result dataclass (``JobKind.result``); the dict for a kind without one."""
    cls = _BY_NAME[kind].result if kind in _BY_NAME else None
    return cls.from_dict(data) if cls is not None else data


def validate_request(req: JobRequest) -> dict[str, Any]:
    """Check and coerce ``req.params`` against its kind's parameters.

    Returns a dict with every parameter of the kind (defaults filled in).

    Raises:
        ValueError: unknown kind, unknown parameter, a bad/missing value, or values that do not
            go together (the kind's ``check``), naming the parameter.
    """
    kind = get_kind(req.kind)
    names = {p.name for p in kind.params}
    unknown = sorted(set(req.params) - names)
    if unknown:
        raise ValueError(f"{req.kind}: unknown parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    out: dict[str, Any] = {}
    for p in kind.params:
        value = req.params.get(p.name)
        if value is None:
            value = p.default
        out[p.name] = p.validate(value)
    if kind.check is not None:
        kind.check(out)
    return out


def check_outputs(kind: JobKind, params: Mapping[str, Any]) -> None:
    """Refuse, before any work, an output path that exists when ``force`` is not set.

    Raises:
        OutputExistsError: naming the path.
    """
    if params.get("force"):
        return
    for name in kind.writes:
        target = params.get(name)
        if target and Path(str(target)).exists():
            raise OutputExistsError(f"{target}: already exists (use --force / force=True to overwrite)")


def run_job(req: JobRequest, *, progress: ProgressFn | None = None, cancel: CancelLike | None = None) -> JobResult:
    """Run ``req`` in this thread.

    Returns:
        ``JobResult`` with ``status="ok"``, or ``"failed"`` for a ``validate`` job whose
        adapters fail their checks (the report is in ``data`` either way).

    Raises:
        ValueError: bad parameters. VloraError: domain failures.
        JobCancelled: ``cancel`` was set.
    """
    params = validate_request(req)
    kind = get_kind(req.kind)
    assert kind.func is not None
    t0 = time.perf_counter()
    check_outputs(kind, params)
    if cancel is not None and cancel.is_set():
        raise JobCancelled()
    out = kind.func(params, progress=progress, cancel=cancel)
    seconds = time.perf_counter() - t0
    return JobResult(
        job_id=req.job_id,
        kind=req.kind,
        status="ok" if out.ok else "failed",
        summary=out.summary,
        outputs=[str(o) for o in out.outputs],
        data=to_jsonable(out.data),
        error=None if out.ok else out.summary,
        error_title=None if out.ok else "Checks failed",
        seconds=seconds,
        error_kind=None if out.ok else "error",
    )
