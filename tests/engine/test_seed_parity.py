"""Seed names keep the seed's meaning (vlora-dev 1.0.0), checked against independent dense computations.

The seed's own suite runs through ``scripts/seed_parity.py`` (it needs the package index);
these tests pin each meaning this project fixed, without it.
"""

from __future__ import annotations

import pytest
import torch

from engine import (
    SharedSubspace,
    adapter_diff,
    compute_similarity_matrix,
    dare_merge,
    find_clusters,
    find_outliers,
    subspace_coverage,
    task_arithmetic,
    ties_merge,
)
from engine.merge import MERGE_METHODS, merge_adapters
from engine.types import LoRAWeights

LAYERS = ("layer.0.q_proj", "layer.0.v_proj")


def _adapters(n: int, seed: int = 0, rank: int = 4, dim: int = 16, noise: float = 0.01) -> list[LoRAWeights]:
    g = torch.Generator().manual_seed(seed)
    sa = {m: torch.randn(3, rank * dim, generator=g) for m in LAYERS}
    sb = {m: torch.randn(3, dim * rank, generator=g) for m in LAYERS}
    out = []
    for _ in range(n):
        la = {m: (torch.randn(3, generator=g) @ sa[m] + noise * torch.randn(rank * dim, generator=g)).reshape(rank, dim)
              for m in LAYERS}
        lb = {m: (torch.randn(3, generator=g) @ sb[m] + noise * torch.randn(dim * rank, generator=g)).reshape(dim, rank)
              for m in LAYERS}
        out.append(LoRAWeights(layer_names=list(LAYERS), lora_a=la, lora_b=lb, rank=rank))
    return out


def _dw(a: LoRAWeights, m: str) -> torch.Tensor:
    return a.scale(m) * (a.lora_b[m].double() @ a.lora_a[m].double())


def _flat(a: LoRAWeights) -> torch.Tensor:
    return torch.cat([_dw(a, m).reshape(-1) for m in a.layer_names])


# -- merging ------------------------------------------------------------------------------


def test_task_arithmetic_without_weights_is_the_mean_update():
    ads = _adapters(3)
    merged = task_arithmetic(ads)
    for m in LAYERS:
        want = sum(_dw(a, m) for a in ads) / 3
        assert torch.allclose(_dw(merged, m), want, atol=1e-4)
    # the job layer's default for the same method is the same
    res = merge_adapters(ads, "task_arithmetic")
    assert res.params["weights"] == pytest.approx([1 / 3] * 3)


def test_task_arithmetic_weights_are_used_as_given():
    ads = _adapters(2, seed=1)
    merged = task_arithmetic(ads, weights=[1.0, 3.0])
    for m in LAYERS:
        assert torch.allclose(_dw(merged, m), _dw(ads[0], m) + 3 * _dw(ads[1], m), atol=1e-4)
    with pytest.raises(ValueError, match="weights length"):
        task_arithmetic(ads, weights=[1.0])
    with pytest.raises(ValueError, match="at least one"):
        task_arithmetic([])


def test_dare_without_drop_is_the_mean_and_ties_density_zero_raises():
    ads = _adapters(2, seed=2)
    merged = dare_merge(ads, drop_rate=0.0, rank=8)  # rank 8 holds the exact mean of two rank-4 updates
    for m in LAYERS:
        assert torch.allclose(_dw(merged, m), (_dw(ads[0], m) + _dw(ads[1], m)) / 2, atol=1e-3)
    with pytest.raises(ValueError, match="density"):
        ties_merge(ads, density=0.0)


def test_merge_methods_is_the_seeds_registry():
    assert set(MERGE_METHODS) >= {"average", "ties", "dare"}
    assert MERGE_METHODS["average"] is task_arithmetic


def test_batch_merge_help_states_the_weights_default():
    from engine.registry import methods

    import engine.jobs.kinds  # noqa: F401  (registers the methods)

    texts = {p.help for info in methods("merge").values() for p in info.params if p.name == "weights"}
    assert len(texts) == 1 and "1/N" in next(iter(texts)) and "task_arithmetic" in next(iter(texts))


# -- analysis -----------------------------------------------------------------------------


