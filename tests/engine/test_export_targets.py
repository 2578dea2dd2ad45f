"""Exports that PEFT, vLLM and TGI read as the same ΔW (``--target``), and ``validate --target``.

vLLM's reading rule is written out here, apart from the engine: one scale per
adapter from the config (``lora_alpha/r``, or ``/√r`` with ``use_rslora``),
``rank_pattern``/``alpha_pattern`` ignored, each module's tensors as stored.
The reference ΔW comes from PEFT itself (``get_delta_weight`` of the loaded source).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft_factory import tiny_llama, write_peft_adapter
from safetensors.torch import load_file

from engine.constants import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, PEFT_PREFIX
from engine.io.local import load_adapter, save_adapter
from engine.jobs import JobRequest, run_job

Q1 = "model.layers.1.self_attn.q_proj"


def _cfg(folder: Path) -> dict:
    return json.loads((folder / ADAPTER_CONFIG_NAME).read_text())


def vllm_deltas(folder: Path) -> dict[str, torch.Tensor]:
    """ΔW per module as vLLM (and TGI) compute it: one scale from ``r``/``lora_alpha``/``use_rslora``."""
    cfg = _cfg(folder)
    r, alpha = cfg["r"], cfg["lora_alpha"]
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    sd = load_file(str(folder / ADAPTER_WEIGHTS_NAME))
    out = {}
    for k, a in sd.items():
        if k.endswith(".lora_A.weight"):
            m = k[len(PEFT_PREFIX):-len(".lora_A.weight")]
            b = sd[k.replace(".lora_A.", ".lora_B.")]
            out[m] = scale * (b.double() @ a.double())
    return out


def peft_deltas(folder: Path) -> dict[str, torch.Tensor]:
    """ΔW per module as PEFT computes it for the loaded folder (patterns honoured)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(tiny_llama(), str(folder))
    inner = model.base_model.model
    out = {}
    for name, mod in inner.named_modules():
        if hasattr(mod, "get_delta_weight") and "default" in getattr(mod, "lora_A", {}):
            out[name] = mod.get_delta_weight("default").double()
    return out


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rtol: float = 1e-6) -> None:
    assert sorted(got) == sorted(want)
    for m, w in want.items():
        err = float(torch.linalg.norm(got[m] - w) / torch.linalg.norm(w))
        assert err <= rtol, (m, err)


def _ranks(folder: Path) -> set[int]:
    sd = load_file(str(folder / ADAPTER_WEIGHTS_NAME))
    return {int(t.shape[0]) for k, t in sd.items() if k.endswith(".lora_A.weight")}


@pytest.fixture(scope="module")
def mixed_dirs(tmp_path_factory, peft_variant_dirs) -> dict[str, Path]:
    """Sources whose per-module scales differ by ratios that are not powers of two."""
    root = tmp_path_factory.mktemp("mixed")
    return {
        "patterns": peft_variant_dirs["patterns"],
        "rslora": peft_variant_dirs["rslora"],
        "r12": write_peft_adapter(root / "r12", seed=21, r=4, alpha=8, rank_pattern={Q1: 12},
                                  alpha_pattern={"v_proj": 24}),
        "rs_mixed": write_peft_adapter(root / "rs_mixed", seed=22, r=4, alpha=6, use_rslora=True,
                                       rank_pattern={"q_proj": 12}, alpha_pattern={"model.layers.0.self_attn.v_proj": 10}),
    }


# -- the default export: one scale, one r, empty patterns --------------------------------------


@pytest.mark.parametrize("name", ["patterns", "rslora", "r12", "rs_mixed"])
def test_default_save_reads_the_same_in_vllm_and_peft(name, mixed_dirs, tmp_path):
    src = mixed_dirs[name]
    want = peft_deltas(src)
    out = save_adapter(load_adapter(src), tmp_path / "out")
    cfg = _cfg(out)
    assert cfg["rank_pattern"] == {} and cfg["alpha_pattern"] == {}
    top = max(t.shape[0] for t in load_adapter(src).lora_a.values())
    assert cfg["r"] == top and _ranks(out) == {top}  # r=12 stays 12: padded to the largest rank, not beyond
    _assert_same(vllm_deltas(out), want)
    _assert_same(peft_deltas(out), want)


def test_old_style_export_is_misread_by_vllm(mixed_dirs):
    """The reference rule really tells the two apart: the source itself is misread."""
    src = mixed_dirs["r12"]
    with pytest.raises(AssertionError):
        _assert_same(vllm_deltas(src), peft_deltas(src), rtol=0.01)


