"""Bounded statistics (engine/subspace/bounded.py): past the memory budget the build holds sums, not per-task projections."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from engine.executors import InProcessExecutor
from engine.subspace import SharedSubspace
from engine.subspace.chunks import bounded_stat_bytes, module_stat_bytes, plan_build
from engine.subspace.joint import JointParams
from engine.types import LoRAWeights

MODS = ["layers.0.q_proj", "layers.0.v_proj"]


def _collection(n: int = 40, d: int = 48, r: int = 4, seed: int = 3) -> list[LoRAWeights]:
    """``n`` tasks in 3 families (a common space each) plus noise: more summed rank than the sketch holds."""
    g = torch.Generator().manual_seed(seed)
    fam = [{m: (torch.linalg.qr(torch.randn(d, 6, generator=g))[0], torch.linalg.qr(torch.randn(d, 6, generator=g))[0])
            for m in MODS} for _ in range(3)]
    ads = []
    for t in range(n):
        cu_cv = fam[t % 3]
        a = {m: torch.randn(r, 6, generator=g) @ cu_cv[m][1].T * 0.1 + torch.randn(r, d, generator=g) * 0.004 for m in MODS}
        b = {m: cu_cv[m][0] @ torch.randn(6, r, generator=g) * 0.1 for m in MODS}
        ads.append(LoRAWeights(layer_names=list(MODS), lora_a=a, lora_b=b, rank=r, lora_alpha=2.0 * r, name=f"t{t}"))
    return ads


@pytest.fixture(scope="module")
def ads():
    return _collection()


def _same(s1: SharedSubspace, s2: SharedSubspace) -> None:
    assert {m: b.kind for m, b in s1.modules.items()} == {m: b.kind for m, b in s2.modules.items()}
    assert s1.k_per_module == s2.k_per_module
    assert s1.compression_stats()["stored_bytes"] == s2.compression_stats()["stored_bytes"]
    for m in s1.modules:
        assert s1.modules[m].explained == pytest.approx(s2.modules[m].explained, rel=1e-6, abs=1e-9)
    for t in s1.task_ids:
        assert s1.tasks[t].fidelity == pytest.approx(s2.tasks[t].fidelity, rel=1e-6, abs=1e-9)
        w1, w2 = s1.reconstruct(t), s2.reconstruct(t)
        for m in w1.layer_names:
            d1, d2 = w1.delta_weight(m), w2.delta_weight(m)
            assert torch.allclose(d1, d2, atol=1e-5 * max(1.0, float(d1.norm())))


def _nbytes(x: Any) -> int:
    """Bytes of every tensor (and float) reachable in a pass's partial result."""
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, dict):
        return sum(_nbytes(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(v) for v in x)
    if isinstance(x, (int, float)):
        return 8
    if hasattr(x, "__dict__"):
        return sum(_nbytes(v) for v in vars(x).values())
    return 0


class Recording(InProcessExecutor):
    """In-process shards that record the bytes of each statistics pass's results (the coefficients' pass aside)."""

    def __init__(self, shards: int) -> None:
        super().__init__(shards)
        self.held: list[int] = []

    def map_reduce(self, fn, shards, combine, **kw):  # type: ignore[override]
        out = super().map_reduce(fn, shards, combine, **kw)
        if fn.__name__ != "coefficients_map":
            self.held.append(_nbytes(out))
        return out


SETTINGS = {
    "variance": {},
    "max_error": {"max_error": 0.08},
    "mean_error": {"mean_error": 0.06, "max_error": 0.2},
    "k5_refine2": {"num_components": 5, "refine": 2},
    "auto": {"mean_error": 0.06, "precision": "auto"},
}


@pytest.mark.parametrize("method", ["joint", "share"])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_past_the_sketch_width_equals_the_held_build(ads, method, setting):
    """Summed ranks 160 > sketch_rank 24: bounded statistics (3 shards) give the held build's subspace.

    The reference is the held build one module per chunk (as the bounded one here: with
    ``precision="auto"`` and ``mean_error`` each chunk meets the budget on its own modules).
    """
    kw = {"sketch_rank": 24, **SETTINGS[setting]}
    one = module_stat_bytes(method, (48, 48), [4] * len(ads), 24)
    held = SharedSubspace.from_adapters(ads, method=method, memory_budget_mb=1.5 * one / 2**20, **kw)
    events = []
    bounded = SharedSubspace.from_adapters(ads, method=method, memory_budget_mb=1e-9, progress=events.append,
                                           executor=InProcessExecutor(shards=3), **kw)
    assert any(e.message.startswith("error tables:") for e in events)  # the bounded path ran
    _same(held, bounded)
    steps = [e.step for e in events]
    assert steps == sorted(steps) and steps[-1] < events[0].total


def test_a_budget_below_the_held_statistics_is_kept(ads):
    """A budget smaller than one module's held statistics: what the passes hold stays within what the planner counts."""
    shapes = {m: (48, 48) for m in MODS}
    ranks = {m: [4] * len(ads) for m in MODS}
    p = JointParams(sketch_rank=24)
    held = module_stat_bytes("joint", (48, 48), ranks[MODS[0]], 24)
    small = bounded_stat_bytes((48, 48), ranks[MODS[0]], 24)
    budget = (small + held) / 2  # between: the old planner could not keep one module within it
    assert small < budget < held
    chunks, bounded, sizes = plan_build("joint", p, shapes, ranks, budget / 2**20)
    assert bounded == set(MODS) and chunks == [[MODS[0]], [MODS[1]]]
    assert all(sum(sizes[m] for m in c) <= budget for c in chunks)

    rec = Recording(3)
    SharedSubspace.from_adapters(ads, method="joint", memory_budget_mb=budget / 2**20, sketch_rank=24, executor=rec)
    assert rec.held and max(rec.held) <= budget
    assert max(rec.held) <= max(sizes.values())
    # the held statistics of the same build: their projections pass holds more (N·K·r per side)
    rec_old = Recording(3)
    SharedSubspace.from_adapters(ads, method="joint", memory_budget_mb=None, sketch_rank=24, executor=rec_old)
    assert max(rec_old.held) > 3 * max(rec.held)


def test_bounded_bytes_do_not_grow_with_n():
    """7B-shaped modules (4096², r16): held statistics grow N·K·r; bounded ones by 3 scalars per task."""
    h1, h2 = (module_stat_bytes("joint", (4096, 4096), [16] * n, 256) for n in (1000, 4000))
    b1, b2 = (bounded_stat_bytes((4096, 4096), [16] * n, 256) for n in (1000, 4000))
    assert h2 - h1 > 3000 * 2 * 256 * 16 * 8  # the per-task projections
    assert b2 - b1 == 3000 * 3 * 8
    budget_mb = 256
    shapes = {f"model.layers.{i}.self_attn.{q}": (4096, 4096) for i in range(32) for q in ("q_proj", "v_proj")}
    ranks = {m: [16] * 4000 for m in shapes}
    assert h2 > budget_mb * 2**20  # one module alone: more than the budget
    chunks, bounded, sizes = plan_build("joint", JointParams(), shapes, ranks, budget_mb)
    assert bounded == set(shapes)
    assert all(sum(sizes[m] for m in c) <= budget_mb * 2**20 for c in chunks)
    assert [m for c in chunks for m in c] == sorted(shapes)
