"""Job specs and results: what a job is, how its parameters are checked, how it runs.

Torch-free: the TUI lists kinds and builds forms from :func:`job_kinds` before
torch loads; the implementations (in :mod:`engine.jobs.kinds`) import torch
inside their functions only.
"""

from __future__ import annotations

import math
import time
import secrets
import traceback as tb_mod
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

from ..errors import (
    AdapterFormatError,
    IncompatibleAdaptersError,
    JobCancelled,
    OutputExistsError,
    SubspaceFormatError,
    UnknownTaskError,
    VloraError,
)
from ..progress import CancelLike, Progress, ProgressFn
from ..registry import Param

#: Statuses a :class:`JobResult` can have.
STATUSES = ("ok", "failed", "cancelled")

#: How a failure is classed, for exit codes and dialogs:
#: ``input`` — the request or its files are bad (missing/corrupt adapter, unknown task,
#: incompatible adapters, output exists, bad parameter); ``cancelled``; ``crash`` — the
#: worker process died; ``error`` — anything else (Hub unreachable, unexpected exception).
ERROR_KINDS = ("input", "cancelled", "crash", "error")

_INPUT_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    AdapterFormatError,
    SubspaceFormatError,
    UnknownTaskError,
    IncompatibleAdaptersError,
    OutputExistsError,
)


@dataclass(frozen=True)
class JobOutput:
    """What a job implementation returns; :func:`run_job` wraps it in a :class:`JobResult`.

    Attributes:
        summary: One line for logs and notifications.
        outputs: Paths the job wrote (folders or files), final names only.
        data: JSON-able figures and tables (schema documented per kind).
        ok: False when the job ran but found the input failing (``validate``).
    """

    summary: str
    outputs: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    ok: bool = True


JobFunc = Callable[..., JobOutput]


@dataclass(frozen=True)
class JobKind:
    """One kind of job: its name, a title for menus, one line of help, typed parameters.

    Attributes:
        name: Identifier (``compress``, ``info``, …); also the ``--batch`` command.
        title: Short human title (``Compress adapters``).
        help: One line for menus, forms and ``--help``.
        params: Typed parameters, in form order.
        writes: Names of the parameters that are output paths (written atomically; an
            existing one is refused before any work unless ``force``).
        modifies: Names of parameters whose folder the job rewrites in place (atomically).
        func: The implementation (``func(params, *, progress, cancel) -> JobOutput``).
    """

    name: str
    title: str
    help: str
    params: tuple[Param, ...] = ()
    writes: tuple[str, ...] = ()
    modifies: tuple[str, ...] = ()
    func: JobFunc | None = field(default=None, compare=False, repr=False)

    def param(self, name: str) -> Param:
        """The parameter called ``name``; ``KeyError`` if there is none."""
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    @property
    def doc(self) -> str:
        """The implementation's docstring (it documents the ``data`` schema)."""
        return (self.func.__doc__ or "") if self.func else ""


def _new_job_id() -> str:
    return secrets.token_hex(4)


@dataclass(frozen=True)
class JobRequest:
    """A request to run one job.

    Attributes:
        kind: A name from :func:`job_kinds`.
        params: Parameter values by name (coerced by :func:`validate_request`).
        job_id: Short id; generated when not given.
    """

    kind: str
    params: Mapping[str, Any] = field(default_factory=dict)
    job_id: str = field(default_factory=_new_job_id)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "params": to_jsonable(dict(self.params)), "job_id": self.job_id}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> JobRequest:
        return cls(kind=d["kind"], params=dict(d.get("params") or {}), job_id=d.get("job_id") or _new_job_id())


