"""Typed job results (engine.jobs.results): to_dict/from_dict, and JobResult.typed() per kind."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from engine.jobs import JobRequest
from engine.jobs.catalog import run_job
from engine.jobs.kinds.info import AdapterInfo, CollectionInfo
from engine.jobs.reports import ErrorPair, TaskChange
from engine.jobs.results import Result, optional


@dataclass(frozen=True)
class _Row(Result):
    name: str = ""
    err: ErrorPair | None = None


@dataclass(frozen=True)
class _Doc(Result):
    path: str
    rows: list[_Row] = field(default_factory=list)
    by: dict[str, ErrorPair] = field(default_factory=dict)
    note: str | None = optional()


def test_to_dict_keeps_field_order_and_leaves_out_optional_none() -> None:
    d = _Doc("p", [_Row("a", ErrorPair(0.1, 0.2))], {"x": ErrorPair(0.0, 1.0)}).to_dict()
    assert list(d) == ["path", "rows", "by"]
    assert d["rows"] == [{"name": "a", "err": {"mean": 0.1, "max": 0.2}}]
    assert _Doc("p", note="n").to_dict()["note"] == "n"


def test_from_dict_builds_nested_results_and_tolerates_missing_keys() -> None:
    doc = _Doc.from_dict({"path": "p", "rows": [{"name": "a", "err": {"mean": 0.5}}], "by": {"x": {"max": 2.0}},
                          "unknown": 1})
    assert isinstance(doc.rows[0], _Row) and doc.rows[0].err == ErrorPair(0.5, None)
    assert doc.by["x"].max == 2.0 and doc.note is None
    assert _Doc.from_dict({}).path is None  # no default: None, not a KeyError
    change = TaskChange.from_dict({"task_id": "t", "before": None, "after": {"mean": 0.1, "max": 0.2}})
    assert change.before is None and change.after.max == 0.2


def test_info_results_come_back_typed_and_round_trip(peft_family_dirs) -> None:
    one = run_job(JobRequest("info", {"path": str(peft_family_dirs[0])}))
    typed = one.typed()
    assert isinstance(typed, AdapterInfo)
    assert typed.rank == one.data["rank"] == 4 and [m.name for m in typed.modules] == [m["name"] for m in one.data["modules"]]
    assert json.dumps(typed.to_dict()) == json.dumps(one.data)  # the --json data, key order included
    folder = run_job(JobRequest("info", {"path": str(peft_family_dirs[0].parent)}))
    coll = folder.typed()
    assert isinstance(coll, CollectionInfo) and coll.count == len(peft_family_dirs)
    assert json.dumps(coll.to_dict()) == json.dumps(folder.data)


def test_a_kind_without_a_result_class_keeps_its_dict() -> None:
    from engine.jobs.base import JobResult

    r = JobResult(job_id="x", kind="no-such-kind", status="ok", data={"a": 1})
    assert r.typed() == {"a": 1}


# --- a round trip per kind: the job's data back typed, and to_dict() gives the same JSON, key order included


def _round_trip(result, cls):
    assert result.ok, result.error
    typed = result.typed()
    assert isinstance(typed, cls)
    assert json.dumps(typed.to_dict()) == json.dumps(result.data)
    return typed


@pytest.fixture(scope="module")
def family_subspace(peft_family_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("results") / "sub"
    assert run_job(JobRequest("compress", {"adapters": [str(p) for p in peft_family_dirs], "output": str(out)})).ok
    return out


def test_export_result_round_trips(family_subspace, tmp_path) -> None:
    from engine.jobs.kinds.export import ExportResult

    r = run_job(JobRequest("export", {"subspace": str(family_subspace), "task_id": "task_0", "output": str(tmp_path / "e"),
                                      "modelfile": True}))
    typed = _round_trip(r, ExportResult)
    assert typed.rank == r.data["rank"] and typed.modelfile == str(tmp_path / "e" / "Modelfile")
    assert typed.fidelity == r.data["fidelity"] and typed.max_error == max(typed.fidelity.values())


def test_merge_result_round_trips(peft_family_dirs, tmp_path) -> None:
    from engine.jobs.kinds.merge import MergedResult

    r = run_job(JobRequest("merge", {"adapters": [str(p) for p in peft_family_dirs[:3]], "output": str(tmp_path / "m"),
                                     "method": "ties"}))
    typed = _round_trip(r, MergedResult)
    assert typed.inputs == [p.name for p in peft_family_dirs[:3]] and typed.method == "ties"
    assert typed.max_error == max(typed.errors.values()) and set(typed.ranks) == set(typed.errors)


def test_analyze_result_round_trips(peft_family_dirs) -> None:
    from engine.jobs.kinds.analyze import AnalyzeResult, Cluster

    r = run_job(JobRequest("analyze", {"adapters": [str(p) for p in peft_family_dirs], "per_module": True}))
    typed = _round_trip(r, AnalyzeResult)
    assert all(isinstance(c, Cluster) for c in typed.clusters) and typed.paths is None
    assert sorted(i for c in typed.clusters for i in c.members) == list(range(len(peft_family_dirs)))
    assert typed.modules is not None and set(typed.modules) == set(typed.compared_modules)
    assert "paths" not in r.data and "modules" not in run_job(
        JobRequest("analyze", {"adapters": [str(p) for p in peft_family_dirs]})).data


def test_validate_result_round_trips(peft_family_dirs, tmp_path) -> None:
    from engine.jobs.kinds.validate import AdapterCheck, ValidateResult

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{}")
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    r = run_job(JobRequest("validate", {"adapters": [str(peft_family_dirs[0]), str(broken)], "target": "vllm"}))
    assert not r.ok and r.data  # failed, with its report
    typed = ValidateResult.from_dict(r.data)
    assert json.dumps(typed.to_dict()) == json.dumps(r.data) and isinstance(r.typed(), ValidateResult)
    assert [type(a) for a in typed.adapters] == [AdapterCheck, AdapterCheck]
    assert [a.ok for a in typed.adapters] == [True, False] and typed.adapters[1].error and not typed.ok


def test_inspect_result_round_trips(peft_family_dirs) -> None:
    from engine.jobs.kinds.inspect import InspectResult, ModuleFigures

    r = run_job(JobRequest("inspect", {"adapter": str(peft_family_dirs[0])}))
    typed = _round_trip(r, InspectResult)
    assert all(isinstance(m, ModuleFigures) for m in typed.modules) and typed.rank == 4
    assert typed.norm_delta_total == pytest.approx(sum(m.norm_delta ** 2 for m in typed.modules) ** 0.5)


def test_diff_result_round_trips(peft_family_dirs) -> None:
    from engine.jobs.kinds.diff import DiffReport, ModuleDiffRow

    r = run_job(JobRequest("diff", {"a": str(peft_family_dirs[0]), "b": str(peft_family_dirs[1])}))
    typed = _round_trip(r, DiffReport)
    assert isinstance(typed.overall, ModuleDiffRow) and all(isinstance(m, ModuleDiffRow) for m in typed.modules)
    assert typed.overall.norm_a == pytest.approx(sum(m.norm_a ** 2 for m in typed.modules) ** 0.5)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    from peft_factory import save_tiny_base

    return save_tiny_base(tmp_path_factory.mktemp("results_base") / "base")


def test_compare_results_round_trip_in_both_modes(family_subspace, tiny_base, peft_family_dirs) -> None:
    from engine.jobs.kinds.compare import BaseChangeRow, BaseCompareResult, CompareInputs, CompareResult, FidelityRow

    r = run_job(JobRequest("compare", {"subspace": str(family_subspace), "adapters": [str(p) for p in peft_family_dirs[:2]],
                                       "base_model": str(tiny_base)}))
    typed = _round_trip(r, CompareResult)
    assert [t.task_id for t in typed.tasks] == ["task_0", "task_1"] and all(isinstance(t, FidelityRow) for t in typed.tasks)
    assert typed.inputs.rows == 8 and typed.inputs.labelled is None and "labelled" not in r.data["inputs"]
    assert all(t.ppl_change == pytest.approx(t.ppl_reconstructed / t.ppl_original - 1.0) for t in typed.tasks)
    base = run_job(JobRequest("compare", {"subspace": str(family_subspace), "base_model": str(tiny_base), "tasks": ["task_2"]}))
    typed_base = _round_trip(base, BaseCompareResult)
    (row,) = typed_base.tasks
    assert isinstance(row, BaseChangeRow) and row.task_id == "task_2" and typed_base.inputs.labelled is False
    assert "accuracy_task" not in base.data["tasks"][0] and row.accuracy_task is None
    # the rows' keys follow the task type and the inputs: a causal LM keeps its ppl keys even when None
    rows = [FidelityRow(task_id="t", kl_mean=0.1)]
    assert "ppl_original" not in CompareResult(task_type="SEQ_CLS", tasks=rows).to_dict()["tasks"][0]
    causal = CompareResult(task_type="CAUSAL_LM", tasks=rows).to_dict()
    assert causal["tasks"][0]["ppl_original"] is None and CompareResult.from_dict(causal).tasks == rows
    labelled = BaseCompareResult(task_type="SEQ_CLS", inputs=CompareInputs(labelled=True),
                                 tasks=[BaseChangeRow(task_id="t", accuracy_task=0.5)]).to_dict()
    assert labelled["tasks"][0]["accuracy_before"] is None and "ppl_base" not in labelled["tasks"][0]


def test_train_result_round_trips(family_subspace, tiny_base, tmp_path) -> None:
    from engine.jobs.kinds.train import EvalFigures, HeldOut, TrainResult
    from engine.jobs.reports import TaskReport

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": "a" * n}) + "\n" for n in (12, 9, 10, 11)), encoding="utf-8")
    r = run_job(JobRequest("train", {"subspace": str(family_subspace), "task_id": "new", "base_model": str(tiny_base),
                                     "data": str(data), "steps": 3, "eval_fraction": 0.25, "output": str(tmp_path / "t")}))
    typed = _round_trip(r, TrainResult)
    assert isinstance(typed.task, TaskReport) and typed.task.task_id == "new" and typed.labels is None
    assert isinstance(typed.eval, HeldOut) and isinstance(typed.eval.before, EvalFigures) and typed.eval.examples == 1
    assert typed.losses[0] == typed.loss_first and typed.losses[-1] == typed.loss_last and len(typed.losses) == 3
    assert typed.eval.before.accuracy is None and typed.train_examples == 3


def test_benchmark_result_round_trips(peft_family_dirs) -> None:
    from engine.jobs.kinds.benchmark import BenchmarkResult

    r = run_job(JobRequest("benchmark", {"adapters": [str(p) for p in peft_family_dirs[:3]], "k_values": [1, 2],
                                         "methods": ["joint", "svd"]}))
    assert r.ok, r.error
    t = r.typed()
    assert isinstance(t, BenchmarkResult) and t.to_dict() == r.data
    assert json.dumps(t.to_dict()) == json.dumps(r.data)  # key order too
    assert [(x.method, x.k) for x in t.rows] == [("joint", 1), ("joint", 2), ("svd", 1), ("svd", 2)]
    # an independent figure: every row's ratio is the inputs' bytes over its own bytes on disk
    assert all(x.ratio == pytest.approx(t.input_bytes / x.stored_bytes) for x in t.rows)


def test_demo_result_round_trips(tmp_path) -> None:
    from engine.demo import DEMO_FAMILIES
    from engine.jobs.kinds.demo import DemoResult

    r = run_job(JobRequest("demo", {"output": str(tmp_path / "demo")}))
    assert r.ok, r.error
    t = r.typed()
    assert isinstance(t, DemoResult) and json.dumps(t.to_dict()) == json.dumps(r.data)
    assert sorted(t.adapters) == sorted(str(p) for p in (tmp_path / "demo").iterdir() if p.is_dir())
    assert sum(len(v) for v in t.families.values()) == sum(len(v) for v in DEMO_FAMILIES.values())
