"""The ``demo`` job kind: write the built-in demo collection of adapters."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...progress import CancelLike, ProgressFn
from ..base import JobKind, JobOutput
from ..params import FORCE, output_param
from ..results import Result


@dataclass(frozen=True)
class DemoResult(Result):
    """``demo``: the folder written, each adapter's folder, and the task families."""

    path: str = ""
    adapters: list[str] = field(default_factory=list)
    families: dict[str, list[str]] = field(default_factory=dict)


def run_demo(params: dict[str, Any], *, progress: ProgressFn | None = None, cancel: CancelLike | None = None) -> JobOutput:
    """Write the built-in demo collection (one PEFT folder per task).

    data: ``{"path": str, "adapters": [str, …], "families": {family: [task, …]}}``
    """
    from ...demo import DEMO_FAMILIES, make_demo_collection
    from ...io.local import atomic_dir

    out = Path(params["output"])
    with atomic_dir(out, force=params["force"]) as tmp:  # the whole collection appears at once, or not at all
        written = make_demo_collection(tmp, force=True, progress=progress, cancel=cancel)
    paths = [out / p.name for p in written]
    return JobOutput(
        summary=f"wrote {len(paths)} demo adapters to {out}",
        outputs=[str(out)],
        data=DemoResult(str(out), [str(p) for p in paths], {f: list(t) for f, t in DEMO_FAMILIES.items()}).to_dict(),
    )


KIND = JobKind(
    "demo", "Demo collection", "write the built-in demo collection of adapters",
    (output_param("folder to write the demo adapters into"), FORCE), writes=("output",), func=run_demo,
    view="demo", result=DemoResult,
)
