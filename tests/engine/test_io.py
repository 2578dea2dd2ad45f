"""Adapter I/O round-trips against PEFT itself, saving, and finding adapters on disk."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from peft_factory import peft_logits, tiny_llama
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from engine.constants import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
from engine.errors import AdapterFormatError, OutputExistsError
from engine.io.header import read_adapter_summary, read_safetensors_header
from engine.io.local import load_adapter, save_adapter
from engine.io.scan import AdapterSpec, expand_adapter_specs, scan_local_adapters

VARIANTS = ["rslora", "patterns", "mts", "bf16", "qkvo", "trained"]


def _peft_model(adapter_dir: Path):
    from peft import PeftModel

    model = PeftModel.from_pretrained(tiny_llama(), str(adapter_dir))
    model.eval()
    return model


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# -- round-trips through PEFT ------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_roundtrip_gives_peft_the_same_logits(variant, peft_variant_dirs, tmp_path):
    src = peft_variant_dirs[variant]
    w = load_adapter(src)
    out = save_adapter(w, tmp_path / "out")
    expected = peft_logits(src)
    got = peft_logits(out)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # and the adapter really changes the model, so equal logits mean something
    base = tiny_llama()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.allclose(base(input_ids=ids).logits.float(), got, atol=1e-4)


def test_roundtrip_family_adapter_logits(peft_adapter_dir, tmp_path):
    out = save_adapter(load_adapter(peft_adapter_dir), tmp_path / "out")
    torch.testing.assert_close(peft_logits(out), peft_logits(peft_adapter_dir), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_tensors_roundtrip_bit_exact(variant, peft_variant_dirs, tmp_path):
    src = peft_variant_dirs[variant]
    out = save_adapter(load_adapter(src), tmp_path / "out", target="peft")
    a, b = load_file(str(src / ADAPTER_WEIGHTS_NAME)), load_file(str(out / ADAPTER_WEIGHTS_NAME))
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("variant", VARIANTS)
def test_scale_matches_peft_scaling(variant, peft_variant_dirs, tmp_path):
    src = peft_variant_dirs[variant]
    w = load_adapter(src)
    for folder in (src, save_adapter(w, tmp_path / "out", target="peft")):
        model = _peft_model(folder)
        inner = model.base_model.model
        for m in w.layer_names:
            module = inner.get_submodule(m)
            assert module.scaling["default"] == pytest.approx(w.scale(m), rel=1e-9), (folder, m)
            assert module.r["default"] == w.module_rank(m)


def test_rank_alpha_and_patterns_read(peft_variant_dirs, tmp_path):
    w = load_adapter(peft_variant_dirs["patterns"])
    q1 = "model.layers.1.self_attn.q_proj"
    assert w.rank == 4 and w.lora_alpha == 8 and not w.use_rslora
    assert w.module_rank(q1) == 8
    assert {m: r for m, r in w.ranks.items() if m != q1} == dict.fromkeys([m for m in w.layer_names if m != q1], 4)
    assert w.module_alpha("model.layers.0.self_attn.v_proj") == 32
    assert w.module_alpha("model.layers.0.self_attn.q_proj") == 8
    assert w.scale(q1) == pytest.approx(8 / 8)
    assert w.scale("model.layers.1.self_attn.v_proj") == pytest.approx(32 / 4)
    cfg = json.loads((save_adapter(w, tmp_path / "o", target="peft") / ADAPTER_CONFIG_NAME).read_text())
    assert cfg["rank_pattern"] == {q1: 8}
    assert cfg["alpha_pattern"] == {"v_proj": 32}

    rs = load_adapter(peft_variant_dirs["rslora"])
    assert rs.use_rslora and rs.rank == 8 and rs.lora_alpha == 16
    assert rs.scale(rs.layer_names[0]) == pytest.approx(16 / 8**0.5)


def test_rank_pattern_first_match_wins_as_in_peft(tmp_path):
    """PEFT uses the first pattern key (in file order) that matches, not an exact name first."""
    from peft_factory import write_peft_adapter

    src = write_peft_adapter(tmp_path / "src", seed=3, r=4, rank_pattern={"q_proj": 8})
    cfg = json.loads((src / ADAPTER_CONFIG_NAME).read_text())
    # a later, exact key that PEFT never reaches for layer 1's q_proj
    cfg["rank_pattern"] = {"q_proj": 8, "model.layers.1.self_attn.q_proj": 2}
    (src / ADAPTER_CONFIG_NAME).write_text(json.dumps(cfg))
    model = _peft_model(src)  # PEFT itself loads it, at rank 8
    assert model.base_model.model.get_submodule("model.layers.1.self_attn.q_proj").r["default"] == 8
    w = load_adapter(src)
    assert w.module_rank("model.layers.1.self_attn.q_proj") == 8
    assert read_adapter_summary(src).rank == 4
    torch.testing.assert_close(peft_logits(save_adapter(w, tmp_path / "out")), peft_logits(src), rtol=1e-5, atol=1e-6)


def test_saved_rank_pattern_survives_suffix_names(tmp_path):
    """Module names that end with another module's name still get their own ranks back."""
    g = torch.Generator().manual_seed(0)
    ranks = {"model.layers.0.q_proj": 8, "vision.model.layers.0.q_proj": 2, "lm.model.layers.0.q_proj": 4, "v_proj": 4}
    from engine.types import LoRAWeights

    w = LoRAWeights(
        layer_names=sorted(ranks),
        lora_a={m: torch.randn(r, 6, generator=g) for m, r in ranks.items()},
        lora_b={m: torch.randn(5, r, generator=g) for m, r in ranks.items()},
        rank=4,
        metadata={"r": 4, "lora_alpha": 8},
    )
    out = save_adapter(w, tmp_path / "out", target="peft")
    assert load_adapter(out).ranks == ranks
    assert json.loads((out / ADAPTER_CONFIG_NAME).read_text())["rank_pattern"] == {
        "vision.model.layers.0.q_proj": 2,
        "lm.model.layers.0.q_proj": 4,
        "model.layers.0.q_proj": 8,
    }