def test_compute_similarity_matrix_is_a_tensor_of_update_cosines():
    ads = _adapters(4, seed=3)
    sim = compute_similarity_matrix(ads)
    assert isinstance(sim, torch.Tensor) and sim.shape == (4, 4)
    x = torch.stack([_flat(a) for a in ads])
    x = x / x.norm(dim=1, keepdim=True)
    assert torch.allclose(sim.double(), x @ x.T, atol=1e-5)
    with pytest.raises(ValueError, match="at least 2"):
        compute_similarity_matrix(ads[:1])
    assert find_clusters(sim, threshold=-1.0) == [[0, 1, 2, 3]]


def test_find_outliers_is_a_z_score_of_the_distance_to_the_centroid():
    ads = _adapters(8, seed=4)
    g = torch.Generator().manual_seed(5)
    ads.append(LoRAWeights(layer_names=list(LAYERS), rank=4,
                           lora_a={m: 100 * torch.randn(4, 16, generator=g) for m in LAYERS},
                           lora_b={m: 100 * torch.randn(16, 4, generator=g) for m in LAYERS}))
    x = torch.stack([_flat(a) for a in ads])
    d = (x - x.mean(dim=0)).norm(dim=1)
    z = (d - d.mean()) / d.std()
    got = find_outliers(ads, threshold=2.0)
    assert [o["index"] for o in got] == [i for i in range(9) if z[i] > 2.0] == [8]
    assert got[0]["distance"] == pytest.approx(float(d[8]), rel=1e-6)
    assert got[0]["z_score"] == pytest.approx(float(z[8]), rel=1e-6)
    assert find_outliers(ads[:2]) == []
    # the default threshold is the seed's 2.0 (a z-score), not a cosine cutoff
    assert find_outliers(_adapters(5, seed=6), 3.0) == []


def test_adapter_diff_is_the_seeds_dict_of_update_distances():
    a, b = _adapters(2, seed=7)
    d = adapter_diff(a, b)
    assert set(d) == set(LAYERS)
    for m in LAYERS:
        x, y = _dw(a, m), _dw(b, m)
        assert d[m]["l2_distance"] == pytest.approx(float((x - y).norm()), rel=1e-5)
        cos = float((x * y).sum() / (x.norm() * y.norm()))
        assert d[m]["cosine_sim"] == pytest.approx(cos, abs=1e-6)
    assert all(v["l2_distance"] == pytest.approx(0.0, abs=1e-3) for v in adapter_diff(a, a).values())


def test_subspace_coverage_on_a_pca_subspace_is_the_seeds_factor_coverage():
    ads = _adapters(5, seed=8)
    sub = SharedSubspace.from_adapters(ads, num_components=2)
    cov = subspace_coverage(sub, ads[0])
    assert set(cov) == set(LAYERS)
    for m in LAYERS:
        for side, x in (("a", ads[0].lora_a[m]), ("b", ads[0].lora_b[m])):
            stack = torch.stack([(ad.lora_a if side == "a" else ad.lora_b)[m].double().reshape(-1) for ad in ads])
            mean = stack.mean(dim=0)
            _, _, vh = torch.linalg.svd(stack - mean, full_matrices=False)
            c = x.double().reshape(-1) - mean
            resid = c - (c @ vh[:2].T) @ vh[:2]
            assert cov[m][f"coverage_{side}"] == pytest.approx(1 - float(resid.norm() / c.norm()), abs=1e-4)
        assert cov[m]["coverage_mean"] == pytest.approx((cov[m]["coverage_a"] + cov[m]["coverage_b"]) / 2)


def test_subspace_coverage_on_a_joint_subspace_measures_the_update():
    ads = _adapters(4, seed=9)
    sub = SharedSubspace.from_adapters(ads, method="joint", num_components=2, dtype=torch.float32)
    cov = subspace_coverage(sub, ads[0])
    for m in LAYERS:
        u = torch.linalg.qr(sub.modules[m].tensors["U"].double()).Q
        v = torch.linalg.qr(sub.modules[m].tensors["V"].double()).Q
        x = _dw(ads[0], m)
        want_b = 1 - float((x - u @ (u.T @ x)).norm() / x.norm())
        want_a = 1 - float((x - (x @ v) @ v.T).norm() / x.norm())
        assert cov[m]["coverage_b"] == pytest.approx(want_b, abs=1e-5)
        assert cov[m]["coverage_a"] == pytest.approx(want_a, abs=1e-5)


# -- the subspace ---------------------------------------------------------------------------


