"""The build's passes as map-reduce (engine/executors.py): sharded in-process and Dask builds equal today's build."""

from __future__ import annotations

import sys
import threading
import time

import pytest
import torch

from engine.demo import make_demo_adapters, make_demo_collection
from engine.errors import AdapterFormatError, JobCancelled
from engine.executors import DASK_HINT, InProcessExecutor, MissingDependencyError, make_executor
from engine.io import load_adapter, save_adapter
from engine.subspace import SharedSubspace
from engine.types import LoRAWeights


def _shared_collection(n: int = 6, out: int = 48, inn: int = 40, r: int = 4, seed: int = 1, *,
                       own: tuple[str, ...] = ()) -> list[LoRAWeights]:
    """Every task in one common column and row space (the ``shared`` structure), ranks mixed 2 and 4.

    ``own``: modules where each task has a space of its own (stored per task, ``hybrid``).
    """
    g = torch.Generator().manual_seed(seed)
    mods = ["layers.0.q_proj", "layers.0.v_proj", "layers.1.q_proj", *own]
    cu = {m: torch.linalg.qr(torch.randn(out, 6, generator=g))[0] for m in mods}
    cv = {m: torch.linalg.qr(torch.randn(inn, 6, generator=g))[0] for m in mods}
    ads = []
    for t in range(n):
        rk = r if t % 2 == 0 else 2
        a = {m: (torch.randn(rk, 6, generator=g) @ cv[m].T) * 0.1 for m in mods}
        b = {m: cu[m] @ torch.randn(6, rk, generator=g) * 0.1 for m in mods}
        for m in own:
            a[m], b[m] = torch.randn(rk, inn, generator=g) * 0.1, torch.randn(out, rk, generator=g) * 0.1
        ads.append(LoRAWeights(layer_names=mods, lora_a=a, lora_b=b, rank=rk, lora_alpha=2.0 * rk,
                               name=f"shared_{t}"))
    return ads


COLLECTIONS = {"shared": _shared_collection, "families": make_demo_adapters,
               "mixed": lambda: _shared_collection(own=("layers.1.v_proj",))}


@pytest.fixture(scope="module")
def collections():
    return {k: f() for k, f in COLLECTIONS.items()}


@pytest.fixture(scope="module")
def demo_paths(tmp_path_factory):
    return make_demo_collection(tmp_path_factory.mktemp("demo") / "c")


@pytest.fixture(scope="module")
def client():
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(processes=False, n_workers=2, threads_per_worker=1, dashboard_address=None)
    c = distributed.Client(cluster)
    yield c
    c.close()
    cluster.close()


def _same(s1: SharedSubspace, s2: SharedSubspace, rel: float = 1e-6) -> None:
    """The same subspace to float tolerance: kinds, k, stored bytes, errors, and every reconstructed ΔW."""
    assert s1.task_ids == s2.task_ids
    assert {m: b.kind for m, b in s1.modules.items()} == {m: b.kind for m, b in s2.modules.items()}
    assert s1.k_per_module == s2.k_per_module
    st1, st2 = s1.compression_stats(), s2.compression_stats()
    assert st1["stored_bytes"] == st2["stored_bytes"] and st1["original_bytes"] == st2["original_bytes"]
    for t in s1.task_ids:
        p1, p2 = s1.tasks[t], s2.tasks[t]
        assert p1.ranks == p2.ranks and list(p1.coeffs) == list(p2.coeffs)
        assert p1.fidelity == pytest.approx(p2.fidelity, rel=rel, abs=1e-6)
        assert p1.norms == pytest.approx(p2.norms, rel=1e-9)
        w1, w2 = s1.reconstruct(t), s2.reconstruct(t)
        for m in w1.layer_names:
            d1, d2 = w1.delta_weight(m), w2.delta_weight(m)
            assert torch.allclose(d1, d2, atol=2e-3 * max(1e-6, float(d1.norm())) + 1e-7)


SETTINGS = {
    "max_error": {"max_error": 0.05},  # hybrid: modules stored per task where smaller
    "variance": {},  # one k for all modules
    "k3": {"num_components": 3},
}


@pytest.mark.parametrize("collection", list(COLLECTIONS))
@pytest.mark.parametrize("method", ["joint", "share"])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_sharded_in_process_equals_the_build(collections, collection, method, setting):
    """Three shards, combined: the same subspace as one pass over all adapters (and as the default executor)."""
    ads = collections[collection]
    kw = SETTINGS[setting]
    whole = SharedSubspace.from_adapters(ads, method=method, **kw)
    sharded = SharedSubspace.from_adapters(ads, method=method, executor=InProcessExecutor(shards=3), **kw)
    _same(whole, sharded)
    chunked = SharedSubspace.from_adapters(ads, method=method, memory_budget_mb=1e-9,
                                           executor=InProcessExecutor(shards=4), **kw)
    _same(whole, chunked)


