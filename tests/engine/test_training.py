"""Training a task inside a shared subspace: only its coefficients learn, write-back stores it like any task,
and the exported adapter is what PEFT loads and reproduces."""

from __future__ import annotations

import pytest
import torch

from engine import SharedSubspace, SubspaceTrainer, VLoRAModel, load_adapter, orthogonal_init, save_adapter
from peft_factory import tiny_llama

IDS = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(3))
LABELS = torch.full_like(IDS, 7)  # a task to learn: always predict token 7


def _logits(model, ids=IDS, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits.float()


@pytest.fixture(scope="module")
def family(peft_family_dirs):
    return [load_adapter(d) for d in peft_family_dirs[:4]]


def _shared(family) -> SharedSubspace:
    return SharedSubspace.from_adapters(family, [f"t{i}" for i in range(len(family))], max_error=0.05, hybrid=False)


def _hybrid(family) -> SharedSubspace:
    """q_proj stored per task, v_proj in a shared basis."""
    ids = [f"t{i}" for i in range(len(family))]
    sub = _shared(family)
    alone = SharedSubspace.from_adapters(family, ids, method="svd", max_error=0.05)
    for m in [m for m in sub.modules if m.endswith("q_proj")]:
        sub.modules[m] = alone.modules[m]
        for t in ids:
            sub.tasks[t].coeffs[m] = alone.tasks[t].coeffs[m]
    assert {b.kind for b in sub.modules.values()} == {"joint", "separate"}
    return sub


def _dense(sub: SharedSubspace, task: str) -> dict[str, torch.Tensor]:
    w = sub.reconstruct(task, pad_to_vllm=False, dtype=torch.float64)
    return {m: w.scale(m) * w.lora_b[m] @ w.lora_a[m] for m in w.layer_names}


def _train(trainer: SubspaceTrainer, steps: int) -> list[float]:
    trainer.model.train()
    out = [trainer.step(trainer.model(input_ids=IDS, labels=LABELS).loss) for _ in range(steps)]
    trainer.model.eval()
    return out


def test_orthogonal_init_starts_at_zero_with_the_others_config(family):
    sub = _hybrid(family)
    torch.manual_seed(0)
    proj = orthogonal_init(sub, "new", scale=0.01)
    assert sub.tasks["new"] is proj and proj.fidelity == {m: 0.0 for m in sub.modules}
    t0 = sub.tasks["t0"].template
    assert (proj.template.lora_alpha, proj.template.rank, proj.template.target_modules) == (t0.lora_alpha, t0.rank, t0.target_modules)
    for m, b in sub.modules.items():
        c = proj.coeffs[m]
        if b.kind == "joint":
            assert not c["sigma"].any()
        else:  # LoRA's init: B zero, A orthonormal rows times the scale
            assert not c["b"].any() and c["b"].shape[1] == sub.tasks["t0"].coeffs[m]["b"].shape[1]
            a = c["a"].double()
            torch.testing.assert_close(a @ a.T, 1e-4 * torch.eye(a.shape[0], dtype=torch.float64), rtol=0, atol=1e-6)
    model = VLoRAModel(tiny_llama(), sub)
    model.set_task("new")
    assert torch.equal(_logits(model), _logits(tiny_llama()))  # the untrained task changes nothing
    with pytest.raises(ValueError, match="holds a task 'new' already"):
        orthogonal_init(sub, "new")


@pytest.mark.parametrize("num_expand", [0, 2])
def test_gradients_reach_only_the_task_coefficients(family, num_expand):
    sub = _hybrid(family)
    others = {t: {m: {k: v.clone() for k, v in c.items()} for m, c in p.coeffs.items()} for t, p in sub.tasks.items()}
    recon = {t: sub.reconstruct(t) for t in others}
    bases = {m: {k: v.clone() for k, v in b.tensors.items()} for m, b in sub.modules.items()}
    base = tiny_llama()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = VLoRAModel(base, sub)
    tr = SubspaceTrainer(sub, "new", lr=1e-2, num_expand=num_expand, model=model, seed=0, init_if_missing=True)

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"trainable.{n}" for n, _ in tr.task.named_parameters()}
    assert {id(p) for p in tr.params.values()} == {id(p) for p in model.parameters() if p.requires_grad}
    shared = [m for m, b in sub.modules.items() if b.kind == "joint"]
    per_task = [m for m, b in sub.modules.items() if b.kind == "separate"]
    for m in shared:  # the core grows by the new directions (capped by the layer's size)
        ku, kv = bases[m]["U"].shape[1], bases[m]["V"].shape[1]
        assert tr.params[f"{m}.sigma"].shape == (ku + num_expand, kv + num_expand)
    assert tr.num_trainable_params == sum(p.numel() for p in tr.params.values())

    model.train()
    loss = model(input_ids=IDS, labels=LABELS).loss
    loss.backward()
    assert all(p.grad is None for p in base.parameters())
    for m in shared:
        assert tr.params[f"{m}.sigma"].grad.abs().max() > 0
    for m in per_task:  # B starts at zero, so B's gradient is the one that moves first
        assert tr.params[f"{m}.lora_B"].grad.abs().max() > 0
    tr.optimizer.zero_grad()
    _train(tr, 3)

    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    for t, coeffs in others.items():
        for m, c in coeffs.items():
            assert all(torch.equal(sub.tasks[t].coeffs[m][k], v) for k, v in c.items())
    tr.write_back()
    for m in shared:  # the bases grew by the new directions, the old columns untouched
        u = sub.modules[m].tensors["U"]
        assert u.shape[1] == bases[m]["U"].shape[1] + num_expand
        assert torch.equal(u[:, : bases[m]["U"].shape[1]], bases[m]["U"])
        if num_expand:
            g = u.double().T @ u.double()
            assert (g - torch.eye(g.shape[0], dtype=torch.float64)).abs().max() < 5e-3  # orthonormal to fp16 rounding
    for t, w in recon.items():  # other tasks ignore the new directions: bit for bit the same adapters
        again = sub.reconstruct(t)
        assert all(torch.equal(again.lora_a[m], w.lora_a[m]) and torch.equal(again.lora_b[m], w.lora_b[m]) for m in w.layer_names)


