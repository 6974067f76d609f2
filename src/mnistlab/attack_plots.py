"""Figures for Part 3 (adversarial examples); every function returns a matplotlib Figure."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib
import matplotlib.figure
import numpy as np
import torch
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure


def _pixels(image: torch.Tensor) -> np.ndarray:
    return image.detach().cpu().reshape(28, 28).numpy()


def plot_image_row(
    images: torch.Tensor, titles: Sequence[str], suptitle: str, columns: int = 5
) -> matplotlib.figure.Figure:
    """Images in [0, 1] on a grid (grey scale, 0 black, 1 white) with a title each and a colour bar."""
    rows = -(-len(images) // columns)
    fig = Figure(figsize=(2.1 * columns, 2.5 * rows))
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, title in zip(axes.flat, images, titles, strict=False):
        shown = ax.imshow(_pixels(image), cmap="gray", vmin=0.0, vmax=1.0)
        ax.set_title(title, fontsize=8)
    fig.suptitle(suptitle)
    fig.tight_layout()
    fig.colorbar(shown, ax=axes, shrink=0.6, label="pixel value ([0, 1] scale)")
    return fig


def plot_cost_curves(
    costs: torch.Tensor, targets: torch.Tensor, title: str
) -> matplotlib.figure.Figure:
    """Cost C against iteration, one line per target class (costs: iterations + 1 by N)."""
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    steps = np.arange(len(costs))
    cmap = matplotlib.colormaps["tab10"]
    for j, target in enumerate(targets.tolist()):
        ax.plot(steps, costs[:, j].cpu().numpy(), color=cmap(target % 10), label=f"{target}")
    ax.set_xlabel("iteration (gradient-ascent steps)")
    ax.set_ylabel("cost C")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(title="target", ncol=2, fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return fig


def plot_beta_sweep(
    sweep: Sequence[dict[str, float]], chosen: float | None = None
) -> matplotlib.figure.Figure:
    """Targets reached, mean confidence and MSEs against beta (symmetric-log axis, so 0 fits)."""
    betas = np.array([row["beta"] for row in sweep], dtype=float)
    positive = betas[betas > 0]
    linthresh = positive.min() if len(positive) else 1.0
    fig = Figure(figsize=(13, 3.6))
    axes = fig.subplots(1, 3)
    axes[0].plot(betas, [row["success"] for row in sweep], "o-")
    axes[0].set_ylabel("targets reached (of 10)")
    axes[0].set_ylim(-0.5, 10.5)
    axes[1].plot(betas, [row["mean_confidence"] for row in sweep], "o-")
    axes[1].set_ylabel("mean softmax(target)")
    axes[1].set_ylim(-0.05, 1.05)
    axes[2].plot(betas, [row["mean_mse"] for row in sweep], "o-", label="to the target image")
    axes[2].plot(
        betas, [row["mean_mse_start"] for row in sweep], "s--", label="to the starting noise"
    )
    axes[2].set_ylabel("mean MSE per pixel ([0, 1] scale)")
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.set_xscale("symlog", linthresh=linthresh)
        ax.set_xlim(left=0.0, right=betas.max() * 1.5 if betas.max() > 0 else 1.0)
        ax.set_xlabel("beta")
        ax.grid(alpha=0.3)
        if chosen is not None:
            ax.axvline(chosen, color="grey", ls=":", label=None)
    fig.suptitle("(b) targeted attack: sweep of beta (dotted line: chosen beta)")
    fig.tight_layout()
    return fig


def plot_noise_attack(
    originals: torch.Tensor,
    noises: torch.Tensor,
    adversarial: torch.Tensor,
    original_titles: Sequence[str],
    noise_titles: Sequence[str],
    adversarial_titles: Sequence[str],
) -> matplotlib.figure.Figure:
    """Three rows: the original images, the noises (diverging colours, 0 white) and x + noise."""
    n = len(noises)
    fig = Figure(figsize=(1.75 * n, 6.6))
    axes = fig.subplots(3, n, squeeze=False)
    bound = float(noises.abs().max()) or 1.0
    norm = TwoSlopeNorm(vmin=-bound, vcenter=0.0, vmax=bound)
    for j in range(n):
        grey = axes[0, j].imshow(_pixels(originals[j]), cmap="gray", vmin=0, vmax=1)
        axes[0, j].set_title(original_titles[j], fontsize=7)
        diverging = axes[1, j].imshow(_pixels(noises[j]), cmap="seismic", norm=norm)
        axes[1, j].set_title(noise_titles[j], fontsize=7)
        axes[2, j].imshow(_pixels(adversarial[j]), cmap="gray", vmin=0, vmax=1)
        axes[2, j].set_title(adversarial_titles[j], fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for row, label in enumerate(("original x", "noise", "x + noise")):
        axes[row, 0].set_ylabel(label)
    fig.suptitle("(c) additive noise: one noise per target class")
    fig.tight_layout(rect=(0, 0, 0.93, 1))
    # One colour bar per row, each beside its own row, so that the two scales cannot be confused.
    for row, mappable, label in ((0, grey, "pixel"), (1, diverging, "noise"), (2, grey, "pixel")):
        box = axes[row, -1].get_position()
        cax = fig.add_axes((0.945, box.y0, 0.01, box.height))
        fig.colorbar(mappable, cax=cax, label=label)
    return fig


def plot_transfer_table(
    images: torch.Tensor,
    noises: torch.Tensor,
    labels: torch.Tensor,
    clean: torch.Tensor,
    predicted: torch.Tensor,
    targets: torch.Tensor,
) -> matplotlib.figure.Figure:
    """10 x (1 + 10) grid: each fixed test image clean, then with each noise; prediction in titles.

    Titles are black where the prediction stays as on the clean image, green where it changes to
    the noise's target, red where it changes to another class.
    """
    n_img, n_noise = predicted.shape
    fig = Figure(figsize=(1.2 * (n_noise + 1), 1.35 * n_img))
    axes = fig.subplots(n_img, n_noise + 1)
    for i in range(n_img):
        axes[i, 0].imshow(_pixels(images[i]), cmap="gray", vmin=0, vmax=1)
        axes[i, 0].set_title(f"true {int(labels[i])} pred {int(clean[i])}", fontsize=6)
        for j in range(n_noise):
            noisy = (images[i] + noises[j]).clamp(0, 1)
            axes[i, j + 1].imshow(_pixels(noisy), cmap="gray", vmin=0, vmax=1)
            pred = int(predicted[i, j])
            colour = (
                "black" if pred == int(clean[i]) else "green" if pred == int(targets[j]) else "red"
            )
            axes[i, j + 1].set_title(f"pred {pred}", fontsize=6, color=colour)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_title(f"clean\ntrue {int(labels[0])} pred {int(clean[0])}", fontsize=6)
    for j in range(n_noise):
        axes[0, j + 1].set_title(
            f"noise->{int(targets[j])}\npred {int(predicted[0, j])}",
            fontsize=6,
            color=axes[0, j + 1].title.get_color(),
        )
    fig.suptitle(
        "(c) every noise on every fixed test image (green: changed to the noise's target; "
        "red: changed to another class)",
        fontsize=9,
    )
    fig.tight_layout()
    return fig


def plot_norm_comparison(
    pair_labels: Sequence[str],
    assignment: dict[str, torch.Tensor],
    reference: dict[str, torch.Tensor],
    reference_names: dict[str, str],
) -> matplotlib.figure.Figure:
    """Bars of the L2 and L-infinity norms of the assignment's noise and of a reference attack.

    `reference` and `reference_names` are keyed "l2" and "linf"; NaN bars (no success) are empty.
    """
    x = np.arange(len(pair_labels))
    fig = Figure(figsize=(12, 3.8))
    axes = fig.subplots(1, 2)
    for ax, key, name in zip(axes, ("l2", "linf"), ("L2", "L-infinity"), strict=True):
        ax.bar(x - 0.2, assignment[key].cpu().numpy(), 0.4, label="assignment's noise (c)")
        ax.bar(x + 0.2, reference[key].cpu().numpy(), 0.4, label=reference_names[key])
        tallest = torch.cat([assignment[key], reference[key]]).nan_to_num(0.0).max().item()
        ax.set_ylim(0.0, 1.3 * tallest or 1.0)  # head room for the legend
        ax.set_xticks(x, pair_labels, fontsize=8)
        ax.set_xlabel("original class -> target class")
        ax.set_ylabel(f"{name} norm ([0, 1] scale)")
        ax.set_title(f"{name} norm of the perturbation", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, ncol=2, loc="upper center")
    fig.suptitle("(c) size of the perturbation: the assignment's noise against targeted PGD")
    fig.tight_layout()
    return fig


def plot_success_vs_radius(
    radii: Sequence[float], successes: dict[str, Sequence[int]], pairs: int
) -> matplotlib.figure.Figure:
    """Targets reached (out of `pairs`) against the L-infinity radius, one line per attack.

    The radius is on the [0, 1] scale; a second axis on top gives it in grey levels.
    """
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for (name, counts), marker in zip(successes.items(), "osd^v", strict=False):
        ax.plot(radii, counts, marker=marker, label=name)
    ax.set_xlabel("L-infinity radius of the noise ([0, 1] scale)")
    ax.set_ylabel(f"targets reached (of {pairs})")
    ax.set_ylim(-0.3, pairs + 0.3)
    ax.set_yticks(range(0, pairs + 1, max(1, pairs // 5)))
    top = ax.secondary_xaxis("top", functions=(lambda r: 255 * r, lambda g: g / 255))
    top.set_xlabel("grey levels (0..255)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title("(c) the noise within an L-infinity budget", fontsize=10, pad=10)
    fig.tight_layout()
    return fig