def test_from_adapters_with_num_components_means_the_seeds_pca():
    ads = _adapters(5, seed=10)
    sub = SharedSubspace.from_adapters(ads, num_components=3)
    assert sub.method == "pca" and sub.num_components == 3 and sub.rank == 4
    for m in LAYERS:
        stack = torch.stack([a.lora_a[m].double().reshape(-1) for a in ads])
        _, _, vh = torch.linalg.svd(stack - stack.mean(dim=0), full_matrices=False)
        comp = sub.components_a[m].double()
        assert comp.shape == (3, 4 * 16)
        # the same span as the top-3 right singular vectors: equal projectors
        assert torch.allclose(comp.T @ comp, vh[:3].T @ vh[:3], atol=1e-4)
        assert torch.allclose(sub.means_a[m].double(), stack.mean(dim=0), atol=1e-5)
    proj = sub.tasks[sub.task_ids[0]]
    assert set(proj.loadings_a) == set(LAYERS) and proj.loadings_a[LAYERS[0]].shape == (3,)
    params = sub.get_trainable_params(sub.task_ids[0])
    assert sorted(params) == sorted(f"{m}.loadings_{s}" for m in LAYERS for s in ("a", "b"))
    stats = sub.compression_stats()
    assert stats["components_per_layer"] == {m: (3, 3) for m in LAYERS}
    assert stats["total_params_original"] == 5 * 2 * (4 * 16 + 16 * 4)
    # the seed's count: components + means + loadings, per side
    assert stats["total_params_compressed"] == 2 * (2 * (3 * 64 + 64) + 5 * (3 + 3))


def test_an_error_target_without_method_builds_joint():
    sub = SharedSubspace.from_adapters(_adapters(4, seed=11), max_error=0.05)
    assert sub.method == "joint"
    with pytest.raises(AttributeError, match="method='pca'"):
        sub.components_a  # noqa: B018


def test_reconstruct_returns_the_adapters_own_rank():
    ads = _adapters(3, seed=12)
    sub = SharedSubspace.from_adapters(ads, num_components=2)  # k = N−1: exact up to rounding
    rec = sub.reconstruct(sub.task_ids[0])
    assert rec.rank == 4 and rec.lora_a[LAYERS[0]].shape == (4, 16)
    for m in LAYERS:
        assert torch.allclose(_dw(rec, m), _dw(ads[0], m), rtol=1e-3, atol=1e-3)
    assert sub.reconstruct(sub.task_ids[0], pad_to_vllm=True).rank == 8


def test_two_adapters_take_k_two_as_the_seed():
    sub = SharedSubspace.from_adapters(_adapters(2, seed=13), num_components=2)
    assert sub.num_components == 2
    c = sub.components_a[LAYERS[0]].double()
    assert torch.allclose(c @ c.T, torch.eye(2, dtype=torch.float64), atol=1e-5)


# -- ops and io -------------------------------------------------------------------------------


def test_ops_keep_the_seeds_signatures():
    from engine import ops

    s = torch.tensor([3.0, 1.0], dtype=torch.float32)
    ev = ops.explained_variance_ratio(s)
    assert ev.dtype == torch.float32 and torch.allclose(ev, torch.tensor([0.9, 1.0]))
    x = torch.randn(100, generator=torch.Generator().manual_seed(0))
    packed, scales, numel = ops.nf4_pack(x, 64)
    assert numel == 100 and ops.nf4_unpack(packed, scales, numel, 64).shape == (100,)
    assert torch.allclose(ops.nf4_unpack(packed, scales, numel, 64), ops.nf4_quantize_dequantize(x, 64))
    assert ops.NF4_QUANT_TABLE.shape == (16,)


def test_io_exports_the_seeds_state_dict_helpers():
    from engine.io import LoRAWeights as W
    from engine.io import parse_state_dict, stack_lora_weights

    a, b = torch.randn(4, 8), torch.randn(8, 4)
    sd = {"base_model.model.x.lora_A.weight": a, "base_model.model.x.lora_B.weight": b,
          "base_model.model.y.lora_A.weight": a, "base_model.model.score.weight": b}
    la, lb, names = parse_state_dict(sd)
    assert names == ["x"] and la["x"] is a and lb["x"] is b
    w = W(layer_names=["x"], lora_a={"x": a}, lora_b={"x": b}, rank=4)
    st = stack_lora_weights([w, w], "A")
    assert st["x"].shape == (2, 32) and torch.equal(st["x"][1], a.flatten())
    with pytest.raises(ValueError, match="at least one"):
        stack_lora_weights([], "A")


# -- serving and training (VLoRAModel, SubspaceTrainer, TaskRouter, VLoRACallback) ----------------