def test_loss_goes_down(family):
    sub = _shared(family)
    torch.manual_seed(0)
    tr = SubspaceTrainer(sub, "new", lr=3e-2, model=tiny_llama(), seed=0, init_if_missing=True)
    losses = _train(tr, 25)
    with torch.no_grad():
        base = float(tiny_llama()(input_ids=IDS, labels=LABELS).loss)
    assert losses[0] == pytest.approx(base, abs=1e-5)  # the new task starts as the base model
    assert losses[-1] < losses[0] - 0.5 and sum(losses[-5:]) < sum(losses[:5]) - 2.0, losses
    tr.write_back()
    served = VLoRAModel(tiny_llama(), sub)
    served.set_task("new")
    with torch.no_grad():
        assert float(served(input_ids=IDS, labels=LABELS).loss) < base - 0.5  # the stored task has learnt it


@pytest.mark.parametrize("num_expand", [0, 3])
def test_write_back_export_peft_reproduces(family, tmp_path, num_expand):
    from peft import PeftModel

    sub = _hybrid(family)
    torch.manual_seed(1)
    tr = SubspaceTrainer(sub, "new", lr=2e-2, num_expand=num_expand, model=tiny_llama(), seed=1, init_if_missing=True)
    _train(tr, 6)
    live = _logits(tr.model)
    # the update as trained, dense (independent of the write-back's r×r arithmetic)
    trained: dict[str, torch.Tensor] = {}
    for m, mod in tr.task.by_module().items():
        if sub.modules[m].kind == "joint":
            trained[m] = (mod.v.double() @ mod.sigma.detach().double().T @ mod.ut.double()).T
        else:
            trained[m] = mod.lora_B.detach().double() @ mod.lora_A.detach().double()
    proj = tr.write_back()

    stored = _dense(sub, "new")
    for m, dw in trained.items():
        err = float((dw - stored[m]).norm() / dw.norm())
        assert proj.fidelity[m] == pytest.approx(err, rel=1e-3, abs=1e-9)
        assert 0 < proj.fidelity[m] < 2e-3  # fp16 rounding of the coefficients, nothing more
        assert proj.norms[m] == pytest.approx(float(dw.norm()), rel=1e-9)
    assert proj.template is not None and proj.original_bytes > 0

    w = sub.reconstruct("new")
    save_adapter(w, tmp_path / "new")
    ref = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "new")).eval()
    served = VLoRAModel(tiny_llama(), sub)
    served.set_task("new")
    ours = _logits(served)
    torch.testing.assert_close(ours, _logits(ref), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, live, rtol=0, atol=2e-3)  # what trained, to fp16 rounding
    assert (ours - _logits(tiny_llama())).abs().max() > 1e-2  # training moved it

    # the grown subspace saves and loads with every task as it was
    sub.save(tmp_path / "sub.vlora")
    back = SharedSubspace.load(tmp_path / "sub.vlora")
    for t in ("new", "t0"):
        a, b = sub.reconstruct(t), back.reconstruct(t)
        assert all(torch.equal(a.lora_b[m], b.lora_b[m]) for m in a.layer_names)
    assert back.tasks["new"].fidelity == pytest.approx(proj.fidelity)


