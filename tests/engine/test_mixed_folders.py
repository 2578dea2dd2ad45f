"""Mixed folders: adapters with different target modules, --exclude, compress --group-by compat, merge heads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.constants import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
from engine.errors import AdapterFormatError, IncompatibleAdaptersError
from engine.io.local import load_adapter
from engine.io.scan import expand_adapter_specs, is_subspace_dir
from engine.jobs import InlineRunner, JobRequest, run_job
from engine.merge import merge_adapters
from peft_factory import write_peft_adapter

QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
HEAD = "base_model.model.lm_head.weight"


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    """Two q/v adapters and two q/k/v/o adapters in one folder."""
    root = tmp_path_factory.mktemp("mixed") / "coll"
    write_peft_adapter(root / "qv_a", seed=1, family=0)
    write_peft_adapter(root / "qv_b", seed=2, family=0)
    write_peft_adapter(root / "qkvo_a", seed=3, target_modules=QKVO)
    write_peft_adapter(root / "qkvo_b", seed=4, target_modules=QKVO)
    return root


@pytest.fixture(scope="module")
def heads(tmp_path_factory) -> dict[str, Path]:
    """Adapters with an lm_head in modules_to_save: cls_a, cls_b (different heads), cls_same (cls_a's head)."""
    root = tmp_path_factory.mktemp("heads")
    a = write_peft_adapter(root / "cls_a", seed=21, modules_to_save=["lm_head"])
    b = write_peft_adapter(root / "cls_b", seed=22, modules_to_save=["lm_head"])
    same = root / "cls_same"
    shutil.copytree(b, same)
    sd = load_file(str(same / ADAPTER_WEIGHTS_NAME))
    sd[HEAD] = load_file(str(a / ADAPTER_WEIGHTS_NAME))[HEAD].clone()
    save_file(sd, str(same / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    return {"cls_a": a, "cls_b": b, "cls_same": same}


def _names(specs) -> list[str]:
    return [s.name for s in specs]


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


# -- --exclude --------------------------------------------------------------------------


def test_exclude_matches_folder_name_and_path(mixed):
    assert _names(expand_adapter_specs([str(mixed)])) == ["qkvo_a", "qkvo_b", "qv_a", "qv_b"]
    assert _names(expand_adapter_specs([str(mixed)], ["qkvo_*"])) == ["qv_a", "qv_b"]
    assert _names(expand_adapter_specs([str(mixed)], ["*/qkvo_a", "qv_b/"])) == ["qkvo_b", "qv_a"]
    assert _names(expand_adapter_specs([str(mixed)], ["qv_?"])) == ["qkvo_a", "qkvo_b"]
    # an adapter named directly is matched too
    assert _names(expand_adapter_specs([str(mixed / "qv_a"), str(mixed / "qv_b")], ["qv_b"])) == ["qv_a"]
    with pytest.raises(AdapterFormatError, match="--exclude"):
        expand_adapter_specs([str(mixed)], ["*"])


def test_exclude_lets_a_mixed_folder_compress(mixed, tmp_path):
    out = tmp_path / "sub"
    res = run_job(JobRequest("compress", {"adapters": [mixed], "output": out, "exclude": ["qkvo_*"]}))
    assert res.data["tasks"] == ["qv_a", "qv_b"] and is_subspace_dir(out)


# -- partition --------------------------------------------------------------------------


def test_partition_compatible_from_weights_and_from_headers(mixed):
    from engine.io.local import partition_compatible

    paths = [mixed / n for n in ("qv_a", "qkvo_a", "qv_b", "qkvo_b")]
    loaded = [load_adapter(p) for p in paths]
    for sets in (partition_compatible(loaded), partition_compatible(paths)):
        got = {s.name: (s.members, s.indices, s.target_modules, len(s.modules)) for s in sets}
        assert got == {
            "q_proj+v_proj": (["qv_a", "qv_b"], [0, 2], ["q_proj", "v_proj"], 4),
            "k_proj+o_proj+q_proj+v_proj": (["qkvo_a", "qkvo_b"], [1, 3], ["k_proj", "o_proj", "q_proj", "v_proj"], 8),
        }
    one = partition_compatible(loaded[::2], names=["x", "y"])
    assert len(one) == 1 and one[0].members == ["x", "y"]


# -- analyze / diff on the modules in common ----------------------------------------------


def _dense_cosines(adapters, modules) -> torch.Tensor:
    """Overall cosine of ΔW over ``modules``, from dense updates (independent of the r×r path)."""
    vecs = [torch.cat([a.delta_weight(m).double().reshape(-1) for m in modules]) for a in adapters]
    n = len(vecs)
    out = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            out[i, j] = vecs[i] @ vecs[j] / (vecs[i].norm() * vecs[j].norm())
    return out


def test_analyze_mixed_folder_compares_common_modules(mixed):
    res = run_job(JobRequest("analyze", {"adapters": [mixed], "per_module": True}))
    d = res.data
    assert d["names"] == ["qkvo_a", "qkvo_b", "qv_a", "qv_b"]
    adapters = [load_adapter(mixed / n) for n in d["names"]]
    qv = sorted(adapters[2].layer_names)
    assert d["compared_modules"] == qv and len(qv) == 4
    ko = sorted(m for m in adapters[0].layer_names if m.endswith(("k_proj", "o_proj")))
    assert d["left_out"] == {"qkvo_a": ko, "qkvo_b": sorted(m for m in adapters[1].layer_names if m not in qv)}
    assert set(d["modules"]) == set(qv)
    ref = _dense_cosines(adapters, qv)
    assert torch.allclose(torch.tensor(d["similarity"], dtype=torch.float64), ref, atol=1e-5)
    assert "compared on the 4 modules" in res.summary


def test_analyze_with_nothing_in_common_lists_the_sets(tmp_path):
    write_peft_adapter(tmp_path / "k_only", seed=1, target_modules=("k_proj",))
    write_peft_adapter(tmp_path / "qv", seed=2)
    with pytest.raises(IncompatibleAdaptersError, match=r"no module is in every adapter.*\[k_proj\].*\[q_proj\+v_proj\]"):
        run_job(JobRequest("analyze", {"adapters": [tmp_path]}))


def test_common_modules_reports_left_out(mixed):
    from engine.io.local import common_modules

    a, b = load_adapter(mixed / "qv_a"), load_adapter(mixed / "qkvo_a")
    ov = common_modules([a, b])
    assert ov.modules == a.layer_names and list(ov.left_out) == ["qkvo_a"] and len(ov.left_out["qkvo_a"]) == 4
    assert common_modules([a, load_adapter(mixed / "qv_b")]).complete


def test_diff_mixed_pair_compares_shared_modules(mixed):
    res = run_job(JobRequest("diff", {"a": mixed / "qv_a", "b": mixed / "qkvo_a"}))
    d = res.data
    assert len(d["modules"]) == 4 and d["only_in_a"] == [] and len(d["only_in_b"]) == 4
    assert "left out" in res.summary


# -- compress --------------------------------------------------------------------------------


def test_compress_mixed_folder_fails_listing_the_sets(mixed, tmp_path):
    res = InlineRunner().run(JobRequest("compress", {"adapters": [mixed], "output": tmp_path / "sub"}))
    assert res.status == "failed" and res.error_kind == "input"
    msg = res.error
    assert "[q_proj+v_proj]" in msg and "[k_proj+o_proj+q_proj+v_proj]" in msg
    assert "qv_a, qv_b" in msg and "qkvo_a, qkvo_b" in msg
    assert "--exclude" in msg and "--group-by compat" in msg and "\n" not in msg
    assert not (tmp_path / "sub").exists()


@pytest.mark.parametrize("streaming", [False, True])
def test_compress_group_by_compat_writes_one_subspace_per_set(mixed, tmp_path, streaming):
    from engine.subspace import SharedSubspace

    out = tmp_path / "subs"
    res = run_job(JobRequest("compress", {"adapters": [mixed], "output": out, "group_by": "compat",
                                          "num_components": 8, "dtype": "float32", "streaming": streaming}))
    d = res.data
    assert d["grouped"] and [s["name"] for s in d["sets"]] == ["k_proj+o_proj+q_proj+v_proj", "q_proj+v_proj"]
    assert sorted(p.name for p in out.iterdir()) == ["k_proj+o_proj+q_proj+v_proj", "q_proj+v_proj"]
    assert res.outputs == [str(out / s["name"]) for s in d["sets"]]
    for s in d["sets"]:
        sub = SharedSubspace.load(out / s["name"])
        assert sub.task_ids == s["tasks"] == s["members"]
        assert sorted(sub.layer_names) == sorted(s["modules"])
        for t in sub.task_ids:
            orig = load_adapter(mixed / t)
            rec = sub.reconstruct(t, pad_to_vllm=False)
            assert sorted(rec.layer_names) == orig.layer_names
            for m in orig.layer_names:  # k = N·r: the subspace holds every direction, reconstruction is exact
                ref = orig.delta_weight(m)
                assert torch.allclose(rec.delta_weight(m), ref, atol=1e-5 * float(ref.abs().max()) + 1e-7)


# -- merge: modules_to_save heads ---------------------------------------------------------------


def test_merge_keeps_identical_heads_bit_for_bit(heads, tmp_path):
    out = tmp_path / "merged"
    res = run_job(JobRequest("merge", {"adapters": [heads["cls_a"], heads["cls_same"]], "output": out, "method": "cat"}))
    assert res.data["heads"] == {"lm_head": "identical"} and not res.data["warnings"]
    written = load_file(str(out / ADAPTER_WEIGHTS_NAME))
    original = load_file(str(heads["cls_a"] / ADAPTER_WEIGHTS_NAME))[HEAD]
    assert _bits(written[HEAD]) == _bits(original) and written[HEAD].dtype == original.dtype
    assert json.loads((out / ADAPTER_CONFIG_NAME).read_text())["modules_to_save"] == ["lm_head"]
    assert load_adapter(out).extra_tensors.keys() == {HEAD}


def test_merge_different_heads_dropped_with_warning_or_taken_from_head_from(heads, tmp_path):
    a, b = load_adapter(heads["cls_a"]), load_adapter(heads["cls_b"])
    assert not torch.equal(a.extra_tensors[HEAD], b.extra_tensors[HEAD])
    dropped = merge_adapters([a, b], "cat")
    assert not dropped.weights.extra_tensors and dropped.weights.metadata["modules_to_save"] is None
    assert dropped.heads == {"lm_head": "dropped"}
    assert len(dropped.warnings) == 1 and "cls_a, cls_b" in dropped.warnings[0] and "--head-from" in dropped.warnings[0]

    out = tmp_path / "merged"
    res = run_job(JobRequest("merge", {"adapters": [heads["cls_a"], heads["cls_b"]], "output": out, "head_from": "cls_b"}))
    assert res.data["heads"] == {"lm_head": "from cls_b"}
    assert any("kept cls_b's" in w and "dropped cls_a's" in w for w in res.data["warnings"])
    written = load_file(str(out / ADAPTER_WEIGHTS_NAME))[HEAD]
    assert _bits(written) == _bits(load_file(str(heads["cls_b"] / ADAPTER_WEIGHTS_NAME))[HEAD])
    assert json.loads((out / ADAPTER_CONFIG_NAME).read_text())["modules_to_save"] == ["lm_head"]

    with pytest.raises(ValueError, match="head_from: 'nope' is not one of the merged adapters"):
        merge_adapters([a, b], "cat", head_from="nope")


def test_merge_head_from_one_adapter_only(heads, mixed):
    """A head only one input has is kept from it (as before), without a warning."""
    res = merge_adapters([load_adapter(heads["cls_a"]), load_adapter(mixed / "qv_a")], "cat")
    assert res.heads == {"lm_head": "from cls_a"} and not res.warnings
    assert res.weights.metadata["modules_to_save"] == ["lm_head"]


def _with_base(src: Path, dst: Path, base: str | None) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / ADAPTER_CONFIG_NAME).read_text())
    cfg["base_model_name_or_path"] = base
    (dst / ADAPTER_CONFIG_NAME).write_text(json.dumps(cfg))
    return dst


def test_partition_splits_by_base_model_and_says_so(mixed, tmp_path):
    from engine.io.local import describe_sets, partition_compatible

    m1a = _with_base(mixed / "qv_a", tmp_path / "m1a", "model-1")
    m1b = _with_base(mixed / "qv_b", tmp_path / "m1b", "model-1")
    m2 = _with_base(mixed / "qv_b", tmp_path / "m2", "model-2")
    unnamed = _with_base(mixed / "qv_a", tmp_path / "unnamed", None)
    sets = partition_compatible([m1a, m2, m1b])
    assert [(s.name, s.members, s.base_model) for s in sets] == [
        ("q_proj+v_proj", ["m1a", "m1b"], "model-1"), ("q_proj+v_proj-2", ["m2"], "model-2")]
    assert "base model model-2: m2" in describe_sets(sets)
    # an adapter naming no base model joins the one set of the same modules that names one
    assert [s.members for s in partition_compatible([m1a, unnamed])] == [["m1a", "unnamed"]]
    assert [s.members for s in partition_compatible([m1a, unnamed, m2])] == [["m1a"], ["unnamed"], ["m2"]]
