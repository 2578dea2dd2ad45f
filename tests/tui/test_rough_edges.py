"""Pilot tests for the rough edges found by driving the app by keyboard at 120×36 (issue #15)."""

from __future__ import annotations

import math
import re
import shutil
import threading
from pathlib import Path

from rich.console import Console
from textual.widgets import DataTable, SelectionList, Static

from engine.errors import OutputExistsError
from engine.jobs import JobResult
from vlora_tui.dialogs.job_form import JobFormScreen
from vlora_tui.dialogs.overwrite import OverwriteScreen
from vlora_tui.screens.help import HelpScreen

from tui_helpers import SIZE, make_app, wait_jobs

STAMP = re.compile(r"-\d{8}-\d{6}(-\d+)?$")


class RecordingRunner:
    """Records each request and reports success with the outputs the request names."""

    def __init__(self, outputs: dict[str, list[str]] | None = None) -> None:
        self.requests: list = []
        self.outputs = outputs or {}

    def run(self, req, *, progress=None, cancel=None):
        self.requests.append(req)
        return JobResult(req.job_id, req.kind, "ok", f"{req.kind} done", outputs=list(self.outputs.get(req.kind, [])))


class GateRunner:
    """Each job waits until ``gate`` is set (or it is cancelled)."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.started = threading.Event()

    def run(self, req, *, progress=None, cancel=None):
        self.started.set()
        while not self.gate.wait(0.01):
            if cancel is not None and cancel.is_set():
                return JobResult(req.job_id, req.kind, "cancelled", "cancelled", error="cancelled", error_title="Cancelled")
        return JobResult(req.job_id, req.kind, "ok", "done")


async def started(gate: GateRunner, pilot) -> None:
    """Wait (letting the app run) until a gated job has started."""
    for _ in range(200):
        if gate.started.is_set():
            return
        await pilot.pause(0.05)
    raise AssertionError("the job did not start")


# -- 8: unique output names, an overwrite/rename dialog, no CLI advice -------------------------------


async def test_outputs_get_unique_timestamped_names(fixed_demo: Path, tmp_path: Path) -> None:
    runner = RecordingRunner()
    app = make_app(fixed_demo, tmp_path, runner_factory=lambda kind: runner)
    async with app.run_test(size=SIZE) as pilot:
        # an earlier session left compress-1 behind: a new name never collides with it
        (tmp_path / "compress-1").mkdir()
        first = app.default_params("compress")["output"]
        assert STAMP.search(first) and Path(first).parent == tmp_path and not Path(first).exists()
        Path(first).mkdir()  # the same second, but taken now
        second = app.default_params("compress")["output"]
        assert second != first and STAMP.search(second) and not Path(second).exists()
        app.config.output_stamp = None  # the clock's stamp (tests fix it so forms look the same every run)
        assert re.fullmatch(r"compress-\d{8}-\d{6}", Path(app.default_params("compress")["output"]).name)
        # a queued job's output is taken too, before it exists on disk
        app.submit_job("compress", {"adapters": list(app.collection), "output": second})
        await wait_jobs(app, pilot)
        assert app.default_params("compress")["output"] not in (first, second)
        # the form's default starts without any dialog
        app.action_new_job("compress")
        await pilot.pause()
        assert isinstance(app.screen, JobFormScreen)
        await pilot.press("ctrl+s")
        await wait_jobs(app, pilot)
        assert not isinstance(app.screen, OverwriteScreen)
        assert app.jobs[-1].status == "done" and STAMP.search(str(runner.requests[-1].params["output"]))


async def test_existing_output_offers_new_name_or_overwrite(fixed_demo: Path, tmp_path: Path) -> None:
    runner = RecordingRunner()
    app = make_app(fixed_demo, tmp_path / "out", runner_factory=lambda kind: runner)
    taken = tmp_path / "elsewhere" / "mine"
    taken.mkdir(parents=True)
    async with app.run_test(size=SIZE) as pilot:
        for key in ("r", "o", "escape"):
            app.action_new_job("compress", {"output": str(taken)})
            await pilot.pause()
            await pilot.press("ctrl+s")
            await pilot.pause()
            assert isinstance(app.screen, OverwriteScreen), key
            assert str(taken) in str(app.screen.query_one("#overwrite-path", Static).render())
            n = len(app.jobs)
            await pilot.press(key)
            await wait_jobs(app, pilot)
            assert not isinstance(app.screen, OverwriteScreen)
            if key == "escape":
                assert len(app.jobs) == n  # cancelled: nothing queued
                continue
            params = runner.requests[-1].params
            if key == "r":
                # a new name next to the folder the user chose
                assert Path(params["output"]).parent == taken.parent and STAMP.search(params["output"])
                assert Path(params["output"]).name.startswith("mine-") and not Path(params["output"]).exists()
                assert params["output"] != str(taken) and not params.get("force")
            else:
                assert params["output"] == str(taken) and params["force"] is True


async def test_output_exists_error_shows_no_cli_advice(fixed_demo: Path, tmp_path: Path) -> None:
    class Exists:
        def run(self, req, *, progress=None, cancel=None):
            raise OutputExistsError(f"{req.params['output']}: already exists (use --force / force=True to overwrite)")

    app = make_app(fixed_demo, tmp_path, runner_factory=lambda kind: Exists())
    async with app.run_test(size=SIZE) as pilot:
        app.submit_job("compress", {"adapters": list(app.collection), "output": str(tmp_path / "x")})
        await wait_jobs(app, pilot)
        job = app.jobs[-1]
        assert job.status == "failed" and "already exists" in job.error
        assert "--force" not in job.error and "force=True" not in job.error
        assert not any("--force" in n.message for n in app._notifications)


# -- 9: titles count adapters -----------------------------------------------------------------------------


async def test_job_title_counts_adapters_not_characters(fixed_demo: Path, tmp_path: Path) -> None:
    runner = RecordingRunner()
    app = make_app(fixed_demo, tmp_path, runner_factory=lambda kind: runner)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("3", "c")
        await pilot.pause()
        assert isinstance(app.screen, JobFormScreen)
        assert len(app.screen.query_one("#param-adapters").value) > 100  # the form holds one long string
        await pilot.press("ctrl+s")
        await wait_jobs(app, pilot)
        assert app.jobs[-1].title == "compress 14 adapters"
        assert len(runner.requests[-1].params["adapters"]) == 14


# -- 10: exports and merges are offered, never added silently ---------------------------------------------


async def test_export_output_is_offered_not_added(fixed_demo: Path, tmp_path: Path) -> None:
    written = tmp_path / "export-sql-duckdb"
    shutil.copytree(fixed_demo / "sql-duckdb", written)
    runner = RecordingRunner({"export": [str(written)], "merge": [str(written)]})
    app = make_app(fixed_demo, tmp_path, runner_factory=lambda kind: runner)
    async with app.run_test(size=SIZE) as pilot:
        before = list(app.collection)
        await pilot.press("3")
        members = app.screen.query_one("#members", SelectionList)
        assert len(members.selected) == 14
        app.subspace_path = str(tmp_path / "some-subspace")  # export needs one; the runner does not read it
        app.submit_job("export", {"subspace": app.subspace_path, "task_id": "sql-duckdb", "output": str(written)})
        await wait_jobs(app, pilot)
        assert app.jobs[-1].status == "done"
        assert app.collection == before and len(members.selected) == 14  # a later compress still takes 14
        assert app.offered == [str(written)]
        assert any("Add" in n.message and "export-sql-duckdb" in n.message for n in app._notifications)
        # the palette offers it, and A on the jobs screen adds it
        from vlora_tui.commands import VloraCommands

        assert "Add written adapters to the collection" in {t for t, _, _ in VloraCommands(app.screen)._commands()}
        await pilot.press("5", "A")
        await pilot.pause()
        assert app.collection == before + [str(written)] and app.offered == []


# -- 11: the jobs screen ---------------------------------------------------------------------------------------


async def test_jobs_screen_focuses_queue_fits_columns_follows_running_job(fixed_demo: Path, tmp_path: Path) -> None:
    gate = GateRunner()
    quick = RecordingRunner()
    app = make_app(fixed_demo, tmp_path, runner_factory=lambda kind: quick if kind == "validate" else gate)
    async with app.run_test(size=SIZE) as pilot:
        app.submit_job("validate", {"adapters": list(app.collection)})
        await wait_jobs(app, pilot)
        app.submit_job("analyze", {"adapters": list(app.collection)})
        await started(gate, pilot)
        app.submit_job("analyze", {"adapters": list(app.collection)[:2]})
        await pilot.press("5")
        await pilot.pause(0.2)
        screen = app.screen
        table = screen.query_one("#queue", DataTable)
        assert app.focused is table
        # every column is in view: the rows fit the table without scrolling sideways
        assert table.virtual_size.width <= table.scrollable_content_region.width, (table.virtual_size, table.size)
        assert [str(c.label) for c in table.ordered_columns] == ["id", "job", "status", "progress", "time"]
        # the detail pane shows the running job (job2), not job1
        assert app.jobs[1].status == "running"
        assert screen.selected() is app.jobs[1]
        assert "analyze 14 adapters" in str(screen.query_one("#job-status", Static).render())
        # when it ends, the next one runs and the cursor follows it
        gate.gate.set()
        await wait_jobs(app, pilot)
        await pilot.pause()
        assert all(j.status == "done" for j in app.jobs)
        # coming back to the screen focuses the queue again
        await pilot.press("1", "5")
        await pilot.pause()
        assert app.focused is table
        # a queue longer than the pane (a scrollbar) still fits sideways
        for _ in range(40):
            app.submit_job("validate", {"adapters": list(app.collection)[:1]})
        await wait_jobs(app, pilot)
        await pilot.pause()
        assert table.row_count == 43 and table.virtual_size.height > table.scrollable_content_region.height
        assert table.virtual_size.width <= table.scrollable_content_region.width, (table.virtual_size, table.size)


async def test_jobs_detail_follows_a_job_as_it_starts(fixed_demo: Path, tmp_path: Path) -> None:
    gate = GateRunner()
    app = make_app(fixed_demo, tmp_path, runner_factory=lambda kind: gate)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("5")
        app.submit_job("analyze", {"adapters": list(app.collection)})
        app.submit_job("validate", {"adapters": list(app.collection)[:1]})
        await pilot.pause(0.2)
        assert app.screen.selected() is app.jobs[0]
        app.cancel_job(app.jobs[0])
        await app.jobs[0].worker.wait()
        await pilot.pause(0.2)
        assert app.jobs[1].status == "running" and app.screen.selected() is app.jobs[1]
        gate.gate.set()
        await wait_jobs(app, pilot)


# -- 12: help lists the screen's own keys first, in full ----------------------------------------------------------


async def test_help_lists_screen_keys_first_in_full(fixed_demo: Path, tmp_path: Path) -> None:
    from vlora_tui.screens.collection import CollectionScreen

    app = make_app(fixed_demo, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("3", "question_mark")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        table = app.screen.query_one("#help-keys", DataTable)
        rows = [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]
        own = [b.description for b in CollectionScreen.BINDINGS]
        assert rows[0][0] == "This screen"
        assert [r[1] for r in rows[1:1 + len(own)]] == own
        assert rows[1 + len(own)][0] == "Everywhere"
        # nothing is cut: the table fits the dialog, and each row is tall enough for its wrapped text
        assert table.virtual_size.width <= table.scrollable_content_region.width
        what = table.columns["what"]  # type: ignore[index]
        for i, row_key in enumerate(table._row_locations):
            text = rows[i][2]
            if text:
                assert table.rows[row_key].height >= math.ceil(len(text) / what.width), (text, what.width)
        tooltips = {b.tooltip for b in CollectionScreen.BINDINGS}
        assert tooltips <= {r[2] for r in rows}


# -- 13: heatmap cursor, toasts, diff columns, fidelity digits, k, browser root ----------------------------------


async def test_collection_cursor_toasts_and_diff_columns(fixed_demo: Path, tmp_path: Path) -> None:
    from vlora_tui.widgets.heatmap import SimilarityHeatmap

    app = make_app(fixed_demo, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("3", "a")
        await wait_jobs(app, pilot)
        assert app.jobs[-1].status == "done", app.jobs[-1].error
        heat = app.screen.query_one(SimilarityHeatmap)
        await pilot.press("n")  # cursor to the most similar pair, focused
        await pilot.pause()
        assert app.focused is heat
        row = heat.cursor_coordinate.row
        value = str(heat.get_cell_at(heat.cursor_coordinate)).strip()
        cursor_bg = heat.get_component_rich_style("datatable--cursor").bgcolor
        strip = heat.render_line(heat.header_height + row - int(heat.scroll_y))
        on_cursor = "".join(s.text for s in strip if s.style is not None and s.style.bgcolor == cursor_bg)
        assert value in on_cursor, (value, on_cursor)  # the whole cell is the cursor, not its padding
        assert "~" in str(heat.border_subtitle)  # the pair is named in the heatmap's border
        await pilot.press("d")
        await wait_jobs(app, pilot)
        assert app.jobs[-1].kind == "diff" and app.jobs[-1].status == "done", app.jobs[-1].error
        await pilot.pause()
        # no toast is left over the clusters and diff panes
        assert len(app._notifications) == 0, [n.message for n in app._notifications]
        # the diff table fits its pane: no column cut to an ellipsis
        box = app.screen.query_one("#diff", Static)
        width = box.content_region.width
        assert width > 0
        from vlora_tui.screens.collection import CollectionScreen, diff_table

        def rendered(renderable, width: int) -> str:
            console = Console(width=width, record=True, color_system=None)
            console.print(renderable)
            return console.export_text()

        text = rendered(diff_table(app.diff), width)
        assert "…" not in text and "rel.diff" in text, text
        # nor the clusters beside it
        clusters = app.screen.query_one("#clusters", Static)
        text = rendered(CollectionScreen._clusters_text(app.analysis), clusters.content_region.width)
        assert "…" not in text and "math-word-problems" in text, text


async def test_fidelity_three_significant_digits_and_k_pairs(fixed_subspace: Path, fixed_demo: Path, tmp_path: Path) -> None:
    app = make_app(fixed_demo, tmp_path, path=fixed_subspace)
    async with app.run_test(size=SIZE) as pilot:
        await wait_jobs(app, pilot)
        await pilot.pause()
        assert app.current_mode == "subspace"
        table = app.screen.query_one("#fidelity", DataTable)
        info = app.subspace_info
        modules = [m["name"] for m in info["modules"]]
        task = info["tasks"][0]["task_id"]
        row = table.get_row(task)
        per_module = [str(c) for c in row[4:]]
        assert per_module == [format(info["fidelity"][task][m], ".3g") for m in modules]
        assert len(set(per_module)) > 1  # not one rounded value everywhere

    from vlora_tui.screens.subspace import k_labels

    assert k_labels({"modules": [{"k": 40, "k_u": 40, "k_v": 32}, {"k": 24, "k_u": 24, "k_v": 24}]}) == ["24", "40×32"]
    assert k_labels({"stats": {"k": {"a": 8, "b": 8}}}) == ["8"]


async def test_browser_shows_the_demo_once_built(fixed_demo: Path, tmp_path: Path) -> None:
    from vlora_tui.widgets.adapter_tree import AdapterTree

    class CopyDemo:
        def run(self, req, *, progress=None, cancel=None):
            out = Path(req.params["output"])
            shutil.copytree(fixed_demo, out)
            adapters = sorted(str(p) for p in out.iterdir() if p.is_dir())
            return JobResult(req.job_id, req.kind, "ok", "demo", outputs=adapters, data={"adapters": adapters})

    demo_dir = tmp_path / "home" / "demo"  # not built yet: the tree starts at its parent
    demo_dir.parent.mkdir()
    app = make_app(demo_dir, tmp_path / "out", demo=True, path=None, runner_factory=lambda kind: CopyDemo())
    app.config.path = None
    async with app.run_test(size=SIZE) as pilot:
        await wait_jobs(app, pilot)
        await pilot.press("1")
        await pilot.pause(0.3)
        tree = app.screen.query_one(AdapterTree)
        assert Path(tree.path) == demo_dir
        labels = {str(n.label) for n in tree.root.children}
        assert "sql-duckdb" in labels, labels


# -- 6: incompatible adapters are marked and can be deselected -------------------------------------------------------


def _drop_modules(src: Path, dst: Path, keep: int) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    f = dst / "adapter_model.safetensors"
    with safe_open(str(f), "pt") as h:
        keys = sorted(h.keys())
        tensors = {k: h.get_tensor(k) for k in keys}
    modules = sorted({k.split(".lora_")[0] for k in keys})[:keep]
    save_file({k: v for k, v in tensors.items() if k.split(".lora_")[0] in modules}, str(f))
    return dst


async def test_incompatible_adapters_are_marked_and_deselected(fixed_demo: Path, tmp_path: Path) -> None:
    coll = tmp_path / "coll"
    coll.mkdir()
    for name in ("sql-duckdb", "sql-postgres", "emoji-only"):
        shutil.copytree(fixed_demo / name, coll / name)
    odd = _drop_modules(fixed_demo / "math-algebra", coll / "zz-fewer-modules", keep=4)
    app = make_app(fixed_demo, tmp_path / "out", path=coll)
    async with app.run_test(size=SIZE) as pilot:
        assert len(app.collection) == 4
        await pilot.press("3")
        await pilot.pause()
        screen = app.screen
        assert set(screen.incompatible) == {str(odd)}
        assert "lacks" in screen.incompatible[str(odd)]
        members = screen.query_one("#members", SelectionList)
        labels = [str(members.get_option_at_index(i).prompt) for i in range(members.option_count)]
        assert labels[-1].startswith("⚠") and not any(l.startswith("⚠") for l in labels[:-1])
        assert "u deselects" in str(screen.query_one("#members-notice", Static).render())
        assert len(members.selected) == 4
        await pilot.press("u")
        await pilot.pause()
        assert str(odd) not in members.selected and len(members.selected) == 3
        assert screen.selected_specs() == [s for s in app.collection if s != str(odd)]


def test_collection_screen_reads_headers_without_torch(fixed_demo: Path) -> None:
    import subprocess
    import sys

    code = (
        "import asyncio, sys\n"
        "from vlora_tui.app import VloraApp\n"
        "from vlora_tui.config import AppConfig\n"
        "async def main():\n"
        f"    app = VloraApp(AppConfig(path={str(fixed_demo)!r}, hub_search=False, auto_inspect=False))\n"
        "    async with app.run_test(size=(120, 36)) as pilot:\n"
        "        await pilot.press('3')\n"
        "        await pilot.pause()\n"
        "        print(len(app.collection), len(app.screen.incompatible))\n"
        "    print('torch' in sys.modules)\n"
        "asyncio.run(main())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[-2:] == ["14 0", "False"], out.stdout
