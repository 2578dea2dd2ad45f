"""``--batch`` commands that need no subspace: demo, info, inspect, validate, merge; exit codes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from batchutil import leftovers, probe_batch, run_batch


def test_info_adapter_reads_header_without_torch_or_textual(tmp_path, demo_dir):
    r = probe_batch(tmp_path, "info", demo_dir / "sql-sqlite", "--json")
    assert r.rc == 0, r.stderr
    assert "torch" not in r.modules and "textual" not in r.modules and "rich" not in r.modules
    doc = json.loads(r.stdout)
    assert doc["status"] == "ok" and doc["data"]["type"] == "adapter"
    assert doc["data"]["num_modules"] == 16 and doc["data"]["rank"] == 8


def test_info_plain_and_collection(demo_dir):
    r = run_batch("info", demo_dir / "sql-sqlite")
    assert r.rc == 0 and "base model" in r.stdout and "model.layers.0.self_attn.q_proj" in r.stdout
    c = run_batch("info", demo_dir, "--json")
    assert c.rc == 0
    d = c.json()["data"]
    assert d["type"] == "collection" and d["count"] == 14 and d["problems"] == []


def test_demo_writes_collection_and_refuses_overwrite(tmp_path):
    r = probe_batch(tmp_path, "demo", "-o", tmp_path / "demo", "--json")
    assert r.rc == 0, r.stderr
    assert "textual" not in r.modules
    data = json.loads(r.stdout)["data"]
    assert len(data["adapters"]) == 14 and all(Path(p).is_dir() for p in data["adapters"])
    again = run_batch("demo", "-o", tmp_path / "demo")
    assert again.rc == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr
    assert again.stderr.strip().splitlines()[-1].startswith("error: ")
    forced = run_batch("demo", "-o", tmp_path / "demo", "--force", "-q")
    assert forced.rc == 0 and forced.stderr == ""
    assert leftovers(tmp_path) == []


def test_inspect_and_json(peft_adapter_dir):
    r = run_batch("inspect", peft_adapter_dir, "--json")
    assert r.rc == 0, r.stderr
    d = r.json()["data"]
    assert len(d["modules"]) == 4 and all(m["norm_delta"] > 0 for m in d["modules"])
    assert {"norm_a", "norm_b", "singular_values", "stable_rank"} <= set(d["modules"][0])
    plain = run_batch("inspect", peft_adapter_dir)
    assert plain.rc == 0 and "‖ΔW‖" in plain.stdout


def test_validate_exit_codes(tmp_path, peft_family_dirs):
    ok = run_batch("validate", *peft_family_dirs[:3])
    assert ok.rc == 0 and "all valid" in ok.stdout
    corrupt = tmp_path / "corrupt"
    shutil.copytree(peft_family_dirs[0], corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json")
    bad = run_batch("validate", peft_family_dirs[1], corrupt, "--json")
    assert bad.rc == 1
    doc = bad.json()
    assert doc["status"] == "failed" and doc["data"]["adapters"][1]["ok"] is False
    assert "corrupt" in doc["data"]["adapters"][1]["error"]


@pytest.mark.parametrize(
    "args, needle",
    [
        (("info", "{tmp}/missing"), "missing: no such file or directory"),
        (("inspect", "{tmp}/corrupt"), "corrupt"),
        (("info", "{tmp}/corrupt"), "corrupt"),
        (("merge", "{tmp}/corrupt", "{tmp}/corrupt", "-o", "{tmp}/out"), "corrupt"),
        (("info",), "the following arguments are required"),
        (("inspect", "x", "--bogus-flag"), "unrecognized arguments: --bogus-flag"),
        (("merge", "a", "-o", "o", "--method", "nope"), "invalid choice"),
        (("merge", "a", "-o", "o", "--density", "lots"), "invalid float value"),
        (("frobnicate",), "invalid choice"),
        (("finetune",), "invalid choice"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, peft_adapter_dir, args, needle):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(peft_adapter_dir, corrupt)
    raw = (corrupt / "adapter_model.safetensors").read_bytes()
    (corrupt / "adapter_model.safetensors").write_bytes(raw[: len(raw) // 2])
    r = run_batch(*[a.format(tmp=tmp_path) for a in args], "-q") if len(args) > 1 else run_batch(*args)
    assert r.rc == 2, (r.rc, r.stderr)
    assert needle in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_debug_shows_traceback(tmp_path):
    r = run_batch("info", tmp_path / "missing", "--debug")
    assert r.rc == 2 and "Traceback" in r.stderr


def test_merge_outputs_load_in_peft(tmp_path, peft_family_dirs):
    from peft_factory import peft_logits

    out = tmp_path / "merged"
    r = run_batch("merge", *peft_family_dirs[:3], "-o", out, "--method", "dare", "--drop-rate", "0.3", "--seed", "7",
                  "--weights", "0.5", "0.3", "0.2", "--rank", "4", "--json")
    assert r.rc == 0, r.stderr
    d = r.json()["data"]
    assert d["params"]["seed"] == 7 and d["params"]["drop_rate"] == 0.3 and d["rank"] == 4
    assert 0 < d["max_error"] < 1
    logits = peft_logits(out)
    assert logits.isfinite().all()

    exact = tmp_path / "exact"
    r2 = run_batch("merge", *peft_family_dirs[:2], "-o", exact, "--method", "task_arithmetic", "--rank", "exact")
    assert r2.rc == 0 and "Merged adapter" in r2.stdout
    cfg = json.loads((exact / "adapter_config.json").read_text())
    assert cfg["r"] == 8
    assert peft_logits(exact).isfinite().all()
    exists = run_batch("merge", *peft_family_dirs[:2], "-o", exact)
    assert exists.rc == 2 and "already exists" in exists.stderr


def test_analyze_finds_families_and_outliers(demo_dir):
    r = run_batch("analyze", demo_dir, "--threshold", "0.5", "--json")
    assert r.rc == 0, r.stderr
    d = r.json()["data"]
    assert len(d["names"]) == 14 and len(d["similarity"]) == 14
    families = sorted(sorted(c["names"]) for c in d["clusters"] if len(c["names"]) > 1)
    assert [f[0].split("-")[0] for f in families] == ["math", "sql", "summarize"]
    assert {o["name"] for o in d["outliers"]} == {"pirate-speak", "emoji-only"}
    assert "mean" in d["variance"] and d["variance"]["modules"]
    plain = run_batch("analyze", *sorted(p for p in demo_dir.iterdir() if p.is_dir())[:3], "--threshold", "0.9")
    assert plain.rc == 0 and "Cosine similarity of ΔW" in plain.stdout and "Clusters" in plain.stdout
    one = run_batch("analyze", demo_dir / "sql-sqlite")
    assert one.rc == 2 and "at least 2 adapters" in one.stderr


def test_diff(demo_dir):
    r = run_batch("diff", demo_dir / "sql-sqlite", demo_dir / "sql-postgres", "--json")
    assert r.rc == 0, r.stderr
    d = r.json()["data"]
    assert d["a"] == "sql-sqlite" and len(d["modules"]) == 16 and 0.5 < d["overall"]["cosine"] < 1
    same = run_batch("diff", demo_dir / "sql-sqlite", demo_dir / "sql-sqlite", "--json").json()["data"]
    assert same["overall"]["relative_difference"] == pytest.approx(0.0, abs=1e-6)
    plain = run_batch("diff", demo_dir / "sql-sqlite", demo_dir / "pirate-speak")
    assert plain.rc == 0 and "Per module" in plain.stdout


def test_validate_and_export_targets(tmp_path, peft_variant_dirs, peft_family_dirs):
    mts, patterns = peft_variant_dirs["mts"], peft_variant_dirs["patterns"]
    r = run_batch("validate", mts, patterns, "--target", "vllm")
    assert r.rc == 1, r.stderr
    assert "For vllm" in r.stdout and "- mts: modules_to_save lm_head: vLLM refuses the adapter" in r.stdout
    assert "- patterns: vLLM misreads the scale" in r.stdout and "result: FAILED" in r.stdout
    assert run_batch("validate", mts, patterns, "--target", "peft").rc == 0
    assert run_batch("validate", mts, "--target", "sglang").rc == 2
    big = run_batch("validate", peft_variant_dirs["rslora"], "--target", "vllm", "--max-lora-rank", "4", "--json")
    assert big.rc == 1 and "rank 8 is above --max-lora-rank 4" in big.json()["data"]["adapters"][0]["target_problems"][0]

    out = tmp_path / "merged"
    m = run_batch("merge", mts, peft_family_dirs[0], "-o", out, "--target", "vllm", "--rank", "exact")
    assert m.rc == 0, m.stderr
    assert "warning: dropped modules_to_save head(s) lm_head" in m.stderr
    assert json.loads((out / "adapter_config.json").read_text())["modules_to_save"] is None
    assert run_batch("validate", out, "--target", "vllm").rc == 0
