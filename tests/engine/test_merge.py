"""Merging: against PEFT's add_weighted_adapter on PEFT-written adapters, and against dense references."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from engine.errors import IncompatibleAdaptersError, JobCancelled
from engine.io import load_adapter, save_adapter
from engine.merge import (
    cat_merge,
    dare_mask,
    dare_merge,
    linear_merge,
    merge_adapters,
    task_arithmetic,
    ties_merge,
)
from engine.types import LoRAWeights
from peft_factory import peft_logits, tiny_llama

ROOT = Path(__file__).resolve().parents[2]


# -- helpers -------------------------------------------------------------------


def _ids() -> torch.Tensor:
    # the same input peft_logits uses
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def _peft_merged_logits(dirs: list[Path], weights: list[float], combination_type: str, **kwargs) -> torch.Tensor:
    """Load every adapter into one PeftModel, merge with PEFT, return the merged adapter's logits."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(tiny_llama(), str(dirs[0]), adapter_name="a0")
    for i, d in enumerate(dirs[1:], start=1):
        model.load_adapter(str(d), adapter_name=f"a{i}")
    names = [f"a{i}" for i in range(len(dirs))]
    model.add_weighted_adapter(names, weights, "merged", combination_type=combination_type, **kwargs)
    model.set_adapter("merged")
    model.eval()
    with torch.no_grad():
        return model(input_ids=_ids()).logits.float()


def _our_logits(weights: LoRAWeights, tmp_path: Path, tag: str) -> torch.Tensor:
    out = save_adapter(weights, tmp_path / tag)
    return peft_logits(out)


def _base_logits() -> torch.Tensor:
    with torch.no_grad():
        return tiny_llama()(input_ids=_ids()).logits.float()


def _close(ours: torch.Tensor, theirs: torch.Tensor, rtol: float = 1e-4) -> None:
    base = _base_logits()
    # the merge must actually move the logits, or the comparison proves nothing
    assert float((theirs - base).abs().max()) > 1e-3
    err = float((ours - theirs).abs().max()) / float((theirs - base).abs().max())
    assert err < rtol, err


def _synthetic(seed: int, *, r: int = 3, out: int = 12, inn: int = 10, alpha: float = 6.0, rslora: bool = False,
               modules: tuple[str, ...] = ("m.0.q", "m.0.v", "m.1.q")) -> LoRAWeights:
    g = torch.Generator().manual_seed(seed)
    return LoRAWeights(
        layer_names=list(modules),
        lora_a={m: torch.randn(r, inn, generator=g, dtype=torch.float64).float() for m in modules},
        lora_b={m: torch.randn(out, r, generator=g, dtype=torch.float64).float() for m in modules},
        rank=r,
        lora_alpha=alpha,
        use_rslora=rslora,
        name=f"s{seed}",
    )


def _dense_sum(adapters: list[LoRAWeights], weights: list[float], m: str) -> torch.Tensor:
    return sum(w * a.delta_weight(m).double() for w, a in zip(weights, adapters))


@pytest.fixture(scope="module")
def family(peft_family_dirs) -> list[LoRAWeights]:
    return [load_adapter(d) for d in peft_family_dirs]


# -- PEFT references -------------------------------------------------------------


def test_cat_matches_peft_cat(peft_family_dirs, family, tmp_path):
    weights = [0.7, -0.4, 1.3]
    merged = cat_merge(family[:3], weights)
    assert merged.rank == 12 and all(r == 12 for r in merged.ranks.values())
    ours = _our_logits(merged, tmp_path, "cat")
    theirs = _peft_merged_logits(peft_family_dirs[:3], weights, "cat")
    _close(ours, theirs, 1e-5)


def test_exact_task_arithmetic_mixed_ranks_alpha_patterns_matches_peft_cat(peft_family_dirs, peft_variant_dirs, tmp_path):
    dirs = [peft_family_dirs[0], peft_variant_dirs["patterns"], peft_variant_dirs["rslora"]]
    adapters = [load_adapter(d) for d in dirs]
    weights = [1.0, 0.5, -0.8]
    merged = task_arithmetic(adapters, weights, rank="exact")
    # rank is Σ r_i per module: 4+4+8, and 4+8+8 where rank_pattern gives q_proj of layer 1 rank 8
    assert merged.ranks["model.layers.1.self_attn.q_proj"] == 20
    assert merged.ranks["model.layers.0.self_attn.q_proj"] == 16
    ours = _our_logits(merged, tmp_path, "ta")
    theirs = _peft_merged_logits(dirs, weights, "cat")
    _close(ours, theirs, 1e-5)
    # and the saved adapter reloads to the dense weighted sum, alpha/rsLoRA intact
    back = load_adapter(tmp_path / "ta")
    for m in back.layer_names:
        ref = _dense_sum(adapters, weights, m)
        assert torch.allclose(back.delta_weight(m).double(), ref, atol=1e-5 * float(ref.abs().max()))


