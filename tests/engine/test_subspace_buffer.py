"""The build's factor buffer (engine/subspace/passes.py ``_Buffer``): one reused block per module."""

from __future__ import annotations

import torch

from engine.subspace.common import effective_factors
from engine.subspace.passes import _Buffer
from engine.types import LoRAWeights


def _adapters(ranks: list[int]) -> list[LoRAWeights]:
    g = torch.Generator().manual_seed(0)
    return [LoRAWeights(layer_names=["m"], lora_a={"m": torch.randn(r, 40, generator=g).half()},
                        lora_b={"m": torch.randn(48, r, generator=g).half()}, rank=r, lora_alpha=3.0 * r, name=f"t{t}")
            for t, r in enumerate(ranks)]


def test_buffer_holds_exactly_the_effective_factors_and_grows_only_as_it_reads():
    """Views equal ``effective_factors`` bit for bit (mixed ranks, one past the cap); the block doubles up to cap + r."""
    ads = _adapters([16, 16, 4, 32, 16, 300, 8, 0, 16])
    buf = _Buffer(64)
    held: list[LoRAWeights] = []
    sizes = []
    for ad in ads:
        sb, a = buf.put(ad, "m")
        ref_sb, ref_a = effective_factors(ad, "m")
        assert torch.equal(sb, ref_sb) and torch.equal(a, ref_a)
        held.append(ad)
        sizes.append(buf.sbt.shape[0])
        if buf.full:
            sbs, as_, sb_all, a_all = buf.take()
            assert len(sbs) == len(held) and not buf.ranks and buf.cols == 0
            for x, s_i, a_i in zip(held, sbs, as_):
                r_sb, r_a = effective_factors(x, "m")
                assert torch.equal(s_i, r_sb) and torch.equal(a_i, r_a)
            assert torch.equal(sb_all, torch.cat([effective_factors(x, "m")[0] for x in held], 1))
            assert torch.equal(a_all, torch.cat([effective_factors(x, "m")[1] for x in held], 0))
            held = []
    assert sizes[:3] == [16, 32, 64]  # a shard of one or two adapters does not hold a block of cap columns
    assert max(sizes) == 16 + 300  # a rank past the cap, after one adapter of 16: the columns held, no more


def test_one_small_adapter_holds_only_its_columns():
    buf = _Buffer(256)
    buf.put(_adapters([8])[0], "m")
    assert buf.sbt.shape[0] == 8 and buf.at.shape[0] == 8
