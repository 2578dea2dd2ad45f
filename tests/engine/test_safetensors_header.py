"""The torch-free header reader accepts exactly the files safetensors itself accepts."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from engine.errors import AdapterFormatError
from engine.io.header import read_safetensors_header

_F8 = '{"dtype":"F32","shape":[2],"data_offsets":[0,8]}'
_U64 = 2**64 - 1


def _info(start: int, end: int, shape: list[int] | None = None, dtype: str = "F32") -> dict:
    return {"dtype": dtype, "shape": [2] if shape is None else shape, "data_offsets": [start, end]}


def _raw(header: object) -> bytes:
    return json.dumps(header).encode()


# name -> (header bytes, data bytes, header length written or None for the true one)
CASES: dict[str, tuple[bytes, bytes, int | None]] = {
    "valid": (_raw({"__metadata__": {"format": "pt"}, "a": _info(0, 8), "b": _info(8, 16)}), bytes(16), None),
    "valid_any_order": (_raw({"b": _info(8, 16), "a": _info(0, 8)}), bytes(16), None),
    "valid_empty": (b"{}", b"", None),
    "valid_null_metadata": (_raw({"__metadata__": None, "a": _info(0, 8)}), bytes(8), None),
    "valid_zero_size_tensors": (_raw({"z": _info(0, 0, [0]), "a": _info(0, 8), "y": _info(8, 8, [2, 0])}), bytes(8), None),
    "valid_padded_header": (_raw({"a": _info(0, 8)}) + b"    ", bytes(8), None),
    "valid_packed_f4": (_raw({"a": _info(0, 2, [4], "F4")}), bytes(2), None),
    "valid_scalar": (_raw({"a": _info(0, 4, [])}), bytes(4), None),
    "valid_extra_field": (_raw({"a": {**_info(0, 8), "note": -0}}), bytes(8), None),
    "valid_duplicate_tensor_last_wins": (('{"a":' + _F8 + ',"a":' + _raw(_info(0, 4, [1])).decode() + "}").encode(), bytes(4), None),
    "overlap": (_raw({"a": _info(0, 8), "b": _info(4, 12)}), bytes(16), None),
    "hole": (_raw({"a": _info(0, 8), "b": _info(12, 20)}), bytes(20), None),
    "starts_late": (_raw({"a": _info(4, 12)}), bytes(12), None),
    "trailing_data": (_raw({"a": _info(0, 8)}), bytes(12), None),
    "empty_with_data": (b"{}", bytes(4), None),
    "end_before_start": (_raw({"a": _info(8, 0)}), bytes(8), None),
    "size_mismatch": (_raw({"a": _info(0, 12)}), bytes(12), None),
    "f4_half_byte": (_raw({"a": _info(0, 2, [3], "F4")}), bytes(2), None),
    "metadata_int_value": (_raw({"__metadata__": {"x": 1}, "a": _info(0, 8)}), bytes(8), None),
    "metadata_null_value": (_raw({"__metadata__": {"x": None}}), b"", None),
    "metadata_not_object": (_raw({"__metadata__": "x"}), b"", None),
    "duplicate_metadata": (b'{"__metadata__":{},"__metadata__":{}}', b"", None),
    "duplicate_dtype_field": (b'{"a":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}}', bytes(8), None),
    "duplicate_tensor_first_bad": (('{"a":{"dtype":"X"},"a":' + _F8 + "}").encode(), bytes(8), None),
    "missing_shape": (_raw({"a": {"dtype": "F32", "data_offsets": [0, 8]}}), bytes(8), None),
    "entry_not_object": (b'{"a":"x"}', b"", None),
    "unknown_dtype": (_raw({"a": _info(0, 8, dtype="F33")}), bytes(8), None),
    "three_offsets": (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8,8]}}', bytes(8), None),
    "float_offset": (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8.0]}}', bytes(8), None),
    "exponent_offset": (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8e0]}}', bytes(8), None),
    "negative_zero_offset": (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[-0,8]}}', bytes(8), None),
    "negative_dim": (_raw({"a": _info(0, 8, [-2])}), bytes(8), None),
    "bool_dim": (_raw({"a": _info(0, 8, [True, 2])}), bytes(8), None),
    "dim_beyond_u64": (_raw({"a": _info(0, 0, [2**64])}), b"", None),
    "shape_overflow_before_zero": (_raw({"a": _info(0, 0, [_U64, _U64, 0])}), b"", None),
    "valid_zero_before_overflow": (_raw({"a": _info(0, 0, [0, _U64, _U64])}), b"", None),
    "nan_in_extra_field": (b'{"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0],"z":NaN}}', b"", None),
    "float_out_of_range": (b'{"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0],"z":1e400}}', b"", None),
    "lone_surrogate": (b'{"\\ud800":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}', b"", None),
    "bad_utf8": (b'{"a\xff":' + _F8.encode() + b"}", bytes(8), None),
    "header_not_object": (b"[1]", b"", None),
    "trailing_nul_in_header": (_raw({"a": _info(0, 8)}) + b"\0", bytes(8), None),
    "header_len_beyond_file": (_raw({"a": _info(0, 8)}), bytes(8), 10_000),
    "header_len_zero": (b"", b"", None),
    "header_len_too_large": (b"{}", b"", 100_000_001),
}


def _write(tmp_path: Path, name: str) -> Path:
    header, data, n = CASES[name]
    path = tmp_path / f"{name}.safetensors"
    path.write_bytes(struct.pack("<Q", len(header) if n is None else n) + header + data)
    return path


def _safetensors_accepts(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as fh:
            list(fh.keys())
    except SafetensorError:
        return False
    return True


def _reader_accepts(path: Path) -> bool:
    try:
        read_safetensors_header(path)
    except AdapterFormatError as exc:
        assert str(path) in str(exc)  # one line naming the file
        return False
    return True


@pytest.mark.parametrize("name", sorted(CASES))
def test_reader_agrees_with_safetensors(tmp_path, name):
    path = _write(tmp_path, name)
    expected = name.startswith("valid")
    assert _safetensors_accepts(path) == expected  # the case is what its name says, for this safetensors
    assert _reader_accepts(path) == expected


def test_reader_returns_what_safetensors_reads(tmp_path):
    import torch

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(3, 2), "b": torch.ones(5, dtype=torch.bfloat16)}, str(path), metadata={"format": "pt"})
    header = read_safetensors_header(path)
    with safe_open(str(path), framework="pt") as fh:
        assert set(header) == set(fh.keys())
        for k in header:
            assert header[k]["shape"] == fh.get_slice(k).get_shape()
    assert header["b"]["dtype"] == "BF16"


def test_duplicate_tensor_key_keeps_the_last_entry(tmp_path):
    header = read_safetensors_header(_write(tmp_path, "valid_duplicate_tensor_last_wins"))
    assert header["a"]["shape"] == [1]
