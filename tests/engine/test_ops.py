"""engine.ops: SVD helpers, Gram-Schmidt, incremental SVD, NF4, low-rank products."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine import ops


def test_compute_svd_matches_numpy():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 12, generator=g, dtype=torch.float64)
    comps, s, mean = ops.compute_svd(x, num_components=3)
    xc = x.numpy() - x.numpy().mean(0)
    _, s_np, vh_np = np.linalg.svd(xc, full_matrices=False)
    assert np.allclose(s.numpy(), s_np[:3])
    assert np.allclose(np.abs(comps.numpy() @ vh_np[:3].T), np.eye(3), atol=1e-10)
    assert torch.allclose(mean, x.mean(0))
    with pytest.raises(ValueError, match="NaN"):
        ops.compute_svd(torch.tensor([[float("nan"), 1.0]]))


def test_project_reconstruct_roundtrip_and_variance():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 9, generator=g, dtype=torch.float64)
    comps, s, mean = ops.compute_svd(x)
    load = ops.project_onto_subspace(x - mean, comps)
    assert torch.allclose(ops.reconstruct_from_subspace(comps, load) + mean, x, atol=1e-10)
    ev = ops.explained_variance_ratio(s)
    assert ev[-1] == pytest.approx(1.0) and bool((ev[1:] >= ev[:-1]).all())
    assert ops.select_num_components(torch.tensor([3.0, 1.0, 1.0]), 0.8) == 1
    assert ops.select_num_components(torch.tensor([3.0, 1.0, 1.0]), 0.9) == 2


def test_gram_schmidt_extends_orthonormally_and_drops_dependent():
    g = torch.Generator().manual_seed(2)
    q, _ = torch.linalg.qr(torch.randn(10, 3, generator=g, dtype=torch.float64))
    basis = q.T
    new = torch.cat([torch.randn(2, 10, generator=g, dtype=torch.float64), basis[:1] * 2.0])
    out = ops.gram_schmidt(basis, new)
    assert out.shape == (5, 10)
    assert torch.allclose(out[:3], basis)
    assert torch.allclose(out @ out.T, torch.eye(5, dtype=torch.float64), atol=1e-10)


def test_incremental_svd_equals_batch():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 20, generator=g, dtype=torch.float64)
    c, s, mean, n = ops.compute_svd(x[:3])[0], ops.compute_svd(x[:3])[1], x[:3].mean(0), 3
    for i in range(3, 8):
        c, s, mean, n = ops.incremental_svd_update(c, s, mean, n, x[i:i + 1])
    cb, sb, mb = ops.compute_svd(x)
    assert n == 8
    assert torch.allclose(mean, mb)
    assert torch.allclose(s, sb[: s.numel()], atol=1e-9)
    # same subspace
    assert torch.allclose(c.T @ c, cb[: c.shape[0]].T @ cb[: c.shape[0]], atol=1e-8)


def test_nf4_pack_unpack_and_levels():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(7, 19, generator=g)
    packed, absmax, numel = ops.nf4_pack(x, 64)
    assert numel == x.numel()
    assert packed.dtype == torch.uint8 and packed.numel() == (x.numel() + 1) // 2
    y = ops.nf4_unpack(packed, absmax, x.shape, 64)
    assert torch.allclose(y, ops.nf4_quantize_dequantize(x, 64))
    levels = torch.tensor(ops.NF4_LEVELS)
    blocks = torch.cat([y.reshape(-1), torch.zeros((-x.numel()) % 64)]).view(-1, 64) / absmax[:, None]
    assert bool(((blocks[..., None] - levels).abs().min(-1).values < 1e-5).all())
    # worst error is half the largest gap between levels, per block
    err = (y - x).abs().reshape(-1)
    assert float(err.max()) <= 0.5 * 0.2773 * float(absmax.max()) + 1e-6


def test_lowrank_products_match_dense():
    g = torch.Generator().manual_seed(5)
    b1, a1 = torch.randn(11, 3, generator=g), torch.randn(3, 9, generator=g)
    b2, a2 = torch.randn(11, 4, generator=g), torch.randn(4, 9, generator=g)
    d1, d2 = b1.double() @ a1.double(), b2.double() @ a2.double()
    assert float(ops.lowrank_inner(b1, a1, b2, a2)) == pytest.approx(float((d1 * d2).sum()), rel=1e-9)
    assert float(ops.lowrank_sqnorm(b1, a1)) == pytest.approx(float((d1 ** 2).sum()), rel=1e-9)
    assert ops.lowrank_rel_error(b1, a1, b2, a2) == pytest.approx(float((d1 - d2).norm() / d1.norm()), rel=1e-7)
    u, s, vh = ops.lowrank_svd(b1.double(), a1.double())
    assert torch.allclose((u * s) @ vh, d1, atol=1e-9)
    assert torch.allclose(s, torch.linalg.svdvals(d1)[:3], atol=1e-9)


def test_lowrank_norm_and_psd_sqrt():
    g = torch.Generator().manual_seed(6)
    b, a = torch.randn(10, 3, generator=g), torch.randn(3, 8, generator=g)
    d = b.double() @ a.double()
    assert ops.lowrank_norm(b, a) == pytest.approx(float(np.linalg.norm(d.numpy())), rel=1e-9)
    x = torch.randn(5, 3, generator=g, dtype=torch.float64)
    gram = x @ x.T  # rank 3: two zero eigenvalues, clipped
    lo = ops.psd_sqrt(gram)
    assert torch.allclose(lo @ lo.T, gram, atol=1e-10)
    m = (b.double() @ a.double()[:, :5]).numpy()  # 10×5
    sv = np.linalg.svd(m @ lo.numpy(), compute_uv=False)[:3]
    eig = np.linalg.eigvalsh(m @ gram.numpy() @ m.T)[::-1][:3]  # the spectrum of M·g·Mᵀ, independently
    assert np.allclose(sv, np.sqrt(eig), rtol=1e-8)
