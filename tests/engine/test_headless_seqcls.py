"""A sequence-classification adapter written without its head still loads in PEFT (found on real MiniLM adapters).

PEFT adds the classifier to ``modules_to_save`` by itself for ``task_type: SEQ_CLS`` and fails
(``KeyError …score.weight``) on a folder that has the task type but not the head's tensors: what a
merge of adapters with different heads, or an export for vLLM, writes. Such folders are now written
without the task type, and the ΔW they hold is the ΔW of the inputs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.jobs import InlineRunner, JobRequest


def _base(seed: int = 0):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, num_labels=2, pad_token_id=0)
    return LlamaForSequenceClassification(cfg).eval()


def _write(out: Path, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_base(), LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def seqcls_pair(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("seqcls")
    return [_write(root / f"cls_{i}", seed=i) for i in range(2)]


def _load(folder: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(_base(), str(folder)).eval()


def test_merge_without_a_common_head_loads_in_peft(seqcls_pair: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "merged"
    r = InlineRunner().run(JobRequest("merge", {"adapters": [str(p) for p in seqcls_pair], "output": str(out),
                                                "method": "task_arithmetic"}))
    assert r.ok, r.error
    assert any("task_type SEQ_CLS removed" in w for w in r.data["target_warnings"])
    model = _load(out)  # raised KeyError before
    ids = torch.randint(1, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_merge_with_a_head_keeps_the_task_type(seqcls_pair: list[Path], tmp_path: Path) -> None:
    import json

    out = tmp_path / "merged-head"
    r = InlineRunner().run(JobRequest("merge", {"adapters": [str(p) for p in seqcls_pair], "output": str(out),
                                                "method": "task_arithmetic", "head_from": "cls_1"}))
    assert r.ok, r.error
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    _load(out)


def test_export_for_vllm_drops_the_head_and_still_loads_in_peft(seqcls_pair: list[Path], tmp_path: Path) -> None:
    sub = tmp_path / "sub"
    r = InlineRunner().run(JobRequest("compress", {"adapters": [str(p) for p in seqcls_pair], "output": str(sub),
                                                   "max_error": 0.05}))
    assert r.ok, r.error
    out = tmp_path / "exp"
    r = InlineRunner().run(JobRequest("export", {"subspace": str(sub), "task_id": "cls_0", "output": str(out),
                                                 "target": "vllm"}))
    assert r.ok, r.error
    assert any("task_type SEQ_CLS removed" in w for w in r.data["target_warnings"])
    _load(out)