def test_peft_target_keeps_patterns_bit_exact(mixed_dirs, tmp_path):
    src = mixed_dirs["r12"]
    out = save_adapter(load_adapter(src), tmp_path / "out", target="peft")
    assert _cfg(out)["rank_pattern"] == {Q1: 12} and _cfg(out)["alpha_pattern"] == {"v_proj": 24}
    a, b = load_file(str(src / ADAPTER_WEIGHTS_NAME)), load_file(str(out / ADAPTER_WEIGHTS_NAME))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("variant", ["rslora", "mts", "bf16", "qkvo", "trained"])
def test_uniform_adapters_are_written_bit_for_bit(variant, peft_variant_dirs, tmp_path):
    src = peft_variant_dirs[variant]
    out = save_adapter(load_adapter(src), tmp_path / "out")
    a, b = load_file(str(src / ADAPTER_WEIGHTS_NAME)), load_file(str(out / ADAPTER_WEIGHTS_NAME))
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_ollama_target_has_integer_alpha_and_no_rslora(mixed_dirs, tmp_path):
    src = mixed_dirs["rslora"]  # r=8, alpha=16: alpha·√r is not an integer
    out = save_adapter(load_adapter(src), tmp_path / "out", target="ollama")
    cfg = _cfg(out)
    assert cfg["use_rslora"] is False and isinstance(cfg["lora_alpha"], int)
    _assert_same(vllm_deltas(out), peft_deltas(src))


def test_vllm_target_drops_heads_and_says_so(peft_variant_dirs, tmp_path):
    from engine.io.targets import for_target

    w = load_adapter(peft_variant_dirs["mts"])
    kept, notes = for_target(w, "portable")
    assert kept.extra_tensors and any("lm_head" in n and "vLLM" in n for n in notes)
    dropped, notes = for_target(w, "vllm")
    assert dropped.extra_tensors == {} and dropped.metadata["modules_to_save"] is None
    assert len(notes) == 1 and "dropped modules_to_save head(s) lm_head" in notes[0]
    assert w.extra_tensors  # the input is not changed
    out = save_adapter(w, tmp_path / "out", target="vllm")
    assert _cfg(out)["modules_to_save"] is None and not any("lm_head" in k for k in load_file(str(out / ADAPTER_WEIGHTS_NAME)))
    _assert_same(vllm_deltas(out), peft_deltas(peft_variant_dirs["mts"]))


# -- jobs: merge and export write portable folders ------------------------------------------------


def test_merge_of_mixed_ranks_reads_the_same_in_vllm(mixed_dirs, peft_family_dirs, tmp_path):
    dirs = [peft_family_dirs[0], mixed_dirs["r12"], mixed_dirs["rs_mixed"]]
    weights = [1.0, 0.5, -0.8]
    want: dict[str, torch.Tensor] = {}
    for wt, d in zip(weights, dirs):
        for m, dw in peft_deltas(d).items():
            want[m] = want.get(m, 0) + wt * dw
    out = tmp_path / "merged"
    res = run_job(JobRequest("merge", {"adapters": [str(d) for d in dirs], "output": out, "method": "task_arithmetic",
                                       "weights": weights, "rank": "exact"}))
    assert res.ok, res.error
    cfg = _cfg(out)
    assert cfg["rank_pattern"] == {} and cfg["alpha_pattern"] == {}
    assert _ranks(out) == {cfg["r"]}
    _assert_same(vllm_deltas(out), want, rtol=1e-5)
    _assert_same(peft_deltas(out), want, rtol=1e-5)


def test_export_of_mixed_ranks_reads_the_same_in_vllm(mixed_dirs, tmp_path):
    src = mixed_dirs["r12"]
    sub = tmp_path / "sub"
    res = run_job(JobRequest("compress", {"adapters": [str(src)], "output": sub, "method": "svd", "max_error": 1e-6,
                                          "dtype": "float32", "task_ids": ["t"]}))
    assert res.ok, res.error
    want = peft_deltas(src)
    for exact in (False, True):
        out = tmp_path / f"exp{int(exact)}"
        exp = run_job(JobRequest("export", {"subspace": sub, "task_id": "t", "output": out, "exact_rank": exact}))
        assert exp.ok, exp.error
        cfg = _cfg(out)
        _assert_same(peft_deltas(out), want, rtol=1e-5)
        if exact:  # --exact-rank alone keeps PEFT's per-module ranks: the peft target
            assert exp.data["target"] == "peft" and cfg["rank_pattern"]
        else:
            assert cfg["rank_pattern"] == {} and cfg["alpha_pattern"] == {} and cfg["r"] == 12 and _ranks(out) == {12}
            _assert_same(vllm_deltas(out), want, rtol=1e-5)
    with pytest.raises(ValueError, match="exact_rank"):
        run_job(JobRequest("export", {"subspace": sub, "task_id": "t", "output": tmp_path / "x", "exact_rank": True,
                                      "target": "vllm"}))


