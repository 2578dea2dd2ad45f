"""A keyboard-navigable similarity heatmap: one coloured cell per pair of adapters."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import DataTable


def _shade(value: float | None) -> str:
    """Background for a similarity in [-1, 1]: deeper for larger magnitude."""
    if value is None:
        return ""
    v = max(-1.0, min(1.0, float(value)))
    level = int(round(abs(v) * 5))
    reds = ["#2b1f1f", "#4a2424", "#6b2a2a", "#8e3030", "#b33636", "#d93d3d"]
    blues = ["#1f232b", "#22324a", "#25426b", "#28528e", "#2b62b3", "#2e72d9"]
    return (blues if v >= 0 else reds)[level]


class SimilarityHeatmap(DataTable):
    """Similarity matrix with a cell cursor; the cursor's pair is what ``diff`` compares.

    Row and column ``i`` are ``labels[i]``; headers are numbers to keep it narrow.
    """

    DEFAULT_CSS = """
    SimilarityHeatmap { height: 1fr; }
    SimilarityHeatmap > .datatable--cursor, SimilarityHeatmap:focus > .datatable--cursor {
        background: $accent;
        color: $text;
        text-style: bold;
    }
    """

    def __init__(self, **kwargs: object) -> None:
        # the cursor's colour wins over the cell's shade: the whole cell shows it, not a sliver of padding
        super().__init__(cursor_type="cell", cursor_background_priority="css", cursor_foreground_priority="css",
                         **kwargs)  # type: ignore[arg-type]
        self.labels: list[str] = []
        self.matrix: list[list[float | None]] = []

    def set_matrix(self, labels: list[str], matrix: list[list[float | None]]) -> None:
        """Fill the table from ``labels`` and the square ``matrix``."""
        self.labels = list(labels)
        self.matrix = [list(r) for r in matrix]
        self.clear(columns=True)
        self.add_column("cos×100", key="adapter")
        for j in range(len(labels)):
            self.add_column(f"{j + 1:>3}", key=f"c{j}")
        for i, name in enumerate(labels):
            cells: list[Text] = [Text(f"{i + 1:>2} {name[:16]}")]
            for j in range(len(labels)):
                v = matrix[i][j] if j < len(matrix[i]) else None
                txt = "  ·" if v is None else f"{0 if abs(v) < 0.005 else round(v * 100):>3}"
                cells.append(Text(txt, style=f"on {_shade(v)}" if v is not None else ""))
            self.add_row(*cells, key=f"r{i}")

    def pair_at_cursor(self) -> tuple[int, int] | None:
        """``(i, j)`` indices of the pair under the cursor (``None`` on the name column)."""
        row, col = self.cursor_coordinate.row, self.cursor_coordinate.column
        if col == 0 or not self.labels:
            return None
        return row, col - 1

    def most_similar_pair(self) -> tuple[int, int] | None:
        """The off-diagonal pair with the highest similarity."""
        best: tuple[float, int, int] | None = None
        for i, row in enumerate(self.matrix):
            for j, v in enumerate(row):
                if j <= i or v is None:
                    continue
                if best is None or v > best[0]:
                    best = (v, i, j)
        return None if best is None else (best[1], best[2])

    def move_to_pair(self, i: int, j: int) -> None:
        self.move_cursor(row=i, column=j + 1)