def test_header_summary_agrees_with_loader(peft_variant_dirs):
    for d in peft_variant_dirs.values():
        s = read_adapter_summary(d)
        w = load_adapter(d)
        assert [m.name for m in s.modules] == w.layer_names
        assert {m.name: m.rank for m in s.modules} == w.ranks
        assert s.num_params == w.num_params
        assert s.extra_tensors == sorted(w.extra_tensors)


def test_modules_to_save_head_roundtrips(peft_variant_dirs, tmp_path):
    src = peft_variant_dirs["mts"]
    w = load_adapter(src)
    assert list(w.extra_tensors) == ["base_model.model.lm_head.weight"]
    out = save_adapter(w, tmp_path / "out")
    again = load_adapter(out)
    assert torch.equal(again.extra_tensors["base_model.model.lm_head.weight"], w.extra_tensors["base_model.model.lm_head.weight"])
    assert json.loads((out / ADAPTER_CONFIG_NAME).read_text())["modules_to_save"] == ["lm_head"]
    # PEFT restores the trained head from our file
    model = _peft_model(out)
    head = model.base_model.model.lm_head.modules_to_save["default"].weight
    assert torch.equal(head, w.extra_tensors["base_model.model.lm_head.weight"])


def test_dtype_kept_and_cast_on_request(peft_variant_dirs, tmp_path):
    w = load_adapter(peft_variant_dirs["bf16"])
    assert {t.dtype for t in w.lora_a.values()} == {torch.bfloat16}
    out = save_adapter(w, tmp_path / "bf16")
    assert {e["dtype"] for e in read_safetensors_header(out / ADAPTER_WEIGHTS_NAME).values()} == {"BF16"}

    w32 = load_adapter(peft_variant_dirs["qkvo"])
    out16 = save_adapter(w32, tmp_path / "f16", dtype=torch.float16)
    assert {e["dtype"] for e in read_safetensors_header(out16 / ADAPTER_WEIGHTS_NAME).values()} == {"F16"}
    assert {t.dtype for t in w32.lora_a.values()} == {torch.float32}  # the input is not changed


