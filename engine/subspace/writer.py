"""Writing a subspace folder (format version 2), all at once or as a build's chunks of modules come.

:class:`FolderWriter` is the one writer: :func:`engine.subspace.storage.save_subspace`
hands it a whole subspace in memory; a streamed build with an output folder
(``SharedSubspace.from_adapters_streaming(…, output=…)``) hands it each chunk's task
coefficients as soon as the chunk is built (:meth:`FolderWriter.add`, ``spill=True``):
their bytes are appended to one part file per task in the temporary folder and the
tensors dropped, so the build holds one chunk's result, not the whole collection's
(at N = 1000 adapters stored per task, that is the size of the input). :meth:`finish`
writes the basis file, each task's file from its part file (the packed bytes of its
modules in sorted order, the layout of :mod:`engine.subspace.layout`), the checksums
and the manifest last, then renames the folder into place; :meth:`abort` removes it.
"""

from __future__ import annotations

import json
import os
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..constants import SUBSPACE_MANIFEST_NAME
from . import layout
from .common import TaskProjection, dtype_name
from .manifest import BASIS_FILE, OWN_CONFIG_KEYS, TASKS_DIR, by_module, significant, task_file

#: Folder of the per-task part files inside the temporary folder (removed before the rename).
PARTS_DIR = ".parts"


