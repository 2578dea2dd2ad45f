"""The compress form checks its parameters with the engine's BuildParams before queuing a job (issue #16)."""

from __future__ import annotations

from pathlib import Path

from textual.widgets import Static

from vlora_tui.dialogs.job_form import JobFormScreen

from tui_helpers import SIZE, make_app


class NeverRuns:
    def run(self, req, *, progress=None, cancel=None):  # pragma: no cover - the form must refuse first
        raise AssertionError("a refused form started a job")


async def test_compress_form_names_parameters_that_do_not_go_together(fixed_demo: Path, tmp_path: Path) -> None:
    app = make_app(fixed_demo, tmp_path / "out", runner_factory=lambda kind: NeverRuns())
    async with app.run_test(size=SIZE) as pilot:
        app.action_new_job("compress", {"precision": "auto", "dtype": "float32"})
        await pilot.pause()
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert isinstance(app.screen, JobFormScreen) and not app.jobs
        text = str(app.screen.query_one("#form-error", Static).render())
        assert text.startswith("✗ precision: 'auto' stores unquantised tensors at float16"), text
