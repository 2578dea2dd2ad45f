"""``--batch``: the ratio printed by compress and info is the files on disk; nothing shared is said; benchmark on mixed ranks."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from batchutil import run_batch
from peft_factory import write_peft_adapter


def folder_size(folder: Path) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(folder) for f in fs)


def input_size(dirs: list[Path]) -> int:
    return sum(os.path.getsize(d / "adapter_model.safetensors") + os.path.getsize(d / "adapter_config.json") for d in dirs)


def printed_ratio(stdout: str) -> str:
    m = re.search(r"^\s*ratio\s+([0-9.]+x)", stdout, re.M)
    assert m, stdout
    return m.group(1)


@pytest.fixture(scope="module")
def distinct_dirs(tmp_path_factory) -> list[Path]:
    """Three PEFT-written adapters of different seeds: nothing to share."""
    root = tmp_path_factory.mktemp("distinct")
    return [write_peft_adapter(root / f"seed_{i}", seed=300 + i) for i in range(3)]


def test_printed_ratio_is_the_files_on_disk_and_nothing_shared_is_said(tmp_path, distinct_dirs):
    out = tmp_path / "sub"
    r = run_batch("compress", *distinct_dirs, "-o", out, "--max-error", "0.01", "-q")
    assert r.rc == 0, r.stderr
    want = f"{input_size(distinct_dirs) / folder_size(out):.2f}x"
    assert printed_ratio(r.stdout) == want
    assert "vs the inputs at fp16" in r.stdout  # PEFT writes fp32
    assert "4 of 4 modules stored per task" in r.stdout and "per task, rank 4" in r.stdout
    info = run_batch("info", out, "-q")
    assert info.rc == 0, info.stderr
    assert printed_ratio(info.stdout) == want
    assert "4 of 4 modules stored per task" in info.stdout
    doc = run_batch("info", out, "--json").json()
    assert doc["data"]["stats"]["disk"]["ratio"] == pytest.approx(input_size(distinct_dirs) / folder_size(out))
    assert [m["shared"] for m in doc["data"]["modules"]] == [False] * 4


def test_benchmark_on_mixed_ranks_keeps_rows_and_notes_pca(tmp_path):
    dirs = [write_peft_adapter(tmp_path / f"r{r}", seed=400 + r, r=r) for r in (4, 8)]
    r = run_batch("benchmark", *dirs, "--k-values", "1", "--json")
    assert r.rc == 0, r.stderr
    d = r.json()["data"]
    assert {x["method"] for x in d["rows"]} == {"joint", "share", "svd"} and all(x["error"] is None for x in d["rows"])
    assert d["skipped"][0]["method"] == "pca"
    plain = run_batch("benchmark", *dirs, "--k-values", "1", "--methods", "pca", "svd", "-q")
    assert plain.rc == 0, plain.stderr
    assert "Skipped" in plain.stdout and "- pca:" in plain.stdout and re.search(r"^\s*svd\s+1\s", plain.stdout, re.M)


def test_ratio_counts_hub_inputs_from_the_cache(tmp_path, peft_family_dirs):
    hubserver = pytest.importorskip("hubserver")
    files = {n: (peft_family_dirs[0] / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")}
    with hubserver.FakeHub() as hub:
        hub.add_repo("org/lora-a", files)
        env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"),
               "HF_HUB_OFFLINE": "0"}
        out = tmp_path / "s"
        comp = run_batch("compress", "hf://org/lora-a", *peft_family_dirs[1:3], "-o", out, "-k", "2", "--streaming", "--json",
                         env=env)
    assert comp.rc == 0, comp.stderr
    disk = comp.json()["data"]["stats"]["disk"]
    assert disk["input_bytes"] == input_size(peft_family_dirs[:3])  # the Hub copy has the same bytes as the first
    assert disk["ratio"] == pytest.approx(input_size(peft_family_dirs[:3]) / folder_size(out))
