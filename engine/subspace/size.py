"""The one compression ratio: bytes of the inputs on disk ÷ bytes of the saved subspace folder.

Every front end (``compress``, ``info``, ``add``, ``quantize``, ``benchmark``, the TUI) and
:meth:`SharedSubspace.compression_stats` report :func:`size_on_disk`, so the figure
printed is the figure ``du`` gives. The inputs' bytes (``adapter_model.safetensors`` +
``adapter_config.json`` of each input, as they were on disk) are measured when the
subspace is built (:func:`adapter_input_bytes`) and recorded per task in the manifest,
so the ratio of a saved subspace is known without its inputs.

Imports neither torch nor safetensors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

#: Float dtypes of a safetensors header wider than 16 bits (counted at 2 bytes in ``input_bytes_fp16``).
_WIDE_FLOATS = {"F32": 4, "F64": 8}


def adapter_input_bytes(source: str | Path | None) -> tuple[int, int] | None:
    """Bytes on disk of one input adapter: ``(bytes, bytes_fp16)``, or ``None`` when it has no files.

    ``bytes`` is the size of ``adapter_model.safetensors`` plus ``adapter_config.json``;
    ``bytes_fp16`` the same with every fp32/fp64 tensor counted at 2 bytes a value (the
    inputs "as if saved at fp16"; equal to ``bytes`` for fp16/bf16 inputs).

    Args:
        source: An adapter folder, its ``.safetensors`` file, or ``hf://org/repo[@rev]``
            (looked up in the local Hub cache only, never downloaded). ``None`` or a path
            that is not an adapter (e.g. an adapter built in memory) gives ``None``.
    """
    if source is None:
        return None
    from ..errors import VloraError
    from ..io.hub import cached_adapter_files
    from ..io.scan import is_hub_spec

    try:
        files = cached_adapter_files(str(source)) if is_hub_spec(source) else _local_files(Path(source))
    except (VloraError, OSError, ValueError):
        return None
    if files is None:
        return None
    config, weights = files
    from ..io.header import read_safetensors_header

    try:
        total = config.stat().st_size + weights.stat().st_size
        header = read_safetensors_header(weights)
    except (VloraError, OSError):
        return None
    wide = 0
    for entry in header.values():
        size = _WIDE_FLOATS.get(entry["dtype"])
        if size:
            numel = 1
            for d in entry["shape"]:
                numel *= int(d)
            wide += numel * (size - 2)
    return total, total - wide


def _local_files(p: Path) -> tuple[Path, Path] | None:
    from ..io.header import resolve_adapter_files

    if not p.exists():
        return None
    return resolve_adapter_files(p)


def folder_bytes(path: str | Path) -> int:
    """Sum of the sizes of every file under ``path`` (what ``du --apparent-size`` counts)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
    return total


def size_on_disk(path: str | Path) -> dict[str, Any]:
    """The compression figures of a saved subspace folder: THE ratio every front end prints.

    Returns:
        ``{"bytes": every file in the folder (manifest included), "input_bytes": the inputs'
        adapter_model.safetensors + adapter_config.json as they were on disk, "input_bytes_fp16":
        the same with fp32 tensors counted at fp16, "inputs_fp32": whether they differ,
        "ratio": input_bytes / bytes, "ratio_vs_fp16": input_bytes_fp16 / bytes, "note": str|None,
        "text": the ratio as every front end prints it (``1.82x``, or ``1.82x (0.95x vs the inputs at
        fp16)`` for fp32 inputs; ``n/a`` without a ratio)}``.
        The input figures and ratios are ``None`` (and ``note`` says why) when the manifest does
        not record every task's input bytes (a folder saved by an older version, or built from
        adapters in memory that have no files).
    """
    from ..constants import SUBSPACE_MANIFEST_NAME

    path = Path(path)
    size = folder_bytes(path)
    try:
        man = json.loads((path / SUBSPACE_MANIFEST_NAME).read_text(encoding="utf-8"))
        tasks = man.get("tasks", []) if isinstance(man, dict) else []
    except (OSError, ValueError):
        tasks = []
    ins = [t.get("input_bytes") for t in tasks]
    ins16 = [t.get("input_bytes_fp16") for t in tasks]
    return disk_figures(size, ins, ins16)


def disk_figures(size: int, input_bytes: list[int | None], input_bytes_fp16: list[int | None]) -> dict[str, Any]:
    """The figures of :func:`size_on_disk` from the folder's bytes and each task's recorded input bytes."""
    out: dict[str, Any] = {"bytes": int(size), "input_bytes": None, "input_bytes_fp16": None, "inputs_fp32": False,
                           "ratio": None, "ratio_vs_fp16": None, "note": None, "text": "n/a"}
    missing = sum(1 for b in input_bytes if b is None)
    if not input_bytes or missing:
        which = f" for {missing} of {len(input_bytes)} task(s)" if input_bytes else ""
        out["note"] = (f"the inputs' size is not recorded{which} (saved by an older version, or built from "
                       "adapters in memory): no ratio")
        return out
    ib = sum(int(b) for b in input_bytes if b is not None)
    ib16 = sum(int(b if b is not None else a) for a, b in zip(input_bytes, input_bytes_fp16) if a is not None)
    out.update(input_bytes=ib, input_bytes_fp16=ib16, inputs_fp32=ib16 < ib,
               ratio=ib / size if size else None, ratio_vs_fp16=ib16 / size if size else None)
    out["text"] = _ratio_text(out)
    return out


def _ratio_text(disk: dict[str, Any]) -> str:
    if not disk or disk.get("ratio") is None:
        return "n/a"
    text = f"{disk['ratio']:.2f}x"
    if disk.get("inputs_fp32"):
        text += f" ({disk['ratio_vs_fp16']:.2f}x vs the inputs at fp16)"
    return text
