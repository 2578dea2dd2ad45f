"""The packed layout of format version 2 (issue #17, item 3): one uint8 tensor per file whatever its
modules, every precision bit for bit through save and load, a compact manifest, format 1 folders still load."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from engine.constants import SUBSPACE_MANIFEST_NAME
from engine.errors import SubspaceFormatError
from engine.io import load_adapter
from engine.jobs import JobRequest, run_job
from engine.subspace import SharedSubspace
from engine.subspace.quant import quantize_tensor
from subspace_v1_writer import save_subspace as save_v1

#: Every storage precision: (bits, method, double_quant, scale dtype); None: plain fp16.
PRECISIONS: list[tuple[int, str, bool, torch.dtype] | None] = [
    None, (8, "symmetric", False, torch.float16), (6, "symmetric", False, torch.float16),
    (5, "symmetric", False, torch.float16), (4, "symmetric", False, torch.float16),
    (3, "symmetric", False, torch.float16), (4, "nf4", False, torch.float16),
    (5, "symmetric", False, torch.float32), (4, "nf4", True, torch.float32), (6, "symmetric", True, torch.float32)]


@pytest.fixture(scope="module")
def adapters(peft_family_dirs):
    return [load_adapter(p) for p in peft_family_dirs]


def _mixed(adapters, method: str = "joint", block_size: int = 64) -> SharedSubspace:
    """A subspace whose basis and coefficient tensors cycle through every precision (fp16 stays plain)."""
    sub = SharedSubspace.from_adapters(adapters[:4], num_components=3, method=method, dtype=torch.float16)
    tensors: list[tuple[tuple[str, ...], dict[str, torch.Tensor], str]] = []
    for m, b in sorted(sub.modules.items()):
        tensors += [((m, k), b.tensors, k) for k in sorted(b.tensors)]
    for tid, p in sub.tasks.items():
        for m, c in sorted(p.coeffs.items()):
            tensors += [((tid, m, k), c, k) for k in sorted(c)]
    for i, (where, holder, k) in enumerate(tensors):
        prec = PRECISIONS[i % len(PRECISIONS)]
        if prec is None:
            continue
        bits, method_q, dq, sdt = prec
        qt = quantize_tensor(holder[k].float(), bits=bits, method=method_q, block_size=block_size, double_quant=dq, scale_dtype=sdt)
        sub.quantized[where] = qt
        holder[k] = qt.dequantize(torch.float32)
    return sub


def _assert_same_bits(a: SharedSubspace, b: SharedSubspace) -> None:
    """Every stored value of ``a`` and ``b`` equal bit for bit, dtypes included (codes and scales too)."""
    assert a.task_ids == b.task_ids and sorted(a.modules) == sorted(b.modules)
    for m, mb in a.modules.items():
        assert mb.kind == b.modules[m].kind and mb.shape == b.modules[m].shape
        for k, t in mb.tensors.items():
            u = b.modules[m].tensors[k]
            assert t.dtype == u.dtype and torch.equal(t, u), (m, k)
    for tid, p in a.tasks.items():
        q = b.tasks[tid]
        for m, c in p.coeffs.items():
            assert sorted(c) == sorted(q.coeffs[m])
            for k, t in c.items():
                u = q.coeffs[m][k]
                assert t.dtype == u.dtype and torch.equal(t, u), (tid, m, k)
        for k, t in p.template.extra_tensors.items():
            assert torch.equal(t, q.template.extra_tensors[k])
        assert p.template.metadata == q.template.metadata and p.template.name == q.template.name
        assert p.template.source == q.template.source and p.template.lora_alpha == q.template.lora_alpha
        assert p.ranks == q.ranks and p.fidelity.keys() == q.fidelity.keys()
        assert all(abs(p.fidelity[m] - q.fidelity[m]) <= 1e-6 * max(1.0, p.fidelity[m]) for m in p.fidelity)
        assert p.input_bytes == q.input_bytes and p.original_bytes == q.original_bytes
    assert sorted(a.quantized) == sorted(b.quantized)
    for key, qt in a.quantized.items():
        other = b.quantized[key]
        assert (qt.shape, qt.method, qt.bits, qt.block_size, qt.double_quant) == (
            other.shape, other.method, other.bits, other.block_size, other.double_quant)
        parts, back = qt.tensors(), other.tensors()
        assert sorted(parts) == sorted(back)
        for name, t in parts.items():
            assert t.dtype == back[name].dtype and torch.equal(t.reshape(-1), back[name].reshape(-1)), (key, name)


def _tensor_names(path: Path) -> list[str]:
    with safe_open(str(path), "pt") as fh:
        return list(fh.keys())


def _folder_size(folder: Path) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(folder) for f in fs)


@pytest.mark.parametrize("method", ["joint", "pca", "svd"])
def test_every_precision_round_trips_bit_for_bit(tmp_path, adapters, method):
    sub = _mixed(adapters, method)
    used = {(q.bits, q.method, q.double_quant, None if q.scales is None else q.scales.dtype) for q in sub.quantized.values()}
    assert len(used) == len(PRECISIONS) - 1  # every quantised precision is in the folder
    out = sub.save(tmp_path / "s")
    man = json.loads((out / SUBSPACE_MANIFEST_NAME).read_text())
    assert man["format_version"] == 2 and "quantized" not in man
    _assert_same_bits(sub, SharedSubspace.load(out))


def test_other_block_size_round_trips(tmp_path, adapters):
    sub = _mixed(adapters, block_size=32)
    _assert_same_bits(sub, SharedSubspace.load(sub.save(tmp_path / "s")))


def test_one_packed_tensor_per_file(tmp_path, peft_variant_dirs, adapters):
    """At most two tensors per module (here: one per file) plus the adapter's own extra tensors."""
    mts = load_adapter(peft_variant_dirs["mts"])  # has modules_to_save: an extra tensor
    sub = _mixed([*adapters[:3], mts])
    out = sub.save(tmp_path / "s")
    assert _tensor_names(out / "basis.safetensors") == ["packed"]
    for tid, p in sub.tasks.items():
        names = _tensor_names(out / "tasks" / f"{tid}.safetensors")
        extras = sorted(f"extra::{k}" for k in p.template.extra_tensors)
        assert sorted(names) == sorted(["packed", *extras])
        assert len(names) - len(extras) <= 2 * len(sub.modules)
    assert SharedSubspace.load(out).tasks[sub.task_ids[-1]].template.extra_tensors.keys() == mts.extra_tensors.keys()