def test_export_modelfile_from(peft_family_dirs, tmp_path):
    sub = tmp_path / "sub"
    assert run_job(JobRequest("compress", {"adapters": [str(peft_family_dirs[0])], "output": sub, "method": "svd",
                                           "task_ids": ["t"]})).ok
    base = tmp_path / "base-model"
    base.mkdir()
    cases = [(str(base), f"FROM {base.resolve()}\n", False), ("llama3.2:1b", "FROM llama3.2:1b\n", False),
             (None, "FROM <base model>\n", True)]  # the fixture's config names no base model
    for i, (given, first, noted) in enumerate(cases):
        out = tmp_path / f"o{i}"
        exp = run_job(JobRequest("export", {"subspace": sub, "task_id": "t", "output": out, "modelfile": True,
                                            "base_model": given}))
        assert exp.ok, exp.error
        assert (out / "Modelfile").read_text() == first + "ADAPTER .\n"
        assert any(w.startswith("Modelfile:") for w in exp.data["target_warnings"]) == noted
    # without --base-model, the adapter's own base model name, and a line saying where it came from
    from engine.io.targets import modelfile_text

    named = load_adapter(peft_family_dirs[0])
    named.base_model_name_or_path = "org/base"
    text, note = modelfile_text(named)
    assert text == "FROM org/base\nADAPTER .\n" and "base_model_name_or_path" in note


# -- validate --target ----------------------------------------------------------------------------


def test_validate_target_lists_what_vllm_refuses_or_misreads(mixed_dirs, peft_variant_dirs, peft_family_dirs, tmp_path):
    big = write_peft_adapter(tmp_path / "big", seed=5, r=32, alpha=16)
    res = run_job(JobRequest("validate", {"adapters": [str(mixed_dirs["r12"]), str(peft_variant_dirs["mts"]), str(big)],
                                          "target": "vllm"}))
    assert not res.ok
    rows = {r["name"]: r for r in res.data["adapters"]}
    assert all(r["ok"] for r in rows.values())  # valid adapters, but not for vLLM
    assert len(rows["r12"]["target_problems"]) == 1 and "misreads the scale" in rows["r12"]["target_problems"][0]
    assert "module(s)" in rows["r12"]["target_problems"][0] and "rank_pattern/alpha_pattern" in rows["r12"]["target_problems"][0]
    assert rows["mts"]["target_problems"] == ["modules_to_save lm_head: vLLM refuses the adapter"]
    assert len(rows["big"]["target_problems"]) == 1 and "rank 32 is above --max-lora-rank 16" in rows["big"]["target_problems"][0]
    # a larger --max-lora-rank accepts it; PEFT reads all of them
    assert run_job(JobRequest("validate", {"adapters": [str(big)], "target": "vllm", "max_lora_rank": 32})).ok
    assert run_job(JobRequest("validate", {"adapters": [str(mixed_dirs["r12"]), str(peft_variant_dirs["mts"])],
                                           "target": "peft"})).ok
    # without --target nothing changes
    assert run_job(JobRequest("validate", {"adapters": [str(mixed_dirs["r12"])]})).ok
    # what export writes for a target passes that target's check
    for t in ("vllm", "tgi", "ollama"):
        out = save_adapter(load_adapter(peft_variant_dirs["mts"]), tmp_path / f"for-{t}", target=t)
        out2 = save_adapter(load_adapter(mixed_dirs["rs_mixed"]), tmp_path / f"mixed-for-{t}", target=t)
        check = run_job(JobRequest("validate", {"adapters": [str(out), str(out2)], "target": t}))
        assert check.ok, check.data


def test_validate_target_names_dora_and_bias(tmp_path, peft_adapter_dir):
    import shutil

    dora = tmp_path / "dora"
    shutil.copytree(peft_adapter_dir, dora)
    cfg = _cfg(dora)
    cfg.update(use_dora=True)
    (dora / ADAPTER_CONFIG_NAME).write_text(json.dumps(cfg))
    biased = tmp_path / "biased"
    shutil.copytree(peft_adapter_dir, biased)
    cfg = _cfg(biased)
    cfg.update(bias="all")
    (biased / ADAPTER_CONFIG_NAME).write_text(json.dumps(cfg))
    res = run_job(JobRequest("validate", {"adapters": [str(dora), str(biased)], "target": "tgi"}))
    rows = {r["name"]: r for r in res.data["adapters"]}
    assert not res.ok
    assert rows["dora"]["target_problems"] == ["use_dora is true: TGI does not support DoRA"]
    assert rows["biased"]["target_problems"] == ["bias is 'all': TGI does not apply it"]
