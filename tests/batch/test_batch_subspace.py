"""``--batch`` subspace commands (compress, info, add, export, quantize, benchmark), the Hub, Ctrl-C."""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import pytest
from batchutil import leftovers, popen_batch, probe_batch, run_batch


@pytest.fixture(scope="module")
def subspace(tmp_path_factory, peft_family_dirs) -> Path:
    """A subspace of the first five PEFT adapters, near-exact (float32, max error 1e-3)."""
    out = tmp_path_factory.mktemp("sub") / "sub"
    r = run_batch("compress", *peft_family_dirs[:5], "-o", out, "--max-error", "0.001", "--dtype", "float32", "-q")
    assert r.rc == 0, r.stderr
    return out


def test_compress_json_and_no_textual(tmp_path, peft_family_dirs):
    r = probe_batch(tmp_path, "compress", *peft_family_dirs, "-o", tmp_path / "sub", "-k", "4", "--json")
    assert r.rc == 0, r.stderr
    assert "textual" not in r.modules
    doc = json.loads(r.stdout)
    d = doc["data"]
    assert doc["status"] == "ok" and doc["outputs"] == [str(tmp_path / "sub")]
    assert d["tasks"] == [p.name for p in peft_family_dirs]
    st = d["stats"]
    assert st["num_tasks"] == 6 and st["stored_bytes"] > 0 and st["ratio"] > 1
    assert set(st["error"]["per_task"]) == set(d["tasks"]) and 0 <= st["error"]["max"] <= 1.5
    assert all(k <= 4 for k in st["k"].values())
    assert leftovers(tmp_path) == []


def test_compress_plain_streaming_and_parent_folder(tmp_path, peft_family_dirs):
    parent = peft_family_dirs[0].parent
    r = run_batch("compress", parent, "-o", tmp_path / "s", "--variance-threshold", "0.9", "--adaptive-k", "--streaming",
                  "--method", "joint", env={"VLORA_TUI_TEST_PROGRESS_DELAY": "0.1"})
    assert r.rc == 0, r.stderr
    assert "Subspace written" in r.stdout and "ratio" in r.stdout
    assert "%]" in r.stderr  # plain progress lines go to stderr
    again = run_batch("compress", parent, "-o", tmp_path / "s", "-q")
    assert again.rc == 2 and "already exists" in again.stderr