def test_hybrid_collection_has_per_task_modules(collections):
    """The mixed collection with an error target: shared and per-task modules (so the tests above cover both)."""
    sub = SharedSubspace.from_adapters(collections["mixed"], method="joint", max_error=0.05)
    kinds = {b.kind for b in sub.modules.values()}
    sharded = SharedSubspace.from_adapters(collections["mixed"], method="joint", max_error=0.05,
                                           executor=InProcessExecutor(shards=5))
    assert kinds == {"joint", "separate"}
    _same(sub, sharded)


@pytest.mark.parametrize("method,kw", [("joint", {"max_error": 0.05}), ("share", {}), ("svd", {"max_error": 0.05}),
                                       ("joint", {"max_error": 0.05, "precision": "auto"})])
def test_sharded_streaming_equals_in_memory(demo_paths, method, kw):
    mem = SharedSubspace.from_adapters([load_adapter(p) for p in demo_paths], method=method, **kw)
    streamed = SharedSubspace.from_adapters_streaming(demo_paths, method=method, executor=InProcessExecutor(shards=3), **kw)
    _same(mem, streamed)


def test_dask_local_cluster_equals_in_process(client, demo_paths):
    """A 2-worker LocalCluster (threads) builds the same subspace from paths."""
    from engine.executors import DaskExecutor

    ex = DaskExecutor(client=client, shards_per_worker=2)
    assert ex.shard_count(len(demo_paths)) == 4
    for kw, budget in (({"max_error": 0.05, "precision": "auto"}, None), ({}, None)):
        events = []
        ref = SharedSubspace.from_adapters_streaming(demo_paths, method="joint", memory_budget_mb=budget, **kw)
        got = SharedSubspace.from_adapters_streaming(demo_paths, method="joint", executor=ex, progress=events.append,
                                                     memory_budget_mb=budget, **kw)
        _same(ref, got)
        steps = [e.step for e in events]
        assert steps == sorted(steps) and all(e.total == events[0].total for e in events) and steps[-1] < events[0].total
        assert any("basis:" in e.message for e in events) and any("coefficients:" in e.message for e in events)
    mem = SharedSubspace.from_adapters([load_adapter(p) for p in demo_paths], method="share", executor=ex)
    _same(SharedSubspace.from_adapters([load_adapter(p) for p in demo_paths], method="share"), mem)


def test_dask_worker_failure_names_the_file(client, tmp_path):
    """A NaN in one adapter file, or a file that turns unreadable after the header check: one error naming it."""
    from engine.executors import DaskExecutor

    ads = make_demo_adapters()[:6]
    paths = [save_adapter(a, tmp_path / str(a.name)) for a in ads]
    bad = ads[3]
    m = bad.layer_names[-1]
    poisoned = bad.lora_a[m].clone()
    poisoned[0, 0] = float("nan")
    save_adapter(LoRAWeights(layer_names=bad.layer_names, lora_a={**bad.lora_a, m: poisoned}, lora_b=bad.lora_b,
                             rank=bad.rank, lora_alpha=bad.lora_alpha, name=bad.name), paths[3], force=True)
    ex = DaskExecutor(client=client)
    with pytest.raises(AdapterFormatError, match=str(paths[3]).replace("\\", "\\\\")):
        SharedSubspace.from_adapters_streaming(paths, method="joint", max_error=0.05, executor=ex)

    # torn after validation: the worker's read fails, the error names the file
    save_adapter(bad, paths[3], force=True)
    import engine.io.local as local

    real = local.load_adapter

    def flaky(path, *a, **k):
        if str(path) == str(paths[4]):
            raise OSError("Input/output error")
        return real(path, *a, **k)

    local.load_adapter = flaky
    try:
        with pytest.raises(AdapterFormatError, match=f"{paths[4].name}.*cannot read.*Input/output error"):
            SharedSubspace.from_adapters_streaming(paths, method="joint", max_error=0.05, executor=ex)
    finally:
        local.load_adapter = real


_CALLS: list[int] = []


def _slow(shard, shared, tick):
    time.sleep(0.3)
    _CALLS.append(1)
    return len(shard)


def _add(a, b):
    return a + b


def test_dask_cancel_stops_the_futures(client):
    """cancel set after the first shard: JobCancelled, and the shards not yet run never run."""
    from engine.executors import DaskExecutor
    from engine.subspace.common import AdapterSource

    ex = DaskExecutor(client=client)
    src = AdapterSource([f"t{i}" for i in range(40)], adapters=[None] * 40)
    shards = src.split(20)
    assert ex.map_reduce(_slow, shards[:4], _add) == 8
    _CALLS.clear()
    ev = threading.Event()
    with pytest.raises(JobCancelled):
        ex.map_reduce(_slow, shards, _add, on_done=lambda j: ev.set(), cancel=ev)
    time.sleep(1.0)
    assert 1 <= len(_CALLS) < 8  # 2 workers: a shard or two past the first, not all 20
    assert not any(client.processing().values())