def test_truncated_task_arithmetic_matches_peft_svd(peft_family_dirs, family, tmp_path):
    weights = [1.0, 0.6, -0.5]
    res = merge_adapters(family[:3], "task_arithmetic", weights=weights, rank=5)
    assert res.weights.rank == 5 and res.max_error > 0
    ours = _our_logits(res.weights, tmp_path, "svd")
    theirs = _peft_merged_logits(peft_family_dirs[:3], weights, "svd", svd_rank=5)
    _close(ours, theirs, 1e-4)


def test_ties_matches_peft_ties_svd_with_equal_weights(peft_family_dirs, family, tmp_path):
    # PEFT elects signs on unweighted trimmed tensors, we on weighted ones: equal weights make them agree
    weights = [0.8, 0.8, 0.8, 0.8]
    dirs = [peft_family_dirs[i] for i in (0, 1, 3, 4)]
    adapters = [family[i] for i in (0, 1, 3, 4)]
    merged = ties_merge(adapters, density=0.4, weights=weights, rank=6)
    ours = _our_logits(merged, tmp_path, "ties")
    theirs = _peft_merged_logits(dirs, weights, "ties_svd", density=0.4, svd_rank=6)
    _close(ours, theirs, 1e-4)


@pytest.mark.parametrize(("combination", "elect"), [("dare_linear_svd", False), ("dare_ties_svd", True)])
def test_dare_matches_peft_dare_svd_given_the_same_masks(peft_family_dirs, family, tmp_path, monkeypatch, combination, elect):
    """PEFT draws DARE masks from torch's global RNG; route them through ``dare_mask`` so both use the same masks.

    Everything else (rescaling, weighting, sign election, SVD) is PEFT's own code.
    """
    import peft.utils.merge_utils as mu

    seed, drop, n = 123, 0.3, 3
    calls = {"i": 0}

    def random_pruning(tensor, density, rescale):
        i = calls["i"]
        calls["i"] += 1
        mask = dare_mask(tensor.shape, 1.0 - density, seed, i // n, i % n)
        out = tensor * mask
        return out / density if rescale else out

    monkeypatch.setattr(mu, "random_pruning", random_pruning)
    weights = [1.0, 1.0, 1.0]
    merged = dare_merge(family[:n], drop_rate=drop, weights=weights, seed=seed, rank=4, elect_sign=elect)
    ours = _our_logits(merged, tmp_path, combination)
    theirs = _peft_merged_logits(peft_family_dirs[:n], weights, combination, density=1.0 - drop, svd_rank=4)
    assert calls["i"] == n * len(family[0].layer_names)
    _close(ours, theirs, 1e-4)


# -- the seed's factor-wise merge is wrong -----------------------------------------


def test_factor_wise_mean_is_not_the_mean_update_ours_is(family):
    m = family[0].layer_names[0]
    adapters = family[:3]
    mean_dw = sum(a.delta_weight(m) for a in adapters) / 3
    # the seed merged factors: mean(B) @ mean(A) (times the shared scale)
    s = adapters[0].scale(m)
    factor_wise = s * (sum(a.lora_b[m] for a in adapters) / 3) @ (sum(a.lora_a[m] for a in adapters) / 3)
    assert float((factor_wise - mean_dw).norm() / mean_dw.norm()) > 0.3
    ours = linear_merge(adapters).delta_weight(m)
    assert float((ours - mean_dw).norm() / mean_dw.norm()) < 1e-5


# -- dense references on small shapes ----------------------------------------------


def _ref_trim(d: torch.Tensor, density: float) -> torch.Tensor:
    k = int(density * d.numel())
    flat = d.reshape(-1)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.abs().argsort(descending=True)[:k]] = True
    return torch.where(keep.reshape(d.shape), d, torch.zeros_like(d))


def _ref_elect_merge(taus: list[torch.Tensor]) -> torch.Tensor:
    stack = torch.stack(taus)
    sign = torch.where(stack.sum(0) >= 0, 1.0, -1.0)
    agree = (torch.sign(stack) == sign) & (stack != 0)
    return (stack * agree).sum(0) / agree.sum(0).clamp(min=1)


