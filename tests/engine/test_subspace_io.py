"""Subspace folders (save/load, checksums, quantised 4-bit), streaming builds, PEFT export."""

from __future__ import annotations

import json

import pytest
import torch

from engine.constants import SUBSPACE_MANIFEST_NAME
from engine.errors import OutputExistsError, SubspaceFormatError
from engine.io import load_adapter, save_adapter
from engine.subspace import SharedSubspace


@pytest.fixture(scope="module")
def family_adapters(peft_family_dirs):
    return [load_adapter(p) for p in peft_family_dirs]


def _same(s1: SharedSubspace, s2: SharedSubspace, atol: float = 1e-6) -> None:
    assert s1.task_ids == s2.task_ids and s1.k_per_module == s2.k_per_module
    for t in s1.task_ids:
        f1, f2 = s1.task_factors(t), s2.task_factors(t)
        for m in f1:
            d1, d2 = f1[m][0] @ f1[m][1], f2[m][0] @ f2[m][1]
            assert torch.allclose(d1, d2, atol=atol * max(1.0, float(d1.norm())))
        assert s1.tasks[t].fidelity == pytest.approx(s2.tasks[t].fidelity)


@pytest.mark.parametrize("method", ["joint", "pca"])
def test_save_load_roundtrip(tmp_path, family_adapters, method):
    sub = SharedSubspace.from_adapters(family_adapters, method=method, num_components=3)
    out = sub.save(tmp_path / "s")
    man = json.loads((out / SUBSPACE_MANIFEST_NAME).read_text())
    assert man["method"] == method and man["format_version"] == 2 and len(man["tasks"]) == 6
    assert all(len(f["sha256"]) == 64 for f in man["files"].values())
    back = SharedSubspace.load(out)
    _same(sub, back)
    assert back.tasks["task_0"].template.lora_alpha == family_adapters[0].lora_alpha
    assert back.compression_stats()["stored_bytes"] == sub.compression_stats()["stored_bytes"]
    with pytest.raises(OutputExistsError):
        sub.save(out)
    sub.save(out, force=True)


def test_quantized_save_is_packed_and_detected(tmp_path, family_adapters):
    sub = SharedSubspace.from_adapters(family_adapters, num_components=3, method="joint")
    out = sub.save_quantized(tmp_path / "q")
    assert sub.quantization is None  # self untouched
    man = json.loads((out / SUBSPACE_MANIFEST_NAME).read_text())
    assert man["quantization"]["method"] == "nf4"
    from safetensors import safe_open

    with safe_open(str(out / "basis.safetensors"), "pt") as fh:
        assert list(fh.keys()) == ["packed"]
        packed = fh.get_tensor("packed").numel()
    m = sorted(sub.modules)[0]
    spec = man["modules"][m]["tensors"][0]
    out_f, k = sub.modules[m].tensors["U"].shape
    assert spec == f"U={out_f}x{k}:nf4/dq"
    nb = -(-out_f * k // 64)  # codes two values a byte, then int8 scale codes, fp32 absmax per 256, fp32 mean
    per_tensor = [(x * y + 1) // 2 + -(-x * y // 64) + 4 * -(-(-(-x * y // 64)) // 256) + 4
                  for b in sub.modules.values() for x, y in (t.shape for t in b.tensors.values())]
    assert nb and packed == sum(per_tensor)
    back = SharedSubspace.load(out)
    assert back.quantization["method"] == "nf4" and back.quantized
    q = sub.copy().quantize(bits=4, method="nf4", double_quant=True)
    _same(q, back, atol=1e-5)
    assert back.compression_stats()["stored_bytes"] < sub.compression_stats()["stored_bytes"]


def test_flipped_byte_and_truncation_are_named(tmp_path, family_adapters):
    sub = SharedSubspace.from_adapters(family_adapters, num_components=2, method="joint")
    out = sub.save(tmp_path / "s")
    f = out / "tasks" / "task_3.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(SubspaceFormatError, match=r"task_3\.safetensors.*checksum"):
        SharedSubspace.load(out)
    b = out / "basis.safetensors"
    b.write_bytes(b.read_bytes()[:100])
    with pytest.raises(SubspaceFormatError, match=r"basis\.safetensors.*truncated"):
        SharedSubspace.load(out)
    (out / SUBSPACE_MANIFEST_NAME).write_text("{not json")
    with pytest.raises(SubspaceFormatError, match="manifest"):
        SharedSubspace.load(out)
    with pytest.raises(SubspaceFormatError, match="not a subspace"):
        SharedSubspace.load(tmp_path)


def test_failed_save_leaves_nothing(tmp_path, family_adapters, monkeypatch):
    from engine.subspace import storage

    sub = SharedSubspace.from_adapters(family_adapters, num_components=2, method="joint")

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(storage, "_sha256", boom)
    with pytest.raises(RuntimeError):
        sub.save(tmp_path / "s")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("kw", [dict(num_components=3), dict(max_error=0.2)])
def test_streaming_equals_in_memory(peft_family_dirs, family_adapters, kw):
    mem = SharedSubspace.from_adapters(family_adapters, task_ids=[p.name for p in peft_family_dirs], **kw)
    seen = []
    stream = SharedSubspace.from_adapters_streaming(peft_family_dirs, progress=seen.append, **kw)
    _same(mem, stream, atol=1e-4)
    assert seen[-1].total >= len(peft_family_dirs)


def test_streaming_names_bad_files(tmp_path, peft_family_dirs, peft_variant_dirs):
    from engine.errors import AdapterFormatError, IncompatibleAdaptersError

    with pytest.raises(IncompatibleAdaptersError, match="qkvo"):
        SharedSubspace.from_adapters_streaming([peft_family_dirs[0], peft_variant_dirs["qkvo"]], method="joint")
    with pytest.raises(AdapterFormatError):
        SharedSubspace.from_adapters_streaming([peft_family_dirs[0], tmp_path / "missing"], method="joint")


def test_peft_loads_reconstruction_and_matches_at_full_k(tmp_path, peft_family_dirs, family_adapters):
    from peft_factory import peft_logits

    sub = SharedSubspace.from_adapters(family_adapters, max_error=1e-4, dtype="float32")
    rec = sub.reconstruct("task_2", pad_to_vllm=True)  # the seed's reconstruct keeps the rank; padding is asked for
    assert rec.rank in (1, 8, 16) and rec.metadata["rank_pattern"] == {}
    assert sub.reconstruct("task_2").rank <= family_adapters[2].rank
    assert rec.lora_alpha == family_adapters[2].lora_alpha
    out = save_adapter(rec, tmp_path / "rec")
    assert torch.allclose(peft_logits(out), peft_logits(peft_family_dirs[2]), atol=1e-4)


def test_reconstruct_keeps_config_and_extras(tmp_path, peft_variant_dirs):
    from peft_factory import peft_logits

    ads = [load_adapter(peft_variant_dirs[k]) for k in ("mts", "rslora")]
    for a in ads:
        sub = SharedSubspace.from_adapters([a], max_error=1e-5, dtype="float32")
        rec = sub.reconstruct(sub.task_ids[0])
        assert rec.use_rslora == a.use_rslora and set(rec.extra_tensors) == set(a.extra_tensors)
        out = save_adapter(rec, tmp_path / a.name)
        assert torch.allclose(peft_logits(out), peft_logits(peft_variant_dirs[a.name]), atol=1e-4)