def test_info_subspace_and_export_loads_in_peft(tmp_path, subspace, peft_family_dirs):
    from peft_factory import peft_logits

    info = run_batch("info", subspace, "--json")
    assert info.rc == 0, info.stderr
    d = info.json()["data"]
    assert d["type"] == "subspace" and len(d["tasks"]) == 5 and d["quantization"] is None
    assert d["stats"]["error"]["max"] <= 0.0011
    assert set(d["fidelity"]) == {p.name for p in peft_family_dirs[:5]}
    assert all(m["k"] >= 0 and m["name"] in d["variance"] for m in d["modules"])

    out = tmp_path / "task_2"
    r = run_batch("export", subspace, "task_2", "-o", out, "--alpha", "16", "--modelfile", "--json")
    assert r.rc == 0, r.stderr
    e = r.json()["data"]
    assert e["lora_alpha"] == 16 and Path(e["modelfile"]).read_text().startswith("FROM ")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["lora_alpha"] == 16
    got, want = peft_logits(out), peft_logits(peft_family_dirs[2])
    assert (got - want).abs().max() <= 1e-3 * max(1.0, want.abs().max().item())

    unknown = run_batch("export", subspace, "nope", "-o", tmp_path / "x")
    assert unknown.rc == 2 and "unknown task 'nope'" in unknown.stderr and len(unknown.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_add_modes_and_bad_input(tmp_path, subspace, peft_family_dirs):
    from peft_factory import peft_logits

    sub = tmp_path / "sub"
    shutil.copytree(subspace, sub)
    r = run_batch("add", sub, peft_family_dirs[5], "--task-id", "new_task", "--incremental", "--force", "--json")
    assert r.rc == 0, r.stderr
    d = r.json()["data"]
    assert d["mode"] == "incremental" and d["stats"]["num_tasks"] == 6 and d["task"]["max_error"] <= 0.0011
    again = run_batch("add", sub, peft_family_dirs[5], "--task-id", "new_task", "-o", tmp_path / "again")
    assert again.rc == 2 and "already in" in again.stderr

    other = tmp_path / "absorbed"
    r2 = run_batch("add", sub, peft_family_dirs[0], "--task-id", "again", "-o", other)
    assert r2.rc == 0, r2.stderr
    assert "absorb" in r2.stdout
    r3 = run_batch("add", other, peft_family_dirs[1], "--task-id", "proj", "--project", "--force", "--allow-worse", "--json")
    assert r3.rc == 0 and r3.json()["data"]["mode"] == "project"
    info = run_batch("info", other, "--json").json()["data"]
    assert {t["task_id"] for t in info["tasks"]} >= {"new_task", "again", "proj"}

    exp = tmp_path / "exp"
    assert run_batch("export", sub, "new_task", "-o", exp, "-q").rc == 0
    assert (peft_logits(exp) - peft_logits(peft_family_dirs[5])).abs().max() < 1e-2

    bad_id = run_batch("add", sub, peft_family_dirs[0], "--task-id", "../evil")
    assert bad_id.rc == 2 and "invalid task id" in bad_id.stderr
    missing = run_batch("add", tmp_path / "nosub", peft_family_dirs[0], "--task-id", "t")
    assert missing.rc == 2
    both = run_batch("add", sub, peft_family_dirs[0], "--task-id", "t", "--incremental", "--project")
    assert both.rc == 2 and "at most one" in both.stderr
    assert leftovers(tmp_path) == []


def test_quantize(tmp_path, subspace):
    out = tmp_path / "q4"
    r = run_batch("quantize", subspace, "-o", out, "--bits", "4", "--method", "nf4", "--double-quant", "--json")
    assert r.rc == 0, r.stderr
    d = r.json()["data"]
    assert d["quantization"]["bits"] == 4 and d["quantization"]["double_quant"] is True
    assert d["after"]["stored_bytes"] < d["before"]["stored_bytes"]
    info = run_batch("info", out, "--json").json()["data"]
    assert info["quantization"]["method"] == "nf4"
    assert run_batch("quantize", subspace, "-o", tmp_path / "q8", "--bits", "8").rc == 0
    assert run_batch("quantize", subspace, "-o", tmp_path / "x", "--bits", "8", "--method", "nf4").rc == 2
    nobits = run_batch("quantize", subspace, "-o", tmp_path / "x")
    assert nobits.rc == 2 and "--bits" in nobits.stderr
    assert run_batch("quantize", subspace, "-o", tmp_path / "x", "--bits", "3").rc == 2


def test_benchmark_table(peft_family_dirs):
    r = run_batch("benchmark", *peft_family_dirs[:4], "--k-values", "1", "4", "--methods", "joint", "svd", "--json")
    assert r.rc == 0, r.stderr
    d = r.json()["data"]
    assert d["ks"] == [1, 4] and d["methods"] == ["joint", "svd"] and len(d["rows"]) == 4
    svd4 = next(x for x in d["rows"] if x["method"] == "svd" and x["k"] == 4)
    assert svd4["max_error"] < 0.01  # rank-4 adapters at k=4: the per-task baseline is exact up to fp16
    plain = run_batch("benchmark", *peft_family_dirs[:3], "--k-values", "2", "--methods", "svd")
    assert plain.rc == 0 and "Fidelity and size over k" in plain.stdout


def test_corrupt_subspace_is_bad_input(tmp_path, subspace):
    bad = tmp_path / "bad"
    shutil.copytree(subspace, bad)
    victim = next(p for p in bad.iterdir() if p.suffix == ".safetensors")
    victim.write_bytes(victim.read_bytes()[:-8] + b"\x00" * 8)
    r = run_batch("info", bad)
    assert r.rc == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_sigint_during_compress_leaves_nothing(tmp_path, demo_dir):
    out = tmp_path / "sub"
    proc = popen_batch("compress", demo_dir, "-o", out, "-k", "4", env={"VLORA_TUI_TEST_PROGRESS_DELAY": "0.3"})
    deadline = time.monotonic() + 120
    assert proc.stderr is not None
    while time.monotonic() < deadline:  # wait until the job is running (a progress line on stderr)
        line = proc.stderr.readline()
        if "%]" in line or not line:
            break
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert stdout == ""
    assert not out.exists() and leftovers(tmp_path) == []
    assert "Traceback" not in stderr


def test_hub_specs(tmp_path, peft_family_dirs):
    hubserver = pytest.importorskip("hubserver")
    files = {n: (peft_family_dirs[0] / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")}
    with hubserver.FakeHub() as hub:
        hub.add_repo("org/lora-a", files)
        env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"),
               "HF_HUB_OFFLINE": "0"}
        info = run_batch("info", "hf://org/lora-a", "--json", env=env)
        assert info.rc == 0, info.stderr
        assert info.json()["data"]["path"] == "hf://org/lora-a" and info.json()["data"]["num_modules"] == 4
        comp = run_batch("compress", "hf://org/lora-a", *peft_family_dirs[1:3], "-o", tmp_path / "s", "-k", "2", "--json", env=env)
        assert comp.rc == 0, comp.stderr
        assert comp.json()["data"]["tasks"][0] == "lora-a"
        missing = run_batch("info", "hf://org/absent", env=env)
        assert missing.rc == 1 and "hf://org/absent" in missing.stderr
        bad = run_batch("inspect", "hf://not a repo", env=env)
        assert bad.rc == 2