def test_trainer_validates_and_trains_a_stored_task(family):
    sub = _shared(family)
    with pytest.raises(ValueError, match="num_expand"):
        SubspaceTrainer(sub, "new", num_expand=-1, init_if_missing=True)
    with pytest.raises(ValueError, match="lr"):
        SubspaceTrainer(sub, "new", lr=0, init_if_missing=True)
    assert "new" not in sub.tasks  # refused before anything changed
    before = _dense(sub, "t1")
    tr = SubspaceTrainer(sub, "t1", model=tiny_llama())  # starts from the stored coefficients
    for m, b in sub.modules.items():
        s = tr.params[f"{m}.sigma"].detach().double()
        dw = b.tensors["U"].double() @ s @ b.tensors["V"].double().T
        torch.testing.assert_close(dw, before[m], rtol=0, atol=1e-6)  # Σ trains in float32
    model = tr.model
    with pytest.raises(ValueError, match="being trained"):
        model(input_ids=IDS, task_ids=["t1", "t0", None, "t1"])


def test_callback_trains_the_task_in_a_trainer_loop(family, tmp_path):
    from transformers import Trainer, TrainingArguments

    from engine import VLoRACallback

    sub = _shared(family)
    base = tiny_llama()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = VLoRAModel(base, sub)
    data = [{"input_ids": IDS[i], "labels": LABELS[i]} for i in range(IDS.shape[0])]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=2,
                             learning_rate=5e-2, save_strategy="steps", save_steps=1, report_to=[], use_cpu=True,
                             logging_strategy="no", disable_tqdm=True)
    cb = VLoRACallback(sub, "new", init_if_missing=True)
    Trainer(model=model, args=args, train_dataset=data, callbacks=[cb]).train()

    assert cb.trainer is not None and model.trainable_task is cb.trainer.task
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())  # the Trainer trained only the task
    proj = sub.tasks["new"]  # written back at the end: the trained coefficients, rounded
    for m, b in sub.modules.items():
        assert proj.coeffs[m]["sigma"].abs().max() > 0
        torch.testing.assert_close(proj.coeffs[m]["sigma"].float(), cb.trainer.params[f"{m}.sigma"].detach(),
                                   rtol=1e-3, atol=1e-5)
    # each checkpoint holds the subspace with the task as it was at that step
    saved = [tmp_path / "run" / f"checkpoint-{s}" / "vlora-subspace" for s in (1, 2)]
    assert cb.saved == saved
    first, last = SharedSubspace.load(saved[0]), SharedSubspace.load(saved[1])
    m = sorted(sub.modules)[0]
    assert torch.equal(last.tasks["new"].coeffs[m]["sigma"], proj.coeffs[m]["sigma"])
    assert not torch.equal(first.tasks["new"].coeffs[m]["sigma"], proj.coeffs[m]["sigma"])