class _Net(torch.nn.Module):
    """Two linears at the seed's module names, applied in turn."""

    def __init__(self, dim: int = 16, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.layer = torch.nn.ModuleDict({"0": torch.nn.ModuleDict(
            {"q_proj": torch.nn.Linear(dim, dim, bias=False), "v_proj": torch.nn.Linear(dim, dim, bias=False)})})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer["0"]["v_proj"](self.layer["0"]["q_proj"](x))


def _pca_sub(n: int = 3, seed: int = 0) -> SharedSubspace:
    return SharedSubspace.from_adapters(_adapters(n, seed=seed), num_components=2)


def test_vlora_model_reconstruct_state_dict_is_the_dense_update_per_module():
    from engine import VLoRAModel

    sub = _pca_sub()
    model = VLoRAModel(_Net(), sub)
    deltas = model.reconstruct_state_dict("task_1")
    rec = sub.reconstruct("task_1")
    assert set(deltas) == set(LAYERS)
    for m in LAYERS:
        # B·A of the reconstruction, out×in (independently: the sum of rank-one outer products)
        want = sum(torch.outer(rec.lora_b[m][:, i].double(), rec.lora_a[m][i].double()) for i in range(rec.lora_a[m].shape[0]))
        assert deltas[m].shape == (16, 16)
        torch.testing.assert_close(deltas[m].double(), want, rtol=1e-5, atol=1e-6)
    sd = model.peft_state_dict("task_1")  # PEFT's form lives under its own name
    assert torch.equal(sd["base_model.model.layer.0.q_proj.lora_A.weight"], rec.lora_a["layer.0.q_proj"])


def test_vlora_model_scaling_order_and_value():
    from engine import VLoRAModel

    sub = _pca_sub()
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    net = _Net()
    with torch.no_grad():
        base_q = net.layer["0"]["q_proj"].weight.double().clone()
        base_v = net.layer["0"]["v_proj"].weight.double().clone()
    rec = sub.reconstruct("task_0")

    def expected(s: float) -> torch.Tensor:
        q = base_q + s * rec.lora_b["layer.0.q_proj"].double() @ rec.lora_a["layer.0.q_proj"].double()
        v = base_v + s * rec.lora_b["layer.0.v_proj"].double() @ rec.lora_a["layer.0.v_proj"].double()
        return x.double() @ q.T @ v.T

    both = VLoRAModel(net, sub, scaling=0.5, lora_alpha=999)  # vlora's order: explicit scaling wins
    assert both.scaling == 0.5
    both.set_task("task_0")
    got = both(x).double()
    torch.testing.assert_close(got, expected(0.5), rtol=1e-4, atol=1e-4 * float(got.abs().max()))
    both.unwrap()
    alpha = VLoRAModel(net, sub, lora_alpha=2 * sub.rank)
    assert alpha.scaling == 2.0  # lora_alpha / r
    alpha.unwrap()
    # no override: each task's own alpha/r; these adapters carry none, so 1.0 (vlora's default coincides)
    assert VLoRAModel(net, sub).scaling == 1.0


def test_vlora_model_merge_keeps_the_task_named_and_errors_read_as_vlora():
    from engine import VLoRAModel

    sub = _pca_sub()
    model = VLoRAModel(_Net(), sub)
    with pytest.raises(KeyError, match="Unknown task"):
        model.set_task("nope")
    with pytest.raises(ValueError, match="No task to merge"):
        model.merge()
    with pytest.raises(RuntimeError, match="not merged"):
        model.unmerge()
    model.set_task("task_2")
    cached = model._cached_deltas
    model.set_task("task_2")
    assert model._cached_deltas is cached  # the same task rebuilds nothing
    before = {n: lin.weight.detach().clone() for n, lin in model._target_modules.items()}
    model.merge()
    assert model.is_merged and model.active_task == "task_2"
    dw = model.reconstruct_state_dict("task_2")
    for n, lin in model._target_modules.items():
        torch.testing.assert_close(lin.weight.double(), before[n].double() + dw[n].double(), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="already merged"):
        model.merge("task_1")
    with pytest.raises(RuntimeError, match="Cannot switch tasks while merged"):
        model.set_task("task_1")
    with pytest.raises(RuntimeError, match="Cannot clear task while merged"):
        model.clear_task()
    model.unmerge()
    assert all(torch.equal(lin.weight, before[n]) for n, lin in model._target_modules.items())


def test_subspace_trainer_needs_an_existing_task_unless_asked():
    from engine.training import SubspaceTrainer

    sub = _pca_sub()
    with pytest.raises(KeyError, match="not in subspace"):
        SubspaceTrainer(sub, "fresh")
    assert "fresh" not in sub.tasks
    SubspaceTrainer(sub, "fresh", init_if_missing=True)
    assert "fresh" in sub.tasks


def test_task_router_blend_loadings_is_one_routed_task_of_mean_weights():
    from engine.training import TaskRouter

    sub = _pca_sub()
    router = TaskRouter.from_subspace(sub, input_dim=8, hidden_dim=0)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(2))
    blended = router.blend_loadings(x, sub)
    assert blended.task_id == "__routed__"
    w = router(x).detach().double().mean(dim=0)
    for m in LAYERS:
        assert blended.loadings_a[m].shape == (2,) and blended.loadings_b[m].shape == (2,)
        want = sum(float(w[i]) * sub.tasks[t].loadings_a[m].double() for i, t in enumerate(router.task_ids))
        torch.testing.assert_close(blended.loadings_a[m].double(), want, rtol=1e-5, atol=1e-6)
    sub.tasks["__routed__"] = blended
    assert sub.reconstruct("__routed__").lora_a[LAYERS[0]].shape == (4, 16)


