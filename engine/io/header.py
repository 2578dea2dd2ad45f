"""Torch-free reading of PEFT adapters: safetensors headers, config, key parsing.

Everything here uses only the standard library so that ``--batch info`` and the
TUI's browser can describe an adapter without importing torch.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..constants import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, PEFT_PREFIX, PICKLE_WEIGHTS_NAMES
from ..errors import AdapterFormatError, UnsupportedAdapterError
from ..types import AdapterSummary, ModuleInfo

#: Bits per element of each safetensors dtype (the sub-byte ones pack several per byte).
DTYPE_BITS = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
    "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}
#: Bytes per element of each whole-byte safetensors dtype.
DTYPE_SIZES = {k: v // 8 for k, v in DTYPE_BITS.items() if v % 8 == 0}
#: Floating dtypes a LoRA factor may be stored in.
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
_MAX_HEADER = 100_000_000  # safetensors' own limit (MAX_HEADER_SIZE)
_USIZE_MAX = 2**64 - 1
_INFO_FIELDS = ("dtype", "shape", "data_offsets")

# base_model.model.<module>.lora_A[.<adapter>].weight
_LORA_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<side>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_UNSUPPORTED = (
    (re.compile(r"\.lora_embedding_[AB]"), "embedding LoRA (lora_embedding_A/B)"),
    (re.compile(r"\.lora_magnitude_vector"), "DoRA (lora_magnitude_vector)"),
    (re.compile(r"\.lora_E(\.|$)"), "AdaLoRA (lora_E)"),
)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def strip_prefix(key: str) -> str:
    """Drop PEFT's ``base_model.model.`` prefix from a key."""
    return key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key


class _Obj(dict):
    """A JSON object that keeps its raw pairs, duplicates included (``json`` keeps the last)."""

    pairs: list[tuple[str, Any]]


def _obj(pairs: list[tuple[str, Any]]) -> _Obj:
    o = _Obj(pairs)
    o.pairs = pairs
    return o


def _parse_int(text: str) -> int | float:
    # serde_json reads ``-0`` (JSON's only signed zero) as a float, which a usize field refuses
    return -0.0 if text == "-0" else int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number out of range: {text}")
    return value


def _reject_constant(text: str) -> Any:
    raise ValueError(f"{text} is not JSON")


def _is_usize(v: Any) -> bool:
    return _is_int(v) and 0 <= v <= _USIZE_MAX


def _header_problem(header: Any, data_len: int) -> str | None:
    """Why safetensors would refuse ``header`` (parsed by :func:`_strict_json`), or None.

    Mirrors ``Metadata`` deserialization and ``validate`` in safetensors' tensor.rs:
    ``__metadata__`` null or string to string; each entry ``dtype``/``shape``/
    ``data_offsets`` exactly once (other fields ignored); sorted by offsets, the
    tensors tile the data with no hole or overlap and end exactly at the file's end.
    """
    if not isinstance(header, dict):
        return "header is not a JSON object"
    pairs = header.pairs if isinstance(header, _Obj) else list(header.items())
    if sum(1 for k, _ in pairs if k == "__metadata__") > 1:
        return "duplicate '__metadata__'"
    for key, entry in pairs:
        if key == "__metadata__":
            if entry is not None and not (isinstance(entry, dict) and all(isinstance(v, str) for v in entry.values())):
                return "'__metadata__' must map names to strings"
            continue
        if not isinstance(entry, dict):
            return f"entry for tensor '{key}' is not an object"
        epairs = entry.pairs if isinstance(entry, _Obj) else list(entry.items())
        for f in _INFO_FIELDS:
            count = sum(1 for k, _ in epairs if k == f)
            if count != 1:
                return f"tensor '{key}' has {'no' if count == 0 else 'a duplicate'} '{f}'"
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
            return f"tensor '{key}' has unknown dtype {dtype!r}"
        if not (isinstance(shape, list) and all(_is_usize(d) for d in shape)):
            return f"tensor '{key}' has an invalid shape {shape!r}"
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_usize(o) for o in offsets)):
            return f"tensor '{key}' has invalid data_offsets {offsets!r}"
    tensors = sorted(((tuple(e["data_offsets"]), k, e) for k, e in header.items() if k != "__metadata__"),
                     key=lambda t: t[0])
    beyond = [(end, key) for (_, end), key, _ in tensors if end > data_len]
    if beyond:
        end, key = max(beyond)
        return f"truncated: tensor '{key}' needs bytes up to {end}, the file holds {data_len}"
    pos = 0
    for (start, end), key, entry in tensors:
        if start != pos or end < start:
            return f"tensor '{key}' has data_offsets [{start}, {end}]; the previous tensor ends at {pos} (hole or overlap)"
        pos = end
        numel = 1
        for d in entry["shape"]:
            numel *= d
            if numel > _USIZE_MAX:
                return f"tensor '{key}': shape {entry['shape']} overflows"
        bits = numel * DTYPE_BITS[entry["dtype"]]
        if bits > _USIZE_MAX:
            return f"tensor '{key}': shape {entry['shape']} overflows"
        if bits % 8:
            return f"tensor '{key}': {numel} {entry['dtype']} elements do not fill whole bytes"
        if end - start != bits // 8:
            return (f"tensor '{key}' has dtype {entry['dtype']} and shape {entry['shape']} ({bits // 8} bytes) "
                    f"but data_offsets [{start}, {end}] ({end - start} bytes)")
    if pos != data_len:
        return f"the tensors cover {pos} bytes of data, the file holds {data_len}"
    return None


