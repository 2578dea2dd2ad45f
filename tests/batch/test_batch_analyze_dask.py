"""``analyze --engine dask [--scheduler …]``: the same JSON as in-process (workers read the paths); bad input exit 2."""

from __future__ import annotations

import pytest

from batchutil import run_batch


def _close(a, b, tol=1e-6):
    if isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b)
        for x, y in zip(a, b):
            _close(x, y, tol)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b)
        for k in a:
            _close(a[k], b[k], tol)
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=tol, abs=tol)
    else:
        assert a == b


def test_analyze_engine_dask_same_as_inprocess(tmp_path, demo_dir):
    distributed = pytest.importorskip("distributed")
    args = ("analyze", demo_dir, "--per-module", "--json")
    ref = run_batch(*args)
    assert ref.rc == 0, ref.stderr
    local = run_batch(*args, "--engine", "dask")
    assert local.rc == 0, local.stderr
    _close(ref.json()["data"], local.json()["data"])
    with distributed.LocalCluster(processes=False, n_workers=2, threads_per_worker=1, protocol="tcp",
                                  dashboard_address=None) as cluster:
        r = run_batch("analyze", demo_dir, "--json", "--engine", "dask", "--scheduler", cluster.scheduler_address)
    assert r.rc == 0, r.stderr
    data = ref.json()["data"]
    del data["modules"]
    _close(data, r.json()["data"])


def test_analyze_engine_dask_corrupt_file_and_bad_scheduler(tmp_path):
    pytest.importorskip("distributed")
    from engine.demo import make_demo_collection

    dirs = sorted(make_demo_collection(tmp_path / "c"))[:3]
    weights = dirs[1] / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 64])
    r = run_batch("analyze", *dirs, "--engine", "dask")
    assert r.rc != 0 and str(weights) in r.stderr and "Traceback" not in r.stderr
    bad = run_batch("analyze", *dirs, "--scheduler", "tcp://127.0.0.1:1")
    assert bad.rc == 2 and "needs engine dask" in bad.stderr


def test_analyze_engine_dask_mixed_folder(tmp_path):
    """Adapters with different target modules: compared on the shared ones, read from headers; same JSON."""
    pytest.importorskip("distributed")
    from peft_factory import write_peft_adapter

    root = tmp_path / "coll"
    write_peft_adapter(root / "qv_a", seed=1, family=0)
    write_peft_adapter(root / "qv_b", seed=2, family=0)
    write_peft_adapter(root / "qkvo_a", seed=3, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
    ref = run_batch("analyze", root, "--per-module", "--json")
    r = run_batch("analyze", root, "--per-module", "--json", "--engine", "dask")
    assert ref.rc == 0 and r.rc == 0, r.stderr
    assert ref.json()["data"]["left_out"]["qkvo_a"]
    _close(ref.json()["data"], r.json()["data"])
