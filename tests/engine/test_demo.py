"""The built-in demo collection: deterministic, real PEFT folders, structured families.

``--batch info`` on it: tests/batch/test_batch_info.py.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from engine.constants import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
from engine.demo import DEMO_BASE_MODEL, DEMO_FAMILIES, DemoShape, make_demo_adapters, make_demo_collection
from engine.errors import JobCancelled, OutputExistsError
from engine.io.local import check_compatible, load_adapter



def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_collection_is_deterministic(tmp_path):
    a = _tree_bytes(Path(make_demo_collection(tmp_path / "a")[0]).parent)
    b = _tree_bytes(Path(make_demo_collection(tmp_path / "b")[0]).parent)
    assert a == b
    assert any(k.endswith(ADAPTER_WEIGHTS_NAME) for k in a)
    c = _tree_bytes(Path(make_demo_collection(tmp_path / "c", seed=1)[0]).parent)
    assert sorted(c) == sorted(a)
    assert any(c[k] != a[k] for k in a if k.endswith(ADAPTER_WEIGHTS_NAME))


def test_collection_layout(demo_dir):
    folders = sorted(p for p in demo_dir.iterdir() if p.is_dir())
    expected = sorted(t for tasks in DEMO_FAMILIES.values() for t in tasks)
    assert [p.name for p in folders] == expected
    assert len(folders) >= 12
    for p in folders:
        assert sorted(x.name for x in p.iterdir()) == [ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME]
    cfg = json.loads((demo_dir / "sql-duckdb" / ADAPTER_CONFIG_NAME).read_text())
    assert cfg["base_model_name_or_path"] == DEMO_BASE_MODEL
    assert cfg["r"] == DemoShape().rank and cfg["peft_type"] == "LORA"
    adapters = [load_adapter(p) for p in folders]
    report = check_compatible(adapters, allow_mixed_ranks=False)
    assert len(report.modules) == DemoShape().layers * 4
    assert report.shapes["model.layers.0.self_attn.k_proj"] == (DemoShape().kv_dim, DemoShape().hidden)


def test_in_memory_adapters_match_files(demo_dir):
    for w in make_demo_adapters():
        disk = load_adapter(demo_dir / str(w.name))
        assert disk.layer_names == w.layer_names
        for m in w.layer_names:
            assert torch.equal(disk.lora_a[m], w.lora_a[m]) and torch.equal(disk.lora_b[m], w.lora_b[m])


def test_families_more_similar_within_than_across(demo_dir):
    adapters = [load_adapter(p) for p in sorted(demo_dir.iterdir()) if p.is_dir()]
    family = {t: f for f, tasks in DEMO_FAMILIES.items() for t in tasks}
    # dense ΔW of every module, concatenated: fine at this size, and independent of the engine's r×r math
    vecs = torch.stack([torch.cat([w.delta_weight(m).flatten() for m in w.layer_names]) for w in adapters])
    vecs = vecs / vecs.norm(dim=1, keepdim=True)
    cos = vecs @ vecs.T
    names = [w.name for w in adapters]
    within, across, outliers = [], [], []
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            fi, fj = family[names[i]], family[names[j]]
            if fi == fj == "outlier":
                outliers.append(cos[i, j].item())
            elif fi == fj:
                within.append(cos[i, j].item())
            else:
                across.append(cos[i, j].item())
    assert len(within) == 3 * 6 and outliers
    assert min(within) > 0.5
    assert max(abs(c) for c in across) < 0.2
    assert min(within) > max(across)
    assert max(abs(c) for c in outliers) < 0.2


def test_existing_collection_needs_force(tmp_path):
    make_demo_collection(tmp_path / "d")
    with pytest.raises(OutputExistsError):
        make_demo_collection(tmp_path / "d")
    assert len(make_demo_collection(tmp_path / "d", force=True)) >= 12


def test_progress_and_cancel(tmp_path):
    events = []
    paths = make_demo_collection(tmp_path / "d", progress=events.append)
    assert events[-1].step == events[-1].total == len(paths)
    assert [e.step for e in events] == list(range(len(paths) + 1))

    cancel = threading.Event()

    def stop_after_two(p):
        if p.step == 2:
            cancel.set()

    with pytest.raises(JobCancelled):
        make_demo_collection(tmp_path / "c", progress=stop_after_two, cancel=cancel)
    written = [p for p in (tmp_path / "c").iterdir() if p.is_dir()]
    assert 2 <= len(written) < len(paths)  # stopped at the next step, not at the end


def test_a_cached_demo_from_another_generator_version_is_not_reused(tmp_path: Path) -> None:
    """Wave 1 snapshots passed only beside a stale ~/.cache demo: the stamp makes such a cache stale."""
    import json

    from engine.demo import DEMO_STAMP, DEMO_VERSION, demo_is_current

    root = tmp_path / "demo"
    assert not demo_is_current(root)
    make_demo_collection(root)
    assert demo_is_current(root)
    assert not demo_is_current(root, seed=1)
    (root / DEMO_STAMP).write_text(json.dumps({"version": DEMO_VERSION - 1, "seed": 0}))
    assert not demo_is_current(root)  # an older generator's collection
    (root / DEMO_STAMP).unlink()
    assert not demo_is_current(root)  # no stamp at all (written before stamps existed)
    make_demo_collection(root, force=True)
    assert demo_is_current(root)
    (root / "sql-duckdb" / "adapter_model.safetensors").unlink()
    assert not demo_is_current(root)  # incomplete
