"""``--batch`` on a folder of adapters with different target modules: --exclude, analyze, compress --group-by, merge --head-from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from batchutil import leftovers, run_batch
from peft_factory import write_peft_adapter

QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    """Two q/v adapters (two with an lm_head each, different) and two q/k/v/o adapters."""
    root = tmp_path_factory.mktemp("mixed") / "coll"
    write_peft_adapter(root / "qv_a", seed=1, family=0, modules_to_save=["lm_head"])
    write_peft_adapter(root / "qv_b", seed=2, family=0, modules_to_save=["lm_head"])
    write_peft_adapter(root / "qkvo_a", seed=3, target_modules=QKVO)
    write_peft_adapter(root / "qkvo_b", seed=4, target_modules=QKVO)
    return root


def test_analyze_mixed_folder_text_and_json(mixed):
    r = run_batch("analyze", mixed, "-q")
    assert r.rc == 0, r.stderr
    assert "Compared on the 4 modules every adapter has; left out:" in r.stdout
    assert "- qkvo_a: 4 module(s) (k_proj, o_proj)" in r.stdout
    r = run_batch("analyze", mixed, "--json")
    assert r.rc == 0, r.stderr
    d = r.json()["data"]
    assert len(d["compared_modules"]) == 4 and sorted(d["left_out"]) == ["qkvo_a", "qkvo_b"]


def test_exclude_is_repeatable_and_may_come_first(mixed):
    r = run_batch("analyze", "--exclude", "qkvo_a", mixed, "--exclude", "*/qkvo_b", "--json")
    assert r.rc == 0, r.stderr
    d = r.json()["data"]
    assert d["names"] == ["qv_a", "qv_b"] and d["left_out"] == {}
    r = run_batch("validate", mixed, "--exclude", "*", "-q")
    assert r.rc == 2 and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and "--exclude '*'" in r.stderr


def test_compress_mixed_folder_exit_2_lists_sets(mixed, tmp_path):
    r = run_batch("compress", mixed, "-o", tmp_path / "sub", "-q")
    assert r.rc == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1
    assert "[q_proj+v_proj] 4 modules (q_proj, v_proj): qv_a, qv_b" in r.stderr
    assert "[k_proj+o_proj+q_proj+v_proj] 8 modules" in r.stderr
    assert "--exclude PATTERN" in r.stderr and "--group-by compat" in r.stderr
    assert not (tmp_path / "sub").exists() and leftovers(tmp_path) == []


def test_compress_group_by_compat(mixed, tmp_path):
    out = tmp_path / "subs"
    r = run_batch("compress", mixed, "-o", out, "--group-by", "compat", "-k", "4", "-q")
    assert r.rc == 0, r.stderr
    assert "OUTPUT/<set name>" in r.stdout and "q_proj+v_proj" in r.stdout and "qkvo_a, qkvo_b" in r.stdout
    assert sorted(p.name for p in out.iterdir()) == ["k_proj+o_proj+q_proj+v_proj", "q_proj+v_proj"]
    for name, tasks in (("q_proj+v_proj", ["qv_a", "qv_b"]), ("k_proj+o_proj+q_proj+v_proj", ["qkvo_a", "qkvo_b"])):
        info = run_batch("info", out / name, "--json")
        assert info.rc == 0, info.stderr
        assert [t["task_id"] for t in info.json()["data"]["tasks"]] == tasks
    assert leftovers(tmp_path) == []


def test_merge_head_from(mixed, tmp_path):
    out = tmp_path / "merged"
    r = run_batch("merge", mixed, "--exclude", "qkvo_*", "-o", out, "--head-from", "qv_b", "--json")
    assert r.rc == 0, r.stderr
    d = r.json()["data"]
    assert d["heads"] == {"lm_head": "from qv_b"} and "dropped qv_a's" in d["warnings"][0]
    assert json.loads((out / "adapter_config.json").read_text())["modules_to_save"] == ["lm_head"]
    r = run_batch("merge", mixed, "--exclude", "qkvo_*", "-o", tmp_path / "m2", "--head-from", "nope", "-q")
    assert r.rc == 2 and "head_from: 'nope'" in r.stderr and not (tmp_path / "m2").exists()
