"""engine.io.compat: which adapters of a collection cannot share a basis with the rest (headers only)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.constants import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
from engine.io.compat import incompatible_with_majority
from engine.io.header import read_adapter_summary
from engine.io.local import load_adapter
from engine.types import AdapterSummary, ModuleInfo
from peft_factory import write_peft_adapter

ROOT = Path(__file__).resolve().parents[2]


def _set_base(folder: Path, base: str) -> Path:
    cfg = json.loads((folder / ADAPTER_CONFIG_NAME).read_text())
    cfg["base_model_name_or_path"] = base
    (folder / ADAPTER_CONFIG_NAME).write_text(json.dumps(cfg))
    return folder


@pytest.fixture(scope="module")
def coll(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compat")
    out = {n: write_peft_adapter(root / n, seed=i, family=0) for i, n in enumerate(("a", "b", "c"))}
    out["qkvo"] = write_peft_adapter(root / "qkvo", seed=7, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
    out["wide"] = write_peft_adapter(root / "wide", seed=8, hidden=32)
    for folder in out.values():
        _set_base(folder, "tiny/base")
    out["other_base"] = _set_base(write_peft_adapter(root / "other_base", seed=9, family=0), "someone/another-model")
    out["no_base"] = write_peft_adapter(root / "no_base", seed=10, family=0)  # names none: goes with the rest
    broken = root / "broken"
    broken.mkdir()
    (broken / ADAPTER_CONFIG_NAME).write_text((out["a"] / ADAPTER_CONFIG_NAME).read_text())
    (broken / ADAPTER_WEIGHTS_NAME).write_bytes(b"not a safetensors file")
    out["broken"] = broken
    return out


def test_outliers_and_why(coll):
    names = ["broken", "a", "qkvo", "b", "wide", "c", "other_base", "no_base"]
    got = incompatible_with_majority([coll[n] for n in names], names=names)
    assert list(got) == ["broken", "qkvo", "wide", "other_base"]  # input order
    assert got["broken"].startswith("cannot read: ")
    assert got["qkvo"] == "has 4 other module(s), e.g. model.layers.0.self_attn.k_proj"
    assert got["other_base"] == "base model someone/another-model (the others: tiny/base)"
    wide = {m.name: (m.out_features, m.in_features) for m in read_adapter_summary(coll["wide"]).modules}
    ref = {m.name: (m.out_features, m.in_features) for m in read_adapter_summary(coll["a"]).modules}
    first = sorted(ref)[0]
    assert got["wide"] == f"{first} is {wide[first][0]}×{wide[first][1]} (the others: {ref[first][0]}×{ref[first][1]})"


def test_same_answer_from_summaries_weights_and_paths(coll):
    names = ["a", "qkvo", "b"]
    paths = [coll[n] for n in names]
    by_path = incompatible_with_majority(paths, names=names)
    assert by_path == incompatible_with_majority([read_adapter_summary(p) for p in paths], names=names)
    assert by_path == incompatible_with_majority([load_adapter(p, name=n) for p, n in zip(paths, names)])
    assert incompatible_with_majority(paths[::2], names=["a", "b"]) == {}
    with pytest.raises(ValueError, match="names"):
        incompatible_with_majority(paths, names=["a"])


def _summary(base, modules) -> AdapterSummary:
    """A header-only summary: ``modules`` are ``(name, out, in)``."""
    infos = [ModuleInfo(name=n, rank=4, in_features=i, out_features=o, dtype="F32") for n, o, i in modules]
    return AdapterSummary(path="x", base_model=base, rank=4, lora_alpha=8.0, use_rslora=False, target_modules=[],
                          modules=infos, extra_tensors=[], num_params=0, nbytes=0, dtypes=["F32"])


def test_incompatible_majority_rules(tmp_path) -> None:
    a = ("base", (("m1", 8, 8), ("m2", 8, 8)))
    other_shape = ("base", (("m1", 8, 8), ("m2", 8, 4)))
    other_base = ("other", a[1])
    no_base = (None, a[1])
    items = {"x": _summary(*a), "y": _summary(*a), "z": _summary(*other_shape), "w": _summary(*other_base),
             "v": _summary(*no_base), "u": tmp_path / "broken"}
    out = incompatible_with_majority(list(items.values()), names=list(items))
    assert set(out) == {"z", "w", "u"}
    assert "m2 is 8×4" in out["z"] and "other" in out["w"]


def test_import_is_torch_free():
    code = "import sys, engine.io.compat, engine.io.local, engine.io.atomic; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "PATH": ""}, timeout=120)
    assert proc.stdout.strip() == "False", proc.stderr
