"""engine.subspace.joint: the joint build (exactness, rotation invariance), its randomized range sketch and the
mean-error k rule, against independent computations."""

from __future__ import annotations

import pytest
import torch
from test_subspace import MODS, R, dense_err, family, lora

from engine.io import save_adapter
from engine.subspace import SharedSubspace
from engine.subspace.joint import encode_joint


def _dense_mean_err(sub: SharedSubspace, ads, m: str) -> float:
    return sum(dense_err(a, sub.reconstruct(a.name), m) for a in ads) / len(ads)


def test_joint_exact_on_collection_in_k_dim_space():
    ads = family(6, k0=4)
    sub = SharedSubspace.from_adapters(ads, num_components=4, dtype="float32", method="joint")
    assert sub.k_per_module == {m: 4 for m in MODS}
    assert sub.compression_stats()["error"]["max"] < 1e-5
    for a in ads:
        rec = sub.reconstruct(a.name)
        for m in MODS:
            assert dense_err(a, rec, m) < 1e-5


def test_joint_blind_to_rank_rotation():
    ads = family(5, noise=0.4, seed=4)
    g = torch.Generator().manual_seed(99)
    rotated = []
    for a in ads:
        qs = {m: torch.linalg.qr(torch.randn(R, R, generator=g))[0] for m in MODS}
        rotated.append(lora({m: qs[m].T @ a.lora_a[m] for m in MODS}, {m: a.lora_b[m] @ qs[m] for m in MODS}, a.name))
    s1 = SharedSubspace.from_adapters(ads, num_components=3, dtype="float32", method="joint")
    s2 = SharedSubspace.from_adapters(rotated, num_components=3, dtype="float32", method="joint")
    for a in ads:
        for m in MODS:
            assert s1.tasks[a.name].fidelity[m] == pytest.approx(s2.tasks[a.name].fidelity[m], rel=1e-4, abs=1e-6)
            d1 = s1.reconstruct(a.name).delta_weight(m)
            d2 = s2.reconstruct(a.name).delta_weight(m)
            assert torch.allclose(d1, d2, atol=1e-5 * float(d1.norm()))
    # the seed is not: its factor-space PCA sees different data
    p1 = SharedSubspace.from_adapters(ads, method="pca", num_components=2, dtype="float32")
    p2 = SharedSubspace.from_adapters(rotated, method="pca", num_components=2, dtype="float32")
    assert abs(p1.compression_stats()["error"]["mean"] - p2.compression_stats()["error"]["mean"]) > 1e-3


def test_sketch_narrower_than_the_ranks_still_exact_on_a_low_rank_collection():
    # 30 adapters of rank 3: 90 columns per side, sketched in 8; the collection spans 4 dimensions
    ads = family(30, k0=4, seed=11)
    sub = SharedSubspace.from_adapters(ads, num_components=4, sketch_rank=8, dtype="float32", method="joint")
    assert sub.k_per_module == {m: 4 for m in MODS}
    assert sub.compression_stats()["error"]["max"] < 1e-5
    for a in ads[::7]:
        for m in MODS:
            assert dense_err(a, sub.reconstruct(a.name), m) < 1e-5


def test_sketch_caps_k_and_errors_stay_measured():
    ads = family(12, k0=4, noise=0.5, seed=12)  # noise fills every direction: Σr = 36 > 6
    exact = SharedSubspace.from_adapters(ads, num_components=5, refine=0, dtype="float32", method="joint")
    sketched = SharedSubspace.from_adapters(ads, num_components=5, refine=0, sketch_rank=6, dtype="float32", method="joint")
    assert max(sketched.k_per_module.values()) <= 6
    for a in ads:
        for m in MODS:  # the recorded error is the true one, whatever the sketch found
            assert sketched.tasks[a.name].fidelity[m] == pytest.approx(dense_err(a, sketched.reconstruct(a.name), m),
                                                                        rel=1e-3, abs=1e-5)
    e_exact = exact.compression_stats()["error"]["mean"]
    e_sketch = sketched.compression_stats()["error"]["mean"]
    assert e_exact <= e_sketch + 1e-6  # the exact top directions are optimal for the joint energy …
    assert e_sketch <= e_exact * 1.25  # … and one power step gets close to them


def test_exact_basis_matches_the_dense_eigenvectors():
    # without truncation the column basis spans the top eigenvectors of Σ ΔW_i ΔW_iᵀ (formed densely here)
    ads = family(6, k0=4, noise=0.3, seed=13)
    sub = SharedSubspace.from_adapters(ads, num_components=3, refine=0, dtype="float32", method="joint")
    for m in MODS:
        g = sum(a.delta_weight(m).double() @ a.delta_weight(m).double().T for a in ads)
        top = torch.linalg.eigh(g)[1][:, -3:]
        u = sub.modules[m].tensors["U"].double()
        # same subspace: the projector difference vanishes
        assert torch.linalg.matrix_norm(u @ u.T - top @ top.T, ord=2) < 1e-5


