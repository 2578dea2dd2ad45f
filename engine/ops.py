"""Pure tensor building blocks for shared subspaces (names as in the ``vlora`` package).

Stateless functions on raw tensors: no adapter or subspace concepts here. The
low-rank helpers at the end keep every norm and inner product of LoRA updates
in r×r / k×k products, never forming an out×in matrix.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: QLoRA's 16 NormalFloat-4 levels (Dettmers et al., 2023, arXiv:2305.14314).
NF4_LEVELS: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


#: The seed's name for the NF4 levels, as a float32 tensor.
NF4_QUANT_TABLE: Tensor = torch.tensor(NF4_LEVELS, dtype=torch.float32)


def _nf4_table(device: torch.device | str | None = None) -> Tensor:
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


def compute_svd(
    data_matrix: Tensor, num_components: int | None = None, center: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k principal directions of the rows of ``data_matrix``.

    Args:
        data_matrix: ``(N, D)``, one observation per row.
        num_components: Directions to keep (``None``: all, ``min(N, D)``).
        center: Subtract the row mean first.

    Returns:
        ``(components (k, D), singular_values (k,), mean (D,))``; ``mean`` is
        zeros when ``center`` is false.

    Raises:
        ValueError: not a 2-D matrix, non-finite values, or ``num_components < 1``.
    """
    if data_matrix.ndim != 2:
        raise ValueError(f"compute_svd: expected a 2-D (N, D) matrix, got shape {tuple(data_matrix.shape)}")
    if not bool(torch.isfinite(data_matrix).all()):
        raise ValueError("compute_svd: the data matrix holds NaN or Inf")
    if num_components is not None and num_components < 1:
        raise ValueError(f"compute_svd: num_components must be >= 1, got {num_components}")
    x = data_matrix
    mean = x.mean(dim=0) if center else torch.zeros(x.shape[1], dtype=x.dtype, device=x.device)
    if center:
        x = x - mean
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    k = s.shape[0] if num_components is None else min(int(num_components), s.shape[0])
    return vh[:k], s[:k], mean


def project_onto_subspace(weights: Tensor, components: Tensor) -> Tensor:
    """Coefficients of ``weights`` ``(D,)`` or ``(N, D)`` in the orthonormal rows of ``components`` ``(k, D)``."""
    return weights @ components.T


def reconstruct_from_subspace(components: Tensor, loadings: Tensor) -> Tensor:
    """Inverse of :func:`project_onto_subspace`: ``loadings @ components``."""
    return loadings @ components


def gram_schmidt(basis: Tensor, new_vectors: Tensor, tol: float = 1e-6) -> Tensor:
    """Extend the orthonormal rows of ``basis`` ``(k, D)`` with the new directions in ``new_vectors`` ``(m, D)``.

    Two passes of classical Gram-Schmidt against the basis (re-orthogonalisation
    keeps it orthonormal to working precision), then a pivoting QR of what is
    left; a candidate whose residual is below ``tol`` times its norm is dropped.

    Returns:
        ``(k + j, D)`` with ``j <= m``; the first ``k`` rows are ``basis`` unchanged.
    """
    if new_vectors.ndim == 1:
        new_vectors = new_vectors[None]
    dtype = basis.dtype if basis.numel() else new_vectors.dtype
    x = new_vectors.to(dtype)
    norms = x.norm(dim=1).clamp_min(torch.finfo(x.dtype).tiny)
    for _ in range(2):
        if basis.shape[0]:
            x = x - (x @ basis.T) @ basis
    out = [basis]
    kept: list[Tensor] = []
    for i in range(x.shape[0]):
        v = x[i]
        for q in kept:
            v = v - (v @ q) * q
        for q in kept:
            v = v - (v @ q) * q
        if basis.shape[0]:
            v = v - (v @ basis.T) @ basis
        n = v.norm()
        if n > tol * norms[i] and n > 0:
            kept.append(v / n)
    if kept:
        out.append(torch.stack(kept))
    return torch.cat(out, dim=0) if len(out) > 1 else basis


def explained_variance_ratio(singular_values: Tensor) -> Tensor:
    """Cumulative share of variance ``Σ_{j<=k} s_j² / Σ s_j²`` for each k (zeros if all are zero).

    Summed in float64, returned in the input's dtype (as the seed does).
    """
    v = singular_values.double() ** 2
    total = v.sum()
    if total <= 0:
        return torch.zeros_like(singular_values)
    return (torch.cumsum(v, 0) / total).to(singular_values.dtype)


