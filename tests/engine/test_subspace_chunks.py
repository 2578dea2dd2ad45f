"""Builds in chunks of modules (``memory_budget_mb``) equal the build over all modules at once."""

from __future__ import annotations

import threading

import pytest
import torch

from engine.demo import make_demo_adapters, make_demo_collection
from engine.errors import AdapterFormatError, JobCancelled
from engine.io import load_adapter, save_adapter
from engine.subspace import SharedSubspace
from engine.subspace.chunks import module_stat_bytes, plan_chunks

TINY = 1e-9  # MiB: every module is a chunk of its own


@pytest.fixture(scope="module")
def demo():
    return make_demo_adapters()


@pytest.fixture(scope="module")
def demo_paths(tmp_path_factory):
    return make_demo_collection(tmp_path_factory.mktemp("demo") / "c")


def _same(s1: SharedSubspace, s2: SharedSubspace) -> None:
    assert s1.task_ids == s2.task_ids
    assert list(s1.modules) == list(s2.modules)
    assert s1.k_per_module == s2.k_per_module
    assert {m: b.kind for m, b in s1.modules.items()} == {m: b.kind for m, b in s2.modules.items()}
    for m in s1.modules:
        assert s1.modules[m].explained == pytest.approx(s2.modules[m].explained, rel=1e-6, abs=1e-9)
    st1, st2 = s1.compression_stats(), s2.compression_stats()
    assert st1["original_bytes"] == st2["original_bytes"] and st1["stored_bytes"] == st2["stored_bytes"]
    assert st1["original_params"] == st2["original_params"]
    for t in s1.task_ids:
        p1, p2 = s1.tasks[t], s2.tasks[t]
        assert list(p1.coeffs) == list(p2.coeffs) and p1.ranks == p2.ranks
        assert p1.original_bytes == p2.original_bytes
        assert p1.fidelity == pytest.approx(p2.fidelity, rel=1e-6, abs=1e-9)
        assert p1.norms == pytest.approx(p2.norms, rel=1e-9)
        assert p1.template.metadata == p2.template.metadata and p1.template.rank == p2.template.rank
        w1, w2 = s1.reconstruct(t), s2.reconstruct(t)
        assert w1.layer_names == w2.layer_names and w1.rank == w2.rank
        for m in w1.layer_names:
            d1, d2 = w1.delta_weight(m), w2.delta_weight(m)
            assert torch.allclose(d1, d2, atol=1e-5 * max(1.0, float(d1.norm())))


SETTINGS = {
    "variance": {},  # joint/share: one k for all modules, found by a first round over the chunks
    "max_error": {"max_error": 0.05},
    "k3": {"num_components": 3},
    "adaptive": {"adaptive_k": True, "variance_threshold": 0.9},
}


@pytest.mark.parametrize("method", ["joint", "share", "pca", "svd"])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_chunked_equals_whole_in_memory(demo, method, setting):
    kw = SETTINGS[setting]
    whole = SharedSubspace.from_adapters(demo, method=method, memory_budget_mb=None, **kw)
    events = []
    chunked = SharedSubspace.from_adapters(demo, method=method, memory_budget_mb=TINY, progress=events.append, **kw)
    _same(whole, chunked)
    n_mods = len(demo[0].layer_names)
    assert any(f"[modules {n_mods}-{n_mods} of {n_mods}]" in e.message for e in events)
    steps = [e.step for e in events]
    assert steps == sorted(steps) and all(e.total == events[0].total for e in events)
    assert steps[-1] < events[0].total


def test_one_k_for_all_holds_across_chunks(demo):
    """With k by variance every module gets the largest k any module needs, also when built one module at a time."""
    sub = SharedSubspace.from_adapters(demo, memory_budget_mb=TINY, method="joint")
    ks = set(sub.k_per_module.values())
    assert len(ks) == 1


@pytest.mark.parametrize("method,kw", [("joint", {"max_error": 0.05}), ("joint", {}), ("share", {"max_error": 0.05}),
                                       ("pca", {"num_components": 3}), ("svd", {"max_error": 0.05})])
def test_chunked_streaming_equals_whole(demo_paths, method, kw):
    whole = SharedSubspace.from_adapters_streaming(demo_paths, method=method, memory_budget_mb=None, **kw)
    chunked = SharedSubspace.from_adapters_streaming(demo_paths, method=method, memory_budget_mb=TINY, **kw)
    _same(whole, chunked)
    mem = SharedSubspace.from_adapters([load_adapter(p) for p in demo_paths], method=method, memory_budget_mb=TINY, **kw)
    _same(whole, mem)


