"""Figures for Part 1 (classification); every function returns a matplotlib Figure."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from .model import LayerRow
from .results import markdown_table


def training_curves(
    runs: dict[str, list[dict[str, float]]], highlight: str | None = None
) -> Figure:
    """Training error, validation error and validation accuracy against epochs, one line per run."""
    fig = Figure(figsize=(15, 4.2))
    axes = fig.subplots(1, 3)
    panels = [
        ("train_error", "training error (running, augmented batches)", "error rate (log scale)"),
        (
            "val_error",
            "validation error (5,000 held-out training images)",
            "error rate (log scale)",
        ),
        ("val_accuracy", "validation (prediction) accuracy", "accuracy"),
    ]
    for ax, (key, title, ylabel) in zip(axes, panels, strict=True):
        for name, history in runs.items():
            epochs = [h["epoch"] for h in history]
            values = [h[key] for h in history]
            style = {"lw": 2.2, "zorder": 3} if name == highlight else {"lw": 1.0, "alpha": 0.7}
            ax.plot(epochs, values, marker=".", label=name, **style)
        ax.set(
            title=title,
            xlabel="epoch",
            ylabel=ylabel,
            yscale="log" if "log" in ylabel else "linear",
        )
        ax.grid(alpha=0.3, which="both")
    axes[2].set_ylim(0.98, 1.0)
    axes[0].legend(fontsize=8, ncol=2)
    fig.tight_layout()
    return fig


def prediction_grid(
    images: torch.Tensor,
    labels: torch.Tensor,
    probabilities: torch.Tensor,
    indices: Sequence[int],
    columns: int = 8,
) -> Figure:
    """Test images with true and predicted class and confidence; mistakes framed in red."""
    rows = int(np.ceil(len(images) / columns))
    fig = Figure(figsize=(1.6 * columns, 1.9 * rows))
    axes = fig.subplots(rows, columns)
    for ax in np.atleast_1d(axes).ravel():
        ax.axis("off")
    for k, ax in enumerate(np.atleast_1d(axes).ravel()[: len(images)]):
        pred = int(probabilities[k].argmax())
        wrong = pred != int(labels[k])
        ax.imshow(images[k, 0].cpu(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(
            f"#{indices[k]}\ntrue {int(labels[k])} pred {pred} ({probabilities[k, pred]:.2f})",
            fontsize=8,
            color="red" if wrong else "black",
        )
        if wrong:
            ax.axis("on")
            ax.set(xticks=[], yticks=[])
            for spine in ax.spines.values():
                spine.set(color="red", lw=2.5)
    fig.tight_layout()
    return fig


def confusion_matrix_figure(matrix: torch.Tensor) -> Figure:
    """The 10 x 10 confusion matrix (rows: true class, columns: predicted), off-diagonal counts shown."""
    fig = Figure(figsize=(6.2, 5.4))
    ax = fig.subplots()
    m = matrix.cpu().numpy()
    off = m.copy()
    np.fill_diagonal(off, 0)
    im = ax.imshow(off, cmap="Reds")
    for i in range(10):
        for j in range(10):
            if m[i, j]:
                ax.text(
                    j,
                    i,
                    m[i, j],
                    ha="center",
                    va="center",
                    fontsize=7,
                    # White on the darkest error cells, where black would not read.
                    color="tab:blue"
                    if i == j
                    else "white"
                    if off[i, j] > off.max() / 2
                    else "black",
                )
    ax.set(
        xticks=range(10),
        yticks=range(10),
        xlabel="predicted class",
        ylabel="true class",
        title="test confusion matrix (colour: errors only)",
    )
    fig.colorbar(im, ax=ax, label="misclassified images")
    fig.tight_layout()
    return fig


def seed_comparison(
    accuracies: dict[str, Sequence[float]], seconds: dict[str, Sequence[float]]
) -> Figure:
    """Per-seed test accuracy and seconds per epoch of each variant, with the mean marked."""
    fig = Figure(figsize=(10, 3.8))
    axes = fig.subplots(1, 2)
    for ax, values, label in (
        (axes[0], accuracies, "test accuracy (%)"),
        (axes[1], seconds, "seconds per epoch"),
    ):
        for i, raw in enumerate(values.values()):
            vals = np.asarray(raw) * (100 if ax is axes[0] else 1)
            ax.scatter(np.full(len(vals), i), vals, s=40, zorder=3)
            ax.errorbar(
                i + 0.15,
                vals.mean(),
                yerr=vals.std(ddof=1) if len(vals) > 1 else 0,
                fmt="_",
                markersize=18,
                capsize=5,
                color="black",
            )
        ax.set(
            xticks=range(len(values)),
            xticklabels=list(values),
            ylabel=label,
            xlim=(-0.5, len(values) - 0.5),
        )
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_title("test accuracy per seed (bar: mean +- std)")
    axes[1].set_title("training time per epoch per seed")
    fig.tight_layout()
    return fig


def layer_table_markdown(rows: Sequence[LayerRow]) -> str:
    """The layer table as a Markdown table."""
    cells = [
        (
            r.name,
            r.kind,
            " x ".join(map(str, r.input_shape)),
            " x ".join(map(str, r.output_shape)),
            f"{r.params:,}",
        )
        for r in rows
    ]
    # The network returns logits; the softmax is applied by the loss and by `predict`, never twice.
    classes = " x ".join(map(str, rows[-1].output_shape))
    cells.append(("softmax", "in the loss and in `predict`", classes, classes, "0"))
    header = ["layer", "type", "input", "output", "parameters"]
    return markdown_table(header, cells, "llllr")