def test_task_router_from_subspace_biases_by_coefficient_norm():
    from engine.training import TaskRouter

    sub = _pca_sub()
    router = TaskRouter.from_subspace(sub, input_dim=8, hidden_dim=4)
    norms = torch.tensor([sum(float(sub.tasks[t].loadings_a[m].norm() + sub.tasks[t].loadings_b[m].norm()) for m in LAYERS)
                          for t in router.task_ids])
    torch.testing.assert_close(router.net[-1].bias.detach().double(), (norms / norms.max()).double(), rtol=1e-5, atol=1e-6)
    torch.manual_seed(0)
    plain = TaskRouter.from_subspace(sub, input_dim=8, hidden_dim=4, init_from_loadings=False)
    torch.manual_seed(0)
    ref = TaskRouter(8, 3, hidden_dim=4, task_ids=sorted(sub.tasks))
    assert torch.equal(plain.net[-1].bias, ref.net[-1].bias)


def test_vlora_callback_trains_a_plain_model_with_its_own_optimizer(tmp_path):
    pytest.importorskip("transformers")
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from engine.training import VLoRACallback, orthogonal_init

    sub = _pca_sub()
    torch.manual_seed(0)
    orthogonal_init(sub, "t")
    before = sub.tasks["t"].loadings_a[LAYERS[0]].clone()
    cb = VLoRACallback(sub, "t", lr=1e-2, log_every=1, save_on_end=True)
    assert cb.trainer is None
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    state, control = TrainerState(), TrainerControl()
    state.global_step = 1
    net = _Net()
    cb.on_train_begin(args, state, control, model=net)
    assert cb.trainer is not None and cb.trainer.num_trainable_params > 0
    net(torch.randn(2, 16)).sum().backward()
    cb.on_step_end(args, state, control)
    logs = [r for r in state.log_history if "vlora/loadings_norm" in r]
    want = float(sum(float(p.detach().double().pow(2).sum()) for p in cb.trainer.params.values()) ** 0.5)
    assert len(logs) == 1 and logs[0]["vlora/loadings_norm"] == pytest.approx(want)
    cb.on_train_end(args, state, control)
    assert not torch.equal(sub.tasks["t"].loadings_a[LAYERS[0]], before)  # stepped and written back


def test_quantize_bits_error_names_the_seeds_choices():
    sub = _pca_sub()
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        sub.quantize(bits=16)


def test_vlora_model_skips_modules_the_model_lacks_unless_strict():
    from engine import VLoRAModel
    from engine.errors import IncompatibleAdaptersError

    sub = _pca_sub()
    lone = torch.nn.Linear(16, 16)  # holds none of the subspace's modules
    with pytest.warns(UserWarning, match="no module for 2 of the subspace's 2 modules"):
        model = VLoRAModel(lone, sub)
    assert model.target_modules == {} and model.compile() is model
    model.set_task("task_0")
    x = torch.randn(2, 16)
    assert torch.equal(model(x), lone(x))  # nothing applied
    with pytest.raises(IncompatibleAdaptersError, match="no module for 2"):
        VLoRAModel(lone, sub, strict=True)
