"""A streamed build with an output folder writes each chunk as it is built; the folder equals ``save``'s, loaded lazily."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import pytest
import torch

from engine.constants import SUBSPACE_MANIFEST_NAME
from engine.demo import make_demo_collection
from engine.errors import JobCancelled, OutputExistsError, SubspaceFormatError
from engine.io import save_adapter
from engine.subspace import SharedSubspace
from engine.types import LoRAWeights

TINY = 1e-9  # MiB: every module is a chunk of its own


def _digests(folder: Path) -> dict[str, object]:
    """Every file's content: the manifest without checksums, each tensor file's metadata and tensors' bytes.

    (The order of a safetensors header's metadata is not fixed from one write to the next,
    so the files' own checksums may differ where their contents do not.)
    """
    from safetensors import safe_open

    out: dict[str, object] = {}
    basis_sha = hashlib.sha256((folder / "basis.safetensors").read_bytes()).hexdigest()
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.name == SUBSPACE_MANIFEST_NAME:
            man = json.loads(p.read_text())
            man["files"] = {f: v["bytes"] for f, v in man["files"].items()}
            out[rel] = man
        elif p.suffix == ".safetensors":
            with safe_open(str(p), framework="pt") as fh:
                meta = dict(fh.metadata())
                assert meta.pop("vlora_basis_sha256", basis_sha) == basis_sha  # the basis file of this folder
                out[rel] = (meta, {k: hashlib.sha256(fh.get_tensor(k).numpy().tobytes()).hexdigest() for k in fh.keys()})
        elif p.is_file():
            out[rel] = p.read_bytes()
    return out


def _mixed_paths(root: Path, n: int = 7) -> list[Path]:
    """Tasks sharing two modules' spaces, each with a space of its own in a third (stored per task), ranks 2 and 4."""
    g = torch.Generator().manual_seed(3)
    mods = ["layers.0.q_proj", "layers.0.v_proj", "layers.1.q_proj"]
    cu = {m: torch.linalg.qr(torch.randn(48, 6, generator=g))[0] for m in mods}
    cv = {m: torch.linalg.qr(torch.randn(40, 6, generator=g))[0] for m in mods}
    paths = []
    for t in range(n):
        rk = 4 if t % 2 == 0 else 2
        a = {m: (torch.randn(rk, 6, generator=g) @ cv[m].T) * 0.1 for m in mods}
        b = {m: cu[m] @ torch.randn(6, rk, generator=g) * 0.1 for m in mods}
        a["layers.1.q_proj"], b["layers.1.q_proj"] = torch.randn(rk, 40, generator=g) * 0.1, torch.randn(48, rk, generator=g) * 0.1
        w = LoRAWeights(layer_names=mods, lora_a=a, lora_b=b, rank=rk, lora_alpha=2.0 * rk, name=f"t{t}")
        paths.append(save_adapter(w, root / f"t{t}"))
    return paths


@pytest.fixture(scope="module")
def collections(tmp_path_factory):
    root = tmp_path_factory.mktemp("out")
    return {"families": make_demo_collection(root / "demo"), "mixed": _mixed_paths(root / "mixed")}


CASES = [
    ("families", "joint", {"max_error": 0.05, "precision": "auto"}, TINY),
    ("families", "joint", {"mean_error": 0.05, "precision": "auto"}, TINY),
    ("families", "joint", {}, TINY),  # one k for all modules: the k round, then the chunks
    ("mixed", "joint", {"max_error": 0.05}, TINY),
    ("mixed", "joint", {"max_error": 0.05, "precision": "auto"}, None),
    ("mixed", "share", {"num_components": 3}, TINY),
    ("mixed", "svd", {"max_error": 0.1, "precision": "auto"}, TINY),
    ("families", "pca", {"num_components": 3}, TINY),
]


@pytest.mark.parametrize("name,method,kw,budget", CASES)
def test_output_folder_equals_save(tmp_path, collections, name, method, kw, budget):
    """Byte for byte the folder ``save`` writes from the same build in memory; the lazy result equals a full load."""
    paths = collections[name]
    ref = SharedSubspace.from_adapters_streaming(paths, method=method, memory_budget_mb=budget, **kw)
    ref.save(tmp_path / "ref")
    got = SharedSubspace.from_adapters_streaming(paths, method=method, memory_budget_mb=budget, output=tmp_path / "out", **kw)
    assert _digests(tmp_path / "out") == _digests(tmp_path / "ref")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    assert got.saved_path == tmp_path / "out" and got.on_disk is not None and got.on_disk.unread == set(got.tasks)
    whole = SharedSubspace.load(tmp_path / "out")
    st_lazy, st_whole = got.compression_stats(), whole.compression_stats()
    for key in ("stored_bytes", "original_bytes", "stored_params", "disk", "storage", "error", "k"):
        assert st_lazy[key] == st_whole[key], key
    first = got.task_ids[0]
    w = got.reconstruct(first)
    assert got.on_disk.unread == set(got.tasks) - {first}  # one task read, the others not
    ref_w = whole.reconstruct(first)
    for m in ref_w.layer_names:
        assert torch.equal(w.lora_a[m], ref_w.lora_a[m]) and torch.equal(w.lora_b[m], ref_w.lora_b[m])
    got.materialize()
    assert got.on_disk is None
    for t in got.task_ids:
        for m, c in got.tasks[t].coeffs.items():
            assert c.keys() == whole.tasks[t].coeffs[m].keys()
            assert all(torch.equal(c[k], whole.tasks[t].coeffs[m][k]) for k in c)
    assert set(got.quantized) == set(whole.quantized)


def test_output_exists_refused_before_reading_and_force_replaces(tmp_path, collections, monkeypatch):
    paths = collections["mixed"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    import engine.subspace.passes as passes

    def boom(*a, **k):
        raise AssertionError("an adapter was read")

    monkeypatch.setattr(passes, "read", boom)
    with pytest.raises(OutputExistsError):
        SharedSubspace.from_adapters_streaming(paths, max_error=0.05, output=out)
    assert (out / "keep.txt").read_text() == "mine"
    monkeypatch.undo()
    SharedSubspace.from_adapters_streaming(paths, max_error=0.05, output=out, force=True)
    assert (out / SUBSPACE_MANIFEST_NAME).is_file() and not (out / "keep.txt").exists()


def test_cancel_leaves_no_output(tmp_path, collections):
    stop = threading.Event()
    seen = []

    def progress(p):
        seen.append(p)
        if len(seen) == 6:
            stop.set()

    with pytest.raises(JobCancelled):
        SharedSubspace.from_adapters_streaming(collections["families"], max_error=0.05, memory_budget_mb=TINY,
                                               output=tmp_path / "out", progress=progress, cancel=stop)
    assert list(tmp_path.iterdir()) == []


def test_lazy_load_reads_a_task_when_used_and_checks_it(tmp_path, collections):
    sub = SharedSubspace.from_adapters_streaming(collections["mixed"], max_error=0.05, precision="auto")
    sub.save(tmp_path / "s")
    lazy = SharedSubspace.load(tmp_path / "s", lazy=True)
    assert all(v.device.type == "meta" for p in lazy.tasks.values() for c in p.coeffs.values() for v in c.values())
    assert lazy.storage() == sub.storage() and lazy.fidelity() == SharedSubspace.load(tmp_path / "s").fidelity()
    man = json.loads((tmp_path / "s" / SUBSPACE_MANIFEST_NAME).read_text())
    victim = man["tasks"][1]
    fp = tmp_path / "s" / victim["file"]
    data = bytearray(fp.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes: only the checksum can tell
    fp.write_bytes(bytes(data))
    lazy.reconstruct(man["tasks"][0]["id"])  # another task: fine
    with pytest.raises(SubspaceFormatError, match="sha256"):
        lazy.reconstruct(victim["id"])
    with pytest.raises(SubspaceFormatError, match="sha256"):
        SharedSubspace.load(tmp_path / "s")


def test_lazy_subspace_saved_elsewhere_and_copied_is_whole(tmp_path, collections):
    """Operations on the whole collection read every task first: save elsewhere, copy, quantize."""
    lazy = SharedSubspace.from_adapters_streaming(collections["mixed"], max_error=0.05, output=tmp_path / "a")
    lazy.copy().save(tmp_path / "b")
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")
    lazy.quantize(bits=8)
    assert lazy.on_disk is None and lazy.saved_path is None
    assert all(v.device.type == "cpu" for p in lazy.tasks.values() for c in p.coeffs.values() for v in c.values())
