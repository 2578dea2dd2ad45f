"""``quantize(max_error=…/mean_error=…)``: the cheapest rank and precision per module of a saved subspace meeting the
target, checked from exported PEFT folders against the original adapters; brute force on a tiny case."""

from __future__ import annotations

import itertools

import pytest
import torch

from engine import ops
from engine.io.local import load_adapter, save_adapter
from engine.subspace import SharedSubspace
from engine.subspace.precision import BITS, PRECISIONS, QUANT_OVERHEAD_BYTES
from engine.subspace.quant import quantize_tensor


def _disk(d):
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def _exported_errors(sub, originals, tmp):
    """Per task: per module ‖ΔW−ΔŴ‖/‖ΔW‖ and the overall one (weighted by ‖ΔW‖²), dense, from exported PEFT folders."""
    out = {}
    for orig in originals:
        back = load_adapter(save_adapter(sub.reconstruct(orig.name), tmp / orig.name))
        per, num, den = {}, 0.0, 0.0
        for m in orig.layer_names:
            d0 = orig.lora_b[m].double() @ orig.lora_a[m].double() * orig.scale(m)
            d1 = back.lora_b[m].double() @ back.lora_a[m].double() * back.scale(m)
            per[m] = float((d0 - d1).norm() / d0.norm())
            num += float((d0 - d1).norm()) ** 2
            den += float(d0.norm()) ** 2
        out[orig.name] = (per, (num / den) ** 0.5)
    return out


@pytest.fixture(scope="module")
def originals(peft_family_dirs):
    return [load_adapter(p) for p in peft_family_dirs]


@pytest.fixture(scope="module")
def plain(originals, tmp_path_factory):
    """Per method: an unquantised fp16 subspace at max error 0.04, saved."""
    root = tmp_path_factory.mktemp("plain")
    return {m: SharedSubspace.from_adapters(originals, method=m, max_error=0.04).save(root / m) for m in ("joint", "svd")}


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("method", ["joint", "svd"])
def test_max_error_never_exceeded_and_smaller_on_disk(method, exact, plain, originals, tmp_path):
    target = 0.08
    sub = SharedSubspace.load(plain[method])
    sub.quantize(max_error=target, adapters=originals if exact else None)
    rep = sub.last_quantize
    assert rep["errors"] == ("exact" if exact else "bound") and rep["held"] == []
    assert sub.k_rule["max_error"] == target and sub.k_rule["rule"] == "max_error"
    assert sub.quantized, "some tensor is stored below fp16"
    out = sub.save(tmp_path / "q")
    assert _disk(out) < _disk(plain[method])
    loaded = SharedSubspace.load(out)
    assert loaded.k_rule["max_error"] == target and loaded.quantization["method"] == "auto"
    measured = _exported_errors(loaded, originals, tmp_path / "exp")
    for tid, (per, _) in measured.items():
        for m, e in per.items():
            assert e <= target + 1e-6, (tid, m)
            recorded = loaded.tasks[tid].fidelity[m]
            if exact:
                assert e == pytest.approx(recorded, rel=1e-4, abs=1e-6)
            else:
                assert e <= recorded + 1e-6  # the bound is never below the truth
        row = next(r for r in rep["tasks"] if r["task_id"] == tid)
        assert row["after"]["max"] == pytest.approx(max(loaded.tasks[tid].fidelity.values()))
        assert row["bytes_after"] <= row["bytes_before"]


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("method", ["joint", "svd"])
def test_mean_error_met_per_task(method, exact, plain, originals, tmp_path):
    target = 0.07
    sub = SharedSubspace.load(plain[method])
    by_max = SharedSubspace.load(plain[method]).quantize(max_error=target, adapters=originals if exact else None)
    sub.quantize(mean_error=target, adapters=originals if exact else None)
    assert sub.k_rule["mean_error"] == target and sub.k_rule["mean_over"] == "task"
    out = sub.save(tmp_path / "q")
    assert _disk(out) <= _disk(by_max.save(tmp_path / "max")) < _disk(plain[method])
    loaded = SharedSubspace.load(out)
    for tid, (_, overall) in _exported_errors(loaded, originals, tmp_path / "exp").items():
        assert overall <= target + 1e-5, tid
        row = next(r for r in sub.last_quantize["tasks"] if r["task_id"] == tid)
        assert overall <= row["after"]["overall"] + 1e-5
        assert row["after"]["overall"] <= target + 1e-6
    assert loaded.target_breaks({}, loaded.fidelity()) == []


