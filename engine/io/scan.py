"""Find adapters on disk and name adapter specs (folders, parents, ``hf://`` ids). Torch-free."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..constants import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, PICKLE_WEIGHTS_NAMES, SUBSPACE_MANIFEST_NAME
from ..errors import AdapterFormatError

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
        if self.repo_id:
            return f"hf://{self.repo_id}" + (f"@{self.revision}" if self.revision else "")
        return str(self.path)

    @property
    def name(self) -> str:
        """A default task id: the folder or repo name."""
        raw = self.repo_id.split("/")[-1] if self.repo_id else Path(self.path or "adapter").name
        clean = re.sub(r"[^A-Za-z0-9._-]", "_", raw).strip("._") or "adapter"
        return clean.replace("..", "_")


def parse_hub_spec(spec: str) -> AdapterSpec:
    """Parse ``hf://org/repo[@revision]``."""
    body = spec[len("hf://"):]
    repo, _, rev = body.partition("@")
    validate_repo_id(repo)
    return AdapterSpec(repo_id=repo, revision=rev or None)


def expand_adapter_specs(specs: list[str]) -> list[AdapterSpec]:
    """Expand CLI adapter arguments: folders, parent folders of adapters, ``hf://`` ids.

    Raises:
        AdapterFormatError: a path that is neither an adapter nor holds any.
        ValueError: a malformed ``hf://`` id.
    """
    out: list[AdapterSpec] = []
    for s in specs:
        if s.startswith("hf://"):
            out.append(parse_hub_spec(s))
            continue
        p = Path(s)
        if not p.exists():
            raise AdapterFormatError(f"{p}: no such file or directory")
        if p.is_file() or is_adapter_dir(p):
            out.append(AdapterSpec(path=p))
            continue
        found = scan_local_adapters(p)
        if not found:
            raise AdapterFormatError(f"{p}: no adapter folders (adapter_config.json + adapter_model.safetensors) found")
        out.extend(AdapterSpec(path=f) for f in found)
    return out
