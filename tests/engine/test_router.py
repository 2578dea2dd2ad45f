"""TaskRouter: fit on labelled features, per-input blends, and VLoRAModel routing each row by blending the cores."""

from __future__ import annotations

import pytest
import torch

from engine import SharedSubspace, TaskRouter, VLoRAModel, load_adapter
from peft_factory import tiny_llama

IDS = torch.randint(0, 128, (4, 10), generator=torch.Generator().manual_seed(5))
ROWS = ["t2", "t0", "t3", "t0"]


@pytest.fixture(scope="module")
def sub(peft_family_dirs) -> SharedSubspace:
    """q_proj stored per task, v_proj in a shared basis."""
    family = [load_adapter(d) for d in peft_family_dirs[:4]]
    ids = [f"t{i}" for i in range(4)]
    out = SharedSubspace.from_adapters(family, ids, max_error=0.05, hybrid=False)
    alone = SharedSubspace.from_adapters(family, ids, method="svd", max_error=0.05)
    for m in [m for m in out.modules if m.endswith("q_proj")]:
        out.modules[m] = alone.modules[m]
        for t in ids:
            out.tasks[t].coeffs[m] = alone.tasks[t].coeffs[m]
    return out


def _clusters(n: int, dim: int, tasks: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(tasks, dim, generator=torch.Generator().manual_seed(0)) * 2.0
    y = torch.randint(0, tasks, (n,), generator=g)
    return centres[y] + torch.randn(n, dim, generator=g), y


def test_router_fit_separates_held_out_examples(sub):
    router = TaskRouter.from_subspace(sub, input_dim=16, hidden_dim=32)
    assert router.task_ids == ["t0", "t1", "t2", "t3"] and router.num_tasks == 4
    x, y = _clusters(300, 16, 4, seed=1)
    xt, yt = _clusters(200, 16, 4, seed=2)
    history = router.fit(x, [router.task_ids[i] for i in y.tolist()], epochs=150, lr=1e-2)
    assert history[-1] < history[0] / 5
    pred = router.predict(xt)
    acc = sum(p == router.task_ids[i] for p, i in zip(pred, yt.tolist())) / len(pred)
    assert acc >= 0.9, acc
    w = router(xt)
    torch.testing.assert_close(w.sum(dim=1), torch.ones(200))

    linear = TaskRouter(16, 4, hidden_dim=0)
    linear.fit(x, y, epochs=150, lr=5e-2)
    assert (linear.logits(xt).argmax(1) == yt).float().mean() >= 0.9
    with pytest.raises(ValueError, match="'t9'"):
        router.fit(x[:2], ["t0", "t9"])
    with pytest.raises(ValueError, match="rows × 16"):
        router(torch.zeros(3, 5))


def test_blend_blends_the_updates(sub):
    router = TaskRouter.from_subspace(sub, input_dim=8, hidden_dim=0, temperature=3.0)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(4))
    blend = router.blend(x, sub)
    assert blend.task_ids == router.task_ids and blend.weights.shape == (5, 4)
    assert set(blend.cores) == {m for m, b in sub.modules.items() if b.kind == "joint"}
    dense = {}
    for t in blend.task_ids:
        w = sub.reconstruct(t, pad_to_vllm=False, dtype=torch.float64)
        dense[t] = {m: w.scale(m) * w.lora_b[m] @ w.lora_a[m] for m in w.layer_names}
    for m, cores in blend.cores.items():
        b = sub.modules[m]
        for row in range(5):
            ours = b.tensors["U"].double() @ cores[row].double() @ b.tensors["V"].double().T
            ref = sum(float(blend.weights[row, j]) * dense[t][m] for j, t in enumerate(blend.task_ids))
            torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6)


def test_one_hot_blends_equal_the_true_task_mixed_batch(sub):
    model = VLoRAModel(tiny_llama(), sub)
    tasks = model.available_tasks
    onehot = torch.zeros(len(ROWS), len(tasks))
    for i, t in enumerate(ROWS):
        onehot[i, tasks.index(t)] = 1.0
    with torch.no_grad():
        routed = model(input_ids=IDS, blend=onehot).logits
        true = model(input_ids=IDS, task_ids=ROWS).logits
    torch.testing.assert_close(routed, true, rtol=1e-5, atol=1e-5)
    assert model.active_task is None


