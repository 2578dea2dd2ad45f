"""The app's job forms: which fit the current state, their defaults, fresh output names, the overwrite question.

:class:`FormsMixin` is mixed into :class:`~vlora_tui.app.VloraApp`; it reads the app's
state (collection, current adapter, open subspace) and each kind's own description
(``JobKind.form_rank``, ``min_adapters``, ``needs``, ``writes``).
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any


class FormsMixin:
    """Forms of the job kinds, for :class:`~vlora_tui.app.VloraApp`."""

    collection: list[str]
    current_adapter: str | None
    subspace_path: str | None
    config: Any
    jobs: list[Any]
    job_kinds: Any
    notify: Any
    push_screen: Any
    submit_job: Any

    def form_fits(self, kind: str) -> bool:
        """Whether the form of ``kind`` is offered and has what it needs in the current state (``JobKind.needs``)."""
        job_kind = self.job_kinds().get(kind)
        if job_kind is None or job_kind.form_rank is None:
            return False
        enough = len(self.collection) >= job_kind.min_adapters
        if job_kind.needs == "adapter":
            return self.current_adapter is not None
        if job_kind.needs == "subspace":
            return self.subspace_path is not None
        if job_kind.needs == "adapters|subspace":
            return enough or self.subspace_path is not None
        return enough

    def form_kinds(self) -> list[Any]:
        """The kinds offered as forms (palette, job picker), in their ``form_rank`` order."""
        try:
            kinds = self.job_kinds()
        except Exception:  # the job layer failed to import: offer the rest
            return []
        return sorted((k for k in kinds.values() if k.form_rank is not None), key=lambda k: k.form_rank)

    def default_params(self, kind: str, values: dict[str, Any] | None = None) -> dict[str, Any]:
        """Form values for ``kind`` from the current state, overridden by ``values``."""
        kinds = self.job_kinds()
        names = {p.name for p in kinds[kind].params} if kind in kinds else set()
        out: dict[str, Any] = {}
        guesses: dict[str, Any] = {
            "adapters": list(self.collection),
            "adapter": self.current_adapter,
            "path": self.subspace_path,
            "subspace": self.subspace_path,
            "a": self.collection[0] if self.collection else None,
            "b": self.collection[1] if len(self.collection) > 1 else None,
        }
        for name, value in guesses.items():
            if name in names and value:
                out[name] = value
        if "base_model" in names and kinds[kind].param("base_model").type == "path":
            used = [j.request.params.get("base_model") for j in self.jobs
                    if j.kind in ("compare", "train") and j.request.params.get("base_model")]
            if used:  # the folder of the last compare/train: the model a subspace serves rarely changes
                out["base_model"] = str(used[-1])
        if "output" in names:
            out["output"] = self.unique_output(kind)
        for name, value in (values or {}).items():
            if name in names and value not in (None, "", []):
                out[name] = value
        if kind in ("export", "merge") and "subspace" in out and "adapters" in out and "subspace" in (values or {}):
            out.pop("adapters")
        if kind == "quantize" and "adapters" not in (values or {}):
            out.pop("adapters", None)  # the originals of a subspace's tasks: given, never guessed from the collection
        return out

    def unique_output(self, stem: str, parent: str | Path | None = None) -> str:
        """A fresh output folder: ``parent/stem-YYYYMMDD-HHMMSS`` (``-2``, ``-3``… if taken).

        ``parent`` defaults to ``output_dir``. Taken means it exists on disk or a job of this
        session already writes there, so a new session never collides with an earlier one's outputs.
        """
        stem = re.sub(r"-\d{8}-\d{6}(-\d+)?$", "", stem)  # renaming a stamped name: one stamp, not two
        stem = re.sub(r"[^\w.+-]+", "_", stem).strip("_") or "output"
        folder = Path(parent) if parent is not None else self.config.output_dir
        base = f"{stem}-{self.config.output_stamp or time.strftime('%Y%m%d-%H%M%S')}"
        taken = {str(v) for j in self.jobs for v in j.request.params.values() if isinstance(v, (str, Path))}
        candidate, n = folder / base, 2
        while candidate.exists() or str(candidate) in taken:
            candidate, n = folder / f"{base}-{n}", n + 1
        return str(candidate)

    def existing_outputs(self, kind: str, params: dict[str, Any]) -> list[str]:
        """The output parameters of ``params`` whose path exists already (``force`` not set)."""
        job_kind = self.job_kinds().get(kind)
        if job_kind is None or params.get("force"):
            return []
        return [name for name in getattr(job_kind, "writes", ()) if params.get(name) and Path(str(params[name])).exists()]

    def queue_job(self, kind: str, params: dict[str, Any], *, title: str | None = None) -> None:
        """Queue a job; if an output exists, first ask whether to overwrite it or write under a new name."""
        clash = self.existing_outputs(kind, params)
        if not clash:
            self.submit_job(kind, params, title=title)
            return
        from .dialogs.overwrite import OverwriteScreen

        name = clash[0]
        path = Path(str(params[name]))
        can_force = "force" in {p.name for p in self.job_kinds()[kind].params}
        suggestion = self.unique_output(path.name, path.parent)  # next to the folder the user chose

        def chosen(answer: str | None) -> None:
            if answer == "overwrite":
                self.queue_job(kind, {**params, "force": True}, title=title)
            elif answer == "rename":
                self.queue_job(kind, {**params, name: suggestion}, title=title)

        self.push_screen(OverwriteScreen(str(path), suggestion, can_overwrite=can_force), chosen)

    def action_new_job(self, kind: str, values: dict[str, Any] | None = None) -> None:
        """Open the form of ``kind`` (prefilled from the state) and queue the job it returns."""
        from .dialogs.job_form import JobFormScreen

        kinds = self.job_kinds()
        if kind not in kinds:
            self.notify(f"No job kind {kind!r} in this engine", title="New job", severity="error")
            return

        def submitted(params: dict | None) -> None:
            if params is not None:
                self.queue_job(kind, params)

        self.push_screen(JobFormScreen(kinds[kind], self.default_params(kind, values)), submitted)

    def action_pick_job(self) -> None:
        """Pick a job kind, then fill in its form."""
        from .dialogs.job_picker import JobPickerScreen

        offered = self.form_kinds()

        def picked(kind: str | None) -> None:
            if kind:
                self.action_new_job(kind)

        self.push_screen(JobPickerScreen(offered), picked)
