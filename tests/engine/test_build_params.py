"""BuildParams (one check of a build's parameters), the compression methods that own their build, one compatibility check."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from engine.methods.build_params import DEFAULT_MAX_ERROR, SEED_VARIANCE_THRESHOLD, BuildParams

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def family_adapters(peft_family_dirs):
    from engine.io.local import load_adapter

    return [load_adapter(p) for p in peft_family_dirs[:3]]


@pytest.mark.parametrize("field,kw", [
    ("num_components", {"num_components": 0}),
    ("variance_threshold", {"variance_threshold": 0.0}),
    ("variance_threshold", {"variance_threshold": 1.5}),
    ("max_error", {"max_error": 1.0}),
    ("mean_error", {"mean_error": float("nan")}),
    ("refine", {"refine": -1}),
    ("sketch_rank", {"sketch_rank": 0}),
    ("block_size", {"block_size": 3}),
    ("precision", {"precision": "int4"}),
    ("precision", {"precision": "auto", "method": "pca", "max_error": 0.1}),
    ("precision", {"precision": "auto", "method": "joint", "max_error": 0.1, "dtype": "float32"}),
    ("dtype", {"dtype": "int8"}),
    ("method", {"method": "magic"}),
])
def test_bad_field_is_named(field, kw):
    with pytest.raises(ValueError, match=rf"^{field}: "):
        BuildParams(**kw)


def test_every_problem_in_one_error():
    with pytest.raises(ValueError) as exc:
        BuildParams(method="joint", num_components=0, max_error=2.0, sketch_rank=0)
    assert [p.split(":")[0] for p in str(exc.value).split("; ")] == ["num_components", "max_error", "sketch_rank"]


def test_python_default_is_the_seeds():
    """No method, no error target: the seed's pca with k by variance 0.6, stored at float32."""
    p = BuildParams()
    assert (p.method, p.variance_threshold, p.max_error, p.dtype, p.precision) == ("pca", SEED_VARIANCE_THRESHOLD, None,
                                                                                   "float32", "fp16")
    assert BuildParams(max_error=0.1).method == "joint" and BuildParams(max_error=0.1).dtype == "float16"
    import torch

    assert BuildParams(method="joint", dtype=torch.bfloat16).dtype == "bfloat16"


def test_job_default_is_an_error_target():
    """A job naming no k rule promises max_error 0.05 with rank and precision chosen together (auto)."""
    p = BuildParams.for_job("joint", dtype="float16")
    assert (p.max_error, p.precision) == (DEFAULT_MAX_ERROR, "auto")
    assert BuildParams.for_job("pca").precision == "fp16" and BuildParams.for_job("pca").max_error == DEFAULT_MAX_ERROR
    assert BuildParams.for_job("joint", num_components=3).max_error is None
    assert BuildParams.for_job("joint", num_components=3).precision == "fp16"
    assert BuildParams.for_job("joint", adaptive_k=False).max_error == DEFAULT_MAX_ERROR  # False is no rule
    assert BuildParams.for_job("svd", max_error=0.1, dtype="float32").precision == "fp16"
    with pytest.raises(ValueError, match="^streaming: "):
        BuildParams.for_job("joint", streaming=True)


def test_build_params_and_methods_import_without_torch():
    code = ("import sys; from engine.methods.build_params import BuildParams; from engine.registry import methods; "
            "BuildParams.for_job('joint'); assert 'build' in dir(methods('compress')['joint']); "
            "from engine.jobs import JobRequest, validate_request; "
            "validate_request(JobRequest('compress', {'adapters': ['a', 'b'], 'output': 'o'})); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": ""})


def test_compress_job_refuses_parameters_that_do_not_go_together(tmp_path):
    """The TUI's form and --batch validate with BuildParams, before reading any adapter."""
    from engine.jobs import JobRequest, validate_request

    req = {"adapters": [str(tmp_path / "missing")], "output": str(tmp_path / "out")}
    with pytest.raises(ValueError, match="^precision: 'auto' stores unquantised tensors at float16"):
        validate_request(JobRequest("compress", {**req, "precision": "auto", "dtype": "float32"}))
    with pytest.raises(ValueError, match="^precision: does not apply to compress method 'pca'"):
        validate_request(JobRequest("compress", {**req, "method": "pca", "precision": "auto"}))
    with pytest.raises(ValueError, match="^variance_threshold: "):
        validate_request(JobRequest("compress", {**req, "variance_threshold": 0.0}))
    assert validate_request(JobRequest("compress", {**req, "method": "pca", "num_components": 2}))["method"] == "pca"


def test_registered_methods_build(family_adapters):
    """Each compression method is a registry object that builds; the one in METHODS order."""
    from engine.methods.compress import CompressMethod
    from engine.registry import methods
    from engine.subspace import METHODS, SharedSubspace
    from engine.subspace.build import CheckedSource
    from engine.subspace.common import AdapterSource

    assert tuple(methods("compress")) == METHODS
    ads = family_adapters
    for name in METHODS:
        method = methods("compress")[name]
        assert isinstance(method, CompressMethod) and method.func == method.run
        params = BuildParams(method=name, num_components=2, dtype="float32")
        shapes = {m: ads[0].shapes(m) for m in ads[0].layer_names}
        ranks = {m: [a.module_rank(m) for a in ads] for m in shapes}
        bases, tasks, _ = method.build(params, AdapterSource(["a", "b", "c"], adapters=ads), shapes, ranks=ranks,
                                       memory_budget_mb=None, checked=CheckedSource)
        sub = SharedSubspace.from_adapters(ads, ["a", "b", "c"], num_components=2, method=name, dtype="float32")
        assert sorted(bases) == sorted(sub.modules) and list(tasks) == ["a", "b", "c"]
        for t, p in tasks.items():
            assert p.fidelity == pytest.approx(sub.tasks[t].fidelity, abs=1e-6)


def test_one_compatibility_check_for_headers_and_adapters(peft_family_dirs, peft_variant_dirs, family_adapters):
    from engine.errors import IncompatibleAdaptersError
    from engine.io.local import check_compatible

    mem, hdr = check_compatible(family_adapters), check_compatible(peft_family_dirs[:3])
    assert (hdr.shapes, hdr.ranks, hdr.mixed_ranks, sorted(hdr.modules)) == (mem.shapes, mem.ranks, mem.mixed_ranks,
                                                                             sorted(mem.modules))
    with pytest.raises(IncompatibleAdaptersError, match="qkvo"):
        check_compatible([peft_family_dirs[0], peft_variant_dirs["qkvo"]])


def test_subspace_modules_do_not_import_the_class_module():
    """storage, build and tasks take the class (or the instance) and never import core, even lazily."""
    for name in ("storage", "build", "tasks", "accounting"):
        tree = ast.parse((ROOT / "engine" / "subspace" / f"{name}.py").read_text(encoding="utf-8"))
        mods = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert "core" not in mods and "engine.subspace.core" not in mods, name
