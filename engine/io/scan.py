"""Find adapters on disk and name adapter specs (folders, parents, ``hf://`` ids). Torch-free."""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..constants import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, PICKLE_WEIGHTS_NAMES, SUBSPACE_MANIFEST_NAME
from ..errors import AdapterFormatError

#: The prefix of a Hub adapter argument: ``hf://org/repo[@revision]``.
HUB_PREFIX = "hf://"

_REPO_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_TASK_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def is_adapter_dir(path: str | Path) -> bool:
    """True if ``path`` holds an adapter config and weights (safetensors or pickle)."""
    p = Path(path)
    if not (p / ADAPTER_CONFIG_NAME).is_file():
        return False
    return (p / ADAPTER_WEIGHTS_NAME).is_file() or any((p / n).is_file() for n in PICKLE_WEIGHTS_NAMES)


def is_subspace_dir(path: str | Path) -> bool:
    """True if ``path`` is a saved subspace folder."""
    return (Path(path) / SUBSPACE_MANIFEST_NAME).is_file()


def scan_local_adapters(root: str | Path, *, max_depth: int = 6, max_results: int = 100_000) -> list[Path]:
    """Every adapter folder under ``root`` (``root`` itself included), sorted.

    Hidden folders are skipped. Symlinked folders are followed (a collection of
    links to adapters elsewhere is common) but each real folder is visited once,
    so symlink loops cannot recur.
    """
    root = Path(root)
    if not root.is_dir():
        raise AdapterFormatError(f"{root}: not a folder")
    found: list[Path] = []
    seen: set[tuple[int, int]] = set()
    base_depth = len(root.parts)
    for dirpath, dirnames, _ in os.walk(root, followlinks=True):
        p = Path(dirpath)
        try:
            st = p.stat()
        except OSError:
            dirnames[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:  # reached again through a link: a loop or a duplicate
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        if is_adapter_dir(p):
            found.append(p)
            dirnames[:] = []  # an adapter folder does not nest adapters
            if len(found) >= max_results:
                break
            continue
        depth = len(p.parts) - base_depth
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and depth < max_depth)
    return sorted(found)


def validate_task_id(task_id: str) -> str:
    """Check that a task id is safe as a file name: letters, digits, ``._-``; no ``..``.

    Raises:
        ValueError: naming the bad id.
    """
    if not isinstance(task_id, str) or not _TASK_ID.match(task_id) or ".." in task_id:
        raise ValueError(
            f"invalid task id {task_id!r}: use letters, digits, '.', '_' or '-' (no separators, no '..', max 128)"
        )
    return task_id


def validate_repo_id(repo_id: str) -> str:
    """Check a Hub repo id ``name`` or ``org/name``.

    Raises:
        ValueError: naming the bad id.
    """
    parts = repo_id.split("/") if isinstance(repo_id, str) else []
    if not 1 <= len(parts) <= 2 or not all(_REPO_PART.match(x) and ".." not in x for x in parts):
        raise ValueError(f"invalid Hub repo id {repo_id!r}: expected 'org/name' (letters, digits, '._-'; no '..')")
    return repo_id


@dataclass(frozen=True)
class AdapterSpec:
    """Where one adapter comes from: a local folder or a Hub repo at a revision."""

    path: Path | None = None
    repo_id: str | None = None
    revision: str | None = None

    @property
    def label(self) -> str:
        """The argument that names it: its path, or ``hf://org/repo[@rev]``."""
        if self.repo_id:
            return hub_spec_label(self.repo_id, self.revision)
        return str(self.path)

    @property
    def name(self) -> str:
        """A default task id: the folder or repo name."""
        raw = self.repo_id.split("/")[-1] if self.repo_id else Path(self.path or "adapter").name
        clean = re.sub(r"[^A-Za-z0-9._-]", "_", raw).strip("._") or "adapter"
        return clean.replace("..", "_")


def is_hub_spec(spec: str | Path) -> bool:
    """True if an adapter argument names a Hub repo (``hf://…``), not a local path."""
    return str(spec).startswith(HUB_PREFIX)


