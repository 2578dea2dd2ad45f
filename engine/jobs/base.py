"""Job specs and results: what a job kind is, a request, a result, how errors are classed.

Torch-free. The kinds themselves live in :mod:`engine.jobs.kinds` (one module each),
the list of them and the running in :mod:`engine.jobs.catalog`.
"""

from __future__ import annotations

import math
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
        positionals: Parameters ``--batch`` takes as positional arguments, in order.
        process: Run in a child process in the TUI (a crash there cannot take the UI down).
        min_adapters: How many adapters of the working collection a form of it needs.
        needs: What else the form needs from the TUI's state: ``""`` (nothing beyond
            ``min_adapters``), ``"adapter"`` (a current adapter), ``"subspace"`` (an open
            subspace) or ``"adapters|subspace"`` (``min_adapters`` adapters, or an open subspace).
        form_rank: Place in the palette's and the job picker's list of forms
            (``None``: not offered as a form).
        view: The TUI's view of a finished job's result (a name in
            ``vlora_tui.results.VIEWS``); ``None``: a toast with the summary only.
        stderr_warnings: ``--batch`` prints the result's ``data["warnings"]`` on stderr.
        check: Checks the parameters together, after each was checked alone (``check(params)``,
            ``ValueError`` naming the parameter); torch-free, so the TUI's form and ``--batch``
            refuse bad input before any work (``compress``: its ``BuildParams``).
        result: The kind's result class (an :class:`engine.jobs.results.Result`, next to its function):
            ``result.from_dict(data)`` gives a finished job's data back typed (:meth:`JobResult.typed`);
            ``None``: the data stays a dict.
    """

    name: str
    title: str
    help: str
    params: tuple[Param, ...] = ()
    writes: tuple[str, ...] = ()
    modifies: tuple[str, ...] = ()
    func: JobFunc | None = field(default=None, compare=False, repr=False)
    positionals: tuple[str, ...] = ()
    process: bool = False
    min_adapters: int = 0
    needs: str = ""
    form_rank: int | None = None
    view: str | None = None
    stderr_warnings: bool = False
    check: Callable[[dict[str, Any]], None] | None = field(default=None, compare=False, repr=False)
    result: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        names = [p.name for p in self.params]
        unknown = [n for n in (*self.positionals, *self.writes, *self.modifies) if n not in names]
        if unknown:
            raise ValueError(f"JobKind {self.name!r}: {', '.join(unknown)} named but not among its parameters")
        if self.needs not in ("", "adapter", "subspace", "adapters|subspace"):
            raise ValueError(f"JobKind {self.name!r}: needs={self.needs!r} is not one of '', adapter, subspace, adapters|subspace")

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

    def typed(self) -> Any:
        """``data`` as the kind's result dataclass (``JobKind.result``); the dict itself for a kind without one."""
        from .catalog import typed_data

        return typed_data(self.kind, self.data)

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
