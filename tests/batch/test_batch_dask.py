"""``compress --engine dask [--scheduler tcp://…]``: the same subspace as in-process; a clear exit 2 without dask."""

from __future__ import annotations

import json

import pytest

from batchutil import run_batch


def _ratio(r) -> tuple[float, float]:
    assert r.rc == 0, r.stderr
    data = json.loads(r.stdout)["data"]
    return data["stats"]["disk"]["ratio"], data["stats"]["error"]["max"]


def test_compress_engine_dask(tmp_path, peft_family_dirs):
    distributed = pytest.importorskip("distributed")
    args = ("compress", *peft_family_dirs[:4], "--max-error", "0.05", "--json")
    ref = _ratio(run_batch(*args, "-o", tmp_path / "inprocess"))
    local = run_batch(*args, "-o", tmp_path / "local", "--engine", "dask")
    assert json.loads(local.stdout)["data"]["streaming"] is True
    assert _ratio(local) == pytest.approx(ref, rel=1e-6)
    # a running scheduler (here: threads of this process behind a tcp address); the workers read the paths
    with distributed.LocalCluster(processes=False, n_workers=2, threads_per_worker=1, protocol="tcp",
                                  dashboard_address=None) as cluster:
        r = run_batch(*args, "-o", tmp_path / "remote", "--engine", "dask", "--scheduler", cluster.scheduler_address)
    assert _ratio(r) == pytest.approx(ref, rel=1e-6)


def test_compress_engine_dask_without_dask(tmp_path, peft_family_dirs):
    """dask missing (a stub that fails to import): exit 2, one line with the install hint, nothing written."""
    stub = tmp_path / "stub" / "distributed"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('No module named distributed')\n")
    r = run_batch("compress", *peft_family_dirs[:3], "-o", tmp_path / "s", "--engine", "dask",
                  env={"PYTHONPATH": f"{tmp_path / 'stub'}"})
    assert r.rc == 2, r.stderr
    assert "pip install 'vlora-tui[dask]'" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "s").exists()
    bad = run_batch("compress", *peft_family_dirs[:3], "-o", tmp_path / "s", "--scheduler", "tcp://127.0.0.1:1")
    assert bad.rc == 2 and "needs engine dask" in bad.stderr
