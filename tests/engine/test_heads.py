"""A stored task's own head (``modules_to_save``): ``VLoRAModel`` serves a compressed PEFT ``SEQ_CLS`` adapter
with its classifier, per row in a mixed batch, and leaves the base model's head untouched."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import SharedSubspace, VLoRAModel, load_adapter

IDS = torch.randint(1, 128, (4, 10), generator=torch.Generator().manual_seed(5))  # no pad token (0)


def _cls_base(num_labels: int = 3):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, num_labels=num_labels,
                      pad_token_id=0)
    return LlamaForSequenceClassification(cfg).eval()


def _cls_adapter(out: Path, seed: int, num_labels: int = 3) -> Path:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_cls_base(num_labels), LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                             target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:  # LoRA factors and the head (score)
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(str(out))
    return out


def _logits(model, ids=IDS, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits.float()


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    dirs = [_cls_adapter(root / f"c{i}", seed=i + 1) for i in range(2)]
    sub = SharedSubspace.from_adapters([load_adapter(d) for d in dirs], ["c0", "c1"], method="joint",
                                       max_error=0.0, dtype="float32")
    sub.save(root / "sub")
    return dirs, SharedSubspace.load(root / "sub")  # served from the saved subspace


def test_set_task_serves_the_tasks_own_head_as_peft_does(compressed):
    from peft import PeftModel

    dirs, sub = compressed
    model = VLoRAModel(_cls_base(), sub)
    base_head = model.base_model.score.weight.detach().clone()
    plain = _logits(_cls_base())
    for tid, d in zip(["c0", "c1"], dirs):
        want = _logits(PeftModel.from_pretrained(_cls_base(), str(d)).eval())
        model.set_task(tid)
        got = _logits(model)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert (got - plain).abs().max() > 1e-2
    assert torch.equal(model.base_model.score.weight, base_head)  # the base's head is never overwritten
    model.clear_task()
    torch.testing.assert_close(_logits(model), plain, rtol=0, atol=0)


def test_mixed_batch_gives_each_row_its_tasks_head(compressed):
    _, sub = compressed
    model = VLoRAModel(_cls_base(), sub)
    rows = ["c0", None, "c1", "c0"]
    mixed = _logits(model, task_ids=rows)
    for i, t in enumerate(rows):
        if t is None:
            model.clear_task()
        else:
            model.set_task(t)
        torch.testing.assert_close(mixed[i:i + 1], _logits(model, IDS[i:i + 1]), rtol=1e-5, atol=1e-5)
    model.clear_task()
    torch.testing.assert_close(mixed[1:2], _logits(_cls_base(), IDS[1:2]), rtol=1e-6, atol=1e-6)


def test_merge_applies_the_head_and_unwrap_removes_it(compressed):
    _, sub = compressed
    model = VLoRAModel(_cls_base(), sub)
    model.set_task("c1")
    want = _logits(model)
    model.merge()
    torch.testing.assert_close(_logits(model), want, rtol=1e-4, atol=1e-4)
    model.unmerge()
    base = model.unwrap()
    torch.testing.assert_close(_logits(base), _logits(_cls_base()), rtol=0, atol=0)


def test_a_head_of_another_shape_is_not_applied_with_a_warning(compressed):
    _, sub = compressed  # 3-label heads
    model = VLoRAModel(_cls_base(num_labels=2), sub)
    with pytest.warns(UserWarning, match="task 'c0'.s head .modules_to_save. is not applied: 'score.weight' is"):
        model.set_task("c0")
    assert _logits(model).shape == (4, 2)
