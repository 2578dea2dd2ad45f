"""The command palette's provider: every action that fits the app's current state."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, cast

from textual.command import DiscoveryHit, Hit, Hits, Provider

if TYPE_CHECKING:  # pragma: no cover
    from .app import VloraApp

#: Screens by mode name, with their titles.
SCREENS = (
    ("browser", "Browser", "Adapter folders, the HF cache and Hub search"),
    ("adapter", "Adapter detail", "Config, modules, shapes and norms of one adapter"),
    ("collection", "Collection", "Similarity heatmap, clusters and outliers, diff"),
    ("subspace", "Subspace", "Variance explained, per-task fidelity, compression stats"),
    ("jobs", "Jobs", "Queue, progress, log, cancel, results"),
)


class VloraCommands(Provider):
    """Offers screens, jobs and the current screen's own keys, filtered by what is possible now."""

    def _commands(self) -> list[tuple[str, str, Callable[[], Any]]]:
        app = cast("VloraApp", self.app)
        out: list[tuple[str, str, Callable[[], Any]]] = []
        for mode, title, help_text in SCREENS:
            if app.current_mode != mode:
                out.append((f"Go to {title}", help_text, partial(app.switch_mode, mode)))
        out.append(("Open the demo collection", "Build (once) and open the built-in demo adapters", app.open_demo))
        out.append(("Open a subspace folder…", "Show a saved subspace (info job)", app.action_open_subspace_prompt))
        n = len(app.collection)
        if n:
            out.append(("Clear the working collection", f"Remove all {n} adapters from the collection", app.clear_collection))
        if n >= 2:
            out.append(("Analyze the collection", f"Similarity, clusters and outliers of {n} adapters", app.action_analyze))
        for kind in app.form_kinds():  # each kind says whether it is a form, and where (JobKind.form_rank)
            if app.form_fits(kind.name):
                out.append((f"New job: {kind.title}…", kind.help, partial(app.action_new_job, kind.name)))
        waiting = [a for a in app.offered if a not in app.collection]
        if waiting:
            from engine.io.scan import spec_name

            out.append(("Add written adapters to the collection", "Exports/merges not in the collection: "
                        + ", ".join(spec_name(a) for a in waiting), app.action_add_offered))
        running = app.running_job
        if running is not None:
            out.append((f"Cancel job: {running.title}", "Stop the running job", app.action_cancel_job))
        # the keys of the screen the palette was opened on, so every action is reachable here too
        seen = {text for text, _, _ in out}
        for _key, active in self.screen.active_bindings.items():
            binding = active.binding
            if not active.enabled or not binding.description or active.node is app:
                continue
            text = f"{binding.description} ({_key})"
            if binding.description in seen or text in seen:
                continue
            seen.add(text)
            out.append((text, binding.tooltip or binding.description, partial(app.call_later, app.run_action, binding.action, active.node)))
        return out

    async def discover(self) -> Hits:
        for text, help_text, command in self._commands():
            yield DiscoveryHit(text, command, help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for text, help_text, command in self._commands():
            score = matcher.match(text)
            if score > 0:
                yield Hit(score, matcher.highlight(text), command, help=help_text)