@pytest.mark.parametrize("method", ["joint", "pca"])
def test_mean_error_rule_picks_the_smallest_k_meeting_the_mean(method):
    ads = family(8, k0=5, noise=0.35, seed=14)
    target = 0.2
    sub = SharedSubspace.from_adapters(ads, method=method, mean_error=target, refine=0, hybrid=False, dtype="float32")
    kmax = 7 if method == "pca" else 20
    for m in MODS:
        k = sub.k_per_module[m]
        assert _dense_mean_err(sub, ads, m) <= target + 1e-4
        # independently: the fixed-k builds' mean errors; k is the first meeting the target
        means = {}
        for kk in range(1, min(kmax, k) + 1):
            fixed = SharedSubspace.from_adapters(ads, method=method, num_components=kk, refine=0, hybrid=False,
                                                 dtype="float32")
            means[kk] = _dense_mean_err(fixed, ads, m)
        assert means[k] <= target + 1e-4
        assert all(means[j] > target - 1e-4 for j in range(1, k)), (m, k, means)
    # a mean target allows some tasks above it; max_error with the same number never does
    by_max = SharedSubspace.from_adapters(ads, method=method, max_error=target, refine=0, hybrid=False, dtype="float32")
    assert all(sub.k_per_module[m] <= by_max.k_per_module[m] for m in MODS)
    assert by_max.compression_stats()["error"]["max"] <= target + 1e-4


def test_mean_and_max_together_meet_both():
    ads = family(8, k0=5, noise=0.35, seed=15)
    sub = SharedSubspace.from_adapters(ads, mean_error=0.1, max_error=0.3, hybrid=False, dtype="float32")
    st = sub.compression_stats()["error"]
    assert st["mean"] <= 0.1 + 1e-4 and st["max"] <= 0.3 + 1e-4


def test_mean_error_validated():
    ads = family(3)
    with pytest.raises(ValueError, match="mean_error"):
        SharedSubspace.from_adapters(ads, mean_error=1.5)
    with pytest.raises(ValueError, match="sketch_rank"):
        SharedSubspace.from_adapters(ads, sketch_rank=0, method="joint")


def test_streaming_equals_in_memory_with_a_narrow_sketch(tmp_path):
    ads = family(10, k0=4, noise=0.3, seed=16)
    paths = [save_adapter(a, tmp_path / a.name, dtype=torch.float32) for a in ads]
    mem = SharedSubspace.from_adapters(ads, mean_error=0.1, sketch_rank=5)
    st = SharedSubspace.from_adapters_streaming(paths, mean_error=0.1, sketch_rank=5)
    assert mem.k_per_module == st.k_per_module
    for m in MODS:
        for key, t in mem.modules[m].tensors.items():
            assert torch.allclose(t.float(), st.modules[m].tensors[key].float(), atol=1e-3), (m, key)
    for a in ads:
        for m in MODS:
            assert mem.tasks[a.name].fidelity[m] == pytest.approx(st.tasks[a.name].fidelity[m], rel=1e-3, abs=1e-5)


def test_encode_joint_error_is_exact_for_a_rounded_non_orthonormal_basis():
    g = torch.Generator().manual_seed(17)
    u = torch.linalg.qr(torch.randn(40, 6, generator=g, dtype=torch.float64))[0].half()
    v = torch.linalg.qr(torch.randn(30, 6, generator=g, dtype=torch.float64))[0].half()
    sb, a = torch.randn(40, R, generator=g, dtype=torch.float64), torch.randn(R, 30, generator=g, dtype=torch.float64)
    for dtype in (torch.float16, torch.float32):
        coeffs, err = encode_joint(u, v, sb, a, R, dtype)
        if "c" in coeffs:
            core = coeffs["c"].double() @ coeffs["d"].double()
        else:  # reconstruction keeps the rank-r truncation of Σ (the adapter's rank)
            uu, ss, vh = torch.linalg.svd(coeffs["sigma"].double())
            core = uu[:, :R] @ torch.diag(ss[:R]) @ vh[:R]
        rec = u.double() @ core @ v.double().T
        dense = float((sb @ a - rec).norm() / (sb @ a).norm())
        assert err == pytest.approx(dense, rel=1e-6, abs=1e-9)