def hub_spec_label(repo_id: str, revision: str | None = None) -> str:
    """``hf://org/repo`` or ``hf://org/repo@rev``: the argument that names a Hub adapter."""
    return f"{HUB_PREFIX}{repo_id}" + (f"@{revision}" if revision else "")


def parse_hub_spec(spec: str) -> AdapterSpec:
    """Parse ``hf://org/repo[@revision]``."""
    body = spec[len(HUB_PREFIX):]
    repo, _, rev = body.partition("@")
    validate_repo_id(repo)
    return AdapterSpec(repo_id=repo, revision=rev or None)


def spec_of(spec: str | Path) -> AdapterSpec:
    """The one reading of an adapter argument: ``hf://org/repo[@rev]`` → a Hub spec, else a local path.

    Raises:
        ValueError: a malformed ``hf://`` id.
    """
    text = str(spec)
    return parse_hub_spec(text) if is_hub_spec(text) else AdapterSpec(path=Path(text))


def spec_name(spec: str | Path) -> str:
    """The name of an adapter argument, as task ids and the TUI write it (:attr:`AdapterSpec.name`)."""
    try:
        return spec_of(spec).name
    except ValueError:  # a malformed hf:// id still needs a label
        return AdapterSpec(path=Path(str(spec).removeprefix(HUB_PREFIX).split("@", 1)[0])).name


def spec_excluded(spec: AdapterSpec, patterns: Sequence[str], root: str | Path | None = None) -> bool:
    """True if ``spec`` matches one of the glob ``patterns`` (:func:`fnmatch.fnmatch`).

    A local adapter is matched by its folder name, its path as given and, when it
    was found under ``root``, its path relative to ``root``; a Hub adapter by its
    repo name, ``org/name`` and ``hf://org/name[@rev]``. A trailing ``/`` in a
    pattern is ignored, so shell completion of a folder works.
    """
    if not patterns:
        return False
    if spec.repo_id:
        cands = {spec.name, spec.repo_id, spec.repo_id.split("/")[-1], spec.label}
    else:
        assert spec.path is not None
        p = spec.path
        cands = {spec.name, p.name, str(p), p.as_posix()}
        if root is not None:
            try:
                cands.add(p.relative_to(root).as_posix())
            except ValueError:
                pass
    pats = [pat.rstrip("/") or pat for pat in patterns]
    return any(fnmatch.fnmatch(c, pat) for pat in pats for c in cands if c)


def expand_adapter_specs(specs: list[str], exclude: Sequence[str] | None = None) -> list[AdapterSpec]:
    """Expand CLI adapter arguments: folders, parent folders of adapters, ``hf://`` ids.

    Args:
        specs: Adapter folders, ``.safetensors`` files, parent folders (scanned),
            ``hf://org/repo[@rev]`` ids.
        exclude: Glob patterns; adapters matching one are left out
            (see :func:`spec_excluded`).

    Raises:
        AdapterFormatError: a path that is neither an adapter nor holds any, or
            ``exclude`` leaves no adapter at all.
        ValueError: a malformed ``hf://`` id.
    """
    patterns = [str(x) for x in (exclude or ()) if str(x)]
    out: list[AdapterSpec] = []
    dropped = 0
    for s in specs:
        if is_hub_spec(s):
            found_specs, root = [parse_hub_spec(s)], None
        else:
            p = Path(s)
            if not p.exists():
                raise AdapterFormatError(f"{p}: no such file or directory")
            if p.is_file() or is_adapter_dir(p):
                found_specs, root = [AdapterSpec(path=p)], None
            else:
                found = scan_local_adapters(p)
                if not found:
                    raise AdapterFormatError(f"{p}: no adapter folders (adapter_config.json + adapter_model.safetensors) found")
                found_specs, root = [AdapterSpec(path=f) for f in found], p
        for spec in found_specs:
            if spec_excluded(spec, patterns, root):
                dropped += 1
            else:
                out.append(spec)
    if dropped and not out:
        shown = " ".join(f"--exclude {pat!r}" for pat in patterns)
        raise AdapterFormatError(f"{', '.join(specs)}: all {dropped} adapter(s) match {shown}; nothing left")
    return out