def _best_rank_k(d: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
    u, s, vh = torch.linalg.svd(d.double(), full_matrices=False)
    approx = (u[:, :k] * s[:k]) @ vh[:k]
    return approx, float((d.double() - approx).norm() / d.double().norm())


@pytest.fixture()
def mixed() -> list[LoRAWeights]:
    return [_synthetic(0, r=3), _synthetic(1, r=2, alpha=4.0), _synthetic(2, r=5, rslora=True), _synthetic(3, r=3)]


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_against_dense_reference(mixed, density):
    weights = [1.0, -0.5, 2.0, 0.3]
    res = merge_adapters(mixed, "ties", weights=weights, density=density, rank=10)
    for m in mixed[0].layer_names:
        taus = [w * _ref_trim(a.delta_weight(m).double(), density) for w, a in zip(weights, mixed)]
        ref = _ref_elect_merge(taus)
        assert torch.allclose(res.weights.delta_weight(m).double(), ref, atol=1e-5 * float(ref.abs().max()))
        assert res.errors[m] < 1e-6  # rank 10 = full rank of a 12x10 update


@pytest.mark.parametrize("elect", [False, True])
def test_dare_against_dense_reference(mixed, elect):
    weights = [1.0, -0.5, 2.0, 0.3]
    drop, seed = 0.4, 7
    res = merge_adapters(mixed, "dare", weights=weights, drop_rate=drop, seed=seed, elect_sign=elect, rank=10)
    for mi, m in enumerate(mixed[0].layer_names):
        taus = []
        for i, (w, a) in enumerate(zip(weights, mixed)):
            d = a.delta_weight(m).double()
            taus.append(w * d * dare_mask(d.shape, drop, seed, mi, i) / (1 - drop))
        ref = _ref_elect_merge(taus) if elect else sum(taus)
        assert torch.allclose(res.weights.delta_weight(m).double(), ref, atol=1e-5 * float(ref.abs().max()))


def test_dare_is_unbiased_and_drops_the_right_share(mixed):
    m = mixed[0].layer_names[0]
    mask = dare_mask((400, 500), 0.3, 1, 0, 0)
    assert abs(float(mask.float().mean()) - 0.7) < 0.01
    weights = [1.0, -0.5, 2.0, 0.3]
    ref = _dense_sum(mixed, weights, m)
    runs = [merge_adapters(mixed, "dare", weights=weights, drop_rate=0.5, seed=s, rank=10).weights.delta_weight(m)
            for s in range(300)]
    mean = torch.stack(runs).double().mean(0)
    assert float((mean - ref).norm() / ref.norm()) < 0.1
    # same seed, same result; the drawn seed is recorded
    r1 = merge_adapters(mixed, "dare", weights=weights, seed=5, rank=4)
    r2 = merge_adapters(mixed, "dare", weights=weights, seed=5, rank=4)
    assert torch.equal(r1.weights.lora_b[m], r2.weights.lora_b[m])
    drawn = merge_adapters(mixed, "dare", rank=4)
    assert isinstance(drawn.params["seed"], int)


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_truncation_is_eckart_young_and_error_is_reported(mixed, rank):
    weights = [0.5, 1.0, -1.0, 0.25]
    res = merge_adapters(mixed, "task_arithmetic", weights=weights, rank=rank)
    for m in mixed[0].layer_names:
        dense = _dense_sum(mixed, weights, m)
        best, best_err = _best_rank_k(dense, rank)
        got = res.weights.delta_weight(m).double()
        assert res.weights.module_rank(m) == rank
        assert torch.allclose(got, best, atol=1e-4 * float(dense.abs().max()))
        measured = float((dense - got).norm() / dense.norm())
        assert res.errors[m] == pytest.approx(best_err, rel=1e-3, abs=1e-6)
        assert measured == pytest.approx(res.errors[m], rel=1e-3, abs=1e-5)
    assert 0 < res.overall_error <= res.max_error


def test_dense_truncation_error_matches_svd(mixed):
    res = merge_adapters(mixed, "ties", density=0.5, rank=3)
    for m in mixed[0].layer_names:
        dense = res.weights.delta_weight(m)  # rank-3 result; recompute the untruncated merge
        full = merge_adapters(mixed, "ties", density=0.5, rank=10).weights.delta_weight(m)
        _, err = _best_rank_k(full, 3)
        assert res.errors[m] == pytest.approx(err, rel=1e-3)
        assert float((full - dense).norm() / full.norm()) == pytest.approx(err, rel=1e-3)


def test_large_module_uses_randomized_svd_and_measures_its_error():
    # min(out, in) > 1024 takes the randomized path; error is measured, near the optimum for a low-rank-ish update
    mods = ("big",)
    adapters = [_synthetic(i, r=4, out=1100, inn=1030, modules=mods) for i in range(3)]
    res = merge_adapters(adapters, "ties", density=0.5, rank=8)
    full = merge_adapters(adapters, "ties", density=0.5, rank=8)  # deterministic
    assert torch.equal(res.weights.lora_a["big"], full.weights.lora_a["big"])
    assert 0 < res.errors["big"] < 1


def test_negative_weights_cancel_and_linear_normalizes(mixed):
    a = mixed[0]
    zero = task_arithmetic([a, a], [1.0, -1.0])
    for m in a.layer_names:
        assert float(zero.delta_weight(m).abs().max()) < 1e-5
    lin = linear_merge([mixed[0], mixed[1]], [3.0, 1.0])
    for m in a.layer_names:
        ref = 0.75 * mixed[0].delta_weight(m) + 0.25 * mixed[1].delta_weight(m)
        assert torch.allclose(lin.delta_weight(m), ref, atol=1e-5)
    with pytest.raises(ValueError, match="sum of weights"):
        linear_merge([a, a], [1.0, -1.0])


def test_output_keeps_alpha_rslora_and_dtype(peft_variant_dirs, family):
    rs = load_adapter(peft_variant_dirs["rslora"])
    merged = task_arithmetic([rs, family[0]], rank=6)
    assert merged.use_rslora and merged.lora_alpha == rs.lora_alpha and merged.rank == 6
    bf = load_adapter(peft_variant_dirs["bf16"])
    out = task_arithmetic([bf, family[0]])
    assert out.lora_a[out.layer_names[0]].dtype == torch.bfloat16


def test_extra_tensors_kept_from_one_adapter_and_when_identical(peft_variant_dirs, family):
    mts = load_adapter(peft_variant_dirs["mts"])
    one = merge_adapters([mts, family[0]], "cat")
    assert one.weights.extra_tensors and not one.warnings
    two = merge_adapters([mts, mts], "cat")  # the same head twice: kept (differing heads: tests/engine/test_mixed_folders.py)
    assert two.weights.extra_tensors.keys() == mts.extra_tensors.keys() and not two.warnings
    assert two.heads == {"lm_head": "identical"} and two.weights.metadata["modules_to_save"] == ["lm_head"]


# -- validation, progress, cancel, registry ----------------------------------------


def test_incompatible_adapters_raise(family, peft_variant_dirs):
    with pytest.raises(IncompatibleAdaptersError):
        task_arithmetic([family[0], load_adapter(peft_variant_dirs["qkvo"])])
    a = _synthetic(0)
    b = _synthetic(1, inn=11)
    for method in ("task_arithmetic", "ties", "dare"):
        with pytest.raises(IncompatibleAdaptersError, match="shape"):
            merge_adapters([a, b], method)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "ties", "rank": "exact"}, "dense"),
        ({"method": "task_arithmetic", "rank": 0}, "rank"),
        ({"method": "task_arithmetic", "rank": "big"}, "rank"),
        ({"method": "cat", "rank": 3}, "exact"),
        ({"method": "ties", "density": 1.5}, "density"),
        ({"method": "dare", "drop_rate": 1.0}, "drop_rate"),
        ({"method": "task_arithmetic", "weights": [1.0]}, "weights"),
        ({"method": "task_arithmetic", "weights": [1.0, float("nan")]}, "weights"),
        ({"method": "slerp"}, "method"),
    ],
)
def test_bad_arguments_raise_value_error(mixed, kwargs, match):
    with pytest.raises(ValueError, match=match):
        merge_adapters(mixed[:2], **kwargs)
    with pytest.raises(ValueError, match="no adapters"):
        merge_adapters([], "cat")


