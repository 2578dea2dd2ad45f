"""The ``train`` and ``compare`` jobs in the TUI: the form from the palette with the subspace prefilled,
the loss plotted as the job runs, the results on the Subspace screen."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tui_helpers import SIZE, make_app, wait_jobs

from vlora_tui.config import tildify
from vlora_tui.dialogs.job_form import JobFormScreen
from vlora_tui.widgets.plots import DataPlot


@pytest.fixture(scope="module")
def setup(tmp_path_factory, peft_family_dirs) -> dict[str, Path]:
    from engine import SharedSubspace, load_adapter
    from peft_factory import save_tiny_base

    root = tmp_path_factory.mktemp("tui_train")
    dirs = list(peft_family_dirs[:2])
    ads = [load_adapter(d) for d in dirs]
    SharedSubspace.from_adapters(ads, [d.name for d in dirs], method="joint", max_error=0.0, dtype="float32").save(root / "sub")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": "a" * n}) + "\n" for n in (12, 9, 10)), encoding="utf-8")
    return {"base": save_tiny_base(root / "base"), "sub": root / "sub", "data": data, "adapters": dirs}


async def test_train_form_from_the_palette_runs_with_a_loss_plot(fixed_demo: Path, tmp_path: Path, setup) -> None:
    app = make_app(fixed_demo, tmp_path, path=setup["sub"])  # opens the subspace (an info job)
    async with app.run_test(size=SIZE) as pilot:
        await wait_jobs(app, pilot)
        await pilot.press("4")
        await pilot.press("ctrl+p")
        await pilot.press(*"train task")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await pilot.pause(0.3)
        assert isinstance(app.screen, JobFormScreen) and app.screen.kind.name == "train"
        form = app.screen
        assert form.query_one("#param-subspace").value == tildify(str(setup["sub"]))
        for name, value in (("task_id", "new"), ("base_model", str(setup["base"])), ("data", str(setup["data"])),
                            ("steps", "6"), ("lr", "0.05")):
            form.query_one(f"#param-{name}").value = value
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert not isinstance(app.screen, JobFormScreen), str(form.query_one("#form-error").render())
        job = next(j for j in app.jobs if j.kind == "train")
        await wait_jobs(app, pilot)
        assert job.status == "done", job.error
        assert [s for s, _ in job.values] == [1, 2, 3, 4, 5, 6]  # every step's loss reached the app
        assert [v for _, v in job.values] == job.result.data["losses"]
        # the result opens on the Subspace screen: the written subspace, with the new task
        assert app.current_mode == "subspace" and app.subspace_path == job.result.outputs[0]
        assert "new" in [t["task_id"] for t in app.subspace_info["tasks"]]
        # under the ΔW fidelity: the held-out figures before → after training
        from textual.widgets import DataTable, Label

        ev = job.result.data["eval"]
        table = app.screen.query_one("#compare", DataTable)
        assert table.display and table.row_count == 1  # a causal LM: loss only
        assert [str(c) for c in table.get_row("loss")] == [
            "loss per predicted token", f"{ev['before']['loss']:.4g}", f"{ev['after']['loss']:.4g}"]
        assert "held out (1 examples), before → after" in str(app.screen.query_one("#compare-title", Label).render())
        await pilot.press("5")
        await pilot.pause(0.2)
        jobs = app.screen
        jobs.query_one("#queue").move_cursor(row=app.jobs.index(job))
        await pilot.pause(0.2)
        assert jobs.query_one("#job-plot", DataPlot).display
        # a job without measured values hides the plot
        jobs.query_one("#queue").move_cursor(row=0)
        await pilot.pause(0.2)
        assert not jobs.query_one("#job-plot", DataPlot).display


async def test_compare_result_is_a_table_on_the_subspace_screen(fixed_demo: Path, tmp_path: Path, setup) -> None:
    from textual.widgets import DataTable

    app = make_app(fixed_demo, tmp_path, path=setup["sub"])
    async with app.run_test(size=SIZE) as pilot:
        await wait_jobs(app, pilot)
        await pilot.press("4")
        assert not app.screen.query_one("#compare", DataTable).display
        await pilot.press("c")
        await pilot.pause(0.3)
        assert isinstance(app.screen, JobFormScreen) and app.screen.kind.name == "compare"
        form = app.screen
        assert form.query_one("#param-subspace").value == tildify(str(setup["sub"]))
        form.query_one("#param-adapters").value = " ".join(str(d) for d in setup["adapters"])
        form.query_one("#param-base_model").value = str(setup["base"])
        await pilot.press("ctrl+s")
        await pilot.pause()
        await wait_jobs(app, pilot)
        job = next(j for j in app.jobs if j.kind == "compare")
        assert job.status == "done", job.error
        assert app.current_mode == "subspace"
        table = app.screen.query_one("#compare", DataTable)
        assert table.display and table.row_count == 2
        assert [str(table.get_cell_at((i, 3))) for i in range(2)] == ["1.000", "1.000"]  # top-1 agreement
