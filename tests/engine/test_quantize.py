"""Block quantisation: error bounds, packing, double quantisation, subspace re-measurement."""

from __future__ import annotations

import pytest
import torch

from engine.subspace.quant import quantize_tensor


@pytest.mark.parametrize("bits", [8, 4])
def test_symmetric_error_bound_and_packing(bits):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(33, 17, generator=g)
    qt = quantize_tensor(x, bits=bits, method="symmetric", block_size=64)
    y = qt.dequantize()
    qmax = (1 << (bits - 1)) - 1
    flat = torch.cat([x.reshape(-1), torch.zeros((-x.numel()) % 64)]).view(-1, 64)
    bound = (flat.abs().amax(1) / qmax / 2).repeat_interleave(64)[: x.numel()]
    assert bool(((y - x).abs().reshape(-1) <= bound + 1e-6).all())
    expected_codes = x.numel() if bits == 8 else (x.numel() + 1) // 2
    assert qt.codes.numel() == expected_codes and qt.codes.dtype == torch.uint8


def test_nf4_double_quant_is_close_and_smaller():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(64, 128, generator=g)
    plain = quantize_tensor(x, method="nf4")
    dq = quantize_tensor(x, method="nf4", double_quant=True)
    assert dq.nbytes < plain.nbytes
    rel = float((dq.dequantize() - plain.dequantize()).norm() / plain.dequantize().norm())
    assert rel < 0.01
    assert float((plain.dequantize() - x).norm() / x.norm()) < 0.15


def test_bad_arguments():
    with pytest.raises(ValueError, match="bits"):
        quantize_tensor(torch.zeros(4), bits=2)
    with pytest.raises(ValueError, match="method"):
        quantize_tensor(torch.zeros(4), method="int2")


def test_nf4_job_double_quantizes_by_default_as_documented(tmp_path, demo_dir) -> None:
    """The nf4 method's registered default (double_quant=True) applies when the flag is not given."""
    from engine.jobs import InlineRunner, JobRequest

    sub = tmp_path / "s"
    r = InlineRunner().run(JobRequest("compress", {"adapters": [str(demo_dir)], "output": str(sub), "max_error": 0.05}))
    assert r.ok, r.error
    r = InlineRunner().run(JobRequest("quantize", {"subspace": str(sub), "output": str(tmp_path / "q"), "bits": 4, "method": "nf4"}))
    assert r.ok, r.error
    assert r.data["quantization"]["double_quant"] is True
    r = InlineRunner().run(JobRequest("quantize", {"subspace": str(sub), "output": str(tmp_path / "q2"), "bits": 4,
                                                   "method": "nf4", "double_quant": False}))
    assert r.ok and r.data["quantization"]["double_quant"] is False