@pytest.mark.parametrize("num_expand", [0, 1])
def test_pca_subspace_trains_its_loadings(family, tmp_path, num_expand):
    from peft import PeftModel

    sub = SharedSubspace.from_adapters(family, [f"t{i}" for i in range(len(family))], method="pca", num_components=2)
    recon = {t: sub.reconstruct(t) for t in sub.tasks}
    torch.manual_seed(2)
    tr = SubspaceTrainer(sub, "new", lr=2e-2, num_expand=num_expand, model=tiny_llama(), seed=2, init_if_missing=True)
    assert set(tr.params) == {f"{m}.loadings_{s}" for m in sub.modules for s in "ab"}
    losses = _train(tr, 5)
    assert losses[-1] < losses[0]
    proj = tr.write_back()
    assert all(0 <= e < 2e-3 for e in proj.fidelity.values())
    for t, w in recon.items():
        again = sub.reconstruct(t)
        assert all(torch.equal(again.lora_a[m], w.lora_a[m]) and torch.equal(again.lora_b[m], w.lora_b[m]) for m in w.layer_names)
    save_adapter(sub.reconstruct("new"), tmp_path / "new")
    served = VLoRAModel(tiny_llama(), sub)
    served.set_task("new")
    ref = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "new")).eval()
    torch.testing.assert_close(_logits(served), _logits(ref), rtol=1e-5, atol=1e-5)


# -- a classification task's head (issue #19) ---------------------------------------------------------------


def _cls_base():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, num_labels=2, pad_token_id=0)
    return LlamaForSequenceClassification(cfg).eval()


def _cls_adapter(out, seed: int):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_cls_base(), LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                   target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:  # LoRA factors and the head (score)
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(str(out))
    return out


def test_a_new_classification_task_trains_and_stores_its_head(tmp_path):
    import json

    from peft import PeftModel

    adapters = [load_adapter(_cls_adapter(tmp_path / f"cls_{i}", seed=i)) for i in range(2)]
    head_key = "base_model.model.score.weight"
    assert all(head_key in a.extra_tensors for a in adapters)
    sub = SharedSubspace.from_adapters(adapters, ["c0", "c1"], method="joint", max_error=0.05)
    model = VLoRAModel(_cls_base(), sub)
    base_head = model.base_model.score.weight.detach().clone()
    torch.manual_seed(0)
    tr = SubspaceTrainer(sub, "new", lr=3e-2, model=model, seed=0, init_if_missing=True)

    assert set(tr.head_params) == {"score.weight"} and model.base_model.score.weight.requires_grad
    assert tr.num_head_params == base_head.numel()
    assert tr.num_trainable_params == sum(p.numel() for p in tr.params.values())  # coefficients only
    assert any(p is model.base_model.score.weight for g in tr.optimizer.param_groups for p in g["params"])

    ids = torch.randint(1, 128, (4, 10), generator=torch.Generator().manual_seed(5))  # no pad token (0)
    labels = torch.tensor([0, 1, 1, 0])
    model.train()
    for _ in range(5):
        tr.step(model(input_ids=ids, labels=labels).loss)
    model.eval()
    proj = tr.write_back()

    assert proj.template.metadata["modules_to_save"] == adapters[0].metadata["modules_to_save"]
    assert set(proj.template.extra_tensors) == {head_key}
    trained_head = model.base_model.score.weight.detach()
    assert torch.equal(proj.template.extra_tensors[head_key], trained_head)
    assert not torch.allclose(trained_head, base_head)  # the head learnt

    out = tmp_path / "new"
    save_adapter(sub.reconstruct("new"), out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and "score" in cfg["modules_to_save"]
    peft = PeftModel.from_pretrained(_cls_base(), str(out)).eval()
    loaded_head = dict(peft.named_parameters())["base_model.model.score.modules_to_save.default.weight"]
    assert torch.equal(loaded_head.detach(), trained_head)
    assert not torch.allclose(loaded_head.detach(), _cls_base().score.weight)

    model.detach_trainable()  # serve the stored task (the trained head is in the model)
    model.set_task("new")
    with torch.no_grad():
        want = model(input_ids=ids).logits.float()
        got = peft(input_ids=ids).logits.float()
        plain = _cls_base()(input_ids=ids).logits.float()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert (got - plain).abs().max() > 1e-3  # and it is not the base model's answer


def test_train_head_true_without_a_stored_head_is_refused(family):
    sub = _shared(family)  # causal-LM tasks: no modules_to_save
    with pytest.raises(ValueError, match="train_head=True but no other task of the subspace stores a head"):
        SubspaceTrainer(sub, "new", model=tiny_llama(), init_if_missing=True, train_head=True)
    tr = SubspaceTrainer(sub, "auto", model=tiny_llama(), init_if_missing=True)
    assert tr.num_head_params == 0 and tr.head_params == {}
