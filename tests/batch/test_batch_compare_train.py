"""``--batch compare`` and ``--batch train`` in a subprocess: exit codes, one-line errors, cancel leaves nothing."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from batchutil import leftovers, popen_batch, run_batch
from peft_factory import save_tiny_base


@pytest.fixture(scope="module")
def setup(tmp_path_factory, peft_family_dirs) -> dict[str, Path]:
    from engine import SharedSubspace, load_adapter

    root = tmp_path_factory.mktemp("cmp")
    dirs = list(peft_family_dirs[:3])
    ads = [load_adapter(d) for d in dirs]
    SharedSubspace.from_adapters(ads, [d.name for d in dirs], method="joint", max_error=0.0, dtype="float32").save(root / "sub")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": "a" * n}) + "\n" for n in (12, 9, 10, 11)), encoding="utf-8")
    return {"base": save_tiny_base(root / "base"), "sub": root / "sub", "data": data, "adapters": root}


def test_compare_json(setup, peft_family_dirs):
    r = run_batch("compare", setup["sub"], *peft_family_dirs[:3], "--base-model", setup["base"], "--json")
    assert r.rc == 0, r.stderr
    d = r.json()["data"]
    assert [t["task_id"] for t in d["tasks"]] == [p.name for p in peft_family_dirs[:3]]
    assert all(t["kl_mean"] < 1e-9 and t["top1_agreement"] == 1.0 for t in d["tasks"])
    assert "Traceback" not in r.stderr and "Warning" not in r.stderr


def test_compare_missing_base_model_is_one_line(setup, peft_family_dirs, tmp_path):
    r = run_batch("compare", setup["sub"], peft_family_dirs[0], "--base-model", tmp_path / "nope")
    assert r.rc == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [f"error: base_model: {tmp_path / 'nope'}: no such folder "
                                             "(a local folder written by save_pretrained)"]


def test_train_writes_the_grown_subspace(setup, tmp_path):
    from engine import SharedSubspace

    out = tmp_path / "out"
    r = run_batch("train", setup["sub"], "--task-id", "new", "--base-model", setup["base"], "--data", setup["data"],
                  "--steps", "20", "--lr", "5e-2", "--batch-size", "4", "--num-expand", "2", "-o", out, "--json")
    assert r.rc == 0, r.stderr
    d = r.json()["data"]
    assert d["loss_last"] < d["loss_first"] - 0.5 and len(d["losses"]) == 20
    assert "new" in SharedSubspace.load(out).tasks and leftovers(tmp_path) == []
    again = run_batch("export", out, "new", "-o", tmp_path / "new", "-q")  # the trained task as a PEFT adapter
    assert again.rc == 0, again.stderr
    from peft import PeftModel

    from peft_factory import tiny_llama

    PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "new"))


def test_train_bad_data_is_one_line(setup, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n', encoding="utf-8")
    r = run_batch("train", setup["sub"], "--task-id", "new", "--base-model", setup["base"], "--data", bad, "-o", tmp_path / "out")
    assert r.rc == 2 and not (tmp_path / "out").exists()
    assert r.stderr.strip().splitlines() == [f"error: data: {bad}: line 2 has no 'text'"]


def test_train_sigint_writes_nothing(setup, tmp_path):
    out = tmp_path / "out"
    proc = popen_batch("train", setup["sub"], "--task-id", "new", "--base-model", setup["base"], "--data", setup["data"],
                       "--steps", "500", "-o", out, env={"VLORA_TUI_TEST_PROGRESS_DELAY": "0.3"})
    assert proc.stderr is not None
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:  # the job is training: a progress line with a loss
        line = proc.stderr.readline()
        if "loss" in line or not line:
            break
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert stdout == "" and "Traceback" not in stderr
    assert not out.exists() and leftovers(tmp_path) == [] and leftovers(setup["sub"].parent) == []


def test_train_reports_held_out_loss_before_and_after(setup, tmp_path):
    """--eval-fraction holds rows out; the JSON's before/after losses are PEFT's figures on them, computed apart."""
    import torch
    from peft import PeftModel

    from engine import SharedSubspace, save_adapter
    from engine.jobs.kinds.train import split_eval
    from peft_factory import tiny_llama

    out = tmp_path / "out"
    r = run_batch("train", setup["sub"], "--task-id", "new", "--base-model", setup["base"], "--data", setup["data"],
                  "--steps", "15", "--lr", "5e-2", "--batch-size", "4", "--eval-fraction", "0.25", "-o", out, "--json")
    assert r.rc == 0, r.stderr
    d = r.json()["data"]
    ev = d["eval"]
    assert ev["examples"] == 1 and d["train_examples"] == 3 and ev["before"]["accuracy"] is None
    texts = [json.loads(ln)["text"] for ln in setup["data"].read_text().splitlines()]
    (held,) = split_eval(len(texts), 0.25, 0)[1]
    ids = torch.tensor([list(texts[held].encode())]) % 127 + 1  # the job's byte encoding (no tokenizer)
    save_adapter(SharedSubspace.load(out).reconstruct("new"), tmp_path / "new")
    with torch.no_grad():
        base = float(tiny_llama()(input_ids=ids, labels=ids).loss)
        trained = float(PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "new")).eval()(input_ids=ids, labels=ids).loss)
    assert ev["before"]["loss"] == pytest.approx(base, rel=1e-4)
    assert ev["after"]["loss"] == pytest.approx(trained, rel=1e-4) and trained < base
    text = run_batch("train", setup["sub"], "--task-id", "new", "--base-model", setup["base"], "--data", setup["data"],
                     "--steps", "2", "--eval-fraction", "0.25", "-o", tmp_path / "out2")
    assert text.rc == 0, text.stderr
    assert "Held out (1 examples, not trained on): before → after" in text.stdout
    assert "the base model with a zero update" in text.stdout


def test_compare_without_adapters_compares_each_task_with_the_base(setup, peft_family_dirs):
    name = peft_family_dirs[0].name
    r = run_batch("compare", setup["sub"], "--base-model", setup["base"], "--tasks", name, "--json")
    assert r.rc == 0, r.stderr
    d = r.json()["data"]
    assert d["mode"] == "base" and [t["task_id"] for t in d["tasks"]] == [name] and d["tasks"][0]["kl_mean"] > 0
    text = run_batch("compare", setup["sub"], "--base-model", setup["base"], "--tasks", "nope")
    assert text.rc == 2 and "holds no task 'nope'" in text.stderr and "Traceback" not in text.stderr
