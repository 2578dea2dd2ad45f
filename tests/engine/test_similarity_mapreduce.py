"""The similarity Gram matrix as map-reduce over blocks of adapters (engine/analysis/gram.py).

In this process (one block: as before; many blocks under a small memory budget), from
paths, and on a threaded Dask ``LocalCluster``: all equal to the cosines of the dense ΔW.
"""

from __future__ import annotations

import pytest
import torch

from engine.analysis import compute_similarity_matrix, similarity_report
from engine.analysis.gram import plan_blocks
from engine.demo import make_demo_adapters, make_demo_collection
from engine.errors import AdapterFormatError
from engine.executors import InProcessExecutor
from engine.io import load_adapter


def _dense_cosines(adapters):
    """Independent: the cosines of the flattened dense updates, overall and per module."""
    mods = adapters[0].layer_names

    def cos(vecs):
        v = torch.stack(vecs)
        n = v.norm(dim=1)
        return (v @ v.T) / (n[:, None] * n[None, :])

    per = {m: cos([a.delta_weight(m).double().flatten() for a in adapters]) for m in mods}
    total = cos([torch.cat([a.delta_weight(m).double().flatten() for m in mods]) for a in adapters])
    return total, per


@pytest.fixture(scope="module")
def adapters():
    return make_demo_adapters()[:7]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return sorted(make_demo_collection(tmp_path_factory.mktemp("demo") / "c"))[:7]


@pytest.fixture(scope="module")
def client():
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(processes=False, n_workers=2, threads_per_worker=1, dashboard_address=None)
    c = distributed.Client(cluster)
    yield c
    c.close()
    cluster.close()


def _same(res, ref_total, ref_per, tol=1e-5):
    assert torch.allclose(res.matrix, ref_total, atol=tol)
    assert set(res.per_module) == set(ref_per)
    for m, t in ref_per.items():
        assert torch.allclose(res.per_module[m], t, atol=tol), m


def test_in_memory_default_and_blocks_equal_dense(adapters):
    total, per = _dense_cosines(adapters)
    one = similarity_report(adapters)
    _same(one, total, per)
    # many blocks (one adapter's module per block under the budget) and many module chunks
    blocked = similarity_report(adapters, executor=InProcessExecutor(shards=6), memory_budget_mb=0.05)
    _same(blocked, total, per)
    assert torch.allclose(blocked.matrix, one.matrix, atol=1e-6)
    assert blocked.norms == pytest.approx(one.norms, rel=1e-6)
    assert compute_similarity_matrix(adapters, memory_budget_mb=0.05).dtype == torch.float32


def test_plan_blocks_bounds_what_a_map_reads():
    mb = {f"m{i}": 2**20 for i in range(8)}  # 1 MiB per adapter and module
    bounds, chunks = plan_blocks(100, mb, 1, 64)  # 64 MiB: blocks of ≤ 32 adapters, then 1 module per chunk
    sizes = [hi - lo for lo, hi in zip(bounds, bounds[1:])]
    assert bounds[0] == 0 and bounds[-1] == 100 and max(sizes) <= 32
    assert all(2 * max(sizes) * len(c) * 2**20 <= 64 * 2**20 for c in chunks)
    assert [m for c in chunks for m in c] == list(mb)
    assert plan_blocks(10, mb, 1, None) == ([0, 10], [list(mb)])  # everything fits: one block, one chunk
    bounds, _ = plan_blocks(10, mb, 4, None)  # 4 maps wanted: 3 blocks, 6 block pairs
    assert len(bounds) - 1 == 3


def test_from_paths_equals_in_memory(paths):
    loaded = [load_adapter(p) for p in paths]
    total, per = _dense_cosines(loaded)
    res = similarity_report(paths, executor=InProcessExecutor(shards=4), memory_budget_mb=0.05)
    assert res.names == [p.name for p in paths]
    _same(res, total, per)
    mods = loaded[0].layer_names[:2]
    sub = similarity_report(paths, modules=mods, per_module=False)
    assert sub.per_module == {}
    ref, _ = _dense_cosines([load_adapter(p, modules=mods) for p in paths])
    assert torch.allclose(sub.matrix, ref, atol=1e-5)


def test_dask_local_cluster_equals_in_process(paths, adapters, client):
    from engine.executors import DaskExecutor

    ex = DaskExecutor(client=client)
    ref = similarity_report(paths)
    res = similarity_report(paths, executor=ex, memory_budget_mb=0.05)
    _same(res, ref.matrix, ref.per_module, tol=1e-6)
    assert res.norms == pytest.approx(ref.norms, rel=1e-6)
    mem = similarity_report(adapters, executor=ex)
    _same(mem, similarity_report(adapters).matrix, similarity_report(adapters).per_module, tol=1e-6)


def test_corrupt_file_is_one_error_naming_it(tmp_path, client):
    from engine.executors import DaskExecutor

    dirs = sorted(make_demo_collection(tmp_path / "c"))[:4]
    weights = dirs[2] / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 64])  # header intact, tensor data torn
    for ex in (None, DaskExecutor(client=client)):
        with pytest.raises(AdapterFormatError) as err:
            similarity_report(dirs, executor=ex)
        assert str(weights) in str(err.value) or str(dirs[2]) in str(err.value)