def select_num_components(singular_values: Tensor, threshold: float = 0.6) -> int:
    """Smallest k whose cumulative explained variance reaches ``threshold`` (at least 1)."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"variance threshold must be in (0, 1], got {threshold}")
    cum = explained_variance_ratio(singular_values)
    hit = (cum >= threshold - 1e-12).nonzero()
    return int(hit[0, 0]) + 1 if hit.numel() else max(1, int(singular_values.shape[0]))


def incremental_svd_update(
    components: Tensor,
    singular_values: Tensor,
    mean: Tensor,
    n_seen: int,
    new_data: Tensor,
    max_components: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, int]:
    """Fold new rows into a centred SVD without revisiting old data.

    The old data enter through their sketch ``diag(s) @ components``; the mean
    shift is carried by one extra row ``sqrt(n·m/(n+m)) (mean_old - mean_new_rows)``
    (the incremental PCA of Ross et al., 2008). Without truncation the result
    equals the batch SVD of all rows seen; with ``max_components`` it keeps the
    top directions.

    Args:
        components: ``(k, D)`` orthonormal rows.
        singular_values: ``(k,)``.
        mean: ``(D,)`` mean of the ``n_seen`` rows.
        n_seen: Rows seen so far (0 for an empty start).
        new_data: ``(m, D)`` new rows.
        max_components: Keep at most this many directions.

    Returns:
        ``(components, singular_values, mean, n_seen + m)``.
    """
    if new_data.ndim == 1:
        new_data = new_data[None]
    m = new_data.shape[0]
    n = int(n_seen)
    total = n + m
    batch_mean = new_data.mean(dim=0)
    new_mean = (mean * n + batch_mean * m) / total if n else batch_mean
    rows = [new_data - batch_mean]
    if n:
        rows.insert(0, singular_values[:, None] * components)
        rows.append((((n * m) / total) ** 0.5 * (mean - batch_mean))[None])
    stacked = torch.cat(rows, dim=0)
    _, s, vh = torch.linalg.svd(stacked, full_matrices=False)
    keep = int((s > s.max() * 1e-10).sum()) if s.numel() and s.max() > 0 else 0
    if max_components is not None:
        keep = min(keep, int(max_components))
    return vh[:keep], s[:keep], new_mean, total


# -- NF4 -------------------------------------------------------------------
def _blocks(tensor: Tensor, block_size: int) -> tuple[Tensor, int]:
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    flat = tensor.detach().float().reshape(-1)
    n = flat.numel()
    pad = (-n) % block_size
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, block_size), n


def _nf4_codes(blocks: Tensor) -> tuple[Tensor, Tensor]:
    absmax = blocks.abs().amax(dim=1)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    table = _nf4_table(blocks.device)
    mid = (table[:-1] + table[1:]) / 2
    codes = torch.bucketize(blocks / safe[:, None], mid).to(torch.uint8)
    return codes, absmax


def _double_quant(absmax: Tensor, group: int) -> Tensor:
    """QLoRA's double quantisation of the block scales, simulated: 8-bit per group of ``group`` scales."""
    if group < 1:
        raise ValueError(f"double_quant_block_size must be >= 1, got {group}")
    n = absmax.numel()
    pad = (-n) % group
    flat = torch.cat([absmax, absmax.new_ones(pad)]) if pad else absmax
    g = flat.view(-1, group)
    gmax = g.abs().amax(dim=1, keepdim=True).clamp_min(1e-10)
    q = (g / gmax * 127.0).round().clamp(-127.0, 127.0) / 127.0
    return (q * gmax).reshape(-1)[:n]


def nf4_quantize_dequantize(
    tensor: Tensor, block_size: int = 64, double_quant: bool = False, double_quant_block_size: int = 256
) -> Tensor:
    """Round ``tensor`` to NF4 (per-block absmax scaling) and back; same shape and dtype.

    Args:
        tensor: Any float tensor.
        block_size: Elements per absmax block.
        double_quant: Also round the block scales to 8 bits per group of
            ``double_quant_block_size`` scales (QLoRA's double quantisation).
        double_quant_block_size: Scales per second-level group.
    """
    blocks, n = _blocks(tensor, block_size)
    codes, absmax = _nf4_codes(blocks)
    if double_quant:
        absmax = _double_quant(absmax, double_quant_block_size)
    deq = _nf4_table(blocks.device)[codes.long()] * absmax[:, None]
    return deq.reshape(-1)[:n].reshape(tensor.shape).to(tensor.dtype)


def pack_nibbles(codes: Tensor) -> Tensor:
    """Pack 4-bit codes (uint8 values 0..15) two per byte; first value in the low nibble."""
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.view(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).contiguous()


def unpack_nibbles(packed: Tensor, numel: int) -> Tensor:
    """Inverse of :func:`pack_nibbles`: ``numel`` uint8 codes."""
    p = packed.reshape(-1).to(torch.uint8)
    out = torch.stack([p & 0x0F, p >> 4], dim=1).reshape(-1)
    if out.numel() < numel:
        raise ValueError(f"packed 4-bit data holds {out.numel()} values, expected {numel}")
    return out[:numel]