@dataclass(frozen=True)
class JobResult:
    """The outcome of one job.

    Attributes:
        job_id: The request's id.
        kind: The job kind.
        status: ``ok``, ``failed`` or ``cancelled``.
        summary: One line (the error message when failed).
        outputs: Paths written (empty unless ``ok``).
        data: JSON-able figures and tables, as documented per kind.
        error: The error message, if not ok.
        error_title: A short heading for the error (the exception's ``title``).
        seconds: Wall time of the job.
        error_kind: One of :data:`ERROR_KINDS` when not ok.
        error_type: The exception's class name, when not ok.
        traceback: The formatted traceback of an unexpected error (for ``--debug``).
    """

    job_id: str
    kind: str
    status: str
    summary: str = ""
    outputs: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    error_title: str | None = None
    seconds: float = 0.0
    error_kind: str | None = None
    error_type: str | None = None
    traceback: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (what ``--batch --json`` prints)."""
        d = asdict(self)
        d["data"] = to_jsonable(self.data)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> JobResult:
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_exception(cls, req: JobRequest, exc: BaseException, seconds: float = 0.0) -> JobResult:
        """A failed/cancelled result describing ``exc``."""
        kind = classify_error(exc)
        title = getattr(exc, "title", None) or ("Invalid input" if kind == "input" else "Job failed")
        msg = str(exc) or exc.__class__.__name__
        if isinstance(exc, KeyError) and not isinstance(exc, VloraError):
            msg = f"missing key {msg}"
        trace = None if kind == "cancelled" else "".join(tb_mod.format_exception(exc))
        return cls(
            job_id=req.job_id,
            kind=req.kind,
            status="cancelled" if kind == "cancelled" else "failed",
            summary=msg,
            error=msg,
            error_title=title,
            seconds=seconds,
            error_kind=kind,
            error_type=exc.__class__.__name__,
            traceback=trace,
        )


def classify_error(exc: BaseException) -> str:
    """Class an exception into one of :data:`ERROR_KINDS` (``crash`` is the runners' own)."""
    if isinstance(exc, (JobCancelled, KeyboardInterrupt)):
        return "cancelled"
    if isinstance(exc, _INPUT_ERRORS):
        return "input"
    return "error"


def to_jsonable(obj: Any) -> Any:
    """Convert ``obj`` into plain JSON types.

    Tensors and arrays become lists, paths strings, objects with ``to_dict()`` their
    dict, dataclasses dicts; non-finite floats become ``None`` (JSON has no NaN).
    """
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj, key=str) if isinstance(obj, (set, frozenset)) else obj
        return [to_jsonable(v) for v in items]
    to_dict = getattr(obj, "to_dict", None)
    if callable(to_dict):
        return to_jsonable(to_dict())
    if is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(asdict(obj))
    tolist = getattr(obj, "tolist", None)  # torch tensors, numpy arrays and scalars
    if callable(tolist):
        return to_jsonable(tolist())
    item = getattr(obj, "item", None)
    if callable(item):
        return to_jsonable(item())
    return str(obj)


# -- the kinds registry ---------------------------------------------------------

_KINDS: dict[str, JobKind] = {}


def register_kind(kind: JobKind) -> JobKind:
    """Add ``kind`` to the registry (the kinds module calls this at import)."""
    _KINDS[kind.name] = kind
    return kind


def job_kinds() -> dict[str, JobKind]:
    """Every job kind by name, in menu order. Torch-free."""
    from . import kinds as _kinds

    _kinds.ensure_registered()
    return dict(_KINDS)


def get_kind(name: str) -> JobKind:
    """One kind; ``ValueError`` listing the known ones if ``name`` is not a kind."""
    found = job_kinds()
    if name not in found:
        raise ValueError(f"unknown job kind {name!r}; choose from {', '.join(found)}")
    return found[name]


def validate_request(req: JobRequest) -> dict[str, Any]:
    """Check and coerce ``req.params`` against its kind's parameters.

    Returns a dict with every parameter of the kind (defaults filled in).

    Raises:
        ValueError: unknown kind, unknown parameter, or a bad/missing value (naming it).
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


class StagedProgress:
    """Map progress of successive stages onto one bar of :attr:`TOTAL` steps.

    ``stages`` gives each stage a weight; ``stage(name)`` returns a progress
    function for that stage's own ``step/total``.
    """

    TOTAL = 1000

    def __init__(self, progress: ProgressFn | None, stages: Mapping[str, float]) -> None:
        self.progress = progress
        total = sum(stages.values()) or 1.0
        self.start: dict[str, float] = {}
        self.width: dict[str, float] = {}
        acc = 0.0
        for name, w in stages.items():
            self.start[name] = acc / total
            self.width[name] = w / total
            acc += w

    def stage(self, name: str) -> ProgressFn | None:
        """A progress function for stage ``name`` (``None`` when there is no callback)."""
        if self.progress is None:
            return None
        start, width, outer = self.start[name], self.width[name], self.progress

        def fn(p: Progress) -> None:
            frac = start + width * p.fraction
            outer(Progress(int(round(frac * self.TOTAL)), self.TOTAL, p.message))

        return fn

    def done(self, message: str = "done") -> None:
        if self.progress is not None:
            self.progress(Progress(self.TOTAL, self.TOTAL, message))
