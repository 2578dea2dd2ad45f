"""``--batch quantize --max-error/--mean-error``: exit 0 with every task's error and bytes before → after; bad target → 2."""

from __future__ import annotations

from pathlib import Path

import pytest
from batchutil import run_batch


@pytest.fixture(scope="module")
def sub(tmp_path_factory, peft_family_dirs) -> Path:
    out = tmp_path_factory.mktemp("qt") / "sub"
    r = run_batch("compress", *peft_family_dirs, "-o", out, "--max-error", "0.04", "--precision", "fp16", "-q")
    assert r.rc == 0, r.stderr
    return out


def test_max_error_json_reports_every_task(tmp_path, sub, peft_family_dirs):
    r = run_batch("quantize", sub, "--max-error", "0.08", "-o", tmp_path / "q", "--adapters", *peft_family_dirs, "--json")
    assert r.rc == 0, r.stderr
    d = r.json()["data"]
    assert d["errors"] == "exact" and d["quantization"]["method"] == "auto" and d["target"]["max_error"] == 0.08
    assert [t["task_id"] for t in d["tasks"]] == [p.name for p in peft_family_dirs]
    for t in d["tasks"]:
        assert t["after"]["max"] <= 0.08 + 1e-9 and t["before"]["max"] <= 0.04 + 1e-6
        assert t["bytes_after"] <= t["bytes_before"]
    assert d["after"]["disk_bytes"] < d["before"]["disk_bytes"]
    text = run_batch("quantize", sub, "--mean-error", "0.06", "-o", tmp_path / "q2")
    assert text.rc == 0, text.stderr
    assert "upper bounds" in text.stdout and "task_0" in text.stdout and "→" in text.stdout


@pytest.mark.parametrize("args", [("--max-error", "0"), ("--mean-error", "1.5"), ("--max-error", "0.05", "--bits", "8"),
                                  ()])
def test_bad_target_exits_2(tmp_path, sub, args):
    r = run_batch("quantize", sub, "-o", tmp_path / "q", *args)
    assert r.rc == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "q").exists()