def nf4_pack(tensor: Tensor, block_size: int = 64) -> tuple[Tensor, Tensor, int]:
    """NF4-quantise ``tensor`` into packed bytes (two codes a byte) and per-block absmax scales.

    Returns:
        ``(packed uint8 (ceil(numel/2),), absmax float32 (num_blocks,), numel)`` (the seed's triple).
    """
    blocks, n = _blocks(tensor, block_size)
    codes, absmax = _nf4_codes(blocks)
    return pack_nibbles(codes.reshape(-1)[:n]), absmax, n


def nf4_unpack(
    packed: Tensor,
    absmax: Tensor,
    numel: int | tuple[int, ...] | torch.Size,
    block_size: int = 64,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Dequantise the output of :func:`nf4_pack`.

    Args:
        packed: The packed codes.
        absmax: The block scales.
        numel: The element count (returns a flat tensor, as the seed) or a shape.
        block_size: The block size used to pack.
        dtype: The output dtype.
    """
    shape = (int(numel),) if isinstance(numel, int) else tuple(numel)
    n = 1
    for d in shape:
        n *= int(d)
    codes = unpack_nibbles(packed, n).long()
    pad = (-n) % block_size
    if pad:
        codes = torch.cat([codes, codes.new_zeros(pad)])
    blocks = codes.view(-1, block_size)
    if blocks.shape[0] != absmax.numel():
        raise ValueError(f"NF4 data has {blocks.shape[0]} blocks but {absmax.numel()} scales")
    deq = _nf4_table(packed.device)[blocks] * absmax.float().reshape(-1, 1)
    return deq.reshape(-1)[:n].reshape(tuple(shape)).to(dtype)


# -- low-rank products -----------------------------------------------------
def lowrank_inner(b1: Tensor, a1: Tensor, b2: Tensor, a2: Tensor) -> Tensor:
    """Frobenius inner product ``⟨B1·A1, B2·A2⟩ = tr((B1ᵀB2)(A2A1ᵀ))`` in float64, through r×r products."""
    b1, a1, b2, a2 = (t.double() for t in (b1, a1, b2, a2))
    return torch.einsum("ij,ji->", b1.T @ b2, a2 @ a1.T)


def lowrank_sqnorm(b: Tensor, a: Tensor) -> Tensor:
    """``‖B·A‖_F²`` as ``tr((BᵀB)(AAᵀ))`` in float64."""
    b, a = b.double(), a.double()
    return torch.einsum("ij,ji->", b.T @ b, a @ a.T)


def lowrank_norm(b: Tensor, a: Tensor) -> float:
    """``‖B·A‖_F`` (the square root of :func:`lowrank_sqnorm`, rounding below zero clipped)."""
    return max(float(lowrank_sqnorm(b, a)), 0.0) ** 0.5


def psd_sqrt(g: Tensor) -> Tensor:
    """A factor ``L`` with ``L·Lᵀ = g`` of a symmetric PSD matrix ``g`` (eigen-decomposition, negatives clipped).

    ``L = Q·diag(√λ)``, not the symmetric root ``Q·diag(√λ)·Qᵀ``: the two differ by an
    orthogonal factor on the right, which no Gram matrix ``X·L·Lᵀ·Xᵀ`` (or its spectrum) sees.
    """
    w, q = torch.linalg.eigh(g)
    return q * w.clamp_min(0).sqrt()


def lowrank_rel_error(b: Tensor, a: Tensor, b_hat: Tensor, a_hat: Tensor) -> float:
    """``‖BA − B̂Â‖_F / ‖BA‖_F`` through small products (0 when both are zero, inf if only BA is)."""
    n2 = float(lowrank_sqnorm(b, a))
    h2 = float(lowrank_sqnorm(b_hat, a_hat))
    cross = float(lowrank_inner(b, a, b_hat, a_hat))
    err2 = max(0.0, n2 - 2.0 * cross + h2)
    if n2 <= 0.0:
        return 0.0 if err2 <= 0.0 else float("inf")
    return (err2 / n2) ** 0.5


def lowrank_svd(b: Tensor, a: Tensor, rtol: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of ``B·A`` (out×r · r×in) without forming it: ``(U (out×q), S (q,), Vh (q×in))``.

    Uses QR of ``B`` and ``Aᵀ`` and an r×r SVD. Directions with singular value
    at most ``rtol·s_max`` are dropped.
    """
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    if s.numel() and rtol > 0:
        keep = int((s > rtol * s[0]).sum())
        u, s, vh = u[:, :keep], s[:keep], vh[:keep]
    return qb @ u, s, vh @ qa.T


__all__ = [
    "NF4_LEVELS",
    "NF4_QUANT_TABLE",
    "compute_svd",
    "explained_variance_ratio",
    "gram_schmidt",
    "incremental_svd_update",
    "lowrank_inner",
    "lowrank_norm",
    "lowrank_rel_error",
    "lowrank_sqnorm",
    "lowrank_svd",
    "nf4_pack",
    "nf4_quantize_dequantize",
    "nf4_unpack",
    "pack_nibbles",
    "project_onto_subspace",
    "psd_sqrt",
    "reconstruct_from_subspace",
    "select_num_components",
    "unpack_nibbles",
]