def test_error_target_picks_the_cheapest_feasible_k_pair_from_dense_bases():
    # column spaces of 3 dims, row spaces of 6: the cheapest pair is rectangular (k_u < k_v)
    g = torch.Generator().manual_seed(18)
    ads = []
    cols = {m: torch.linalg.qr(torch.randn(24, 3, generator=g, dtype=torch.float64))[0] for m in MODS}
    rows = {m: torch.linalg.qr(torch.randn(20, 6, generator=g, dtype=torch.float64))[0] for m in MODS}
    from test_subspace import lora

    for i in range(6):
        a = {m: (torch.randn(R, 6, generator=g, dtype=torch.float64) @ rows[m].T
                 + 0.03 * torch.randn(R, 20, generator=g, dtype=torch.float64)).float() for m in MODS}
        b = {m: (cols[m] @ torch.randn(3, R, generator=g, dtype=torch.float64)
                 + 0.03 * torch.randn(24, R, generator=g, dtype=torch.float64)).float() for m in MODS}
        ads.append(lora(a, b, f"t{i}"))
    target = 0.1
    sub = SharedSubspace.from_adapters(ads, mean_error=target, refine=0, hybrid=False, dtype="float32")
    n = len(ads)
    for m in MODS:
        u, v = sub.modules[m].tensors["U"], sub.modules[m].tensors["V"]
        ku, kv = u.shape[1], v.shape[1]
        assert ku < kv  # rectangular where the data is
        # independently: dense eigenvectors of Σ ΔWΔWᵀ and Σ ΔWᵀΔW, every pair's mean error, the cheapest feasible
        dws = [a.delta_weight(m).double() for a in ads]
        eu = torch.linalg.eigh(sum(d @ d.T for d in dws))[1].flip(1)
        ev = torch.linalg.eigh(sum(d.T @ d for d in dws))[1].flip(1)
        best = None
        for i in range(1, 13):
            for j in range(1, 13):
                mean = sum(float((d - eu[:, :i] @ (eu[:, :i].T @ d @ ev[:, :j]) @ ev[:, :j].T).norm() / d.norm())
                           for d in dws) / n
                if mean <= target:
                    cost = i * 24 + j * 20 + n * min(i * j, min(i, j, R) * (i + j))
                    if best is None or cost < best[0]:
                        best = (cost, i, j)
        assert best is not None
        mine = ku * 24 + kv * 20 + n * min(ku * kv, min(ku, kv, R) * (ku + kv))
        assert mine == best[0], (m, (ku, kv), best)
        assert _dense_mean_err(sub, ads, m) <= target + 1e-4


def test_target_beyond_the_sketch_falls_back_to_per_task_storage():
    ads = family(12, k0=6, noise=0.6, seed=19)  # needs far more than 2 shared directions
    sub = SharedSubspace.from_adapters(ads, mean_error=0.05, sketch_rank=2, dtype="float32")
    assert set(sub.compression_stats()["module_kinds"].values()) == {"separate"}
    assert sub.compression_stats()["error"]["mean"] <= 0.05 + 1e-6
    # without hybrid the shared basis is kept at the sketch's width, and the error says so
    best = SharedSubspace.from_adapters(ads, mean_error=0.05, sketch_rank=2, hybrid=False, dtype="float32")
    assert max(best.k_per_module.values()) <= 2
    assert best.compression_stats()["error"]["mean"] > 0.05


def test_rank_zero_module_after_a_full_buffer_keeps_task_order():
    from engine.subspace.joint import BUFFER_COLUMNS
    from test_subspace import lora

    n_full = BUFFER_COLUMNS // R + 1  # the buffer fills exactly, then one adapter of rank 0 in one module
    ads = family(n_full, k0=4, noise=0.1, seed=20)
    z = ads[0]
    a = {m: z.lora_a[m].clone() for m in MODS}
    b = {m: z.lora_b[m].clone() for m in MODS}
    a[MODS[0]], b[MODS[0]] = torch.zeros(0, a[MODS[0]].shape[1]), torch.zeros(b[MODS[0]].shape[0], 0)
    ads.append(lora(a, b, "zero-rank"))
    sub = SharedSubspace.from_adapters(ads, max_error=0.3, hybrid=False, dtype="float32")
    for x in ads[::10]:
        for m in MODS:
            if x.lora_a[m].shape[0]:
                assert sub.tasks[x.name].fidelity[m] == pytest.approx(dense_err(x, sub.reconstruct(x.name), m),
                                                                      rel=1e-3, abs=1e-5)


def test_num_components_beyond_the_sketch_is_refused():
    ads = family(10, k0=4, noise=0.3, seed=21)
    with pytest.raises(ValueError, match="sketch_rank"):
        SharedSubspace.from_adapters(ads, num_components=8, sketch_rank=4, method="joint")
