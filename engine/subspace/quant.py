"""Block quantisation of subspace tensors: symmetric int8/int6/int5/int4/int3 and NF4, with double-quantised scales.

A :class:`QuantizedTensor` holds what goes on disk (codes, 3–6-bit codes
bit-packed (:mod:`engine.subspace.packing`; 4-bit: two a byte), block scales
(fp32, or fp16 for the precision search), optionally themselves quantised to
8 bits as in QLoRA) and dequantises to the float tensor the math uses. The
manifest's ``bits`` says how the codes are packed, so loading detects it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .. import ops
from .packing import pack_bits, unpack_bits

QUANT_METHODS = ("symmetric", "nf4")
#: Block size of the second-level quantisation of block scales (QLoRA uses 256).
SCALE_BLOCK = 256
#: Bit widths of the symmetric method (3, 5 and 6 bit-packed; 4 two a byte; 8 a byte each).
SYMMETRIC_BITS = (8, 6, 5, 4, 3)


@dataclass
class QuantizedTensor:
    """One quantised tensor.

    Attributes:
        shape: Original shape.
        method: ``symmetric`` or ``nf4``.
        bits: 8, 6, 5, 4 or 3 (NF4 is 4).
        block_size: Elements per scale block.
        codes: uint8 codes; below 8 bits bit-packed (4 bits: two a byte).
        scales: float32 (or float16) per-block scales (absent when double-quantised).
        scale_codes: int8 codes of ``scale - scale_mean`` (double quantisation).
        scale_absmax: float32 absmax per :data:`SCALE_BLOCK` scales.
        scale_mean: float32 scalar mean of the scales.
    """

    shape: tuple[int, ...]
    method: str
    bits: int
    block_size: int
    codes: Tensor
    scales: Tensor | None = None
    scale_codes: Tensor | None = None
    scale_absmax: Tensor | None = None
    scale_mean: Tensor | None = None

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= int(d)
        return n

    @property
    def double_quant(self) -> bool:
        return self.scale_codes is not None

    def tensors(self) -> dict[str, Tensor]:
        """Stored parts by suffix (for safetensors)."""
        out = {"codes": self.codes}
        for k in ("scales", "scale_codes", "scale_absmax", "scale_mean"):
            v = getattr(self, k)
            if v is not None:
                out[k] = v
        return out

    @property
    def nbytes(self) -> int:
        return int(sum(t.numel() * t.element_size() for t in self.tensors().values()))

    def info(self) -> dict[str, Any]:
        """JSON description for the manifest."""
        return {"shape": list(self.shape), "method": self.method, "bits": self.bits, "block_size": self.block_size,
                "double_quant": self.double_quant}

    @classmethod
    def from_parts(cls, info: dict[str, Any], parts: dict[str, Tensor]) -> QuantizedTensor:
        """Rebuild from :meth:`info` and :meth:`tensors` (as read back from disk)."""
        return cls(shape=tuple(int(d) for d in info["shape"]), method=str(info["method"]), bits=int(info["bits"]),
                   block_size=int(info["block_size"]), codes=parts["codes"], scales=parts.get("scales"),
                   scale_codes=parts.get("scale_codes"), scale_absmax=parts.get("scale_absmax"),
                   scale_mean=parts.get("scale_mean"))

    def block_scales(self) -> Tensor:
        if self.scale_codes is None:
            assert self.scales is not None
            return self.scales.float()
        assert self.scale_absmax is not None and self.scale_mean is not None
        q = self.scale_codes.to(torch.int8).float()
        n = q.numel()
        pad = (-n) % SCALE_BLOCK
        if pad:
            q = torch.cat([q, q.new_zeros(pad)])
        deq = (q.view(-1, SCALE_BLOCK) * (self.scale_absmax.float()[:, None] / 127.0)).reshape(-1)[:n]
        return (deq + self.scale_mean.float()).clamp_min(0.0)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        scales = self.block_scales()
        n = self.numel
        if self.method == "nf4":
            return ops.nf4_unpack(self.codes, scales, self.shape, self.block_size, dtype)
        if self.bits == 4:
            q = ops.unpack_nibbles(self.codes, n).to(torch.int16) - 8
        elif self.bits < 8:
            q = unpack_bits(self.codes, n, self.bits).to(torch.int16) - (1 << (self.bits - 1))
        else:
            q = self.codes.view(torch.int8).to(torch.int16)
        q = q.float()
        pad = (-n) % self.block_size
        if pad:
            q = torch.cat([q, q.new_zeros(pad)])
        qmax = (1 << (self.bits - 1)) - 1
        deq = q.view(-1, self.block_size) * (scales[:, None] / qmax)
        return deq.reshape(-1)[:n].reshape(self.shape).to(dtype)


def _blocks(flat: Tensor, size: int) -> tuple[Tensor, int]:
    """``flat`` zero-padded to a whole number of blocks, as ``(blocks × size)``, and its true length."""
    n = flat.numel()
    pad = (-n) % size
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, size), n


def _double_quantize(scales: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    mean = scales.mean()
    centred = scales - mean
    blocks, n = _blocks(centred, SCALE_BLOCK)
    absmax = blocks.abs().amax(dim=1)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    q = torch.round(blocks / safe[:, None] * 127.0).clamp(-127, 127).to(torch.int8)
    return q.reshape(-1)[:n].contiguous(), absmax.float(), mean.reshape(1).float()


def quantize_tensor(
    tensor: Tensor, *, bits: int = 8, method: str = "symmetric", block_size: int = 64, double_quant: bool = False,
    scale_dtype: torch.dtype = torch.float32,
) -> QuantizedTensor:
    """Quantise one tensor per block of ``block_size`` elements.

    Args:
        tensor: Any float tensor.
        bits: 8, 6, 5, 4 or 3 for ``symmetric``; NF4 is always 4.
        method: ``symmetric`` (absmax → int) or ``nf4`` (QLoRA's levels).
        block_size: Elements per scale.
        double_quant: Quantise the fp32 block scales to int8 per 256 (QLoRA's double quantisation).
        scale_dtype: Storage dtype of the block scales (``float16`` halves them; the codes are
            computed against the rounded scales, so dequantising gives what was measured).

    Raises:
        ValueError: unknown method, bits, or block size.
    """
    if method not in QUANT_METHODS:
        raise ValueError(f"quantization method must be one of {', '.join(QUANT_METHODS)}, got {method!r}")
    if method == "symmetric" and bits not in SYMMETRIC_BITS:
        more = ", ".join(str(b) for b in sorted(set(SYMMETRIC_BITS) - {4, 8}))
        raise ValueError(f"bits must be 4 or 8 (vlora's), or {more}: symmetric quantization needs bits "
                         f"{', '.join(map(str, SYMMETRIC_BITS))}, got {bits}")
    if scale_dtype not in (torch.float32, torch.float16):
        raise ValueError(f"scale_dtype must be float32 or float16, got {scale_dtype}")
    if method == "nf4":
        bits = 4
    if block_size < 2 or block_size % 2:
        raise ValueError(f"block_size must be an even number >= 2, got {block_size}")
    shape = tuple(int(d) for d in tensor.shape)
    if method == "nf4":
        codes, scales, _ = ops.nf4_pack(tensor, block_size)
        scales = scales.to(scale_dtype)
    else:
        blocks, n = _blocks(tensor.detach().float().reshape(-1), block_size)
        scales = blocks.abs().amax(dim=1).to(scale_dtype)  # rounded first: the codes are made against what is stored
        qmax = (1 << (bits - 1)) - 1
        sf = scales.float()
        safe = torch.where(sf > 0, sf, torch.ones_like(sf))
        q = torch.round(blocks / safe[:, None] * qmax).clamp(-qmax, qmax).reshape(-1)[:n]
        if bits == 8:
            codes = q.to(torch.int8).view(torch.uint8).contiguous()
        elif bits == 4:
            codes = ops.pack_nibbles((q + 8).to(torch.uint8))
        else:
            codes = pack_bits((q + (1 << (bits - 1))).to(torch.int64), bits)
    qt = QuantizedTensor(shape=shape, method=method, bits=bits, block_size=block_size, codes=codes,
                         scales=scales if scale_dtype == torch.float16 else scales.float())
    if double_quant:
        qt.scale_codes, qt.scale_absmax, qt.scale_mean = _double_quantize(scales.float())
        qt.scales = None
    return qt


def fake_quantize(tensor: Tensor, bits: int, block_size: int = 64, scale_dtype: torch.dtype = torch.float16) -> Tensor:
    """``quantize_tensor(tensor, bits=bits, block_size=block_size, scale_dtype=scale_dtype).dequantize()`` without packing.

    The same float32 values, bit for bit (the same operations in the same order), for
    trying many precisions cheaply; the one kept is then quantised for real.
    """
    blocks, n = _blocks(tensor.detach().float().reshape(-1), block_size)
    scales = blocks.abs().amax(dim=1).to(scale_dtype).float()
    qmax = (1 << (bits - 1)) - 1
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(blocks / safe[:, None] * qmax).clamp(-qmax, qmax)
    deq = q * (scales[:, None] / qmax)
    return deq.reshape(-1)[:n].reshape(tensor.shape)
