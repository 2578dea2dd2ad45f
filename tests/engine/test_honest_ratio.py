"""One honest ratio (bytes of the inputs' files ÷ bytes of every file saved), what is shared, benchmark on mixed ranks.

Every figure is checked against sizes taken here with ``os.path.getsize``, independently of the engine.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest

from engine.jobs import JobRequest, run_job
from engine.subspace import SharedSubspace
from peft_factory import write_peft_adapter


def folder_size(folder: Path) -> int:
    """Every file under ``folder`` (manifest included)."""
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(folder) for f in fs)


def input_size(dirs: list[Path]) -> int:
    return sum(os.path.getsize(d / "adapter_model.safetensors") + os.path.getsize(d / "adapter_config.json") for d in dirs)


def input_size_fp16(dirs: list[Path]) -> int:
    """The inputs' bytes with every F32 tensor counted at 2 bytes a value (header parsed here)."""
    total = input_size(dirs)
    for d in dirs:
        with open(d / "adapter_model.safetensors", "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for key, e in header.items():
            if key != "__metadata__" and e["dtype"] == "F32":
                numel = 1
                for s in e["shape"]:
                    numel *= s
                total -= numel * 2
    return total


@pytest.fixture(scope="module")
def distinct_dirs(tmp_path_factory) -> list[Path]:
    """Four PEFT-written adapters of different random seeds (no family): they share nothing."""
    root = tmp_path_factory.mktemp("distinct")
    return [write_peft_adapter(root / f"seed_{i}", seed=100 + i) for i in range(4)]


@pytest.fixture(scope="module")
def mixed_rank_dirs(tmp_path_factory) -> list[Path]:
    """Three PEFT-written adapters of ranks 4, 4 and 8."""
    root = tmp_path_factory.mktemp("mixed")
    return [write_peft_adapter(root / f"r{r}_{i}", seed=200 + i, r=r, family=0) for i, r in enumerate((4, 4, 8))]


def test_compress_and_info_ratio_is_the_files_on_disk(tmp_path, peft_family_dirs):
    out = tmp_path / "sub"
    res = run_job(JobRequest("compress", {"adapters": [str(p) for p in peft_family_dirs], "output": str(out)}))
    files, inputs, inputs16 = folder_size(out), input_size(peft_family_dirs), input_size_fp16(peft_family_dirs)
    assert inputs16 < inputs  # PEFT writes fp32: the second figure applies
    disk = res.data["stats"]["disk"]
    assert disk["bytes"] == files and disk["input_bytes"] == inputs and disk["input_bytes_fp16"] == inputs16
    assert disk["ratio"] == pytest.approx(inputs / files) and disk["ratio_vs_fp16"] == pytest.approx(inputs16 / files)
    assert f"{inputs / files:.2f}x" in res.summary and f"{inputs16 / files:.2f}x vs the inputs at fp16" in res.summary
    info = run_job(JobRequest("info", {"path": str(out)}))
    assert info.data["stats"]["disk"] == disk
    assert f"{inputs / files:.2f}x" in info.summary
    # the library's own figures, after save and after load
    assert SharedSubspace.load(out).compression_stats()["disk"] == disk


def test_ratio_is_recorded_so_info_needs_no_inputs(tmp_path, peft_family_dirs):
    copies = [Path(shutil.copytree(p, tmp_path / "in" / p.name)) for p in peft_family_dirs[:3]]
    inputs = input_size(copies)
    out = tmp_path / "sub"
    run_job(JobRequest("compress", {"adapters": [str(p) for p in copies], "output": str(out), "num_components": 4}))
    shutil.rmtree(tmp_path / "in")
    man = json.loads((out / "subspace.json").read_text())
    assert sum(t["input_bytes"] for t in man["tasks"]) == inputs
    disk = run_job(JobRequest("info", {"path": str(out)})).data["stats"]["disk"]
    assert disk["ratio"] == pytest.approx(inputs / folder_size(out))


def test_add_and_quantize_keep_the_ratio_honest(tmp_path, peft_family_dirs):
    first, extra = peft_family_dirs[:3], peft_family_dirs[3]
    out = tmp_path / "sub"
    run_job(JobRequest("compress", {"adapters": [str(p) for p in first], "output": str(out)}))
    add = run_job(JobRequest("add", {"subspace": str(out), "adapter": str(extra), "task_id": "extra", "incremental": True, "force": True}))
    disk = add.data["stats"]["disk"]
    assert disk["input_bytes"] == input_size([*first, extra])
    assert disk["ratio"] == pytest.approx(input_size([*first, extra]) / folder_size(out))
    q = run_job(JobRequest("quantize", {"subspace": str(out), "output": str(tmp_path / "q"), "bits": 8}))
    assert q.data["before"]["ratio"] == pytest.approx(disk["ratio"])
    assert q.data["after"]["ratio"] == pytest.approx(input_size([*first, extra]) / folder_size(tmp_path / "q"))


def test_library_stats_on_disk_only_while_saved(tmp_path, peft_family_dirs):
    from engine import load_adapter

    ads = [load_adapter(p) for p in peft_family_dirs[:3]]
    sub = SharedSubspace.from_adapters(ads, max_error=0.05)
    assert sub.compression_stats()["disk"] is None  # nothing on disk yet
    sub.save(tmp_path / "s")
    disk = sub.compression_stats()["disk"]
    assert disk["ratio"] == pytest.approx(input_size(peft_family_dirs[:3]) / folder_size(tmp_path / "s"))
    sub.quantize(bits=8)
    assert sub.compression_stats()["disk"] is None  # changed since: the folder no longer says what it holds


def test_nothing_shared_is_said(tmp_path, distinct_dirs, peft_family_dirs):
    out = tmp_path / "sub"
    res = run_job(JobRequest("compress", {"adapters": [str(p) for p in distinct_dirs], "output": str(out),
                                          "max_error": 0.01}))
    storage = res.data["stats"]["storage"]
    assert storage["per_task"] == storage["total"] == 4 and storage["shared"] == 0
    assert storage["summary"].startswith("4 of 4 modules stored per task") and "share too little" in storage["summary"]
    assert storage["summary"] in res.summary
    assert all(not m["shared"] and m["stored"] == "per task, rank 4" for m in res.data["modules"])
    info = run_job(JobRequest("info", {"path": str(out)})).data
    assert info["stats"]["storage"]["summary"] == storage["summary"]
    assert [m["stored"] for m in info["modules"]] == ["per task, rank 4"] * 4
    # a fixed k shares every module, and says its k_u×k_v
    shared = run_job(JobRequest("compress", {"adapters": [str(p) for p in peft_family_dirs], "output": str(tmp_path / "k"),
                                             "num_components": 3})).data
    assert shared["stats"]["storage"]["summary"] == "4 of 4 modules shared"
    assert all(m["shared"] and m["stored"] == f"shared {m['k_u']}×{m['k_v']}" for m in shared["modules"])


def test_benchmark_on_mixed_ranks_skips_pca_and_keeps_rows(tmp_path, mixed_rank_dirs):
    res = run_job(JobRequest("benchmark", {"adapters": [str(p) for p in mixed_rank_dirs], "k_values": [1, 2]}))
    d = res.data
    assert [s["method"] for s in d["skipped"]] == ["pca"] and "rank" in d["skipped"][0]["reason"]
    assert "pca skipped" in res.summary
    assert sorted((r["method"], r["k"]) for r in d["rows"]) == [(m, k) for m in ("joint", "share", "svd") for k in (1, 2)]
    assert all(r["error"] is None for r in d["rows"])
    inputs = input_size(mixed_rank_dirs)
    assert d["input_bytes"] == inputs
    for r in d["rows"]:
        assert r["ratio"] == pytest.approx(inputs / r["stored_bytes"])
    # the same figure compress gives for the same build
    out = tmp_path / "joint2"
    run_job(JobRequest("compress", {"adapters": [str(p) for p in mixed_rank_dirs], "output": str(out), "num_components": 2,
                                    "method": "joint"}))
    row = next(r for r in d["rows"] if (r["method"], r["k"]) == ("joint", 2))
    assert row["stored_bytes"] == folder_size(out)
    assert row["ratio"] == pytest.approx(inputs / folder_size(out))


def test_folder_without_recorded_inputs_says_so(tmp_path, peft_family_dirs):
    out = tmp_path / "sub"
    run_job(JobRequest("compress", {"adapters": [str(p) for p in peft_family_dirs[:2]], "output": str(out), "num_components": 2}))
    man = json.loads((out / "subspace.json").read_text())
    for t in man["tasks"]:  # as an older version wrote it
        t.pop("input_bytes")
        t.pop("input_bytes_fp16")
    (out / "subspace.json").write_text(json.dumps(man))
    info = run_job(JobRequest("info", {"path": str(out)}))
    disk = info.data["stats"]["disk"]
    assert disk["bytes"] == folder_size(out) and disk["ratio"] is None and "not recorded" in disk["note"]
    assert "n/a on disk" in info.summary and "not recorded" in info.summary
