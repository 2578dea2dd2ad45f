"""SharedSubspace: exactness, ΔW fidelity, rotation invariance, k selection, absorb, bad input."""

from __future__ import annotations

import pytest
import torch

from engine.errors import IncompatibleAdaptersError, UnknownTaskError
from engine.subspace import SharedSubspace
from engine.types import LoRAWeights

OUT, IN, R = 24, 20, 3
MODS = ("m.layers.0.q_proj", "m.layers.0.v_proj")


def lora(a: dict, b: dict, name: str, r: int = R, alpha: float = 6.0) -> LoRAWeights:
    cfg = {"r": r, "lora_alpha": alpha, "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": "tiny"}
    return LoRAWeights(layer_names=sorted(a), lora_a=a, lora_b=b, rank=r, metadata=cfg, name=name)


def family(n: int, k0: int = 4, seed: int = 0, noise: float = 0.0, r: int = R) -> list[LoRAWeights]:
    """Adapters whose ΔW all lie in one k0-dim column space and one k0-dim row space per module."""
    g = torch.Generator().manual_seed(seed)
    cols = {m: torch.linalg.qr(torch.randn(OUT, k0, generator=g))[0] for m in MODS}
    rows = {m: torch.linalg.qr(torch.randn(IN, k0, generator=g))[0] for m in MODS}
    out = []
    for i in range(n):
        a = {m: torch.randn(r, k0, generator=g) @ rows[m].T + noise * torch.randn(r, IN, generator=g) for m in MODS}
        b = {m: cols[m] @ torch.randn(k0, r, generator=g) + noise * torch.randn(OUT, r, generator=g) for m in MODS}
        out.append(lora(a, b, f"t{i}", r=r))
    return out


def dense_err(orig: LoRAWeights, rec: LoRAWeights, m: str) -> float:
    d = orig.delta_weight(m).double()
    return float((d - rec.delta_weight(m).double()).norm() / d.norm())


def test_pca_full_k_is_exact_with_mean():
    ads = family(5, noise=0.3)
    sub = SharedSubspace.from_adapters(ads, method="pca", num_components=4, dtype="float32")
    assert sub.compression_stats()["error"]["max"] < 1e-5
    rec = sub.reconstruct("t2")
    assert dense_err(ads[2], rec, MODS[0]) < 1e-5


@pytest.mark.parametrize("method", ["joint", "share", "pca", "svd"])
def test_recorded_error_equals_dense_error(method):
    ads = family(5, noise=0.4, seed=3)
    sub = SharedSubspace.from_adapters(ads, method=method, num_components=2)
    for a in ads:
        rec = sub.reconstruct(a.name)
        for m in MODS:
            assert sub.tasks[a.name].fidelity[m] == pytest.approx(dense_err(a, rec, m), rel=1e-3, abs=1e-4)
    stats = sub.compression_stats()
    assert stats["ratio"] > 0 and stats["original_bytes"] == sum(a.nbytes for a in ads)
    assert set(stats["error"]["per_task"]) == {a.name for a in ads}


def test_max_error_meets_target_per_module_and_k_selection():
    ads = family(6, noise=0.2, seed=5)
    sub = SharedSubspace.from_adapters(ads, max_error=0.1, dtype="float32")
    assert sub.compression_stats()["error"]["max"] <= 0.1 + 1e-6
    ev = sub.explained_variance()
    assert set(ev) == set(MODS) and all(0 < v[-1] <= 1 + 1e-9 for v in ev.values())
    assert all(x <= y + 1e-9 for v in ev.values() for x, y in zip(v, v[1:]))
    k6 = SharedSubspace.from_adapters(ads, variance_threshold=0.99, adaptive_k=True, method="joint").k_per_module
    k5 = SharedSubspace.from_adapters(ads, variance_threshold=0.5, adaptive_k=True, method="joint").k_per_module
    assert all(k5[m] <= k6[m] for m in MODS)


def test_project_add_task_and_absorb_incremental():
    ads = family(5, noise=0.05, seed=6)
    sub = SharedSubspace.from_adapters(ads[:4], max_error=0.05, dtype="float32", hybrid=False)
    before = {t: {m: {k: v.clone() for k, v in c.items()} for m, c in p.coeffs.items()} for t, p in sub.tasks.items()}
    proj = sub.project(ads[4], "new")
    assert set(proj.fidelity) == set(MODS)
    sub.add_task(proj)
    assert "new" in sub.task_ids
    out = family(1, seed=77, noise=1.0)[0]  # unrelated: needs new directions
    p2 = sub.absorb_incremental(out, "outlier")
    assert p2.max_error <= 0.05 + 1e-6
    assert all(sub.modules[m].k > 0 for m in MODS)
    for t, coeffs in before.items():  # stored tasks untouched, still reconstruct the same
        for m, c in coeffs.items():
            for k, v in c.items():
                assert torch.equal(sub.tasks[t].coeffs[m][k], v)
    assert dense_err(out, sub.reconstruct("outlier"), MODS[0]) == pytest.approx(p2.fidelity[MODS[0]], abs=1e-4)


def test_absorb_recomputes_and_reports_bound():
    ads = family(4, noise=0.1, seed=7)
    sub = SharedSubspace.from_adapters(ads[:3], num_components=3, method="joint")
    sub.absorb(ads[3], "t3")
    assert sub.task_ids == ["t0", "t1", "t2", "t3"]
    assert sub.tasks["t0"].error_is_bound and not sub.tasks["t3"].error_is_bound
    for a in ads[:3]:
        for m in MODS:
            assert dense_err(a, sub.reconstruct(a.name), m) <= sub.tasks[a.name].fidelity[m] + 1e-3


