"""Figures that training and the bench both draw: one place, imported by both.

Every figure is drawn with matplotlib's ``Figure`` API, which needs no pyplot backend: it works
headless and leaves the caller's backend alone; :func:`~mtl_plugin.utils.io.atomic_save_figure`
writes it.

Example::

    from mtl_plugin.utils.plots import plot_meta_curves
    plot_meta_curves([("mtl", pd.read_csv("runs/meta/metrics.csv"))], "curve.png")
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mtl_plugin.utils.io import atomic_save_figure

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["plot_meta_curves"]


def plot_meta_curves(runs: list[tuple[str, pd.DataFrame]], path: str | Path, title: str = "") -> None:
    """Draw meta-training curves: validation accuracy, and normal against hard tasks' training accuracy.

    Args:
        runs: ``(label, metrics)`` pairs, ``metrics`` as :func:`~mtl_plugin.training.meta_training.meta_train` writes
            ``metrics.csv``; the label names the run in the legend ("" for one run).
        path: the PNG to write (atomically).
        title: the figure's title.

    The training accuracies are running means over ``max(5, iterations // 20)``
    iterations: one meta-batch's few tasks make the raw curve too noisy to read.

    Example::

        plot_meta_curves([("mtl", pd.read_csv("a/metrics.csv")), ("mtl-ht", pd.read_csv("b/metrics.csv"))],
                         "mtl-vs-mtl-ht.png")
    """
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4))
    validation, training = figure.subplots(1, 2)
    for index, (label, frame) in enumerate(runs):
        color = f"C{index}"
        prefix = f"{label} " if label else ""
        val = frame.dropna(subset=["val_accuracy"])
        validation.plot(val["iteration"], val["val_accuracy"], marker="o", color=color, label=label or None)
        window = max(5, len(frame) // 20)
        for column, style in (("normal_accuracy", "-"), ("hard_accuracy", "--")):
            if column in frame and frame[column].notna().any():
                smooth = frame[column].rolling(window, min_periods=1).mean()
                training.plot(
                    frame["iteration"], smooth, style, color=color, label=f"{prefix}{column.split('_')[0]} tasks"
                )
    validation.set_ylabel("validation accuracy (%)")
    training.set_ylabel("training query accuracy (%), running mean")
    for axis in (validation, training):
        axis.set_xlabel("meta-training iteration")
        axis.grid(True, alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize="small")
    if title:
        figure.suptitle(title)
    atomic_save_figure(figure, path, dpi=100)
