"""benchmarks/_real_bench.py: the fixed-precision baseline's quantiser and the retained share (no model needed)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _real_bench as rb  # noqa: E402


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_matches_a_blockwise_computation(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    t = torch.randn(8, 100, generator=g)  # 800 values: 12.5 blocks of 64, the last one padded
    stored, deq = rb.quantize(t, bits)
    qmax = 2 ** (bits - 1) - 1
    flat = t.reshape(-1).tolist()
    want = []
    for i in range(0, len(flat), 64):
        blk = flat[i:i + 64]
        s = float(torch.tensor(max(abs(x) for x in blk) / qmax).half())
        want += [max(-qmax, min(qmax, round(x / s))) * s for x in blk]
    assert torch.allclose(deq.reshape(-1), torch.tensor(want), atol=1e-6)
    n_blocks = -(-800 // 64)
    assert stored["scales"].numel() == n_blocks and stored["scales"].dtype == torch.float16
    assert stored["codes"].numel() * stored["codes"].element_size() == (n_blocks * 64 * bits) // 8


def test_retained_share_is_relative_to_the_head_only_gain() -> None:
    ref = {"acc_orig": {"a": 1.0, "b": 0.9, "c": 0.52}, "acc_head": {"a": 0.5, "b": 0.6, "c": 0.5}}
    got = rb.retained({"a": 0.75, "b": 0.9, "c": 0.1}, ref)
    assert got["ret_n"] == 2  # c gains 2 points: no share to retain
    assert got["ret_min"] == pytest.approx(0.5) and got["ret_worst"] == "a"
    assert got["ret_mean"] == pytest.approx(0.75)
