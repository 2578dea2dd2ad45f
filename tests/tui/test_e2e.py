"""THE end-to-end flow, keyboard only: demo → heatmap → compress → fidelity → export one task → merge two."""

from __future__ import annotations

from pathlib import Path

from textual.widgets import DataTable

from engine.io.scan import is_adapter_dir, is_subspace_dir
from vlora_tui.dialogs.job_form import JobFormScreen
from vlora_tui.widgets.heatmap import SimilarityHeatmap

from tui_helpers import SIZE, make_app, wait_jobs


async def test_demo_to_export_and_merge_by_keyboard(fixed_demo: Path, tmp_path: Path) -> None:
    from vlora_tui.config import PROCESS_KINDS

    # compress runs in a child process exactly as in the real app
    app = make_app(fixed_demo, tmp_path, demo=True, process_kinds=frozenset({"compress"}))
    assert "compress" in PROCESS_KINDS
    async with app.run_test(size=SIZE) as pilot:
        await wait_jobs(app, pilot)  # the demo opens and is analyzed
        assert app.current_mode == "collection" and len(app.collection) == 14
        heat = app.screen.query_one(SimilarityHeatmap)
        assert len(heat.labels) == 14

        # find two similar adapters on the heatmap, then diff them
        await pilot.press("n")
        i, j = heat.pair_at_cursor()
        first, second = heat.labels[i], heat.labels[j]
        assert first.split("-")[0] == second.split("-")[0]  # same family
        assert heat.matrix[i][j] > 0.5
        await pilot.press("d")
        await wait_jobs(app, pilot)
        assert app.diff["overall"]["cosine"] > 0.5

        # compress the collection (form, k=24)
        await pilot.press("c")
        await pilot.pause()
        assert isinstance(app.screen, JobFormScreen)
        app.screen.query_one("#param-num_components").value = "24"
        await pilot.press("ctrl+s")
        await wait_jobs(app, pilot)  # compress (child process), then info on its output
        compress = next(j for j in app.jobs if j.kind == "compress")
        assert compress.status == "done", compress.error
        assert is_subspace_dir(compress.result.outputs[0])
        assert app.current_mode == "subspace"

        # per-task fidelity
        table = app.screen.query_one("#fidelity", DataTable)
        assert table.row_count == 14
        tasks = [t["task_id"] for t in app.subspace_info["tasks"]]
        assert all(0.0 <= t["mean_error"] < 1.0 for t in app.subspace_info["tasks"])

        # export the highlighted task (the first) as a PEFT adapter
        await pilot.press("e")
        await pilot.pause()
        assert isinstance(app.screen, JobFormScreen)
        assert app.screen.query_one("#param-task_id").value == tasks[0]
        await pilot.press("ctrl+s")
        await wait_jobs(app, pilot)
        export = next(j for j in app.jobs if j.kind == "export")
        assert export.status == "done", export.error
        assert is_adapter_dir(export.result.outputs[0])
        # offered for the collection, never added unasked: a later compress still takes the 14
        assert app.current_mode == "subspace" and app.offered == [export.result.outputs[0]]
        assert len(app.collection) == 14

        # merge two tasks: mark the two similar ones in the fidelity table, m, start
        await pilot.press("4")
        table = app.screen.query_one("#fidelity", DataTable)
        table.focus()
        for name in (first, second):
            table.move_cursor(row=tasks.index(name))
            await pilot.press("space")
        await pilot.press("m")
        await pilot.pause()
        assert isinstance(app.screen, JobFormScreen)
        await pilot.press("ctrl+s")
        await wait_jobs(app, pilot)
        merge = next(j for j in app.jobs if j.kind == "merge")
        assert merge.status == "done", merge.error
        assert is_adapter_dir(merge.result.outputs[0])
        assert merge.result.data["inputs"] == [first, second]
        assert app.offered == [export.result.outputs[0], merge.result.outputs[0]] and len(app.collection) == 14
        assert all(j.status == "done" for j in app.jobs)