def test_default_budget_is_one_chunk_for_small_collections(demo):
    sizes = {m: module_stat_bytes("joint", demo[0].shapes(m), [8] * len(demo), 1024) for m in demo[0].layer_names}
    assert len(plan_chunks(sizes, 512 * 2**20)) == 1
    assert len(plan_chunks(sizes, 1)) == len(sizes)


def test_plan_chunks_under_budget():
    sizes = {f"m{i:02d}": 100 for i in range(10)}
    chunks = plan_chunks(sizes, 350)
    assert chunks == [[f"m{i:02d}" for i in range(j, min(j + 3, 10))] for j in range(0, 10, 3)]
    assert plan_chunks(sizes, None) == [sorted(sizes)]
    assert plan_chunks({"big": 10, "a": 1}, 5) == [["a"], ["big"]]  # larger than the budget: a chunk of its own


def test_7b_estimate_splits_into_several_chunks():
    """7B-shaped (4096², r16, 64 modules, 100 adapters): all at once is GBs; the default budget splits it."""
    sizes = {f"model.layers.{i}.self_attn.{p}": module_stat_bytes("joint", (4096, 4096), [16] * 100, 1024)
             for i in range(32) for p in ("q_proj", "v_proj")}
    assert sum(sizes.values()) > 4 * 2**30
    chunks = plan_chunks(sizes, 512 * 2**20)
    assert len(chunks) > 8 and all(sum(sizes[m] for m in c) <= 512 * 2**20 for c in chunks)
    assert [m for c in chunks for m in c] == sorted(sizes)


def test_bad_budget(demo):
    with pytest.raises(ValueError, match="memory_budget_mb"):
        SharedSubspace.from_adapters(demo, memory_budget_mb=0, method="joint")


def test_cancel_in_a_later_chunk(demo):
    ev = threading.Event()
    seen = []

    def progress(p):
        seen.append(p)
        if "[modules 3-3" in p.message:
            ev.set()

    with pytest.raises(JobCancelled):
        SharedSubspace.from_adapters(demo, max_error=0.05, memory_budget_mb=TINY, progress=progress, cancel=ev)
    assert not any("[modules 4-4" in p.message for p in seen)


def test_nan_in_a_later_chunk_names_the_file(tmp_path, demo):
    paths = [save_adapter(a, tmp_path / str(a.name)) for a in demo[:4]]
    bad = demo[2]
    last = bad.layer_names[-1]
    poisoned = bad.lora_a[last].clone()
    poisoned[0, 0] = float("nan")
    w = type(bad)(**{**bad.__dict__, "lora_a": {**bad.lora_a, last: poisoned}})
    save_adapter(w, paths[2], force=True)
    with pytest.raises(AdapterFormatError, match=str(paths[2].name)):
        SharedSubspace.from_adapters_streaming(paths, max_error=0.05, memory_budget_mb=TINY)


def test_load_adapter_modules_subset(demo_paths):
    full = load_adapter(demo_paths[0])
    want = full.layer_names[3:6]
    part = load_adapter(demo_paths[0], modules=want + ["model.layers.99.nothing"])
    assert part.layer_names == sorted(want)
    assert set(part.lora_a) == set(part.lora_b) == set(want)
    for m in want:
        assert torch.equal(part.lora_a[m], full.lora_a[m]) and torch.equal(part.lora_b[m], full.lora_b[m])
    assert part.rank == full.rank and part.metadata == full.metadata and part.name == full.name
    assert part.target_modules == full.target_modules and part.lora_alpha == full.lora_alpha
    assert load_adapter(demo_paths[0], modules=[]).layer_names == []
    assert load_adapter(demo_paths[0], modules=None).layer_names == full.layer_names