def test_config_has_fields_servers_need(peft_variant_dirs, tmp_path):
    w = load_adapter(peft_variant_dirs["qkvo"])
    cfg = json.loads((save_adapter(w, tmp_path / "out") / ADAPTER_CONFIG_NAME).read_text())
    assert cfg["peft_type"] == "LORA"
    assert cfg["r"] == 4 and isinstance(cfg["r"], int)
    assert cfg["lora_alpha"] == 8
    assert sorted(cfg["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]


def test_keys_with_adapter_name_load(peft_adapter_dir, tmp_path):
    sd = load_file(str(peft_adapter_dir / ADAPTER_WEIGHTS_NAME))
    named = {k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight"): v for k, v in sd.items()}
    assert all(".default." in k for k in named)
    folder = tmp_path / "named"
    folder.mkdir()
    save_file(named, str(folder / ADAPTER_WEIGHTS_NAME))
    shutil.copy(peft_adapter_dir / ADAPTER_CONFIG_NAME, folder / ADAPTER_CONFIG_NAME)
    w, ref = load_adapter(folder), load_adapter(peft_adapter_dir)
    assert w.layer_names == ref.layer_names
    for m in ref.layer_names:
        assert torch.equal(w.lora_a[m], ref.lora_a[m]) and torch.equal(w.lora_b[m], ref.lora_b[m])
    # written back in PEFT's own layout
    out = save_adapter(w, tmp_path / "out")
    with safe_open(str(out / ADAPTER_WEIGHTS_NAME), framework="pt") as fh:
        assert sorted(fh.keys()) == sorted(sd)


def test_safetensors_file_beside_config(peft_adapter_dir):
    w = load_adapter(peft_adapter_dir / ADAPTER_WEIGHTS_NAME)
    assert w.layer_names == load_adapter(peft_adapter_dir).layer_names
    assert w.name == peft_adapter_dir.name


# -- saving --------------------------------------------------------------------


def test_save_refuses_to_overwrite_without_force(peft_adapter_dir, tmp_path):
    w = load_adapter(peft_adapter_dir)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match=str(out)):
        save_adapter(w, out)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert _leftovers(tmp_path) == []


def test_save_force_replaces_whole_folder(peft_variant_dirs, peft_adapter_dir, tmp_path):
    out = save_adapter(load_adapter(peft_variant_dirs["mts"]), tmp_path / "out")
    (out / "stale.txt").write_text("old")
    w = load_adapter(peft_adapter_dir)
    save_adapter(w, out, force=True)
    assert sorted(p.name for p in out.iterdir()) == [ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME]
    again = load_adapter(out)
    assert again.extra_tensors == {}
    assert torch.equal(again.lora_a[w.layer_names[0]], w.lora_a[w.layer_names[0]])
    assert _leftovers(tmp_path) == []


def test_save_error_leaves_nothing_behind(peft_adapter_dir, tmp_path, monkeypatch):
    import safetensors.torch

    w = load_adapter(peft_adapter_dir)
    existing = save_adapter(w, tmp_path / "existing")
    before = (existing / ADAPTER_WEIGHTS_NAME).read_bytes()

    def boom(*args, **kwargs):
        Path(args[1]).write_bytes(b"half")  # a partial write, then the failure
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="No space"):
        save_adapter(w, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    with pytest.raises(OSError, match="No space"):
        save_adapter(w, existing, force=True)
    assert (existing / ADAPTER_WEIGHTS_NAME).read_bytes() == before
    assert _leftovers(tmp_path) == []


def test_saved_folder_permissions_follow_umask(peft_adapter_dir, tmp_path):
    old = os.umask(0o022)
    try:
        out = save_adapter(load_adapter(peft_adapter_dir), tmp_path / "out")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755  # not mkdtemp's private 0o700


def test_save_writes_ollama_modelfile(tmp_path, demo_dir):
    w = load_adapter(demo_dir / "sql-sqlite")
    out = save_adapter(w, tmp_path / "out", modelfile=True)
    assert (out / "Modelfile").read_text() == "FROM vlora-demo/tiny-llama-256\nADAPTER .\n"


def test_save_empty_adapter_is_value_error(peft_adapter_dir, tmp_path):
    w = load_adapter(peft_adapter_dir)
    empty = w.replace_factors({})
    with pytest.raises(ValueError, match="no modules"):
        save_adapter(empty, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- the demo adapters in PEFT ---------------------------------------------------


def test_demo_adapter_loads_in_peft(demo_dir):
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.demo import demo_base_config

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**demo_base_config())).eval()
    folder = demo_dir / "math-algebra"
    model = PeftModel.from_pretrained(base, str(folder)).eval()
    w = load_adapter(folder)
    inner = model.base_model.model
    for m in w.layer_names:
        layer = inner.get_submodule(m)
        torch.testing.assert_close(layer.get_delta_weight("default"), w.delta_weight(m), rtol=1e-5, atol=1e-7)
    ids = torch.randint(0, 512, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all()


# -- finding adapters on disk ---------------------------------------------------


def _fake_adapter(folder: Path, src: Path) -> Path:
    folder.mkdir(parents=True)
    for n in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME):
        shutil.copy(src / n, folder / n)
    return folder


def test_scan_finds_nested_skips_hidden_and_loops(peft_adapter_dir, tmp_path):
    root = tmp_path / "root"
    a = _fake_adapter(root / "a", peft_adapter_dir)
    b = _fake_adapter(root / "group" / "deep" / "b", peft_adapter_dir)
    _fake_adapter(root / ".hidden" / "c", peft_adapter_dir)
    _fake_adapter(root / "group" / ".git" / "d", peft_adapter_dir)
    (root / "group" / "deep" / "loop").symlink_to(root, target_is_directory=True)
    (root / "self").symlink_to(".", target_is_directory=True)
    (root / "empty").mkdir()
    assert scan_local_adapters(root) == [a, b]
    assert scan_local_adapters(a) == [a]


def test_scan_follows_symlinked_adapter_outside_root(peft_adapter_dir, tmp_path):
    outside = _fake_adapter(tmp_path / "elsewhere" / "x", peft_adapter_dir)
    root = tmp_path / "root"
    root.mkdir()
    (root / "linked").symlink_to(outside, target_is_directory=True)
    assert scan_local_adapters(root) == [root / "linked"]


def test_scan_not_a_folder(tmp_path):
    with pytest.raises(AdapterFormatError, match="not a folder"):
        scan_local_adapters(tmp_path / "missing")


def test_expand_adapter_specs(peft_adapter_dir, tmp_path):
    root = tmp_path / "coll"
    a = _fake_adapter(root / "a", peft_adapter_dir)
    b = _fake_adapter(root / "b", peft_adapter_dir)
    specs = expand_adapter_specs([str(a), str(root), "hf://org/name@v1.0", "hf://user-x/lora_2"])
    assert specs == [
        AdapterSpec(path=a),
        AdapterSpec(path=a),
        AdapterSpec(path=b),
        AdapterSpec(repo_id="org/name", revision="v1.0"),
        AdapterSpec(repo_id="user-x/lora_2"),
    ]
    assert specs[3].label == "hf://org/name@v1.0" and specs[3].name == "name"
    assert specs[2].name == "b"
    with pytest.raises(ValueError, match="invalid Hub repo id"):
        expand_adapter_specs(["hf://../etc"])
    with pytest.raises(AdapterFormatError, match="no such file"):
        expand_adapter_specs([str(tmp_path / "nope")])
    (tmp_path / "nothing").mkdir()
    with pytest.raises(AdapterFormatError, match="no adapter folders"):
        expand_adapter_specs([str(tmp_path / "nothing")])
