"""The TUI's views of finished jobs, by name: a job kind names its view (``JobKind.view``).

A view stores a finished job's data where a screen looks for it and says which screen
to switch to. A new job kind reuses a view, or adds one function decorated
``@view("name")`` here. Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .app import JobRecord, VloraApp


@dataclass(frozen=True)
class View:
    """One result view.

    Attributes:
        name: What ``JobKind.view`` names.
        show: ``show(app, job) -> mode``: stores the result, returns the screen to switch to (or ``None``).
        shows: The view shows the result itself, so no "finished" toast is needed over it.
        on_failure: Also shown for a failed job that has data (``validate``'s report).
    """

    name: str
    show: Callable[[VloraApp, JobRecord], str | None]
    shows: bool = True
    on_failure: bool = False


#: Views by name (filled by :func:`view`).
VIEWS: dict[str, View] = {}


def view(name: str, *, shows: bool = True, on_failure: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register the decorated ``fn(app, job) -> mode | None`` as the view ``name``."""

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        VIEWS[name] = View(name, fn, shows, on_failure)
        return fn

    return register


def view_of(app: VloraApp, kind: str) -> View | None:
    """The view of job kind ``kind`` (``None``: the kind has none, or is unknown)."""
    try:
        job_kind = app.job_kinds().get(kind)
    except Exception:  # the job layer failed to import
        return None
    return VIEWS.get(job_kind.view) if job_kind is not None and job_kind.view else None


def _data(job: JobRecord) -> dict[str, Any]:
    return dict(getattr(job.result, "data", None) or {})


def _outputs(job: JobRecord) -> list[str]:
    return [str(o) for o in (getattr(job.result, "outputs", None) or [])]


def _first(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return value[0] if value else None
    return value


@view("demo")
def _demo(app: VloraApp, job: JobRecord) -> str | None:
    from engine.jobs.kinds.demo import DemoResult

    app._demo_ready(DemoResult.from_dict(_data(job)).adapters or [str(s) for s in _outputs(job)])
    return None


@view("inspect")
def _inspect(app: VloraApp, job: JobRecord) -> str | None:
    params = job.request.params
    app.inspections[str(_first(params.get("adapter") or params.get("path")))] = _data(job)
    app.state_signal.publish("inspect")
    return "adapter"


@view("validate", on_failure=True)
def _validate(app: VloraApp, job: JobRecord) -> str | None:
    params = job.request.params
    app.validations[str(_first(params.get("adapter") or params.get("path") or params.get("adapters")))] = _data(job)
    app.state_signal.publish("inspect")
    return "adapter"


@view("analysis")
def _analysis(app: VloraApp, job: JobRecord) -> str | None:
    """The ``analyze`` job: its result, with each adapter's folder (``paths``, for diff), on the collection screen."""
    from dataclasses import replace

    from engine.jobs.kinds.analyze import AnalyzeResult

    result = AnalyzeResult.from_dict(_data(job))
    specs = [str(x) for x in job.request.params.get("adapters") or []]
    if len(specs) == len(result.names):
        paths = specs
    else:  # a parent folder was given: name → folder
        from engine.io.scan import expand_adapter_specs

        try:
            paths = [s.label for s in expand_adapter_specs(specs)]
        except Exception:
            paths = []
    app.analysis = replace(result, paths=paths).to_dict()
    app.state_signal.publish("analysis")
    return "collection"


@view("diff")
def _diff(app: VloraApp, job: JobRecord) -> str | None:
    app.diff = _data(job)
    app.state_signal.publish("diff")
    return "collection"


@view("subspace_info")
def _subspace_info(app: VloraApp, job: JobRecord) -> str | None:
    app.subspace_path = str(job.request.params.get("path"))
    app.subspace_info = _data(job)
    app.state_signal.publish("subspace")
    return "subspace"


@view("subspace_written")
def _subspace_written(app: VloraApp, job: JobRecord) -> str | None:
    """A job that wrote a subspace: open it (an ``info`` job) in the subspace screen."""
    outputs = _outputs(job)
    out = outputs[0] if outputs else _data(job).get("output")
    if out:
        app.open_subspace(str(out), switch=job.open_result)
    return None


@view("trained")
def _trained(app: VloraApp, job: JobRecord) -> str | None:
    """The ``train`` job: open the written subspace, with the held-out before → after table under its fidelity."""
    from engine.jobs.kinds.train import TrainResult

    result = TrainResult.from_dict(_data(job))
    outputs = _outputs(job)
    out = outputs[0] if outputs else result.path
    if result.eval and out:
        app.comparison = {"mode": "train", "subspace": str(out), "task_id": result.task_id,
                          "task_type": result.task_type, **result.eval.to_dict()}
    return _subspace_written(app, job)


@view("adapters_written", shows=False)
def _adapters_written(app: VloraApp, job: JobRecord) -> str | None:
    """A job that wrote adapters: offer them for the collection (never added unasked)."""
    from engine.io.scan import is_adapter_dir

    app.offer_outputs([o for o in _outputs(job) if is_adapter_dir(o)])
    return None


@view("compare")
def _compare(app: VloraApp, job: JobRecord) -> str | None:
    """Output fidelity per task: a table on the subspace screen (under the ΔW fidelity)."""
    from engine.jobs.kinds.compare import Compared

    result = Compared.from_dict(_data(job))
    app.comparison = result.to_dict()
    if result.subspace and str(result.subspace) != str(app.subspace_path):
        app.open_subspace(str(result.subspace), switch=False)  # its info job publishes "subspace" again
    app.state_signal.publish("subspace")
    return "subspace"
