"""Figures for reports: cost against resolution, per-layer connections, accuracy against cost."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from convtally.analysis.accounting import Analysis  # noqa: E402
from convtally.analysis.io import atomic_save_figure  # noqa: E402


def save(figure, stem: Path) -> list[Path]:
    """Save `figure` as stem.png and stem.pdf (atomically); return both paths."""
    # No creation date in the PDF, so regenerating an unchanged figure leaves git clean.
    paths = [
        atomic_save_figure(figure, stem.with_suffix(suffix), bbox_inches="tight", dpi=150,
                           metadata={"CreationDate": None} if suffix == ".pdf" else None)
        for suffix in (".png", ".pdf")
    ]
    plt.close(figure)
    return paths


def connections_vs_resolution(
    analyses: Sequence[Analysis], sizes: Sequence[int], stem: Path
) -> list[Path]:
    """Plot total connections against the side length (log-log), one line per model."""
    figure, axis = plt.subplots(figsize=(6, 4))
    for analysis in analyses:
        totals = analysis.totals_at([(s, s) for s in sizes])["connections"]
        axis.plot(sizes, totals, marker="o", label=analysis.model)
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xticks(list(sizes), [f"{s}x{s}" for s in sizes])
    axis.set_xlabel("input size H x W (pixels)")
    axis.set_ylabel("total connections (multiply-adds + element-wise)")
    axis.set_title("Connections grow as H·W")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    return save(figure, stem)


def per_layer_connections(
    analysis: Analysis, resolution: tuple[int, int], stem: Path
) -> list[Path]:
    """Bar chart of each layer's connections at one resolution."""
    values = analysis.evaluate([resolution])["connections"][:, 0]
    names = [layer.name for layer in analysis.layers]
    figure, axis = plt.subplots(figsize=(max(6, 0.35 * len(names)), 4))
    colours = ["tab:blue" if layer.kind == "conv" else "tab:gray" for layer in analysis.layers]
    axis.bar(range(len(names)), [int(v) for v in values], color=colours)
    axis.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    # a log axis: a convolution has 100-1000 times the connections of the layers around it,
    # which on a linear axis leaves every other bar invisible (a layer with 0 has no bar)
    axis.set_yscale("log")
    axis.set_ylabel("connections (log scale)")
    axis.set_title(
        f"{analysis.model}: connections per layer at {resolution[0]}x{resolution[1]}"
        " (blue: convolutions)"
    )
    axis.grid(True, axis="y", alpha=0.3)
    return save(figure, stem)


def accuracy_vs_connections(frame: pd.DataFrame, stem: Path) -> list[Path] | None:
    """Scatter of validation accuracy against the trained network's connections, when runs exist."""
    measured = frame[frame["source"].str.startswith("formula + run")]
    if measured.empty:
        return None
    reference = frame[frame["source"].str.startswith("write-up")]
    figure, axis = plt.subplots(figsize=(6, 4))
    for rows, marker, label in (
        (measured, "o", "measured here (CIFAR-10 subset)"),
        (reference, "x", "write-up (full CIFAR-10 horses)"),
    ):
        if rows.empty:
            continue
        xs = rows["trained-net connections"] / 1e6
        axis.scatter(xs, rows["val accuracy %"], marker=marker, label=label)
        for x, y, model in zip(xs, rows["val accuracy %"], rows["model"], strict=True):
            axis.annotate(model, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axis.set_xlabel("total connections at 32x32, network as trained (millions)")
    axis.set_ylabel("validation per-pixel accuracy (%)")
    axis.set_title("Accuracy against cost")
    axis.grid(True, alpha=0.3)
    axis.legend()
    return save(figure, stem)


def memory_vs_batch(models: Sequence, batches: Sequence[int], resolution: tuple[int, int],
                    stem: Path) -> list[Path]:
    """Plot the training peak (solid) and the inference peak (dashed) against the batch size,
    one colour per model (analysis.memory.MemoryModel), log-log."""
    figure, axis = plt.subplots(figsize=(6, 4))
    points = [(b, *resolution) for b in batches]
    for number, model in enumerate(models):
        result = model.evaluate(points)
        colour = f"C{number}"
        axis.plot(batches, [v / 2**20 for v in result["training_peak"]], marker="o",
                  color=colour, label=f"{model.model}: training ({model.optimizer})")
        axis.plot(batches, [v / 2**20 for v in result["inference_peak"]], linestyle="--",
                  color=colour, label=f"{model.model}: inference")
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xticks(list(batches), [str(b) for b in batches])
    axis.set_xlabel("batch size B")
    axis.set_ylabel(f"peak memory (MiB, {models[0].dtype})" if models else "peak memory (MiB)")
    axis.set_title(f"Memory against batch size at {resolution[0]}x{resolution[1]}")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=7)
    return save(figure, stem)
