"""A directory tree of folders that marks adapter folders, collections and subspaces."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from rich.style import Style
from rich.text import Text
from textual.widgets import DirectoryTree
from textual.widgets._tree import TreeNode
from textual.widgets._directory_tree import DirEntry


def folder_kind(path: Path) -> str:
    """``adapter``, ``subspace``, ``collection`` (holds adapter folders) or ``folder``."""
    from engine.io.scan import is_adapter_dir, is_subspace_dir

    try:
        if is_adapter_dir(path):
            return "adapter"
        if is_subspace_dir(path):
            return "subspace"
        for child in path.iterdir():
            if child.is_dir() and not child.name.startswith(".") and is_adapter_dir(child):
                return "collection"
    except OSError:
        pass
    return "folder"


#: Marker and label suffix per folder kind.
MARKS = {"adapter": ("◆ ", "adapter"), "collection": ("▣ ", "collection"), "subspace": ("◇ ", "subspace"), "folder": ("", "")}


class AdapterTree(DirectoryTree):
    """Folders only; adapter folders (◆), collections (▣) and subspaces (◇) are marked.

    Enter on an adapter or collection selects it (the screen adds it to the
    working collection); space expands a folder.
    """

    DEFAULT_CSS = """
    AdapterTree > .adapter-tree--adapter { color: $success; text-style: bold; }
    AdapterTree > .adapter-tree--collection { color: $accent; text-style: bold; }
    AdapterTree > .adapter-tree--subspace { color: $warning; text-style: bold; }
    """
    COMPONENT_CLASSES = DirectoryTree.COMPONENT_CLASSES | {
        "adapter-tree--adapter",
        "adapter-tree--collection",
        "adapter-tree--subspace",
    }

    def __init__(self, path: str | Path, **kwargs: object) -> None:
        super().__init__(path, **kwargs)  # type: ignore[arg-type]
        self.auto_expand = False
        self._kinds: dict[Path, str] = {}

    def kind_of(self, path: Path) -> str:
        """Folder kind of ``path`` (cached)."""
        if path not in self._kinds:
            self._kinds[path] = folder_kind(path)
        return self._kinds[path]

    def filter_paths(self, paths: Iterable[Path]) -> Iterable[Path]:
        return [p for p in paths if not p.name.startswith(".") and p.is_dir()]

    def render_label(self, node: TreeNode[DirEntry], base_style: Style, style: Style) -> Text:
        label = super().render_label(node, base_style, style)
        if node.data is None or not self.is_mounted:
            return label
        kind = self.kind_of(node.data.path)
        if kind == "folder":
            return label
        mark, word = MARKS[kind]
        rich_style = self.get_component_rich_style(f"adapter-tree--{kind}", partial=True)
        label.stylize(rich_style)
        return Text.assemble(label, Text(f"  {mark}{word}", style=rich_style))
