"""The ``compare`` job (PEFT originals vs subspace reconstructions on a real model) and the ``train`` job
(a task trained in a subspace on JSONL), run in-process on a tiny Llama saved from its config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine import SharedSubspace, load_adapter, save_adapter
from engine.jobs import InlineRunner, JobRequest
from engine.jobs.basemodel import read_jsonl
from peft_factory import save_tiny_base, tiny_llama


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return save_tiny_base(tmp_path_factory.mktemp("base") / "tiny")


@pytest.fixture(scope="module")
def adapters(peft_family_dirs) -> list[Path]:
    return list(peft_family_dirs[:3])


def _subspace(dirs: list[Path], out: Path, **kw) -> Path:
    ads = [load_adapter(d) for d in dirs]
    SharedSubspace.from_adapters(ads, [d.name for d in dirs], **kw).save(out)
    return out


def _run(kind: str, **params):
    events = []
    r = InlineRunner().run(JobRequest(kind, params), progress=events.append)
    assert r.ok, r.error
    return r, events


def _kl_independent(original: Path, reconstructed: Path) -> float:
    """KL(original ‖ reconstruction) over the compare job's random inputs, both adapters run by PEFT alone."""
    from peft import PeftModel

    ids = torch.randint(1, 128, (8, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        p = PeftModel.from_pretrained(tiny_llama(), str(original)).eval()(input_ids=ids).logits.double()
        q = PeftModel.from_pretrained(tiny_llama(), str(reconstructed)).eval()(input_ids=ids).logits.double()
    lp, lq = torch.log_softmax(p, -1), torch.log_softmax(q, -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def test_compare_lossless_is_exact_and_truncated_is_not(tmp_path, base_dir, adapters):
    exact = _subspace(adapters, tmp_path / "exact", method="joint", max_error=0.0, dtype="float32")
    k1 = _subspace(adapters, tmp_path / "k1", num_components=1, hybrid=False)
    r, events = _run("compare", subspace=str(exact), adapters=[str(a) for a in adapters], base_model=str(base_dir))
    d = r.data
    assert d["task_type"] == "CAUSAL_LM" and d["mixed_batch"] and d["inputs"]["source"] == "random"
    assert any("no tokenizer" in n for n in d["notes"])
    assert [t["task_id"] for t in d["tasks"]] == [a.name for a in adapters]
    for t in d["tasks"]:
        assert t["kl_mean"] < 1e-9 and t["top1_agreement"] == 1.0 and t["positions"] == 8 * 16
        assert t["ppl_change"] == pytest.approx(0.0, abs=1e-6)
    assert sum("original adapter" in e.message for e in events) == len(adapters)  # progress per task

    r2, _ = _run("compare", subspace=str(k1), adapters=[str(a) for a in adapters], base_model=str(base_dir))
    worst = max(t["kl_mean"] for t in r2.data["tasks"])
    assert worst > 1e-4 and worst > 1e4 * max(t["kl_mean"] for t in d["tasks"])
    # the job's figure is the one PEFT gives for the reconstructed adapter, computed without the job
    t0 = r2.data["tasks"][0]
    save_adapter(SharedSubspace.load(k1).reconstruct(t0["task_id"]), tmp_path / "rec")
    assert t0["kl_mean"] == pytest.approx(_kl_independent(adapters[0], tmp_path / "rec"), rel=1e-3)


def test_compare_sequence_classification_with_heads(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    base = save_tiny_base(tmp_path / "cls", num_labels=3)
    dirs = []
    for seed in (1, 2):
        m = get_peft_model(AutoModelForSequenceClassification.from_pretrained(str(base)),
                           LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if p.requires_grad:  # lora factors and the saved head
                    p.add_(torch.randn(p.shape, generator=g) * 0.2)
        m.save_pretrained(str(tmp_path / f"cls_{seed}"))
        dirs.append(tmp_path / f"cls_{seed}")
    sub = _subspace(dirs, tmp_path / "sub", method="joint", max_error=0.0, dtype="float32")
    r, _ = _run("compare", subspace=str(sub), adapters=[str(d) for d in dirs], base_model=str(base))
    d = r.data
    assert d["task_type"] == "SEQ_CLS" and not d["mixed_batch"]  # each task has its own head
    for t in d["tasks"]:
        assert t["kl_mean"] < 1e-9 and t["top1_agreement"] == 1.0 and t["positions"] == 8 and "ppl_change" not in t


def test_compare_refuses_unknown_tasks_and_bad_base(tmp_path, base_dir, adapters):
    sub = _subspace(adapters[:2], tmp_path / "sub", method="joint", max_error=0.0, dtype="float32")
    r = InlineRunner().run(JobRequest("compare", {"subspace": str(sub), "adapters": [str(a) for a in adapters],
                                                  "base_model": str(base_dir)}))
    assert r.error_kind == "input" and f"no task {adapters[2].name!r}" in r.error
    r = InlineRunner().run(JobRequest("compare", {"subspace": str(sub), "adapters": [str(adapters[0])],
                                                  "base_model": str(tmp_path)}))
    assert r.error_kind == "input" and "no config.json" in r.error


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_train_learns_and_writes_a_subspace_peft_reproduces(tmp_path, base_dir, adapters):
    from peft import PeftModel

    from engine import VLoRAModel

    sub = _subspace(adapters, tmp_path / "sub", max_error=0.05)
    before = _files(sub)
    data = _jsonl(tmp_path / "d.jsonl", [{"text": "a" * 12}, {"text": "a" * 9}] * 3)
    r, events = _run("train", subspace=str(sub), task_id="new", base_model=str(base_dir), data=str(data),
                     output=str(tmp_path / "out"), steps=25, lr=5e-2, batch_size=4, num_expand=2)
    d = r.data
    losses = d["losses"]
    assert len(losses) == 25 and losses[-1] < losses[0] - 0.5
    assert [e.value for e in events if e.value is not None] == losses  # every step's loss, in order
    assert d["trainable_params"] > 0 and d["task"]["max_error"] < 2e-3 and d["num_tasks"] == 4
    assert _files(sub) == before  # the input is untouched
    out = SharedSubspace.load(tmp_path / "out")
    assert "new" in out.tasks
    save_adapter(out.reconstruct("new"), tmp_path / "new")
    ids = torch.tensor([list(b"a" * 9)]) % 127 + 1  # the job's byte encoding: 1 + byte % (vocab - 1)
    served = VLoRAModel(tiny_llama(), out)
    served.set_task("new")
    with torch.no_grad():
        ref = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "new")).eval()(input_ids=ids).logits
        torch.testing.assert_close(served(input_ids=ids).logits, ref, rtol=1e-5, atol=1e-5)
        base_loss = float(tiny_llama()(input_ids=ids, labels=ids).loss)
        assert float(served(input_ids=ids, labels=ids).loss) < base_loss - 0.5


def test_train_classifier_with_string_labels(tmp_path):
    base = save_tiny_base(tmp_path / "cls", num_labels=2)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    dirs = []
    for seed in (1, 2):
        m = get_peft_model(AutoModelForSequenceClassification.from_pretrained(str(base)),
                           LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if p.requires_grad and "lora_A" in name:
                    p.add_(torch.randn(p.shape, generator=g) * 0.2)
                elif p.requires_grad and "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        m.save_pretrained(str(tmp_path / f"cls_{seed}"))
        dirs.append(tmp_path / f"cls_{seed}")
    sub = _subspace(dirs, tmp_path / "sub", max_error=0.05)
    rows = [{"text": "good " * (1 + i % 3), "label": "pos"} for i in range(6)] + \
           [{"text": "bad " * (1 + i % 3), "label": "neg"} for i in range(6)]
    data = _jsonl(tmp_path / "d.jsonl", rows)
    r, _ = _run("train", subspace=str(sub), task_id="senti", base_model=str(base), data=str(data),
                output=str(tmp_path / "out"), steps=20, lr=5e-2, batch_size=12)
    d = r.data
    assert d["task_type"] == "SEQ_CLS" and d["labels"] == {"neg": 0, "pos": 1}
    assert d["losses"][-1] < d["losses"][0]
    # held out (10 % of 12 rows: 1): before = the base classifier with its own head (a new task starts at zero)
    from transformers import AutoModelForSequenceClassification

    from engine.jobs.kinds.train import split_eval

    ev = d["eval"]
    (held,) = split_eval(len(rows), 0.1, 0)[1]
    assert ev["examples"] == 1 and d["train_examples"] == 11 and "initial head" in ev["before_is"]
    ids = torch.tensor([list(rows[held]["text"].encode())]) % 127 + 1
    label = torch.tensor([d["labels"][rows[held]["label"]]])
    with torch.no_grad():
        logits = AutoModelForSequenceClassification.from_pretrained(str(base)).eval()(input_ids=ids).logits.double()
    assert ev["before"]["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, label)), rel=1e-5)
    assert ev["before"]["accuracy"] == float(logits.argmax(-1).item() == label.item())
    assert ev["after"]["accuracy"] in (0.0, 1.0) and ev["after"]["loss"] > 0


def test_read_jsonl_names_every_bad_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\nnot json\n[1]\n{"other": 1}\n\n', encoding="utf-8")
    with pytest.raises(ValueError) as e:
        read_jsonl(p, ("text",))
    msg = str(e.value)
    assert str(p) in msg and "line 2 is not JSON" in msg and "line 3 is not a JSON object" in msg and "line 4 has no 'text'" in msg
    with pytest.raises(ValueError, match="no such file"):
        read_jsonl(tmp_path / "missing.jsonl", ("text",))


def test_compare_base_mode_zero_task_is_the_base_and_a_task_moves_it(tmp_path, base_dir, adapters):
    """No adapters: each task vs the base model. A zero-update task gives KL 0 and agreement 1; a real task's KL is
    the one computed apart from the job (PEFT on the reconstructed adapter vs the plain base model)."""
    from engine.training import orthogonal_init

    sub = SharedSubspace.from_adapters([load_adapter(a) for a in adapters], [a.name for a in adapters],
                                       method="joint", max_error=0.0, dtype="float32")
    orthogonal_init(sub, "zero")
    sub.save(tmp_path / "sub")
    t0 = adapters[0].name
    r, _ = _run("compare", subspace=str(tmp_path / "sub"), base_model=str(base_dir), tasks=["zero", t0])
    d = r.data
    assert d["mode"] == "base" and [t["task_id"] for t in d["tasks"]] == ["zero", t0]
    zero, real = d["tasks"]
    assert zero["kl_mean"] == 0.0 and zero["top1_agreement"] == 1.0 and zero["ppl_change"] == pytest.approx(0.0, abs=1e-12)
    assert zero["reference"] == "the base model"
    from peft import PeftModel

    save_adapter(SharedSubspace.load(tmp_path / "sub").reconstruct(t0), tmp_path / "rec")
    ids = torch.randint(1, 128, (8, 16), generator=torch.Generator().manual_seed(0))  # the job's random inputs
    with torch.no_grad():
        p = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "rec")).eval()(input_ids=ids).logits.double()
        q = tiny_llama()(input_ids=ids).logits.double()
    lp, lq = torch.log_softmax(p, -1), torch.log_softmax(q, -1)
    kl = float((lp.exp() * (lp - lq)).sum(-1).mean())
    assert real["kl_mean"] > 1e-4 and real["kl_mean"] == pytest.approx(kl, rel=1e-3)
    agree = float((p.argmax(-1) == q.argmax(-1)).double().mean())
    assert real["top1_agreement"] == pytest.approx(agree)


def test_compare_base_mode_classifier_accuracy_with_the_tasks_head(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    base = save_tiny_base(tmp_path / "cls", num_labels=2)
    m = get_peft_model(AutoModelForSequenceClassification.from_pretrained(str(base)),
                       LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in m.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    m.save_pretrained(str(tmp_path / "c"))
    sub = _subspace([tmp_path / "c"], tmp_path / "sub", method="joint", max_error=0.0, dtype="float32")
    rows = [{"text": "good " * (1 + i % 3), "label": i % 2} for i in range(8)]
    data = _jsonl(tmp_path / "d.jsonl", rows)
    r, _ = _run("compare", subspace=str(sub), base_model=str(base), data=str(data))
    (t,) = r.data["tasks"]
    assert t["reference"] == "the base model with the task's stored head, no update"
    from engine.jobs.basemodel import encode

    ids, mask = encode([x["text"] for x in rows], None, 128, 64)  # the job's encoding (no tokenizer)
    labels = torch.tensor([x["label"] for x in rows])
    before = AutoModelForSequenceClassification.from_pretrained(str(base)).eval()
    head = dict(m.named_parameters())["base_model.model.score.modules_to_save.default.weight"]
    with torch.no_grad():
        got = m.eval()(input_ids=ids, attention_mask=mask).logits
        before.score.weight.copy_(head)  # before: the task's head on the base model, no update
        ref = before(input_ids=ids, attention_mask=mask).logits
    assert t["accuracy_task"] == pytest.approx(float((got.argmax(-1) == labels).double().mean()))
    assert t["accuracy_before"] == pytest.approx(float((ref.argmax(-1) == labels).double().mean()))
    lp, lq = torch.log_softmax(got.double(), -1), torch.log_softmax(ref.double(), -1)
    assert t["kl_mean"] == pytest.approx(float((lp.exp() * (lp - lq)).sum(-1).mean()), rel=1e-3)