def _strict_json(raw: bytes) -> Any:
    """Parse a header the way safetensors' serde_json does (no NaN, no lone surrogates, ...)."""
    text = raw.decode("utf-8")
    value = json.loads(text, object_pairs_hook=_obj, parse_int=_parse_int, parse_float=_parse_float,
                       parse_constant=_reject_constant)
    json.dumps(value, ensure_ascii=False).encode("utf-8")  # a lone surrogate (\ud800) fails here, as in serde
    return value


def read_safetensors_header(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read and check a safetensors header without loading tensors.

    Accepts exactly the files ``safetensors.safe_open`` accepts: the header is
    checked as safetensors checks it (see :func:`_header_problem`).

    Returns the tensor entries (``{key: {"dtype", "shape", "data_offsets"}}``).

    Raises:
        AdapterFormatError: the file is truncated, not safetensors, or its
            offsets/shapes disagree with its size.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise AdapterFormatError(f"{path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n <= 0 or n > _MAX_HEADER or 8 + n > size:
                raise AdapterFormatError(f"{path}: corrupt safetensors file (header length {n} does not fit in {size} bytes)")
            raw = fh.read(n)
    except OSError as exc:
        raise AdapterFormatError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    try:
        header = _strict_json(raw)
    except (UnicodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise AdapterFormatError(f"{path}: corrupt safetensors file (header is not valid JSON: {exc})") from exc
    problem = _header_problem(header, size - 8 - n)
    if problem is not None:
        raise AdapterFormatError(f"{path}: corrupt safetensors file ({problem})")
    return {k: dict(v) for k, v in header.items() if k != "__metadata__"}


def read_config(path: str | Path) -> dict[str, Any]:
    """Read ``adapter_config.json`` and check the fields LoRA needs.

    Raises:
        AdapterFormatError: missing, not JSON, or fields of the wrong type.
        UnsupportedAdapterError: not a LoRA config, or DoRA.
    """
    path = Path(path)
    if not path.is_file():
        raise AdapterFormatError(f"{path.parent}: missing {ADAPTER_CONFIG_NAME}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterFormatError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{path}: expected a JSON object")
    peft_type = config.get("peft_type")
    if peft_type is not None and str(peft_type).upper() != "LORA":
        raise UnsupportedAdapterError(f"{path}: peft_type is {peft_type!r}; only LORA adapters are supported")
    if config.get("use_dora"):
        raise UnsupportedAdapterError(f"{path}: use_dora is true; DoRA adapters are not supported")
    problems: list[str] = []
    r = config.get("r")
    if r is not None and not _is_pos_int(r):
        problems.append(f"'r' must be a positive integer, got {r!r}")
    alpha = config.get("lora_alpha")
    if alpha is not None and not _is_alpha(alpha):
        # Python's json reads NaN/Infinity; a zero alpha makes every update zero
        problems.append(f"'lora_alpha' must be a finite, non-zero number, got {alpha!r}")
    for name, ok, what in (("rank_pattern", _is_pos_int, "a positive integer"),
                           ("alpha_pattern", _is_alpha, "a finite, non-zero number")):
        value = config.get(name)
        if value is None:
            continue
        if not isinstance(value, dict):
            problems.append(f"'{name}' must be an object, got {type(value).__name__}")
            continue
        for k, v in value.items():
            if not ok(v):
                problems.append(f"'{name}' entry {k!r} must be {what}, got {v!r}")
    tm = config.get("target_modules")
    if tm is not None and not (isinstance(tm, str) or (isinstance(tm, list) and all(isinstance(x, str) for x in tm))):
        problems.append(f"'target_modules' must be a list of names or a regex string, got {tm!r}")
    for name in ("use_rslora", "fan_in_fan_out"):
        value = config.get(name)
        if value is not None and not isinstance(value, bool):
            problems.append(f"'{name}' must be true or false, got {value!r}")
    if problems:
        raise AdapterFormatError(f"{path}: " + "; ".join(problems))
    return config


def _is_pos_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_alpha(v: Any) -> bool:
    return _is_number(v) and math.isfinite(v) and v != 0


@dataclass
class KeyLayout:
    """How a state dict's keys split into LoRA pairs and extra tensors."""

    pairs: dict[str, tuple[str, str]] = field(default_factory=dict)  # module -> (A key, B key)
    extra: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _is_known_extra(key: str, config: dict[str, Any]) -> bool:
    if ".lora_B." in key and key.endswith(".bias"):  # PEFT's lora_bias
        return True
    if "modules_to_save" in key or "trainable_tokens" in key:
        return True
    mts = config.get("modules_to_save") or []
    parts = strip_prefix(key).split(".")
    return any(m in parts for m in mts)


def classify_keys(keys: list[str], config: dict[str, Any], where: str) -> KeyLayout:
    """Split ``keys`` into LoRA pairs and extra tensors, collecting every problem."""
    layout = KeyLayout()
    a_keys: dict[str, str] = {}
    b_keys: dict[str, str] = {}
    adapters: set[str] = set()
    unsupported: dict[str, str] = {}
    unknown: list[str] = []
    for key in keys:
        for pat, what in _UNSUPPORTED:
            if pat.search(key):
                unsupported.setdefault(what, key)
                break
        else:
            m = _LORA_RE.match(key)
            if m:
                module = strip_prefix(m.group("module"))
                if m.group("adapter"):
                    adapters.add(m.group("adapter"))
                (a_keys if m.group("side") == "A" else b_keys)[module] = key
            elif _is_known_extra(key, config):
                layout.extra.append(key)
            else:
                unknown.append(key)
    if unsupported:
        what, key = next(iter(unsupported.items()))
        raise UnsupportedAdapterError(f"{where}: {what} is not supported (tensor '{key}')")
    if len(adapters) > 1:
        layout.problems.append(f"holds several adapters ({', '.join(sorted(adapters))}); save one adapter per folder")
    for module in sorted(set(a_keys) | set(b_keys)):
        if module not in b_keys:
            layout.problems.append(f"'{a_keys[module]}' has no matching lora_B")
        elif module not in a_keys:
            layout.problems.append(f"'{b_keys[module]}' has no matching lora_A")
        else:
            layout.pairs[module] = (a_keys[module], b_keys[module])
    if not layout.pairs and not layout.problems:
        sample = ", ".join(f"'{k}'" for k in keys[:3]) or "no tensors"
        layout.problems.append(f"holds no lora_A/lora_B tensors ({sample}): not a LoRA adapter")
    elif unknown:
        shown = ", ".join(f"'{k}'" for k in unknown[:3])
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        layout.problems.append(f"non-LoRA tensor {shown}{more} (not lora_A/lora_B and not in modules_to_save)")
    return layout


def resolve_adapter_files(path: str | Path) -> tuple[Path, Path]:
    """Return ``(config_path, weights_path)`` for an adapter folder or weights file.

    Raises:
        AdapterFormatError: the path is missing, holds only pickle weights, or lacks a file.
    """
    p = Path(path)
    if not p.exists():
        raise AdapterFormatError(f"{p}: no such file or directory")
    if p.is_file():
        if p.suffix != ".safetensors":
            if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt"):
                raise AdapterFormatError(f"{p}: pickle weights are refused (never unpickled); convert to safetensors")
            raise AdapterFormatError(f"{p}: expected an adapter folder or a .safetensors file")
        folder, weights = p.parent, p
    else:
        folder, weights = p, p / ADAPTER_WEIGHTS_NAME
    config = folder / ADAPTER_CONFIG_NAME
    if not weights.is_file():
        pickles = [n for n in PICKLE_WEIGHTS_NAMES if (folder / n).is_file()]
        if pickles:
            raise AdapterFormatError(
                f"{folder / pickles[0]}: pickle weights are refused (never unpickled); re-save the adapter with "
                "safe_serialization=True to get adapter_model.safetensors"
            )
        if not config.is_file():
            raise AdapterFormatError(f"{folder}: not an adapter folder (no {ADAPTER_CONFIG_NAME} or {ADAPTER_WEIGHTS_NAME})")
        raise AdapterFormatError(f"{folder}: missing {ADAPTER_WEIGHTS_NAME}")
    if not config.is_file():
        raise AdapterFormatError(f"{folder}: missing {ADAPTER_CONFIG_NAME}")
    return config, weights


def check_pair_shapes(layout: KeyLayout, shape_of: dict[str, list[int]], config: dict[str, Any]) -> dict[str, int]:
    """Check A/B shapes of every pair; return module → rank. Appends to ``layout.problems``."""
    from ..types import match_pattern_key

    ranks: dict[str, int] = {}
    cfg_r = config.get("r")
    patterns = config.get("rank_pattern") or {}
    for module, (ka, kb) in layout.pairs.items():
        sa, sb = list(shape_of[ka]), list(shape_of[kb])
        if len(sa) != 2 or len(sb) != 2:
            layout.problems.append(
                f"module '{module}' has {len(sa)}-D lora_A / {len(sb)}-D lora_B; only Linear (2-D) LoRA is supported"
            )
            continue
        if sa[0] != sb[1]:
            layout.problems.append(
                f"module '{module}': lora_A {tuple(sa)} and lora_B {tuple(sb)} disagree on rank ({sa[0]} vs {sb[1]})"
            )
            continue
        r = sa[0]
        key = match_pattern_key(patterns, module)
        expected = patterns[key] if key is not None else cfg_r
        if expected is not None and r != expected:
            layout.problems.append(f"module '{module}' has rank {r} but the config says r={expected}")
            continue
        ranks[module] = r
    return ranks


def raise_problems(where: str | Path, problems: list[str]) -> None:
    """Raise one ``AdapterFormatError`` naming ``where`` and every problem."""
    if problems:
        head = problems[0] if len(problems) == 1 else "; ".join(problems[:3]) + (
            f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
        )
        raise AdapterFormatError(f"{where}: {head}")


def read_adapter_summary(path: str | Path) -> AdapterSummary:
    """Describe an adapter from its config and safetensors header only (no torch).

    Raises:
        AdapterFormatError: on any problem the header shows.
    """
    config_path, weights_path = resolve_adapter_files(path)
    config = read_config(config_path)
    header = read_safetensors_header(weights_path)
    layout = classify_keys(list(header), config, str(weights_path))
    shape_of = {k: v["shape"] for k, v in header.items()}
    ranks = check_pair_shapes(layout, shape_of, config)
    raise_problems(weights_path, layout.problems)
    for module, (ka, kb) in layout.pairs.items():
        for k in (ka, kb):
            if header[k]["dtype"] not in FLOAT_DTYPES:
                raise AdapterFormatError(f"{weights_path}: tensor '{k}' has dtype {header[k]['dtype']}; LoRA factors must be float")
    modules = [
        ModuleInfo(
            name=m,
            rank=ranks[m],
            in_features=int(shape_of[layout.pairs[m][0]][1]),
            out_features=int(shape_of[layout.pairs[m][1]][0]),
            dtype=header[layout.pairs[m][0]]["dtype"],
        )
        for m in sorted(layout.pairs)
    ]
    num_params = sum(m.rank * (m.in_features + m.out_features) for m in modules)
    nbytes = sum(e["data_offsets"][1] - e["data_offsets"][0] for e in header.values())
    r = config.get("r") or (max(ranks.values()) if ranks else 0)
    return AdapterSummary(
        path=str(Path(path)),
        base_model=config.get("base_model_name_or_path"),
        rank=int(r),
        lora_alpha=float(config.get("lora_alpha", 8)),
        use_rslora=bool(config.get("use_rslora", False)),
        target_modules=config.get("target_modules") or sorted({m.name.rsplit(".", 1)[-1] for m in modules}),
        modules=modules,
        extra_tensors=sorted(layout.extra),
        num_params=num_params,
        nbytes=int(nbytes),
        dtypes=sorted({e["dtype"] for e in header.values()}),
        peft_type=config.get("peft_type"),
    )
