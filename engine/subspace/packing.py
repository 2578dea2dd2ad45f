"""Bit packing of small integer codes: ``n`` values of ``bits`` bits each in ``ceil(n·bits/8)`` bytes.

Values are written least significant bit first into a little-endian bit stream, so
a 4-bit stream is the same bytes as :func:`engine.ops.pack_nibbles` (first value in
the low nibble). Pure tensor functions, no I/O.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Bit widths :func:`pack_bits` packs (8 is a plain byte per value).
PACKED_BITS = (1, 2, 3, 4, 5, 6, 7, 8)


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes :func:`pack_bits` writes for ``numel`` values of ``bits`` bits."""
    return (numel * bits + 7) // 8


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack unsigned codes (each ``< 2**bits``) into a uint8 bit stream, LSB first.

    Raises:
        ValueError: a width outside :data:`PACKED_BITS` or a code that does not fit.
    """
    if bits not in PACKED_BITS:
        raise ValueError(f"bits must be one of {', '.join(map(str, PACKED_BITS))}, got {bits}")
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] for {bits}-bit packing")
    if bits == 8:
        return flat.to(torch.uint8).contiguous()
    shifts = torch.arange(bits, dtype=torch.int64)
    stream = ((flat[:, None] >> shifts) & 1).reshape(-1)  # n·bits bits, LSB of each value first
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    weights = (1 << torch.arange(8, dtype=torch.int64))
    return (stream.view(-1, 8) * weights).sum(1).to(torch.uint8).contiguous()


def unpack_bits(packed: Tensor, numel: int, bits: int) -> Tensor:
    """Inverse of :func:`pack_bits`: ``numel`` codes as uint8.

    Raises:
        ValueError: a width outside :data:`PACKED_BITS`, or fewer bytes than ``numel`` values need.
    """
    if bits not in PACKED_BITS:
        raise ValueError(f"bits must be one of {', '.join(map(str, PACKED_BITS))}, got {bits}")
    p = packed.reshape(-1).to(torch.int64)
    need = packed_nbytes(numel, bits)
    if p.numel() < need:
        raise ValueError(f"packed {bits}-bit data holds {p.numel()} bytes, {numel} values need {need}")
    if bits == 8:
        return p[:numel].to(torch.uint8)
    stream = ((p[:need, None] >> torch.arange(8, dtype=torch.int64)) & 1).reshape(-1)[: numel * bits]
    vals = (stream.view(numel, bits) << torch.arange(bits, dtype=torch.int64)).sum(1)
    return vals.to(torch.uint8)