def test_progress_per_module_and_cancel(mixed):
    seen = []
    merge_adapters(mixed, "ties", rank=2, progress=seen.append)
    assert [p.step for p in seen] == [0, 1, 2, 3] and all(p.total == 3 for p in seen)
    ev = threading.Event()

    def stop_after_first(p):
        ev.set()

    with pytest.raises(JobCancelled):
        merge_adapters(mixed, "task_arithmetic", progress=stop_after_first, cancel=ev)


def test_rank_strings_from_forms(mixed):
    assert merge_adapters(mixed, "task_arithmetic", rank="4").weights.rank == 4
    assert merge_adapters(mixed, "ties", rank="auto").weights.rank == 5  # largest input rank
    assert merge_adapters(mixed, "task_arithmetic", rank="auto").weights.ranks[mixed[0].layer_names[0]] == 13


def test_registry_lists_every_method_and_runs_it(mixed):
    from engine.registry import get_method, methods

    found = methods("merge")
    assert set(found) == {"linear", "task_arithmetic", "cat", "ties", "dare"}
    for info in found.values():
        assert info.help and all(p.help for p in info.params)
        params = {p.name: p.validate(p.default) for p in info.params}
        res = info.func(mixed, **{k: v for k, v in params.items() if v is not None})
        assert res.method == info.name
        json.dumps(res.to_dict())
    dare = get_method("merge", "dare")
    assert {p.name for p in dare.params} >= {"drop_rate", "seed", "weights", "rank", "elect_sign"}


def test_method_registration_imports_without_torch():
    code = "import sys, engine.registry as r; r.methods('merge'); assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
