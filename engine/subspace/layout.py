"""The packed tensor layout of format version 2: every stored tensor of a file in one uint8 tensor.

Each tensor of a subspace file is described in the manifest by a short spec string,
``<key>=<shape>:<format>``, e.g. ``a=6x384:int6``, ``U=384x12:f16`` or ``sigma=4x4:nf4/32/dq``:

- ``<shape>``: the dimensions joined by ``x`` (empty for a scalar);
- ``<format>``: a plain dtype (``f16``, ``bf16``, ``f32``, ``f64``: the values' raw bytes), or a
  block quantisation ``int8``/``int6``/``int5``/``int4``/``int3`` (symmetric) or ``nf4``, then
  ``/<block size>`` unless it is 64, then ``/f32`` (fp32 scales) or ``/dq`` (double-quantised
  scales) unless the scales are fp16.

The bytes of a file's tensors follow one another in the order of its specs; a
quantised tensor is its parts in the order of :meth:`QuantizedTensor.tensors` (codes,
bit-packed below 8 bits; then the scales, or ``scale_codes``, ``scale_absmax``,
``scale_mean``). Every part's dtype and length follow from the spec
(:func:`part_layout`), so the layout needs no offsets, and a file whose packed tensor
has another length than its specs need is refused. Pure functions, no I/O.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

from .packing import packed_nbytes
from .quant import SCALE_BLOCK, SYMMETRIC_BITS, QuantizedTensor

#: Name of the one uint8 tensor of a version-2 file that holds the packed bytes.
PACKED = "packed"
DEFAULT_BLOCK = 64
_PLAIN = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32, "f64": torch.float64}
_PLAIN_NAME = {v: k for k, v in _PLAIN.items()}
_SPEC = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=((?:[0-9]+(?:x[0-9]+)*)?):([a-z0-9]+)(?:/([0-9]+))?(?:/(f32|dq))?$")


def spec(key: str, t: Tensor, qt: QuantizedTensor | None) -> str:
    """The spec string of tensor ``key`` stored as ``t`` (plain) or as ``qt`` (quantised)."""
    if qt is None:
        if t.dtype not in _PLAIN_NAME:
            raise ValueError(f"tensor {key!r}: cannot store dtype {t.dtype} in a packed file")
        return f"{key}={'x'.join(str(int(d)) for d in t.shape)}:{_PLAIN_NAME[t.dtype]}"
    fmt = "nf4" if qt.method == "nf4" else f"int{qt.bits}"
    if qt.block_size != DEFAULT_BLOCK:
        fmt += f"/{qt.block_size}"
    if qt.double_quant:
        fmt += "/dq"
    elif qt.scales is not None and qt.scales.dtype != torch.float16:
        fmt += "/f32"
    return f"{key}={'x'.join(str(int(d)) for d in qt.shape)}:{fmt}"


def parse_spec(s: Any) -> dict[str, Any]:
    """``{"key", "shape", "dtype"}`` (plain) or ``{"key", "shape", "quant": info of QuantizedTensor.info(), "scales"}``.

    Raises:
        ValueError: not a spec string as :func:`spec` writes them.
    """
    m = _SPEC.match(s) if isinstance(s, str) else None
    fmt = m.group(3) if m else ""
    quant = fmt == "nf4" or (fmt.startswith("int") and fmt[3:].isdigit() and int(fmt[3:]) in SYMMETRIC_BITS)
    if not m or not (fmt in _PLAIN or quant) or (not quant and (m.group(4) or m.group(5))):
        raise ValueError("must be a tensor spec '<key>=<d0>x<d1>…:<format>' (format f16, bf16, f32, f64, "
                         f"int8/6/5/4/3 or nf4, then /<block>, /f32 or /dq), got {s!r}"[:300])
    shape = [int(d) for d in m.group(2).split("x")] if m.group(2) else []
    if not quant:
        return {"key": m.group(1), "shape": shape, "dtype": _PLAIN[fmt]}
    block = int(m.group(4) or DEFAULT_BLOCK)
    if block < 2 or block % 2:
        raise ValueError(f"block size must be an even number >= 2, got {block} in {s!r}")
    info = {"shape": shape, "method": "nf4" if fmt == "nf4" else "symmetric", "bits": 4 if fmt == "nf4" else int(fmt[3:]),
            "block_size": block, "double_quant": m.group(5) == "dq"}
    return {"key": m.group(1), "shape": shape, "quant": info, "scales": {"dq": None, "f32": torch.float32}.get(m.group(5) or "", torch.float16)}


def part_layout(parsed: dict[str, Any]) -> list[tuple[str, torch.dtype, int]]:
    """``(part, dtype, numel)`` of each stored part of a parsed spec, in file order."""
    n = 1
    for d in parsed["shape"]:
        n *= d
    if "quant" not in parsed:
        return [("", parsed["dtype"], n)]
    q = parsed["quant"]
    blocks = -(-n // q["block_size"])
    parts = [("codes", torch.uint8, n if q["bits"] == 8 else packed_nbytes(n, q["bits"]))]
    if q["double_quant"]:
        return parts + [("scale_codes", torch.int8, blocks), ("scale_absmax", torch.float32, -(-blocks // SCALE_BLOCK)),
                        ("scale_mean", torch.float32, 1)]
    return parts + [("scales", parsed["scales"], blocks)]


def _nbytes(dtype: torch.dtype, n: int) -> int:
    return n * torch.empty((), dtype=dtype).element_size()


def pack(items: list[tuple[str, Tensor, QuantizedTensor | None]]) -> tuple[list[str], Tensor]:
    """The specs of ``(key, tensor, quantised or None)`` items and the one uint8 tensor of their bytes."""
    specs, chunks = [], []
    for key, t, qt in items:
        s = spec(key, t, qt)
        stored = {"": t} if qt is None else qt.tensors()
        for part, dtype, n in part_layout(parse_spec(s)):
            v = stored[part]
            if v.dtype != dtype or v.numel() != n:  # the writer and part_layout disagree: a bug, not bad input
                raise RuntimeError(f"tensor {key!r} part {part or 'values'}: {v.dtype} × {v.numel()}, layout says {dtype} × {n}")
            chunks.append(v.detach().contiguous().reshape(-1).view(torch.uint8))
        specs.append(s)
    return specs, (torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.uint8))


def nbytes(specs: list[str]) -> int:
    """Bytes the tensors of ``specs`` take in a packed tensor.

    Raises:
        ValueError: a spec that does not parse.
    """
    return sum(_nbytes(dtype, n) for s in specs for _, dtype, n in part_layout(parse_spec(s)))


def unpack(groups: list[list[str]], packed: Tensor) -> list[dict[str, Tensor | QuantizedTensor]]:
    """Inverse of :func:`pack` for the groups of specs packed one after another (a file's modules, in order).

    Returns:
        Per group, key → plain tensor or :class:`QuantizedTensor`, bit for bit as packed.

    Raises:
        ValueError: a spec that does not parse, a key twice in a group, or a packed tensor of another
            length than the specs need.
    """
    need = sum(nbytes(g) for g in groups)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != need:
        raise ValueError(f"the packed tensor holds {packed.numel()} {str(packed.dtype).replace('torch.', '')} values, "
                         f"its layout in the manifest needs {need} bytes")
    out: list[dict[str, Tensor | QuantizedTensor]] = []
    offset = 0
    for group in groups:
        values: dict[str, Tensor | QuantizedTensor] = {}
        for p in map(parse_spec, group):
            if p["key"] in values:
                raise ValueError(f"tensor {p['key']!r} appears twice in one module's specs")
            parts: dict[str, Tensor] = {}
            for part, dtype, n in part_layout(p):
                size = _nbytes(dtype, n)
                parts[part] = packed[offset:offset + size].clone().view(dtype)
                offset += size
            values[p["key"]] = QuantizedTensor.from_parts(p["quant"], parts) if "quant" in p else parts[""].reshape(p["shape"])
        out.append(values)
    return out