def test_packed_bytes_are_the_payload(tmp_path, adapters):
    """The packed tensor holds exactly the stored values' bytes (codes bit-packed): nothing else."""
    sub = _mixed(adapters)
    out = sub.save(tmp_path / "s")
    for tid, p in sub.tasks.items():
        expect = 0
        for m, c in p.coeffs.items():
            for k, t in c.items():
                qt = sub.quantized.get((tid, m, k))
                expect += qt.nbytes if qt is not None else t.numel() * 2  # fp16
                if qt is not None and qt.bits < 8:
                    assert qt.codes.numel() == (qt.numel * qt.bits + 7) // 8
        assert load_file(str(out / "tasks" / f"{tid}.safetensors"))["packed"].numel() == expect


def test_manifest_stores_each_config_once_and_lists_per_module(tmp_path, adapters):
    sub = SharedSubspace.from_adapters(adapters, num_components=2, method="joint")
    out = sub.save(tmp_path / "s")
    man = json.loads((out / SUBSPACE_MANIFEST_NAME).read_text())
    from engine.subspace.storage import _template_json

    distinct = {json.dumps({k: v for k, v in _template_json(p.template).items() if k not in ("name", "source")},
                           sort_keys=True) for p in sub.tasks.values()}
    assert len(man["configs"]) == len(distinct) < len(man["tasks"])
    names = sorted(man["modules"])
    for t in man["tasks"]:
        assert isinstance(t["config"], int) and t["source"] == sub.tasks[t["id"]].template.source
        assert len(t["fidelity"]) == len(t["norms"]) == len(t["ranks"]) == len(t["tensors"]) == len(names)
        assert t["fidelity"] == pytest.approx([sub.tasks[t["id"]].fidelity[m] for m in names], rel=1e-5, abs=1e-7)
    for m, info in man["modules"].items():
        assert all(float(f"{v:.4g}") == v for v in info["explained"])
        assert info["explained"] == pytest.approx(sub.modules[m].explained, rel=1e-3)


def test_ratio_printed_is_the_bytes_on_disk(tmp_path, peft_family_dirs):
    out = tmp_path / "sub"
    res = run_job(JobRequest("compress", {"adapters": [str(p) for p in peft_family_dirs], "output": str(out),
                                          "precision": "auto", "max_error": 0.1}))
    inputs = sum(os.path.getsize(d / "adapter_model.safetensors") + os.path.getsize(d / "adapter_config.json")
                 for d in peft_family_dirs)
    disk = run_job(JobRequest("info", {"path": str(out)})).data["stats"]["disk"]
    assert disk["bytes"] == _folder_size(out) and disk["ratio"] == pytest.approx(inputs / _folder_size(out))
    assert f"{inputs / _folder_size(out):.2f}x" in res.summary


# -- format version 1 -------------------------------------------------------------------------


