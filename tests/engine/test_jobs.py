"""The job layer: kinds and params, run_job, InlineRunner, ProcessRunner (crash, cancel)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from engine.errors import AdapterFormatError, JobCancelled, OutputExistsError
from engine.jobs import (
    CRASH_ENV,
    DELAY_ENV,
    InlineRunner,
    JobRequest,
    JobResult,
    ProcessRunner,
    job_kinds,
    run_job,
    validate_request,
)
from engine.registry import PARAM_TYPES

ROOT = Path(__file__).resolve().parents[2]
KINDS = ["demo", "info", "inspect", "validate", "analyze", "diff", "compress", "add", "export", "merge", "quantize", "benchmark", "compare", "train"]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


def test_job_layer_imports_without_torch():
    code = (
        "import sys, json\n"
        "from engine.jobs import job_kinds, validate_request, JobRequest, InlineRunner, ProcessRunner\n"
        "kinds = job_kinds()\n"
        "forms = {n: [(p.name, p.type, p.choices) for p in k.params] for n, k in kinds.items()}\n"
        "print(json.dumps({'kinds': list(kinds), 'torch': 'torch' in sys.modules, 'textual': 'textual' in sys.modules,"
        " 'merge_methods': [p.choices for p in kinds['merge'].params if p.name == 'method'][0]}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    got = json.loads(out.stdout)
    assert got["torch"] is False and got["textual"] is False
    assert set(got["merge_methods"]) >= {"task_arithmetic", "ties", "dare"}


def test_kinds_have_typed_params():
    kinds = job_kinds()
    assert {"compare", "train"} <= set(kinds)  # the jobs that run a base model
    for name, kind in kinds.items():
        assert kind.name == name and kind.title and kind.help
        assert kind.func is not None and kind.func.__doc__ and "data" in kind.func.__doc__
        for p in kind.params:
            assert p.type in PARAM_TYPES
        for w in kind.writes:
            kind.param(w)
    assert set(kinds) <= set(KINDS)


def test_validate_request_coerces_and_names_bad_params(tmp_path):
    params = validate_request(JobRequest("merge", {"adapters": "a b", "output": tmp_path / "o", "weights": "0.5, 0.5"}))
    assert params["adapters"] == ["a", "b"] and params["weights"] == [0.5, 0.5]
    assert params["method"] == "task_arithmetic" and params["force"] is False
    with pytest.raises(ValueError, match="output: required"):
        validate_request(JobRequest("merge", {"adapters": ["a"]}))
    with pytest.raises(ValueError, match="method"):
        validate_request(JobRequest("merge", {"adapters": ["a"], "output": "o", "method": "nope"}))
    with pytest.raises(ValueError, match="unknown parameter"):
        validate_request(JobRequest("info", {"path": "x", "bogus": 1}))
    with pytest.raises(ValueError, match="unknown job kind"):
        validate_request(JobRequest("finetune", {}))
    with pytest.raises(ValueError, match="data: required"):
        validate_request(JobRequest("train", {"subspace": "s", "task_id": "t", "base_model": "b", "output": "o"}))


def test_request_and_result_round_trip_json():
    req = JobRequest("info", {"path": Path("/x")})
    assert JobRequest.from_dict(json.loads(json.dumps(req.to_dict()))) == JobRequest("info", {"path": "/x"}, job_id=req.job_id)
    res = JobResult(req.job_id, "info", "ok", "s", ["/o"], {"a": [1.0, float("nan")]})
    d = json.loads(json.dumps(res.to_dict(), allow_nan=False))
    assert d["data"]["a"] == [1.0, None]
    assert JobResult.from_dict(d).job_id == req.job_id


def test_info_inspect_validate_inline(demo_dir):
    one = demo_dir / "sql-sqlite"
    info = run_job(JobRequest("info", {"path": one}))
    assert info.ok and info.data["type"] == "adapter" and info.data["num_modules"] == 16
    coll = run_job(JobRequest("info", {"path": demo_dir}))
    assert coll.data["type"] == "collection" and coll.data["count"] == 14 and not coll.data["problems"]

    events = []
    ins = run_job(JobRequest("inspect", {"adapter": one}), progress=events.append)
    assert ins.ok and len(ins.data["modules"]) == 16 and ins.data["problems"] == []
    assert events and events[-1].step == events[-1].total

    # ‖ΔW‖ and the spectrum come through r×r products; check them against the dense update
    import torch

    from engine.io.local import load_adapter

    w = load_adapter(one)
    m = ins.data["modules"][5]
    dense = w.delta_weight(m["name"])
    assert m["norm_delta"] == pytest.approx(float(torch.linalg.norm(dense)), rel=1e-5)
    assert m["singular_values"][:3] == pytest.approx(torch.linalg.svdvals(dense)[:3].tolist(), rel=1e-4)
    assert m["norm_a"] == pytest.approx(float(torch.linalg.norm(w.lora_a[m["name"]])), rel=1e-6)

    val = run_job(JobRequest("validate", {"adapters": [demo_dir]}))
    assert val.ok and val.data["compatible"] is True and len(val.data["adapters"]) == 14


def test_inspect_reports_nan_and_validate_fails(tmp_path, peft_adapter_dir):
    import torch
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "nan"
    bad.mkdir()
    (bad / "adapter_config.json").write_bytes((peft_adapter_dir / "adapter_config.json").read_bytes())
    sd = load_file(str(peft_adapter_dir / "adapter_model.safetensors"))
    key = sorted(k for k in sd if "lora_B" in k)[0]
    sd[key][0, 0] = float("nan")
    save_file(sd, str(bad / "adapter_model.safetensors"))
    ins = run_job(JobRequest("inspect", {"adapter": bad}))
    assert any("NaN" in p for p in ins.data["problems"])
    bad_mod = [m for m in ins.data["modules"] if not m["finite"]]
    assert len(bad_mod) == 1 and bad_mod[0]["norm_delta"] is None
    json.dumps(ins.to_dict(), allow_nan=False)

    val = run_job(JobRequest("validate", {"adapters": [peft_adapter_dir, bad]}))
    assert val.status == "failed" and val.error_kind == "error"
    rows = {r["name"]: r for r in val.data["adapters"]}
    assert rows["nan"]["ok"] is False and "NaN" in rows["nan"]["error"]
    assert torch.isnan(sd[key]).any()


def test_run_job_raises_and_inline_runner_classifies(tmp_path, demo_dir):
    with pytest.raises(AdapterFormatError):
        run_job(JobRequest("info", {"path": tmp_path / "missing"}))
    res = InlineRunner().run(JobRequest("info", {"path": tmp_path / "missing"}))
    assert res.status == "failed" and res.error_kind == "input" and "missing" in res.error
    assert res.error_title == "Adapter format error"

    # outputs that exist are refused before any work unless force
    (tmp_path / "exists").mkdir()
    with pytest.raises(OutputExistsError):
        run_job(JobRequest("merge", {"adapters": [demo_dir], "output": tmp_path / "exists"}))

    ev = threading.Event()
    ev.set()
    with pytest.raises(JobCancelled):
        run_job(JobRequest("info", {"path": demo_dir}), cancel=ev)
    assert InlineRunner().run(JobRequest("info", {"path": demo_dir}), cancel=ev).status == "cancelled"


def test_cancel_demo_leaves_nothing(tmp_path):
    ev = threading.Event()
    seen = []

    def progress(p):
        seen.append(p)
        if len(seen) == 4:
            ev.set()

    res = InlineRunner().run(JobRequest("demo", {"output": tmp_path / "demo"}), progress=progress, cancel=ev)
    assert res.status == "cancelled" and res.error_kind == "cancelled"
    assert not (tmp_path / "demo").exists() and _leftovers(tmp_path) == []


def test_merge_job_writes_peft_adapter(tmp_path, peft_family_dirs):
    from peft_factory import peft_logits

    out = tmp_path / "merged"
    res = run_job(JobRequest("merge", {"adapters": peft_family_dirs[:2], "output": out, "method": "ties", "density": 0.5, "rank": "4"}))
    assert res.ok and res.outputs == [str(out)]
    assert res.data["method"] == "ties" and res.data["rank"] == 4 and len(res.data["errors"]) == 4
    assert peft_logits(out).isfinite().all()
    with pytest.raises(ValueError, match="drop_rate: does not apply"):
        run_job(JobRequest("merge", {"adapters": peft_family_dirs[:2], "output": tmp_path / "x", "method": "ties", "drop_rate": 0.2}))


# -- the process runner ------------------------------------------------------------------


def test_process_runner_runs_and_forwards_progress(demo_dir):
    events = []
    res = ProcessRunner().run(JobRequest("inspect", {"adapter": demo_dir / "math-proofs"}), progress=events.append)
    assert res.ok and len(res.data["modules"]) == 16
    assert len(events) >= 2 and events[-1].fraction == 1.0


def test_process_runner_reports_job_errors(tmp_path):
    res = ProcessRunner().run(JobRequest("inspect", {"adapter": tmp_path / "nope"}))
    assert res.status == "failed" and res.error_kind == "input" and "nope" in res.error
    bad = ProcessRunner().run(JobRequest("nope", {}))
    assert bad.status == "failed" and bad.error_kind == "input"


@pytest.mark.parametrize("how, signal_name", [("exit", "code 3"), ("segfault", "SIGSEGV"), ("kill", "SIGKILL")])
def test_process_runner_survives_crash(monkeypatch, demo_dir, how, signal_name):
    monkeypatch.setenv(CRASH_ENV, how)
    res = ProcessRunner().run(JobRequest("info", {"path": demo_dir}))
    assert res.status == "failed" and res.error_kind == "crash"
    assert signal_name in res.error and res.error_title == "Worker crashed"
    monkeypatch.delenv(CRASH_ENV)
    # the caller goes on: the next job runs
    assert ProcessRunner().run(JobRequest("info", {"path": demo_dir / "sql-sqlite"})).ok


def test_process_runner_cancel_terminates_stuck_child(monkeypatch, demo_dir):
    monkeypatch.setenv(CRASH_ENV, "hang")
    ev = threading.Event()
    timer = threading.Timer(1.0, ev.set)
    timer.start()
    res = ProcessRunner(grace=0.5).run(JobRequest("info", {"path": demo_dir}), cancel=ev)
    timer.cancel()
    assert res.status == "cancelled" and res.error_kind == "cancelled"


def test_process_runner_cancel_mid_job_leaves_no_output(monkeypatch, tmp_path):
    monkeypatch.setenv(DELAY_ENV, "0.2")
    ev = threading.Event()
    seen = []

    def progress(p):
        seen.append(p)
        if len(seen) == 3:
            ev.set()

    res = ProcessRunner().run(JobRequest("demo", {"output": tmp_path / "demo"}), progress=progress, cancel=ev)
    assert res.status == "cancelled"
    assert not (tmp_path / "demo").exists() and _leftovers(tmp_path) == []


def test_crash_hook_is_not_a_job_kind():
    assert not any("crash" in k for k in job_kinds())
    assert CRASH_ENV not in os.environ


# -- subspace jobs and pipeline helpers ------------------------------------------------------


def test_compress_cancel_in_process_runner_leaves_nothing(monkeypatch, tmp_path, peft_family_dirs):
    monkeypatch.setenv(DELAY_ENV, "0.2")
    ev = threading.Event()
    seen = []

    def progress(p):
        seen.append(p)
        if len(seen) == 8:
            ev.set()

    out = tmp_path / "sub"
    res = ProcessRunner(grace=0.5).run(JobRequest("compress", {"adapters": peft_family_dirs, "output": out, "num_components": 2}),
                                       progress=progress, cancel=ev)
    assert res.status == "cancelled"
    assert not out.exists() and _leftovers(tmp_path) == []


def _compress_abcd(tmp_path, peft_family_dirs):
    sub = tmp_path / "sub"
    res = run_job(JobRequest("compress", {"adapters": [str(p) for p in peft_family_dirs[:4]], "output": sub,
                                          "max_error": 0.001, "dtype": "float32", "task_ids": ["a", "b", "c", "d"]}))
    return sub, res


def test_compress_job_inline(tmp_path, peft_family_dirs):
    _, res = _compress_abcd(tmp_path, peft_family_dirs)
    assert res.ok and res.data["tasks"] == ["a", "b", "c", "d"] and res.data["stats"]["error"]["max"] <= 0.0011
    with pytest.raises(ValueError, match="task_ids"):
        run_job(JobRequest("compress", {"adapters": peft_family_dirs[:2], "output": tmp_path / "x", "task_ids": ["a"]}))


def test_add_job_inline(tmp_path, peft_family_dirs):
    sub, _ = _compress_abcd(tmp_path, peft_family_dirs)
    add = run_job(JobRequest("add", {"subspace": sub, "adapter": peft_family_dirs[4], "task_id": "e", "project": True,
                                      "force": True, "allow_worse": True}))
    assert add.data["mode"] == "project" and add.outputs == [str(sub)]


def test_export_job_inline(tmp_path, peft_family_dirs):
    sub, _ = _compress_abcd(tmp_path, peft_family_dirs)
    exp = run_job(JobRequest("export", {"subspace": sub, "task_id": "b", "output": tmp_path / "b", "exact_rank": True,
                                        "base_model": "other/base", "target_modules": ["q_proj", "v_proj"]}))
    cfg = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "other/base" and exp.data["max_error"] <= 0.0011
    with pytest.raises(ValueError, match="target_modules"):
        run_job(JobRequest("export", {"subspace": sub, "task_id": "b", "output": tmp_path / "c", "target_modules": ["q_proj"]}))


def test_pipeline_helpers(tmp_path, peft_family_dirs):
    import torch

    from engine.io.local import load_adapter
    from engine.pipeline import absorb_task, extract_adapter, init_subspace

    sub = init_subspace(peft_family_dirs[:3], num_components=None, max_error=0.001)
    assert sub.task_ids == [p.name for p in peft_family_dirs[:3]]
    proj = absorb_task(sub, peft_family_dirs[3], "fourth", incremental=True)
    assert proj.task_id == "fourth" and "fourth" in sub.tasks
    absorb_task(sub, peft_family_dirs[4], "fifth")
    assert {"fourth", "fifth"} <= set(sub.tasks)
    w = extract_adapter(sub, "fourth", tmp_path / "out")
    orig = load_adapter(peft_family_dirs[3])
    m = orig.layer_names[0]
    err = torch.linalg.norm(w.delta_weight(m) - orig.delta_weight(m)) / torch.linalg.norm(orig.delta_weight(m))
    assert float(err) < 0.05
    with pytest.raises(OutputExistsError):
        extract_adapter(sub, "fourth", tmp_path / "out")
    streamed = init_subspace([peft_family_dirs[0].parent], num_components=2, streaming=True)
    assert len(streamed.tasks) == 6