def test_load_adapter_modules_still_checks_header_and_values(tmp_path, demo):
    a = demo[0]
    m0, m_last = a.layer_names[0], a.layer_names[-1]
    poisoned = a.lora_b[m_last].clone()
    poisoned[0, 0] = float("inf")
    w = type(a)(**{**a.__dict__, "lora_b": {**a.lora_b, m_last: poisoned}})
    out = save_adapter(w, tmp_path / "bad")
    assert load_adapter(out, modules=[m0]).layer_names == [m0]  # the bad tensor is not read
    with pytest.raises(AdapterFormatError, match="bad"):
        load_adapter(out, modules=[m_last])
    # a header problem anywhere is still refused, whatever the subset
    from safetensors.torch import load_file, save_file

    out2 = save_adapter(a, tmp_path / "shape")
    f = out2 / "adapter_model.safetensors"
    sd = load_file(str(f))
    key = next(k for k in sd if k.endswith(f"{m_last}.lora_A.weight"))
    sd[key] = sd[key][:-1].contiguous()
    save_file(sd, str(f))
    with pytest.raises(AdapterFormatError, match="disagree on rank"):
        load_adapter(out2, modules=[m0])


def test_load_adapter_modules_keeps_whole_file_config_facts(tmp_path, demo):
    """r and target_modules missing from the config come from every module of the file, not just those read."""
    import json

    out = save_adapter(demo[0], tmp_path / "a")
    cfg_path = out / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["target_modules"]
    cfg_path.write_text(json.dumps(cfg))
    full = load_adapter(out)
    part = load_adapter(out, modules=[demo[0].layer_names[0]])
    assert part.target_modules == full.target_modules == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert part.rank == full.rank


def test_chunks_fit_their_result_in_the_budget():
    """A chunk's statistics plus its coefficients' bound (each task's factors at fp16) stay within the budget."""
    from engine.subspace.chunks import plan_build, result_bytes
    from engine.subspace.joint import JointParams

    shapes = {f"model.layers.{i}.self_attn.{q}": (4096, 4096) for i in range(32) for q in ("q_proj", "v_proj")}
    assert result_bytes("joint", (4096, 4096), [16] * 1000) == 2 * 16 * 1000 * 8192  # per-task factors at fp16
    assert result_bytes("pca", (4096, 4096), [16] * 1000) == 0
    for n, per_chunk in ((100, 5), (300, 3), (1000, 1)):
        ranks = {m: [16] * n for m in shapes}
        chunks, bounded, sizes = plan_build("joint", JointParams(max_error=0.05), shapes, ranks, 512)
        assert not bounded and {len(c) for c in chunks[:-1]} == {per_chunk}, n
        held = [sum(sizes[m] + result_bytes("joint", shapes[m], ranks[m]) for m in c) for c in chunks]
        assert max(held) <= 512 * 2**20 and [m for c in chunks for m in c] == sorted(shapes)


def test_later_chunks_take_more_modules_once_a_result_is_seen_small(demo, monkeypatch):
    """Planned with every module's result at its bound (one module a chunk); a small result seen: later chunks merge."""
    import re

    import engine.subspace.chunks as ch

    ref = SharedSubspace.from_adapters(demo, method="joint", max_error=0.05, memory_budget_mb=None)
    shapes = {m: demo[0].shapes(m) for m in demo[0].layer_names}
    ranks = {m: [a.module_rank(m) for a in demo] for m in shapes}
    stats = {m: ch.module_stat_bytes("joint", shapes[m], ranks[m], 256) for m in shapes}
    bound = 2 * max(stats.values()) + max(ch.result_bytes("joint", shapes[m], ranks[m]) for m in shapes)
    # a budget of ~3 modules' statistics, and a bound on each module's result that leaves room for one
    monkeypatch.setattr(ch, "result_bytes", lambda method, shape, rk: bound)
    budget_mb = (3 * max(stats.values()) + bound - 2 * max(stats.values())) / 2**20
    events = []
    got = SharedSubspace.from_adapters(demo, method="joint", max_error=0.05, memory_budget_mb=budget_mb,
                                       progress=events.append)
    spans = []
    for e in events:
        m = re.search(r"\[modules (\d+)-(\d+) of (\d+)\]", e.message)
        if m and (not spans or spans[-1] != m.groups()):
            spans.append(m.groups())
    assert spans[0][:2] == ("1", "1") and any(int(b) > int(a) for a, b, _ in spans[1:])  # the first alone, then more
    assert [int(a) for a, _, _ in spans] == [1] + [int(b) + 1 for _, b, _ in spans[:-1]]  # every module once, in order
    assert int(spans[-1][1]) == len(shapes)
    steps = [e.step for e in events]
    assert steps == sorted(steps) and all(e.total == events[0].total for e in events) and steps[-1] <= events[0].total
    _same(ref, got)