def test_tasks_over_the_target_keep_their_storage(plain, originals):
    sub = SharedSubspace.load(plain["svd"])
    before = {t: {m: {k: v.clone() for k, v in c.items()} for m, c in p.coeffs.items()} for t, p in sub.tasks.items()}
    worst = max(sub.tasks.values(), key=lambda p: p.max_error)
    target = worst.max_error * 0.999  # below the worst stored error: that task is held where it is over
    sub.quantize(max_error=target)
    rep = sub.last_quantize
    assert worst.task_id in rep["held"]
    for m, e in worst.fidelity.items():
        if e > target:
            assert all(torch.equal(v, before[worst.task_id][m][k]) for k, v in worst.coeffs[m].items())
    for t, p in sub.tasks.items():
        if t not in rep["held"]:
            assert p.max_error <= target + 1e-9


def test_bad_targets(plain):
    sub = SharedSubspace.load(plain["svd"])
    for kw in ({"max_error": 0.0}, {"mean_error": 1.2}, {"max_error": float("nan")}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            sub.quantize(**kw)


def _bytes(numel, prec, elem=2):
    return numel * elem if prec == "fp16" else (numel * BITS[prec] + 7) // 8 + 2 * -(-numel // 64) + QUANT_OVERHEAD_BYTES


def _rounded(t, prec):
    if prec == "fp16":
        return t.half().double()
    return quantize_tensor(t.float(), bits=BITS[prec], method="symmetric", block_size=64,
                           scale_dtype=torch.float16).dequantize(torch.float32).double()


def test_per_task_choice_equals_brute_force(originals, tmp_path):
    """Two tasks stored per task: each (task, module) at the fewest bytes of every (rank, precision of B, of A),
    quantised for real, or the stored factors as they are, whose dense error against the original meets the target."""
    target = 0.06
    sub = SharedSubspace.from_adapters(originals[:2], method="svd", max_error=0.02)
    stored = {t: {m: {k: v.clone() for k, v in c.items()} for m, c in p.coeffs.items()} for t, p in sub.tasks.items()}
    sub.quantize(max_error=target, adapters=originals[:2])
    for orig in originals[:2]:
        proj = sub.tasks[orig.name]
        for m in orig.layer_names:
            d0 = orig.lora_b[m].double() @ orig.lora_a[m].double() * orig.scale(m)
            b0, a0 = stored[orig.name][m]["b"].double(), stored[orig.name][m]["a"].double()
            keep = b0.numel() * 2 + a0.numel() * 2
            best = keep if float((d0 - b0 @ a0).norm() / d0.norm()) <= target else None
            uu, s, vh = ops.lowrank_svd(b0, a0)
            for q, pb, pa in itertools.product(range(s.numel() + 1), PRECISIONS, PRECISIONS):
                cost = _bytes(uu.shape[0] * q, pb) + _bytes(q * vh.shape[1], pa)
                if best is not None and cost >= best:
                    continue
                b, a = _rounded(uu[:, :q], pb), _rounded(s[:q, None] * vh[:q], pa)
                if float((d0 - b @ a).norm() / d0.norm()) <= target:
                    best = cost
            got = sum((sub.quantized[(orig.name, m, k)].nbytes + QUANT_OVERHEAD_BYTES)
                      if (orig.name, m, k) in sub.quantized else t.numel() * 2 for k, t in proj.coeffs[m].items())
            assert got == best, (orig.name, m)
