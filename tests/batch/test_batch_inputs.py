"""``--batch`` flags on either side of the subcommand; numbers that would write a useless adapter."""

from __future__ import annotations

import json

import pytest
from batchutil import run_batch

from engine.constants import ADAPTER_CONFIG_NAME


@pytest.mark.parametrize("args", [
    ("--json", "-q", "info", "{a}"),
    ("--json", "info", "-q", "{a}"),
    ("-q", "info", "{a}", "--json"),
    ("info", "{a}", "--json", "--quiet"),
])
def test_global_flags_before_or_after_the_subcommand(tmp_path, peft_adapter_dir, args):
    r = run_batch(*(a.format(a=peft_adapter_dir) for a in args))
    assert r.rc == 0, r.stderr
    assert r.json()["data"]["type"] == "adapter"  # JSON, not text
    assert r.stderr == ""  # -q: no progress


def test_debug_before_the_subcommand_shows_the_traceback(tmp_path):
    r = run_batch("--debug", "info", tmp_path / "missing")
    assert r.rc == 2 and "Traceback" in r.stderr
    assert "Traceback" not in run_batch("info", tmp_path / "missing").stderr


def test_without_flags_output_is_text(peft_adapter_dir):
    r = run_batch("-q", "info", peft_adapter_dir)
    assert r.rc == 0 and not r.stdout.lstrip().startswith("{")


@pytest.mark.parametrize("alpha", ["0", "nan", "inf", "-2"])
def test_export_alpha_zero_or_not_finite_is_usage_error(tmp_path, alpha):
    r = run_batch("export", tmp_path / "sub", "t", "-o", tmp_path / "out", "--alpha", alpha)
    assert r.rc == 2 and "alpha" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_nan_lora_alpha_is_refused_naming_the_config(tmp_path, peft_adapter_dir):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(peft_adapter_dir, bad)
    cfg = json.loads((bad / ADAPTER_CONFIG_NAME).read_text())
    cfg["lora_alpha"] = float("nan")
    (bad / ADAPTER_CONFIG_NAME).write_text(json.dumps(cfg))  # writes NaN, as Python does
    r = run_batch("info", bad)
    assert r.rc == 2 and str(bad / ADAPTER_CONFIG_NAME) in r.stderr and "lora_alpha" in r.stderr
    v = run_batch("validate", bad, "--json")
    assert v.rc != 0
    assert str(bad / ADAPTER_CONFIG_NAME) in v.json()["data"]["adapters"][0]["error"]
