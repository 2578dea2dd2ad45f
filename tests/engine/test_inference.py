"""VLoRAModel: every task through one base model, checked against PEFT loading the same adapter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import IncompatibleAdaptersError, SharedSubspace, UnknownTaskError, VLoRAModel, load_adapter, save_adapter
from engine.inference.model import VLoRAModel as _Model
from peft_factory import tiny_llama

IDS = torch.randint(0, 128, (5, 10), generator=torch.Generator().manual_seed(7))
ROWS = ["t0", None, "t3", "t0", "t5"]


def _logits(model, ids=IDS, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits.float()


def _peft(adapter_dir: Path, base=None):
    from peft import PeftModel

    return PeftModel.from_pretrained(base if base is not None else tiny_llama(), str(adapter_dir)).eval()


@pytest.fixture(scope="module")
def family(peft_family_dirs):
    return [load_adapter(d) for d in peft_family_dirs]


def _hybrid(family) -> SharedSubspace:
    """Half the modules in a shared basis, half stored per task (spliced from a joint and an svd build)."""
    ids = [f"t{i}" for i in range(len(family))]
    sub = SharedSubspace.from_adapters(family, ids, max_error=0.05, hybrid=False)
    alone = SharedSubspace.from_adapters(family, ids, method="svd", max_error=0.05)
    for m in sorted(sub.modules)[::2]:
        sub.modules[m] = alone.modules[m]
        for t in ids:
            sub.tasks[t].coeffs[m] = alone.tasks[t].coeffs[m]
    return sub


@pytest.fixture(scope="module")
def subspaces(family):
    ids = [f"t{i}" for i in range(len(family))]
    out = {
        "shared": SharedSubspace.from_adapters(family, ids, max_error=0.05, hybrid=False),
        "per_task": SharedSubspace.from_adapters(family, ids, method="svd", max_error=0.05),
        "pca": SharedSubspace.from_adapters(family, ids, method="pca", num_components=3),
        "hybrid": _hybrid(family),
    }
    out["shared_nf4"] = out["shared"].copy().quantize(bits=4, method="nf4", quantize_loadings=True)
    out["per_task_int8"] = out["per_task"].copy().quantize(bits=8)
    kinds = {name: {b.kind for b in s.modules.values()} for name, s in out.items()}
    assert kinds["shared"] == {"joint"} and kinds["per_task"] == {"separate"} and kinds["hybrid"] == {"joint", "separate"}
    return out


@pytest.mark.parametrize("name", ["shared", "per_task", "pca", "hybrid", "shared_nf4", "per_task_int8"])
def test_each_task_equals_peft_with_the_reconstructed_adapter(subspaces, tmp_path, name):
    sub = subspaces[name]
    model = VLoRAModel(tiny_llama(), sub)
    for t in ("t0", "t4"):
        save_adapter(sub.reconstruct(t), tmp_path / t)
        model.set_task(t)
        ours, ref = _logits(model), _logits(_peft(tmp_path / t))
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
        assert (ours - _logits(tiny_llama())).abs().max() > 1e-3  # the task changes the output


def test_lossless_subspace_equals_the_original_adapters(peft_family_dirs, family):
    sub = SharedSubspace.from_adapters(family, [f"t{i}" for i in range(6)], method="joint", max_error=0.0, dtype="float32")
    model = VLoRAModel(tiny_llama(), sub)
    for i in (0, 5):
        model.set_task(f"t{i}")
        torch.testing.assert_close(_logits(model), _logits(_peft(peft_family_dirs[i])), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["shared", "per_task", "hybrid", "shared_nf4", "per_task_int8"])
def test_mixed_batch_rows_equal_single_task_runs_fp32(subspaces, name):
    model = VLoRAModel(tiny_llama(), subspaces[name])
    mixed = _logits(model, task_ids=ROWS)
    for i, t in enumerate(ROWS):
        if t is None:
            model.clear_task()
        else:
            model.set_task(t)
        torch.testing.assert_close(mixed[i], _logits(model, IDS[i : i + 1])[0], rtol=1e-5, atol=1e-5)
    model.clear_task()
    base = _logits(model)
    assert torch.equal(mixed[1], base[1])
    assert all((mixed[i] - base[i]).abs().max() > 1e-3 for i in (0, 2, 3, 4))
    assert model.active_task is None  # task_ids leave no state behind


@pytest.mark.parametrize("name", ["shared", "hybrid"])
def test_mixed_batch_rows_equal_single_task_runs_bf16(subspaces, name):
    model = VLoRAModel(tiny_llama().to(torch.bfloat16), subspaces[name])
    mixed = _logits(model, task_ids=ROWS)
    for i, t in enumerate(ROWS):
        if t is None:
            model.clear_task()
        else:
            model.set_task(t)
        torch.testing.assert_close(mixed[i], _logits(model, IDS[i : i + 1])[0], rtol=3e-2, atol=3e-2)


def test_mixed_batch_one_task_and_bad_task_ids(subspaces):
    model = VLoRAModel(tiny_llama(), subspaces["hybrid"])
    model.set_task("t2")
    single = _logits(model)
    model.clear_task()
    torch.testing.assert_close(_logits(model, task_ids=["t2"] * 5), single, rtol=0, atol=0)
    with pytest.raises(ValueError, match="task_ids has 3 entries"):
        _logits(model, task_ids=["t0", "t1", None])
    with pytest.raises(UnknownTaskError, match="nope"):
        _logits(model, task_ids=["t0", "nope", None, None, None])
    with pytest.raises(ValueError, match="not a string"):
        _logits(model, task_ids="t0")
    assert model.active_task is None


def test_generate_with_task_ids_follows_each_row(subspaces):
    model = VLoRAModel(tiny_llama(), subspaces["hybrid"])
    ids = IDS[:3, :6]
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        mixed = model.generate(input_ids=ids, task_ids=["t1", None, "t4"], **kw)
        for i, t in enumerate(["t1", None, "t4"]):
            if t is None:
                model.clear_task()
            else:
                model.set_task(t)
            assert torch.equal(mixed[i], model.generate(input_ids=ids[i : i + 1], **kw)[0])


def test_clear_task_is_the_base_model_bit_for_bit(subspaces):
    model = VLoRAModel(tiny_llama(), subspaces["shared"])
    base = _logits(tiny_llama())
    model.set_task("t1")
    model.clear_task()
    assert torch.equal(_logits(model), base)
    assert model.unwrap() is model.base_model
    assert torch.equal(_logits(model.base_model), base)


def test_dropping_the_wrapper_removes_its_hooks(subspaces):
    import gc

    base_model = tiny_llama()
    base = _logits(base_model)
    model = VLoRAModel(base_model, subspaces["hybrid"])
    model.set_task("t2")
    assert not torch.equal(_logits(base_model), base)
    del model
    gc.collect()
    assert torch.equal(_logits(base_model), base)
    merged = VLoRAModel(base_model, subspaces["hybrid"])
    merged.merge("t1")
    assert not torch.equal(_logits(base_model), base)
    del merged
    gc.collect()
    assert torch.equal(_logits(base_model), base)  # weights restored bit for bit


def test_merge_matches_hooks_and_unmerge_restores_bit_for_bit(subspaces):
    base = tiny_llama()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = VLoRAModel(base, subspaces["hybrid"])
    model.set_task("t3")
    hooked = _logits(model)
    model.merge()
    assert model.is_merged and model.active_task == "t3"  # vlora's meaning: the merged task
    torch.testing.assert_close(_logits(model), hooked, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="unmerge"):
        model.set_task("t1")
    with pytest.raises(RuntimeError, match="already merged"):
        model.merge("t1")
    model.unmerge()
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    assert model.active_task == "t3"
    assert torch.equal(_logits(model), hooked)
    model.clear_task()
    with pytest.raises(ValueError, match="No task to merge"):
        model.merge()


def _orig_scale_model(adapter_dir: Path, scale_of):
    """PEFT's model of the original adapter, each LoRA layer's scale set by ``scale_of(layer)``."""
    ref = _peft(adapter_dir)
    for _, mod in ref.named_modules():
        if isinstance(getattr(mod, "scaling", None), dict) and "default" in mod.scaling:
            mod.scaling["default"] = scale_of(mod)
    return ref


@pytest.mark.parametrize("variant", ["rslora", "patterns"])
def test_default_scale_is_each_tasks_own(peft_variant_dirs, variant):
    d = peft_variant_dirs[variant]
    sub = SharedSubspace.from_adapters([load_adapter(d)], ["x"], method="svd", max_error=0.0, dtype="float32")
    model = VLoRAModel(tiny_llama(), sub)
    model.set_task("x")
    torch.testing.assert_close(_logits(model), _logits(_peft(d)), rtol=1e-5, atol=1e-5)
    w = load_adapter(d)
    assert model.module_scaling("x") == pytest.approx({m: w.scale(m) for m in w.layer_names})


@pytest.mark.parametrize("variant", ["rslora", "patterns"])
def test_scaling_and_lora_alpha_override(peft_variant_dirs, variant):
    d = peft_variant_dirs[variant]
    w = load_adapter(d)
    sub = SharedSubspace.from_adapters([w], ["x"], method="svd", max_error=0.0, dtype="float32")
    m1 = VLoRAModel(tiny_llama(), sub, scaling=0.5)
    m1.set_task("x")
    torch.testing.assert_close(_logits(m1), _logits(_orig_scale_model(d, lambda mod: 0.5)), rtol=1e-5, atol=1e-5)

    def alpha4(mod):
        r = mod.r["default"]
        return 4.0 / (r**0.5 if w.use_rslora else r)

    m2 = VLoRAModel(tiny_llama(), sub, lora_alpha=4)
    m2.set_task("x")
    torch.testing.assert_close(_logits(m2), _logits(_orig_scale_model(d, alpha4)), rtol=1e-5, atol=1e-5)
    m3 = VLoRAModel(tiny_llama(), sub, scaling=0.5, lora_alpha=4)  # vlora's order: explicit scaling wins
    m3.set_task("x")
    torch.testing.assert_close(_logits(m3), _logits(m1), rtol=0, atol=0)
    assert (m1.scaling, m3.scaling) == (0.5, 0.5)


def test_set_task_builds_each_task_once(subspaces, monkeypatch):
    calls: list[str] = []
    real = _Model._build_task

    def counting(self, task_id):
        calls.append(task_id)
        return real(self, task_id)

    monkeypatch.setattr(_Model, "_build_task", counting)
    model = VLoRAModel(tiny_llama(), subspaces["hybrid"])
    model.set_task("t0")
    model.set_task("t1")
    cached = model._active
    model.set_task("t0")
    model.set_task("t1")
    assert model._active is cached
    _logits(model, task_ids=["t0", "t1", None, "t1", "t0"])
    assert calls == ["t0", "t1"]
    _logits(model, task_ids=ROWS)  # t3, t5 new: built once each
    _logits(model, task_ids=ROWS)
    assert calls == ["t0", "t1", "t3", "t5"]
    model.refresh()  # drops the cache; the active task (t1) is rebuilt
    model.set_task("t0")
    assert calls[4:] == ["t1", "t0"]


def test_peft_state_dict_is_peft_style(subspaces):
    sub = subspaces["hybrid"]
    model = VLoRAModel(tiny_llama(), sub)
    sd = model.peft_state_dict("t2")
    w = sub.reconstruct("t2")
    assert len(sd) == 2 * len(w.layer_names)
    for m in w.layer_names:
        assert torch.equal(sd[f"base_model.model.{m}.lora_A.weight"], w.lora_a[m])
        assert torch.equal(sd[f"base_model.model.{m}.lora_B.weight"], w.lora_b[m])
    assert model.available_tasks == sorted(sub.tasks)
    assert model.qlora_info == {"quantized": False, "method": None, "num_quantized_layers": 0,
                                "num_target_layers": 4, "quantized_layers": {}}


def test_module_names_match_by_suffix_and_missing_ones_are_named(subspaces):
    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = tiny_llama()

        def forward(self, **kw):
            return self.inner(**kw)

    sub = subspaces["shared"]
    wrapped = VLoRAModel(Wrapper(), sub)
    assert wrapped.target_modules["model.layers.0.self_attn.q_proj"] == "inner.model.layers.0.self_attn.q_proj"
    plain = VLoRAModel(tiny_llama(), sub)
    for m in (wrapped, plain):
        m.set_task("t1")
    torch.testing.assert_close(_logits(wrapped), _logits(plain), rtol=0, atol=0)
    inner = VLoRAModel(tiny_llama().model, sub)  # the model is a sub-model: names lack its prefix
    assert inner.target_modules["model.layers.1.self_attn.v_proj"] == "layers.1.self_attn.v_proj"
    with pytest.raises(IncompatibleAdaptersError, match=r"no module for 2 of the subspace's 4 modules: 'model.layers.1"):
        VLoRAModel(tiny_llama(layers=1), sub, strict=True)
    with pytest.warns(UserWarning, match=r"no module for 2 of the subspace's 4 modules"):  # vlora's default: skipped
        partial = VLoRAModel(tiny_llama(layers=1), sub)
    assert sorted(partial.target_modules) == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    with pytest.raises(IncompatibleAdaptersError, match=r"is 128×128 \(out×in\)"):
        VLoRAModel(tiny_llama(hidden=128), sub)


def test_getattr_passes_through_and_compile_is_guarded(subspaces):
    model = VLoRAModel(tiny_llama(), subspaces["shared"])
    assert model.config.hidden_size == 64
    assert model.compile(backend="eager") is model


# -- transformers Conv1D (GPT-2: fan_in_fan_out) ------------------------------------------------------------------
def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=128, n_positions=32, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def gpt2_dirs(tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("gpt2")
    out = []
    for i in range(3):
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                         init_lora_weights=False, lora_dropout=0.0)
        torch.manual_seed(100 + i)
        m = get_peft_model(_gpt2(), cfg)
        m.save_pretrained(str(root / f"g{i}"))
        out.append(root / f"g{i}")
    return out


def test_conv1d_matches_peft_mixes_and_merges(gpt2_dirs):
    from peft import PeftModel

    sub = SharedSubspace.from_adapters([load_adapter(d) for d in gpt2_dirs], ["g0", "g1", "g2"], max_error=0.0,
                                       dtype="float32")
    base = _gpt2()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = VLoRAModel(base, sub)
    assert {st.kind for st in model._states.values()} == {"conv1d"}
    for i, t in enumerate(["g0", "g2"]):
        model.set_task(t)
        ref = PeftModel.from_pretrained(_gpt2(), str(gpt2_dirs[2 * i])).eval()
        torch.testing.assert_close(_logits(model), _logits(ref), rtol=1e-4, atol=1e-4)
    rows = ["g1", None, "g2", "g1", "g0"]
    mixed = _logits(model, task_ids=rows)
    for i, t in enumerate(rows):
        model.clear_task() if t is None else model.set_task(t)
        torch.testing.assert_close(mixed[i], _logits(model, IDS[i : i + 1])[0], rtol=1e-5, atol=1e-5)
    model.set_task("g1")
    hooked = _logits(model)
    model.merge()
    torch.testing.assert_close(_logits(model), hooked, rtol=1e-5, atol=1e-5)
    model.unmerge()
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


# -- GPU ------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mixed_batch_on_cuda_bf16(subspaces):
    model = VLoRAModel(tiny_llama().to("cuda", torch.bfloat16), subspaces["hybrid"])
    ids = IDS.cuda()
    mixed = _logits(model, ids, task_ids=ROWS)
    for i, t in enumerate(ROWS):
        model.clear_task() if t is None else model.set_task(t)
        torch.testing.assert_close(mixed[i], _logits(model, ids[i : i + 1])[0], rtol=3e-2, atol=3e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bitsandbytes_4bit_base(subspaces):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    base = tiny_llama().to(torch.bfloat16)
    for name, mod in list(base.named_modules()):
        for child_name, child in list(mod.named_children()):
            if child_name in ("q_proj", "v_proj") and isinstance(child, torch.nn.Linear):
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=torch.bfloat16, quant_type="nf4")
                q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4")
                setattr(mod, child_name, q)
    base = base.cuda()
    model = VLoRAModel(base, subspaces["shared"])
    info = model.qlora_info
    assert info["quantized"] and info["num_quantized_layers"] == 4 and info["method"] == "nf4"
    ids = IDS.cuda()
    model.clear_task()
    b = _logits(model, ids)
    model.set_task("t0")
    assert (_logits(model, ids) - b).abs().max() > 1e-3
    mixed = _logits(model, ids, task_ids=ROWS)
    torch.testing.assert_close(mixed[1], b[1], rtol=3e-2, atol=3e-2)
    with pytest.raises(RuntimeError, match="quantised"):
        model.merge("t0")
