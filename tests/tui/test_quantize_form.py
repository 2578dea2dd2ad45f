"""The quantize form offers a fixed --bits or an error target, and never guesses the original adapters."""

from __future__ import annotations

from pathlib import Path

from vlora_tui.dialogs.job_form import JobFormScreen

from tui_helpers import SIZE, make_app


async def test_quantize_form_offers_max_and_mean_error(fixed_demo: Path, tmp_path: Path) -> None:
    app = make_app(fixed_demo, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        assert app.collection, "the working collection is not empty: the form must still leave adapters blank"
        app.action_new_job("quantize")
        await pilot.pause()
        assert isinstance(app.screen, JobFormScreen)
        for name in ("bits", "max_error", "mean_error", "adapters"):
            app.screen.query_one(f"#param-{name}")
        assert not app.screen.query_one("#param-adapters").value