def _ids(shard, shared, tick):
    return {"ids": list(shard.task_ids), "read": False}


def _concat_once(x, y):
    """Concatenate in order; a partial read by a second combine fails (the combines may reuse their inputs)."""
    assert not x["read"] and not y["read"], "a partial result was combined twice"
    x["read"] = y["read"] = True
    return {"ids": x["ids"] + y["ids"], "read": False}


def test_chains_cover_the_shards_in_order():
    from engine.executors import _chains

    for n in range(0, 30):
        for w in range(1, 6):
            ch = _chains(n, w)
            assert [i for lo, hi in ch for i in range(lo, hi)] == list(range(n))
            assert len(ch) == max(1, min(n, w))
            sizes = [hi - lo for lo, hi in ch]
            assert max(sizes) - min(sizes) <= 1


def test_dask_chains_keep_the_task_order_and_combine_each_partial_once(client):
    """Many shards on 2 workers: one chain of links per worker, the order of the tasks kept, every partial read once."""
    from engine.executors import DaskExecutor
    from engine.subspace.common import AdapterSource

    ids = [f"t{i}" for i in range(37)]
    src = AdapterSource(ids, adapters=[None] * len(ids))
    for spw in (1, 3, 8):
        ex = DaskExecutor(client=client, shards_per_worker=spw)
        shards = src.split(ex.shard_count(len(ids)))
        done = []
        out = ex.map_reduce(_ids, shards, _concat_once, on_done=done.append)
        assert out["ids"] == ids
        assert sorted(done) == list(range(len(shards)))
    assert DaskExecutor(client=client).map_reduce(_ids, [], _concat_once) is None


def test_dask_cancel_in_a_build(client, demo_paths):
    from engine.executors import DaskExecutor

    ev = threading.Event()

    def progress(p):
        if "statistics:" in p.message:
            ev.set()

    with pytest.raises(JobCancelled):
        SharedSubspace.from_adapters_streaming(demo_paths, method="joint", max_error=0.05,
                                               executor=DaskExecutor(client=client), progress=progress, cancel=ev)


def test_executor_arguments():
    with pytest.raises(ValueError, match="unknown executor 'spark'"):
        make_executor("spark")
    with pytest.raises(ValueError, match="needs executor='dask'"):
        make_executor("inprocess", "tcp://127.0.0.1:8786")
    with pytest.raises(ValueError, match="pca.*in-process"):
        SharedSubspace.from_adapters(make_demo_adapters()[:3], method="pca", executor="dask")


def test_dask_missing_gives_the_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed → ImportError
    with pytest.raises(MissingDependencyError, match=DASK_HINT.replace("[", r"\[").replace("]", r"\]")):
        make_executor("dask")


class _Untouchable(dict):
    """A stored task's coefficients that fail on any read (O(1) adding must not look at them)."""

    def _no(self, *a, **k):
        raise AssertionError("read another task's coefficients")

    __getitem__ = get = items = values = keys = __iter__ = __len__ = __contains__ = _no


def test_project_and_absorb_incremental_read_only_the_new_adapter_and_the_basis(tmp_path, monkeypatch):
    """A subspace loaded from disk whose other tasks' inputs are gone and whose coefficients cannot be read."""
    import shutil

    import engine.io.local as local

    ads = make_demo_adapters()
    paths = [save_adapter(a, tmp_path / "in" / str(a.name)) for a in ads[:-2]]
    new = ads[-1]
    SharedSubspace.from_adapters_streaming(paths, method="joint", max_error=0.05).save(tmp_path / "sub")
    sub = SharedSubspace.load(tmp_path / "sub")
    shutil.rmtree(tmp_path / "in")  # the stored tasks' adapter files: gone
    for t in sub.tasks.values():
        t.coeffs = _Untouchable()
    reads = []
    monkeypatch.setattr(local, "load_adapter", lambda *a, **k: reads.append(a) or pytest.fail("read an adapter"))
    with pytest.raises(AssertionError, match="another task"):
        sub.reconstruct(sub.task_ids[0])  # (the poison works)
    proj = sub.project(new, "projected")
    assert proj.max_error < 1.0 and set(proj.coeffs) == set(sub.modules)
    added = sub.absorb_incremental(new, "added", allow_worse=True)
    assert set(added.coeffs) == set(sub.modules) and "added" in sub.tasks
    w = sub.reconstruct("added")
    for m in w.layer_names[:3]:  # the new task's error, measured independently from its ΔW
        d, ref = w.delta_weight(m).double(), new.delta_weight(m).double()
        assert float((d - ref).norm() / ref.norm()) == pytest.approx(added.fidelity[m], abs=2e-3)
    assert reads == []
