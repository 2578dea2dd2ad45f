"""Every bad adapter gives its named error, naming the file and the key; compatibility checks; id checks."""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from engine.constants import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
from engine.errors import AdapterFormatError, IncompatibleAdaptersError, UnsupportedAdapterError
from engine.io.header import read_adapter_summary
from engine.io.local import check_compatible, load_adapter
from engine.io.scan import validate_repo_id, validate_task_id
from engine.types import LoRAWeights

P = "base_model.model.model.layers.0.self_attn"
LOADERS = [
    pytest.param(load_adapter, id="load_adapter"),
    pytest.param(read_adapter_summary, id="read_adapter_summary"),
]


def _config(**over) -> dict:
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": "base"}
    cfg.update(over)
    return cfg


def _tensors(r: int = 4, d: int = 16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for m in ("q_proj", "v_proj"):
        out[f"{P}.{m}.lora_A.weight"] = torch.randn(r, d, generator=g)
        out[f"{P}.{m}.lora_B.weight"] = torch.randn(d, r, generator=g)
    return out


def _write(folder: Path, tensors: dict | None = None, config: dict | str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if tensors is not None:
        save_file(tensors, str(folder / ADAPTER_WEIGHTS_NAME))
    if config is not None:
        text = config if isinstance(config, str) else json.dumps(config)
        (folder / ADAPTER_CONFIG_NAME).write_text(text)
    return folder


def test_valid_synthetic_adapter_loads(tmp_path):
    """The helpers make a good adapter; each test below breaks one thing."""
    folder = _write(tmp_path / "ok", _tensors(), _config())
    assert load_adapter(folder).ranks == {"model.layers.0.self_attn.q_proj": 4, "model.layers.0.self_attn.v_proj": 4}
    assert read_adapter_summary(folder).num_params == 2 * 4 * 32


# -- missing and refused files -----------------------------------------------------


@pytest.mark.parametrize("loader", LOADERS)
def test_missing_config(loader, tmp_path):
    folder = _write(tmp_path / "a", _tensors())
    with pytest.raises(AdapterFormatError) as ei:
        loader(folder)
    assert str(folder) in str(ei.value) and ADAPTER_CONFIG_NAME in str(ei.value)


@pytest.mark.parametrize("loader", LOADERS)
def test_missing_weights(loader, tmp_path):
    folder = _write(tmp_path / "a", None, _config())
    with pytest.raises(AdapterFormatError) as ei:
        loader(folder)
    assert str(folder) in str(ei.value) and ADAPTER_WEIGHTS_NAME in str(ei.value)


@pytest.mark.parametrize("loader", LOADERS)
def test_missing_path_and_empty_folder(loader, tmp_path):
    with pytest.raises(AdapterFormatError, match="no such file"):
        loader(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterFormatError, match="not an adapter folder"):
        loader(tmp_path / "empty")


class _Trap:
    """Unpickling this creates a marker folder: proof that a file was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("name", ["adapter_model.bin", "pytorch_model.bin"])
def test_pickle_only_folder_is_refused_and_never_unpickled(loader, name, tmp_path):
    marker = tmp_path / "UNPICKLED"
    payload = pickle.dumps(_Trap(marker))
    # the trap works: unpickling it does create the marker
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Trap(probe)))
    assert probe.is_dir()

    folder = _write(tmp_path / "a", None, _config())
    (folder / name).write_bytes(payload)
    with pytest.raises(AdapterFormatError) as ei:
        loader(folder)
    assert str(folder / name) in str(ei.value) and "pickle" in str(ei.value)
    with pytest.raises(AdapterFormatError, match="pickle"):
        loader(folder / name)
    assert not marker.exists()


# -- corrupt files ---------------------------------------------------------------


def _good_bytes(tmp_path: Path) -> bytes:
    return (_write(tmp_path / "good", _tensors(), _config()) / ADAPTER_WEIGHTS_NAME).read_bytes()


def _corrupt(tmp_path: Path, kind: str) -> bytes:
    good = _good_bytes(tmp_path)
    (n,) = struct.unpack("<Q", good[:8])
    if kind == "garbage":
        return b"this is not a safetensors file at all" * 3
    if kind == "empty":
        return b""
    if kind == "truncated":
        return good[: 8 + n + 100]
    if kind == "header_json":
        bad = b"{not json"
        return struct.pack("<Q", len(bad)) + bad
    if kind == "header_len":
        return struct.pack("<Q", 10**9) + good[8:]
    if kind == "header_not_object":
        bad = b"[1, 2, 3]"
        return struct.pack("<Q", len(bad)) + bad
    if kind == "bad_offsets":
        header = json.loads(good[8 : 8 + n])
        key = f"{P}.q_proj.lora_A.weight"
        header[key]["data_offsets"] = ["a", "b"]
        raw = json.dumps(header).encode()
        return struct.pack("<Q", len(raw)) + raw + good[8 + n :]
    if kind == "bad_dtype":
        header = json.loads(good[8 : 8 + n])
        header[f"{P}.q_proj.lora_A.weight"]["dtype"] = "F12"
        raw = json.dumps(header).encode()
        return struct.pack("<Q", len(raw)) + raw + good[8 + n :]
    raise AssertionError(kind)


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize(
    "kind", ["garbage", "empty", "truncated", "header_json", "header_len", "header_not_object", "bad_offsets", "bad_dtype"]
)
def test_corrupt_safetensors(loader, kind, tmp_path):
    data = _corrupt(tmp_path, kind)
    folder = _write(tmp_path / "a", None, _config())
    (folder / ADAPTER_WEIGHTS_NAME).write_bytes(data)
    with pytest.raises(AdapterFormatError) as ei:
        loader(folder)
    msg = str(ei.value)
    assert str(folder / ADAPTER_WEIGHTS_NAME) in msg
    if kind in ("truncated", "bad_offsets", "bad_dtype"):
        assert "lora_" in msg  # names the tensor


@pytest.mark.parametrize("loader", LOADERS)
def test_config_not_json(loader, tmp_path):
    folder = _write(tmp_path / "a", _tensors(), '{"r": 4,')
    with pytest.raises(AdapterFormatError) as ei:
        loader(folder)
    assert str(folder / ADAPTER_CONFIG_NAME) in str(ei.value) and "JSON" in str(ei.value)
    _write(folder, None, "[4, 8]")
    with pytest.raises(AdapterFormatError, match="JSON object"):
        loader(folder)


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize(
    "field,value",
    [
        ("r", "four"),
        ("r", 0),
        ("r", True),
        ("lora_alpha", "big"),
        ("rank_pattern", ["q_proj", 8]),
        ("rank_pattern", {"q_proj": "eight"}),
        ("alpha_pattern", {"v_proj": None}),
        ("target_modules", 5),
        ("use_rslora", "yes"),
    ],
)
def test_config_wrong_types(loader, field, value, tmp_path):
    folder = _write(tmp_path / "a", _tensors(), _config(**{field: value}))
    with pytest.raises(AdapterFormatError) as ei:
        loader(folder)
    assert str(folder / ADAPTER_CONFIG_NAME) in str(ei.value)
    assert f"'{field}'" in str(ei.value)


def test_config_problems_are_collected(tmp_path):
    folder = _write(tmp_path / "a", _tensors(), _config(r="x", lora_alpha=[1], target_modules={"q": 1}))
    with pytest.raises(AdapterFormatError) as ei:
        load_adapter(folder)
    assert all(f"'{k}'" in str(ei.value) for k in ("r", "lora_alpha", "target_modules"))


# -- wrong tensors ---------------------------------------------------------------


@pytest.mark.parametrize("loader", LOADERS)
def test_full_model_weights_are_not_lora(loader, tmp_path):
    from peft_factory import tiny_llama

    sd = {k: v.contiguous() for k, v in tiny_llama(hidden=16, layers=1).state_dict().items() if "lm_head" not in k}
    folder = _write(tmp_path / "a", sd, _config())
    with pytest.raises(AdapterFormatError) as ei:
        loader(folder)
    msg = str(ei.value)
    assert str(folder / ADAPTER_WEIGHTS_NAME) in msg and "not a LoRA adapter" in msg
    assert "model.embed_tokens.weight" in msg or "model.layers.0" in msg


@pytest.mark.parametrize("loader", LOADERS)
def test_stray_non_lora_tensor(loader, tmp_path):
    t = _tensors()
    t["base_model.model.model.layers.0.mlp.down_proj.weight"] = torch.zeros(4, 4)
    folder = _write(tmp_path / "a", t, _config())
    with pytest.raises(AdapterFormatError) as ei:
        loader(folder)
    assert "'base_model.model.model.layers.0.mlp.down_proj.weight'" in str(ei.value)
    assert "non-LoRA" in str(ei.value)


@pytest.mark.parametrize("loader", LOADERS)
def test_rank_mismatch_between_a_and_b(loader, tmp_path):
    t = _tensors()
    t[f"{P}.q_proj.lora_B.weight"] = torch.zeros(16, 3)
    folder = _write(tmp_path / "a", t, _config())
    with pytest.raises(AdapterFormatError) as ei:
        loader(folder)
    msg = str(ei.value)
    assert str(folder / ADAPTER_WEIGHTS_NAME) in msg
    assert "model.layers.0.self_attn.q_proj" in msg and "(4, 16)" in msg and "(16, 3)" in msg


@pytest.mark.parametrize("loader", LOADERS)
def test_lora_a_without_b(loader, tmp_path):
    t = _tensors()
    del t[f"{P}.v_proj.lora_B.weight"]
    folder = _write(tmp_path / "a", t, _config())
    with pytest.raises(AdapterFormatError) as ei:
        loader(folder)
    assert f"'{P}.v_proj.lora_A.weight' has no matching lora_B" in str(ei.value)


@pytest.mark.parametrize("loader", LOADERS)
def test_all_problems_are_collected(loader, tmp_path):
    t = _tensors()
    t[f"{P}.q_proj.lora_B.weight"] = torch.zeros(16, 3)
    del t[f"{P}.v_proj.lora_A.weight"]
    folder = _write(tmp_path / "a", t, _config())
    with pytest.raises(AdapterFormatError) as ei:
        loader(folder)
    msg = str(ei.value)
    assert "q_proj" in msg and "disagree on rank" in msg
    assert f"'{P}.v_proj.lora_B.weight' has no matching lora_A" in msg


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nan_inf_refused(value, tmp_path):
    t = _tensors()
    t[f"{P}.v_proj.lora_B.weight"][3, 1] = value
    folder = _write(tmp_path / "a", t, _config())
    with pytest.raises(AdapterFormatError) as ei:
        load_adapter(folder)
    assert str(folder / ADAPTER_WEIGHTS_NAME) in str(ei.value)
    assert f"{P}.v_proj.lora_B.weight" in str(ei.value) and "NaN/Inf" in str(ei.value)
    assert not torch.isfinite(load_adapter(folder, check_finite=False).lora_b["model.layers.0.self_attn.v_proj"]).all()


@pytest.mark.parametrize("loader", LOADERS)
def test_integer_factors_refused(loader, tmp_path):
    t = _tensors()
    t[f"{P}.q_proj.lora_A.weight"] = torch.zeros(4, 16, dtype=torch.int32)
    folder = _write(tmp_path / "a", t, _config())
    with pytest.raises(AdapterFormatError, match=rf"'{P}.q_proj.lora_A.weight' has dtype I32"):
        loader(folder)


@pytest.mark.parametrize("loader", LOADERS)
def test_dora_config_refused(loader, tmp_path):
    folder = _write(tmp_path / "a", _tensors(), _config(use_dora=True))
    with pytest.raises(UnsupportedAdapterError) as ei:
        loader(folder)
    assert str(folder / ADAPTER_CONFIG_NAME) in str(ei.value) and "use_dora" in str(ei.value)


@pytest.mark.parametrize("loader", LOADERS)
def test_dora_magnitude_vector_refused(loader, tmp_path):
    t = _tensors()
    t[f"{P}.q_proj.lora_magnitude_vector"] = torch.ones(16)
    folder = _write(tmp_path / "a", t, _config())  # a config that forgot use_dora
    with pytest.raises(UnsupportedAdapterError) as ei:
        loader(folder)
    assert str(folder / ADAPTER_WEIGHTS_NAME) in str(ei.value)
    assert f"'{P}.q_proj.lora_magnitude_vector'" in str(ei.value) and "DoRA" in str(ei.value)


@pytest.mark.parametrize("loader", LOADERS)
def test_embedding_lora_refused(loader, tmp_path):
    t = _tensors()
    t["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(4, 32)
    t["base_model.model.model.embed_tokens.lora_embedding_B"] = torch.zeros(16, 4)
    folder = _write(tmp_path / "a", t, _config(target_modules=["q_proj", "v_proj", "embed_tokens"]))
    with pytest.raises(UnsupportedAdapterError) as ei:
        loader(folder)
    assert "embedding LoRA" in str(ei.value) and "model.embed_tokens.lora_embedding_" in str(ei.value)


@pytest.mark.parametrize("loader", LOADERS)
def test_conv_lora_refused(loader, tmp_path):
    t = {
        "base_model.model.conv.lora_A.weight": torch.zeros(4, 3, 3, 3),
        "base_model.model.conv.lora_B.weight": torch.zeros(8, 4, 1, 1),
    }
    folder = _write(tmp_path / "a", t, _config(target_modules=["conv"]))
    with pytest.raises(AdapterFormatError) as ei:
        loader(folder)
    assert "'conv'" in str(ei.value) and "4-D" in str(ei.value) and str(folder / ADAPTER_WEIGHTS_NAME) in str(ei.value)


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("peft_type", ["IA3", "LOHA", "PREFIX_TUNING"])
def test_non_lora_peft_type_refused(loader, peft_type, tmp_path):
    folder = _write(tmp_path / "a", _tensors(), _config(peft_type=peft_type))
    with pytest.raises(UnsupportedAdapterError) as ei:
        loader(folder)
    assert str(folder / ADAPTER_CONFIG_NAME) in str(ei.value) and peft_type in str(ei.value)


@pytest.mark.parametrize("loader", LOADERS)
def test_rank_contradicts_config(loader, tmp_path):
    folder = _write(tmp_path / "a", _tensors(r=4), _config(r=8))
    with pytest.raises(AdapterFormatError) as ei:
        loader(folder)
    msg = str(ei.value)
    assert "model.layers.0.self_attn.q_proj" in msg and "rank 4" in msg and "r=8" in msg
    # a rank_pattern that explains the difference is fine
    tensors = _tensors(r=4)
    _write(folder, None, _config(r=8, rank_pattern={"q_proj": 4, "v_proj": 4}))
    got = loader(folder)
    # each module's rank is its tensors' (lora_A's rows), which the rank_pattern names
    want = {k.removeprefix("base_model.model.").removesuffix(".lora_A.weight"): int(v.shape[0])
            for k, v in tensors.items() if k.endswith(".lora_A.weight")}
    assert want == {"model.layers.0.self_attn.q_proj": 4, "model.layers.0.self_attn.v_proj": 4}
    if isinstance(got, LoRAWeights):
        assert got.ranks == want and got.rank == 8
        # PEFT's scale for a pattern rank: lora_alpha / rank_pattern[module] = 8 / 4
        assert {m: got.scale(m) for m in got.layer_names} == {m: 8 / 4 for m in want}
    else:
        assert {m.name: m.rank for m in got.modules} == want and got.rank == 8


@pytest.mark.parametrize("loader", LOADERS)
def test_several_adapter_names_refused(loader, tmp_path):
    t = {}
    for name, v in _tensors().items():
        t[name.replace(".weight", ".default.weight")] = v
        t[name.replace(".weight", ".other.weight")] = v.clone()
    folder = _write(tmp_path / "a", t, _config())
    with pytest.raises(AdapterFormatError, match="several adapters \\(default, other\\)"):
        loader(folder)


# -- check_compatible --------------------------------------------------------------


def _weights(name: str, *, r: int = 4, d: int = 16, base: str = "base", modules=("q_proj", "v_proj"), seed=0) -> LoRAWeights:
    g = torch.Generator().manual_seed(seed)
    names = [f"model.layers.0.self_attn.{m}" for m in modules]
    return LoRAWeights(
        layer_names=names,
        lora_a={n: torch.randn(r, d, generator=g) for n in names},
        lora_b={n: torch.randn(d, r, generator=g) for n in names},
        rank=r,
        metadata={"r": r, "lora_alpha": 8},
        base_model_name_or_path=base,
        name=name,
    )


def test_compatible_adapters_report():
    rep = check_compatible([_weights("a"), _weights("b", seed=1)])
    assert rep.modules == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    assert rep.shapes == dict.fromkeys(rep.modules, (16, 16))
    assert rep.base_model == "base" and not rep.mixed_ranks and rep.warnings == []


def test_incompatible_base_models():
    with pytest.raises(IncompatibleAdaptersError) as ei:
        check_compatible([_weights("a", base="llama-7b"), _weights("b", base="mistral-7b")])
    assert "llama-7b" in str(ei.value) and "mistral-7b" in str(ei.value)


def test_incompatible_module_sets():
    with pytest.raises(IncompatibleAdaptersError) as ei:
        check_compatible([_weights("a"), _weights("b", modules=("q_proj",))])
    msg = str(ei.value)
    assert "b lacks 1 module(s) of a" in msg and "'model.layers.0.self_attn.v_proj'" in msg
    with pytest.raises(IncompatibleAdaptersError, match="k_proj"):
        check_compatible([_weights("a"), _weights("c", modules=("q_proj", "v_proj", "k_proj"))])


def test_incompatible_shapes():
    with pytest.raises(IncompatibleAdaptersError) as ei:
        check_compatible([_weights("a"), _weights("b"), _weights("wide", d=32)])
    msg = str(ei.value)
    assert "wide" in msg and "model.layers.0.self_attn.q_proj" in msg and "(32, 32)" in msg and "(16, 16)" in msg


def test_mixed_ranks_reported_or_refused():
    adapters = [_weights("a", r=4), _weights("b", r=8)]
    rep = check_compatible(adapters)
    assert rep.mixed_ranks
    assert rep.ranks["model.layers.0.self_attn.q_proj"] == [4, 8]
    assert any("different ranks (4, 8)" in w for w in rep.warnings)
    with pytest.raises(IncompatibleAdaptersError, match="different ranks \\(4, 8\\)"):
        check_compatible(adapters, allow_mixed_ranks=False)


def test_check_compatible_empty():
    with pytest.raises(ValueError):
        check_compatible([])


# -- ids ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["", "..", "a..b", "../x", "a/b", "/abs", "a\\b", "..\\x", ".hidden", "a b", "x" * 200, None])
def test_validate_task_id_rejects(bad):
    with pytest.raises(ValueError, match="invalid task id"):
        validate_task_id(bad)


@pytest.mark.parametrize("good", ["sql-postgres", "task_1", "v1.2", "A"])
def test_validate_task_id_accepts(good):
    assert validate_task_id(good) == good


@pytest.mark.parametrize(
    "bad", ["", "..", "org/..", "../name", "org/../name", "/name", "org/", "a/b/c", "org\\name", "org/na me", "org/a..b", None]
)
def test_validate_repo_id_rejects(bad):
    with pytest.raises(ValueError, match="invalid Hub repo id"):
        validate_repo_id(bad)


@pytest.mark.parametrize("good", ["gpt2", "org/name", "Org-1/my_lora.v2"])
def test_validate_repo_id_accepts(good):
    assert validate_repo_id(good) == good


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("alpha", ["NaN", "Infinity", "-Infinity", "0", "0.0"])
def test_lora_alpha_must_be_finite_and_non_zero(loader, alpha, tmp_path):
    # Python's json reads NaN/Infinity as floats: they used to pass and crash later in an SVD
    text = json.dumps(_config()).replace('"lora_alpha": 8', f'"lora_alpha": {alpha}')
    folder = _write(tmp_path / "a", _tensors(), text)
    with pytest.raises(AdapterFormatError) as ei:
        loader(folder)
    assert str(folder / ADAPTER_CONFIG_NAME) in str(ei.value) and "lora_alpha" in str(ei.value)


def test_alpha_pattern_must_be_finite_and_non_zero(tmp_path):
    text = json.dumps(_config(alpha_pattern={"q_proj": 1})).replace('"q_proj": 1}', '"q_proj": NaN}')
    folder = _write(tmp_path / "a", _tensors(), text)
    with pytest.raises(AdapterFormatError, match="alpha_pattern"):
        load_adapter(folder)


def test_negative_alpha_loads_with_a_warning_naming_the_file(tmp_path):
    from engine.jobs import InlineRunner, JobRequest

    folder = _write(tmp_path / "a", _tensors(), _config(lora_alpha=-8))
    assert load_adapter(folder).lora_alpha == -8.0
    result = InlineRunner().run(JobRequest("validate", {"adapters": [str(folder)]}))
    assert result.ok
    (row,) = result.data["adapters"]
    assert row["ok"]
    assert [w for w in row["warnings"] if str(folder / ADAPTER_CONFIG_NAME) in w and "negative" in w]
    ok = _write(tmp_path / "b", _tensors(), _config())
    (row,) = InlineRunner().run(JobRequest("validate", {"adapters": [str(ok)]})).data["adapters"]
    assert not [w for w in row["warnings"] if "negative" in w]