def test_format_1_folder_loads_and_resaves_in_format_2(tmp_path, adapters):
    sub = _mixed(adapters)
    old = save_v1(sub, tmp_path / "v1")
    man = json.loads((old / SUBSPACE_MANIFEST_NAME).read_text())
    assert man["format_version"] == 1 and man["quantized"]
    assert any(k.endswith("::q::codes") for k in _tensor_names(old / "basis.safetensors"))
    back = SharedSubspace.load(old)
    _assert_same_bits(sub, back)
    again = SharedSubspace.load(back.save(tmp_path / "v2"))
    _assert_same_bits(sub, again)
    assert _folder_size(tmp_path / "v2") < _folder_size(old)
    info = run_job(JobRequest("info", {"path": str(old)})).data
    assert info["format_version"] == 1 and len(info["tasks"]) == 4


def test_format_1_crafted_manifest_is_still_refused(tmp_path, adapters):
    sub = _mixed(adapters)
    old = save_v1(sub, tmp_path / "v1")
    mp = old / SUBSPACE_MANIFEST_NAME
    man = json.loads(mp.read_text())
    man["quantized"]["basis.safetensors"] = {"x::U": 4}
    man["tasks"][0]["fidelity"]["x"] = "low"
    mp.write_text(json.dumps(man))
    with pytest.raises(SubspaceFormatError) as ei:
        SharedSubspace.load(old)
    msg = str(ei.value)
    assert msg.startswith(f"{mp}: ") and "\n" not in msg
    assert "'quantized['basis.safetensors']['x::U']' must be an object" in msg and "'tasks[0].fidelity['x']'" in msg


# -- crafted format 2 folders -------------------------------------------------------------------


def _edit(folder: Path, fn: Any) -> Path:
    mp = folder / SUBSPACE_MANIFEST_NAME
    man = json.loads(mp.read_text())
    fn(man)
    mp.write_text(json.dumps(man))
    return mp


def _widen(man: dict[str, Any]) -> None:
    """One tensor of task_1 said to be 8-bit: its packed tensor is too short for that."""
    specs = man["tasks"][1]["tensors"][0]
    specs[0] = specs[0].split(":")[0] + ":int8"


def _rehash(folder: Path, rel: str) -> None:
    import hashlib

    data = (folder / rel).read_bytes()
    _edit(folder, lambda m: m["files"].__setitem__(rel, {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}))


def test_an_edited_spec_is_named(tmp_path, adapters):
    out = _mixed(adapters).save(tmp_path / "s")
    _edit(out, _widen)
    with pytest.raises(SubspaceFormatError, match=r"task_1\.safetensors: the manifest's tensor specs of task 'task_1'"):
        SharedSubspace.load(out)


def test_a_spec_that_does_not_match_the_packed_bytes_is_named(tmp_path, adapters):
    """Without the file's record of its specs (stripped), the packed tensor's length still catches the edit."""
    out = _mixed(adapters).save(tmp_path / "s")
    f = out / "tasks" / "task_1.safetensors"
    save_file(load_file(str(f)), str(f), metadata={"format": "pt"})
    _rehash(out, "tasks/task_1.safetensors")
    _edit(out, _widen)
    with pytest.raises(SubspaceFormatError) as ei:
        SharedSubspace.load(out)
    msg = str(ei.value)
    assert "task_1.safetensors" in msg and "layout in the manifest needs" in msg and "\n" not in msg


@pytest.mark.parametrize("bad", ["a", "a=3x4", "a=3x4:int7", "a=3x4:f16/64", "a=3y4:f16", "=3:f16", 5])
def test_a_malformed_spec_is_named(tmp_path, adapters, bad):
    out = SharedSubspace.from_adapters(adapters[:2], num_components=2).save(tmp_path / "s")
    mp = _edit(out, lambda m: m["tasks"][0]["tensors"][1].__setitem__(0, bad))
    with pytest.raises(SubspaceFormatError, match=r"'tasks\[0\]\.tensors\[1\]\[0\]' must be a tensor spec") as ei:
        SharedSubspace.load(out)
    assert str(ei.value).startswith(f"{mp}: ")


def test_a_file_without_its_packed_tensor_is_named(tmp_path, adapters):
    out = SharedSubspace.from_adapters(adapters[:2], num_components=2).save(tmp_path / "s")
    f = out / "tasks" / "task_0.safetensors"
    sd = load_file(str(f))
    with safe_open(str(f), "pt") as fh:
        meta = fh.metadata()
    save_file({"x::a": sd["packed"]}, str(f), metadata=meta)
    _rehash(out, "tasks/task_0.safetensors")
    with pytest.raises(SubspaceFormatError, match=r"task_0\.safetensors: has no 'packed' tensor"):
        SharedSubspace.load(out)


def test_header_is_small(tmp_path, adapters):
    """Headers no longer grow with the modules: one entry (plus extras) per file."""
    sub = _mixed(adapters)
    out = sub.save(tmp_path / "s")
    for f in [out / "basis.safetensors", *sorted((out / "tasks").iterdir())]:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
        assert n < 600