def test_soft_blend_applies_the_blend_of_updates_per_row(sub):
    """Layer 0's input does not depend on any adapter: its update must be x·(Σ_t w_t ΔW_t)ᵀ, row by row."""
    base = tiny_llama()
    model = VLoRAModel(base, sub)
    tasks = model.available_tasks
    w = torch.softmax(torch.randn(len(ROWS), len(tasks), generator=torch.Generator().manual_seed(8)), dim=1)
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    layers = {n: mod for n, mod in base.named_modules() if n.startswith("model.layers.0.self_attn.") and n[-6:] in ("q_proj", "v_proj")}
    for n, mod in layers.items():  # registered after VLoRAModel's hooks: sees the updated output
        mod.register_forward_hook(lambda mod, a, out, n=n: seen.__setitem__(n, (a[0].detach(), out.detach())))
    dense = {}
    for t in tasks:
        r = sub.reconstruct(t, pad_to_vllm=False)
        dense[t] = {m: r.scale(m) * r.lora_b[m] @ r.lora_a[m] for m in layers}
    with torch.no_grad():
        model(input_ids=IDS, blend=w)
        for n, mod in layers.items():
            x, out = seen[n]
            for row in range(len(ROWS)):
                dw = sum(float(w[row, j]) * dense[t][n] for j, t in enumerate(tasks))
                assert mod.bias is None
                torch.testing.assert_close(out[row], x[row] @ mod.weight.T + x[row] @ dw.T, rtol=1e-4, atol=1e-5)
    assert {sub.modules[n].kind for n in layers} == {"joint", "separate"}


def test_router_argument_routes_every_row(sub):
    router = TaskRouter.from_subspace(sub, input_dim=64, hidden_dim=0)
    base = tiny_llama()
    routed = VLoRAModel(base, sub, router=router)
    assert routed.router is router and "router" not in dict(routed.named_children())
    plain = VLoRAModel(tiny_llama(), sub)
    feats = torch.randn(4, 64, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        by_features = routed(input_ids=IDS, router_features=feats).logits
        torch.testing.assert_close(by_features, plain(input_ids=IDS, blend=router(feats)).logits, rtol=1e-5, atol=1e-5)
        pooled = base.get_input_embeddings()(IDS).mean(dim=1)  # the default features
        torch.testing.assert_close(routed(input_ids=IDS).logits, plain(input_ids=IDS, blend=router(pooled)).logits,
                                   rtol=1e-5, atol=1e-5)
        routed.set_task("t1")  # an active task wins over the router
        torch.testing.assert_close(routed(input_ids=IDS).logits, plain(input_ids=IDS, task_ids=["t1"] * 4).logits,
                                   rtol=0, atol=0)
    bad = TaskRouter(64, 2, task_ids=["t0", "nope"])
    with pytest.raises(Exception, match="nope"):
        VLoRAModel(tiny_llama(), sub, router=bad)


def test_lazily_loaded_subspace_routes_and_serves_as_a_whole_one(sub, tmp_path):
    """A subspace loaded with ``lazy=True`` (what a build with an output folder returns): same router, blend and logits."""
    sub.save(tmp_path / "s")
    whole, lazy = SharedSubspace.load(tmp_path / "s"), SharedSubspace.load(tmp_path / "s", lazy=True)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(9))
    r1 = TaskRouter.from_subspace(whole, input_dim=8, hidden_dim=0)
    lazy_blend = SharedSubspace.load(tmp_path / "s", lazy=True)
    b1 = r1.blend(x, whole)
    b2 = r1.blend(x, lazy_blend)  # reads the routed tasks on first use
    for m in b1.cores:
        torch.testing.assert_close(b1.cores[m], b2.cores[m])
    last = (lambda r: r.net[-1] if isinstance(r.net, torch.nn.Sequential) else r.net)
    r2 = TaskRouter.from_subspace(lazy, input_dim=8, hidden_dim=0)  # its warm start reads every task
    torch.testing.assert_close(last(r2).bias, last(r1).bias)
    assert lazy.on_disk is None
    with torch.no_grad():
        l1 = VLoRAModel(tiny_llama(), whole)(input_ids=IDS, task_ids=ROWS).logits
        l2 = VLoRAModel(tiny_llama(), SharedSubspace.load(tmp_path / "s", lazy=True))(input_ids=IDS, task_ids=ROWS).logits
    torch.testing.assert_close(l2, l1)