class FolderWriter:
    """One subspace folder written atomically: task coefficients chunk by chunk, then the rest.

    Args:
        path: The folder to write (refused if it exists, unless ``force``; written to a temp sibling).
        force: Replace an existing folder.
        spill: Keep each task's packed bytes in a part file on disk (and empty the records
            :meth:`add` is given) rather than in memory.
    """

    def __init__(self, path: Path, *, force: bool = False, spill: bool = False) -> None:
        from ..io.local import atomic_dir

        self.path = Path(path)
        self.spill = spill
        self._stack = ExitStack()
        self.tmp = Path(self._stack.enter_context(atomic_dir(self.path, force=force)))
        self._dest(TASKS_DIR).mkdir()
        if spill:
            self._dest(PARTS_DIR).mkdir()
        self.modules: list[str] = []  # the modules added, in order
        self.specs: dict[str, list[list[str]]] = {}  # task → per module added, its tensor specs
        self.held: dict[str, list[Tensor]] = {}  # task → packed bytes per chunk (not spilled)
        self.files: dict[str, str] = {}  # task → its file, relative (validated)
        self._parts: dict[str, Path] = {}

    def _dest(self, rel: str) -> Path:
        from .storage import _dest

        return _dest(self.tmp, rel)

    def add(self, tasks: dict[str, TaskProjection], modules: list[str], quantized: dict[tuple[str, ...], Any],
            dtype: torch.dtype) -> None:
        """Pack every task's coefficients of ``modules`` (sorted, after those added before).

        ``quantized``: ``(task, module, key)`` → the stored quantised tensor. With ``spill``, the
        records' tensors of these modules are dropped and their quantised entries removed from ``quantized``.
        """
        mods = sorted(modules)
        if self.modules and mods and mods[0] <= self.modules[-1]:
            raise RuntimeError(f"modules must come in sorted order: {mods[0]!r} after {self.modules[-1]!r}")
        self.modules += mods
        for tid, p in tasks.items():
            if tid not in self.files:
                self.files[tid] = task_file(tid)  # ValueError before anything of it is written
                self.specs[tid] = []
            chunks = []
            for m in mods:
                c = p.coeffs.get(m, {})
                items = [(key, t if (tid, m, key) in quantized else t.to(dtype), quantized.get((tid, m, key)))
                         for key, t in sorted(c.items())]
                s, packed = layout.pack(items)
                self.specs[tid].append(s)
                chunks.append(packed)
            if not self.spill:
                self.held.setdefault(tid, []).extend(chunks)
                continue
            part = self._parts.setdefault(tid, self._dest(f"{PARTS_DIR}/{len(self._parts)}.bin"))
            with open(part, "ab") as fh:
                for packed in chunks:
                    fh.write(packed.numpy().tobytes())
            for m in mods:
                for key in p.coeffs.pop(m, {}):
                    quantized.pop((tid, m, key), None)

    def _packed(self, tid: str) -> Tensor:
        if not self.spill:
            held = self.held.pop(tid, [])
            return torch.cat(held) if held else torch.zeros(0, dtype=torch.uint8)
        part = self._parts.get(tid)
        if part is None or not part.stat().st_size:
            return torch.zeros(0, dtype=torch.uint8)
        return torch.frombuffer(bytearray(part.read_bytes()), dtype=torch.uint8)

    def finish(self, sub: Any) -> Path:
        """Write ``sub``'s basis, every task's file and the manifest; rename the folder into place.

        ``sub``: the subspace whose tasks were :meth:`add`-ed (its bases, params and task records;
        with ``spill`` the records hold no coefficients any more).
        """
        from safetensors.torch import save_file

        from .storage import (EXPLAINED_DIGITS, FORMAT_NAME, FORMAT_VERSION, SEP, _digest, _json_default, _rounded, _sha256, _template_json)

        names = sorted(sub.modules)
        if self.modules != names:
            raise RuntimeError(f"{self.path}: the coefficients written cover modules {self.modules[:3]}…, the subspace has {names[:3]}…")
        basis_items, basis_specs = [], {}
        for m in names:
            items = [(key, t if (m, key) in sub.quantized else t.to(sub.dtype), sub.quantized.get((m, key)))
                     for key, t in sub.modules[m].tensors.items()]
            basis_specs[m], packed = layout.pack(items)
            basis_items.append(packed)
        manifest: dict[str, Any] = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "method": sub.method,
            "dtype": dtype_name(sub.dtype),
            "params": sub.params,
            "k_rule": sub.k_rule,  # the rule k was chosen by (from params): what absorb and quantize are held to
            "quantization": sub.quantization,
            "base_model": sub.base_model,
            "modules": {m: {"kind": b.kind, "shape": list(b.shape), "k": b.k, "rank": b.rank, "tensors": basis_specs[m],
                            "explained": significant([float(v) for v in b.explained], EXPLAINED_DIGITS)}
                        for m, b in ((m, sub.modules[m]) for m in names)},
            "configs": [],
            "tasks": [],
            "files": {},
        }
        configs: dict[str, int] = {}  # digest of a shared config → its index in "configs"
        basis_path = self._dest(BASIS_FILE)
        save_file({layout.PACKED: torch.cat(basis_items) if basis_items else torch.zeros(0, dtype=torch.uint8)},
                  str(basis_path), metadata={"format": "pt", "vlora_file": "basis", "vlora_modules_sha256": _digest(manifest["modules"])})
        basis_sha = _sha256(basis_path)
        for tid, p in sub.tasks.items():
            if tid not in self.files:  # a subspace without modules: nothing was added
                self.files[tid], self.specs[tid] = task_file(tid), []
            specs = self.specs[tid]
            tensors = {layout.PACKED: self._packed(tid)}
            extras = p.template.extra_tensors if p.template is not None else {}
            for k, t in extras.items():
                tensors[f"extra{SEP}{k}"] = t.contiguous()
            rel = self.files[tid]
            config = _template_json(p.template)
            save_file(tensors, str(self._dest(rel)), metadata={
                "format": "pt", "vlora_file": "task", "vlora_task_id": tid, "vlora_config_sha256": _digest(config),
                "vlora_basis_sha256": basis_sha, "vlora_tensors_sha256": _digest(specs)})
            del tensors
            if tid in self._parts:
                os.unlink(self._parts.pop(tid))
            entry: dict[str, Any] = {"id": tid, "file": rel, "config": None}
            if config:
                shared = {k: v for k, v in config.items() if k not in OWN_CONFIG_KEYS}
                entry["config"] = configs.setdefault(_digest(shared), len(configs))
                if entry["config"] == len(manifest["configs"]):
                    manifest["configs"].append(shared)
                if config["name"] != tid:
                    entry["name"] = config["name"]
                entry["source"] = config["source"]
            entry.update({
                "fidelity": by_module(p.fidelity, names), "norms": by_module(p.norms, names),
                "ranks": by_module(p.ranks, names), "tensors": specs, "error_is_bound": p.error_is_bound,
                "original_bytes": p.original_bytes, "input_bytes": p.input_bytes, "input_bytes_fp16": p.input_bytes_fp16})
            manifest["tasks"].append(entry)
        if self.spill:
            for left in self._parts.values():  # tasks added but not in ``sub``: none in a build
                os.unlink(left)
            self._dest(PARTS_DIR).rmdir()
        for f in sorted([BASIS_FILE] + [t["file"] for t in manifest["tasks"]]):
            fp = self._dest(f)
            manifest["files"][f] = {"sha256": _sha256(fp), "bytes": fp.stat().st_size}
        # compact: no indentation, floats to 7 significant digits at most (fewer where that is what they
        # mean: see EXPLAINED_DIGITS); on a small collection the manifest is otherwise a visible share of the bytes
        text = json.dumps(_rounded(manifest), separators=(",", ":"), sort_keys=True, default=_json_default)
        self._dest(SUBSPACE_MANIFEST_NAME).write_text(text + "\n", encoding="utf-8")
        self._stack.close()  # the rename into place
        return self.path

    def abort(self, exc: BaseException | None = None) -> None:
        """Remove the temporary folder (after a failure or a cancel); the output path is left as it was."""
        err = exc or RuntimeError("aborted")
        self._stack.__exit__(type(err), err, err.__traceback__)
