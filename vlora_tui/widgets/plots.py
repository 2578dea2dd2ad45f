"""Plots (textual-plotext) whose data is set from job results; the theme follows the app."""

from __future__ import annotations

from typing import Any

from textual_plotext import PlotextPlot


class DataPlot(PlotextPlot):
    """A ``PlotextPlot`` redrawn from plain data by :meth:`draw`; shows ``empty`` when there is none."""

    DEFAULT_CSS = """
    DataPlot { height: 1fr; min-height: 8; }
    """

    def __init__(self, empty: str = "no data", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.empty = empty

    def on_mount(self) -> None:
        super().on_mount()
        self.draw_empty()

    def draw_empty(self) -> None:
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        plt.title(self.empty)
        self.refresh()

    def draw_heatmap(self, matrix: list[list[float]], labels: list[str], title: str) -> None:
        """A similarity matrix as coloured blocks (rows and columns in ``labels`` order)."""
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        plt.title(title)
        if matrix:
            plt.matrix_plot([[0.0 if v is None else float(v) for v in row] for row in matrix])
            # no tick labels: plotext thins them by the drawn size, which varies while a layout settles;
            # the heatmap table beside the plot numbers the adapters
            plt.xticks([])
            plt.yticks([])
            plt.xlabel(f"adapters 1…{len(labels)} (columns and rows as in the table)")
        self.refresh()

    def draw_lines(self, series: dict[str, tuple[list[float], list[float]]], title: str, xlabel: str, ylabel: str,
                   ylim: tuple[float, float] | None = None) -> None:
        """One line per named series ``name -> (xs, ys)``."""
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        plt.title(title)
        plt.xlabel(xlabel)
        plt.ylabel(ylabel)
        for name, (xs, ys) in series.items():
            if xs:
                plt.plot(xs, [0.0 if y is None else y for y in ys], label=name, marker="braille")
        if ylim is not None:
            plt.ylim(*ylim)
        self.refresh()

    def draw_bars(self, labels: list[str], values: list[float], title: str, ylabel: str) -> None:
        """One bar per label."""
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        plt.title(title)
        plt.ylabel(ylabel)
        if labels:
            plt.bar(labels, [0.0 if v is None else v for v in values])
        self.refresh()