def test_mixed_ranks_joint_ok_pca_refuses():
    ads = family(3, seed=8) + family(2, seed=8, r=5)
    for i, a in enumerate(ads):
        a.name = f"x{i}"
    sub = SharedSubspace.from_adapters(ads, num_components=4, method="joint")
    assert sub.reconstruct("x4").rank <= 5  # the seed's meaning: at most the adapter's own rank
    rec = sub.reconstruct("x4", pad_to_vllm=True)
    assert rec.rank == 8 and rec.metadata["rank_pattern"] == {}
    with pytest.raises(IncompatibleAdaptersError, match="pca"):
        SharedSubspace.from_adapters(ads, method="pca")


def test_single_adapter_joint_works_pca_refuses():
    ads = family(1, seed=9)
    sub = SharedSubspace.from_adapters(ads, num_components=2, method="joint")
    assert sub.task_ids == ["t0"]
    with pytest.raises(ValueError, match="at least 2"):
        SharedSubspace.from_adapters(ads, method="pca")


def test_bad_input_is_named():
    ads = family(3, seed=10)
    with pytest.raises(ValueError, match="no adapters"):
        SharedSubspace.from_adapters([], method="joint")
    # the seed's pca takes k up to N (min(k, N) components, the N-th of zero variance)
    assert SharedSubspace.from_adapters(ads, method="pca", num_components=5).num_components == 3
    with pytest.raises(ValueError, match="too large"):
        SharedSubspace.from_adapters(ads, num_components=50, method="joint")
    with pytest.raises(ValueError, match="invalid task id"):
        SharedSubspace.from_adapters(ads, task_ids=["a", "../b", "c"], method="joint")
    with pytest.raises(ValueError, match="duplicate"):
        SharedSubspace.from_adapters(ads, task_ids=["a", "a", "c"], method="joint")
    bad = family(1, seed=11)[0]
    bad.lora_a[MODS[1]][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"'t0'.*v_proj.*NaN"):
        SharedSubspace.from_adapters([ads[0], bad], task_ids=["ok", "t0"], method="joint")
    other = lora({m: torch.zeros(R, IN + 1) for m in MODS}, {m: torch.zeros(OUT, R) for m in MODS}, "wide")
    with pytest.raises(IncompatibleAdaptersError, match="wide"):
        SharedSubspace.from_adapters([ads[0], other], method="joint")
    sub = SharedSubspace.from_adapters(ads, num_components=2, method="joint")
    with pytest.raises(UnknownTaskError, match="nope"):
        sub.reconstruct("nope")
    with pytest.raises(IncompatibleAdaptersError, match="shape"):
        sub.project(other, "wide")
    with pytest.raises(ValueError, match="method"):
        SharedSubspace.from_adapters(ads, method="magic")


def test_quantize_remeasures_error():
    ads = family(5, noise=0.2, seed=12)
    sub = SharedSubspace.from_adapters(ads, num_components=4, dtype="float32", method="joint")
    exact = sub.copy().quantize(bits=4, method="nf4", double_quant=True, quantize_loadings=True, adapters=ads)
    bound = sub.copy().quantize(bits=4, method="nf4", double_quant=True, quantize_loadings=True)
    for a in ads:
        rec = exact.reconstruct(a.name)
        for m in MODS:
            e = exact.tasks[a.name].fidelity[m]
            assert e == pytest.approx(dense_err(a, rec, m), rel=1e-3, abs=1e-4)
            assert e > sub.tasks[a.name].fidelity[m]  # rounding costs something, and it is measured
            assert bound.tasks[a.name].fidelity[m] >= e - 1e-6
    s8, s4 = sub.copy().quantize(bits=8).compression_stats(), exact.compression_stats()
    assert s4["stored_bytes"] < s8["stored_bytes"] < sub.compression_stats()["stored_bytes"]
    assert s4["quantization"]["method"] == "nf4"


def test_trainable_params_and_full_stack():
    ads = family(3, seed=13)
    sub = SharedSubspace.from_adapters(ads, num_components=2, method="joint")
    params = sub.get_trainable_params("t1", num_expand=1)
    assert params[f"{MODS[0]}.sigma"].shape == (3, 3) and params[f"{MODS[0]}.sigma"].requires_grad
    # other tasks are unaffected by the expansion
    assert dense_err(ads[0], sub.reconstruct("t0"), MODS[0]) == pytest.approx(sub.tasks["t0"].fidelity[MODS[0]], abs=2e-3)
    fs = sub.full_stack_compression(1_000_000)
    assert fs["base_model_bytes"] == 2_000_000 and fs["total_after_bytes"] < fs["total_before_bytes"]


def test_progress_and_cancel():
    import threading

    from engine.errors import JobCancelled

    ads = family(3, seed=14)
    seen = []
    SharedSubspace.from_adapters(ads, num_components=2, progress=seen.append, method="joint")
    assert seen and all(p.step <= p.total for p in seen)
    ev = threading.Event()
    ev.set()
    with pytest.raises(JobCancelled):
        SharedSubspace.from_adapters(ads, num_components=2, cancel=ev, method="joint")


def test_methods_registered_torch_free():
    import subprocess
    import sys

    code = ("import sys; from engine.registry import methods; "
            "c = methods('compress'); q = methods('quantize'); "
            "assert {'joint', 'share', 'pca', 'svd'} <= set(c) and {'symmetric', 'nf4'} <= set(q); "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
    from engine.registry import get_method

    ads = family(3, seed=15)
    sub = get_method("compress", "joint").func(ads, num_components=2)
    get_method("quantize", "symmetric").func(sub, bits=4)
    assert sub.quantization["bits"] == 4
