"""Part 2 (b): feature maps after every layer, and what changes going deeper.

Each layer's receptive field (the input square one position sees) is derived analytically here;
the optional part's single-neuron images (`feature_images`) are drawn inside it.

Every measurement runs in fp32 (autocast off), in eval mode, without gradients, and leaves the
model's mode as it found it; figure functions return a matplotlib Figure built without pyplot.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from .model import frozen_eval

TOP_FRACTION = 0.1  # localisation: share of a map's activation mass in its strongest 10% positions


def feature_layers(model: nn.Module) -> list[str]:
    """Names of the layers in `model.layers` that output feature maps (all before flatten)."""
    names = []
    for name, layer in model.layers.named_children():
        if isinstance(layer, nn.Flatten):
            break
        names.append(name)
    return names


def feature_maps(
    model: nn.Module, images: torch.Tensor, layers: Sequence[str] | None = None
) -> dict[str, torch.Tensor]:
    """Output of each named layer (default: every conv, BN, ReLU and pool layer) for `images`."""
    layers = list(layers or feature_layers(model))
    modules = dict(model.layers.named_children())
    outputs: dict[str, torch.Tensor] = {}
    hooks = []
    for name in layers:

        def keep(module, inputs, output, name=name):
            outputs[name] = output.detach().float().clone().cpu()

        hooks.append(modules[name].register_forward_hook(keep))
    try:
        with frozen_eval(model), torch.no_grad():
            model(images.to(next(model.parameters()).device).float())
    finally:
        for h in hooks:
            h.remove()
    return {name: outputs[name] for name in layers}


@dataclass(frozen=True)
class ReceptiveField:
    """How one position of a feature map sees the input: side `size`, stride `jump`, first centre."""

    size: int
    jump: int
    first_centre: float  # input coordinate of the centre of output position 0

    def box(self, position: tuple[int, int], image_size: int = 28) -> tuple[int, int, int, int]:
        """(row0, row1, col0, col1), half-open, of the input pixels `position` sees, clipped."""
        bounds = []
        for p in position:
            lo = math.ceil(self.first_centre + p * self.jump - (self.size - 1) / 2)
            bounds += [max(lo, 0), min(lo + self.size, image_size)]
        return bounds[0], bounds[1], bounds[2], bounds[3]


def receptive_field(model: nn.Module, layer: str) -> ReceptiveField:
    """Receptive field of `layer`, derived analytically from its kernels, strides and paddings.

    r_out = r_in + (k - 1) j_in;  j_out = j_in s;  centre_out = centre_in + ((k - 1) / 2 - p) j_in.
    """
    size, jump, first = 1, 1, 0.0
    for name, module in model.layers.named_children():
        if isinstance(module, nn.Conv2d | nn.MaxPool2d):
            k, s, p = (
                v if isinstance(v, int) else v[0]
                for v in (module.kernel_size, module.stride, module.padding)
            )
            first += ((k - 1) / 2 - p) * jump
            size += (k - 1) * jump
            jump *= s
        if name == layer:
            return ReceptiveField(size, jump, first)
    raise ValueError(f"no layer {layer!r} in model.layers")


def top_mass_share(maps: torch.Tensor, fraction: float = TOP_FRACTION) -> torch.Tensor:
    """Per map (N, C, H, W): share of |activation| mass in its strongest `fraction` of positions.

    A flat map scores `fraction`, a single hot spot 1. All-zero maps give NaN (no mass to share).
    """
    flat = maps.abs().flatten(2)
    k = max(1, math.ceil(fraction * flat.shape[-1]))
    total = flat.sum(-1)
    top = flat.topk(k, dim=-1).values.sum(-1)
    return torch.where(
        total > 0, top / total.clamp_min(1e-30), torch.full_like(total, float("nan"))
    )


def activation_statistics(
    model: nn.Module, images: torch.Tensor, batch_size: int = 250
) -> dict[str, dict[str, object]]:
    """Per feature layer, measured over `images`: shape, receptive field, fraction of exact zeros,
    fraction of all-zero maps, and localisation (top-10% mass share, mean over non-zero maps)."""
    sums: dict[str, dict[str, float]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for start in range(0, len(images), batch_size):
        for name, maps in feature_maps(model, images[start : start + batch_size]).items():
            shapes[name] = tuple(maps.shape[1:])
            share = top_mass_share(maps)
            acc = sums.setdefault(
                name, dict.fromkeys(("zeros", "values", "dead", "maps", "top"), 0.0)
            )
            acc["zeros"] += float((maps == 0).sum())
            acc["values"] += maps.numel()
            acc["dead"] += float(share.isnan().sum())
            acc["maps"] += share.numel()
            acc["top"] += float(share.nan_to_num(0.0).sum())
    stats = {}
    for name, acc in sums.items():
        c, h, w = shapes[name]
        live = acc["maps"] - acc["dead"]
        stats[name] = {
            "channels": c,
            "resolution": [h, w],
            "receptive_field": receptive_field(model, name).size,
            "zero_fraction": acc["zeros"] / acc["values"],
            "dead_map_fraction": acc["dead"] / acc["maps"],
            "top10_mass_share": acc["top"] / live if live else float("nan"),
            "flat_map_top10_share": math.ceil(TOP_FRACTION * h * w) / (h * w),
        }
    return stats


def nearest_centroid_accuracy(
    model: nn.Module,
    fit_images: torch.Tensor,
    fit_labels: torch.Tensor,
    eval_images: torch.Tensor,
    eval_labels: torch.Tensor,
    batch_size: int = 500,
) -> dict[str, float]:
    """Accuracy of a nearest-class-mean classifier on the pixels and on each feature layer's maps.

    Class means come from `fit_images`; accuracy is measured on `eval_images`. It asks how far the
    classes have been pulled apart by each layer, with no training at all. Batched, so memory stays
    at one batch of maps whatever the number of images.
    """

    def batches(images: torch.Tensor, labels: torch.Tensor):
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            features = {"input": chunk.float().cpu().flatten(1)}
            features.update({n: m.flatten(1) for n, m in feature_maps(model, chunk).items()})
            yield features, labels[start : start + batch_size].cpu()

    n_classes = int(max(fit_labels.max(), eval_labels.max())) + 1
    sums: dict[str, torch.Tensor] = {}
    counts = torch.zeros(n_classes)
    for features, labels in batches(fit_images, fit_labels):
        counts += torch.bincount(labels, minlength=n_classes)
        for name, x in features.items():
            zero = torch.zeros(n_classes, x.shape[1])
            sums[name] = sums.get(name, zero).index_add_(0, labels, x)
    present = counts.nonzero()[:, 0]  # classes without a fitting image get no centroid
    centroids = {name: total[present] / counts[present, None] for name, total in sums.items()}
    correct = dict.fromkeys(sums, 0)
    for features, labels in batches(eval_images, eval_labels):
        for name, x in features.items():
            predicted = present[torch.cdist(x, centroids[name]).argmin(1)]
            correct[name] += int((predicted == labels).sum())
    return {name: hits / len(eval_images) for name, hits in correct.items()}


def mosaic(tiles: torch.Tensor, ncols: int, gap: int = 1) -> np.ndarray:
    """(N, h, w) tiles laid out row-major in `ncols` columns, NaN in the gaps and unused cells."""
    tiles = tiles.detach().float().cpu()
    n, h, w = tiles.shape
    nrows = math.ceil(n / ncols)
    out = np.full((nrows * (h + gap) - gap, ncols * (w + gap) - gap), np.nan, dtype=np.float32)
    for i in range(n):
        r, c = divmod(i, ncols)
        out[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = tiles[i]
    return out


def show_mosaic(ax, tiles: torch.Tensor, ncols: int, gap: int = 1, **imshow):
    """Draw a mosaic on `ax` (grey gaps, no ticks); return the image and the tile pitch (h, w)."""
    image = ax.imshow(mosaic(tiles, ncols, gap), interpolation="nearest", **imshow)
    ax.set_facecolor("0.75")
    ax.set_xticks([])
    ax.set_yticks([])
    return image, (tiles.shape[1] + gap, tiles.shape[2] + gap)


def plot_feature_maps(
    model: nn.Module, images: torch.Tensor, labels: Sequence[int] | None = None
) -> Figure:
    """For each image (column): the input, then every feature layer's maps tiled 8 per row.

    Reading down a column goes deeper. One colour scale per layer, shared by the images: diverging
    for signed layers (conv, BN), sequential from 0 for the non-negative ones (ReLU, pool). Each
    panel gives that image's fraction of exact zeros in the layer.
    """
    maps = feature_maps(model, images)
    names = list(maps)
    n = len(images)
    fig = Figure(figsize=(4.3 * n + 1.8, 2.3 * (len(names) + 1) + 0.5), layout="constrained")
    axes = fig.subplots(len(names) + 1, n, squeeze=False)

    def label_row(ax, text: str) -> None:
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.set_ylabel(text, fontsize=9)

    for c in range(n):
        ax = axes[0, c]
        ax.imshow(images[c, 0].cpu().numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_title("input" + (f", label {labels[c]}" if labels is not None else ""), fontsize=9)
        label_row(ax, "input\n1 x 28x28" if c == 0 else "")
    for r, name in enumerate(names, start=1):
        stack = maps[name]
        channels, h, w = stack.shape[1:]
        signed = bool((stack < 0).any())
        limit = float(stack.abs().max()) or 1.0
        style = {"cmap": "RdBu_r", "vmin": -limit} if signed else {"cmap": "magma", "vmin": 0.0}
        for c in range(n):
            ax = axes[r, c]
            im = ax.imshow(mosaic(stack[c], 8), interpolation="nearest", vmax=limit, **style)
            ax.set_facecolor("0.6")  # the gaps between channels
            zeros = float((stack[c] == 0).float().mean())
            ax.set_title(f"{name}: zeros {zeros:.0%}", fontsize=8)
            label_row(ax, f"{name}\n{channels} x {h}x{w}" if c == 0 else "")
        fig.colorbar(im, ax=axes[r, :], location="right", shrink=0.9, aspect=10)
    kinds = " / ".join(dict.fromkeys(name.rstrip("0123456789") for name in names))
    fig.suptitle(
        f"Feature maps after every {kinds} layer, deeper going down "
        "(32 channels tiled 8 per row; one colour scale per layer)"
    )
    return fig


def plot_activation_statistics(
    stats: dict[str, dict[str, object]], centroid_accuracy: dict[str, float] | None = None
) -> Figure:
    """Per layer, going deeper: fraction of zeros, localisation and (optionally) separation."""
    names = list(stats)
    x = np.arange(len(names))
    panels = 3 if centroid_accuracy else 2
    fig = Figure(figsize=(4.2 * panels, 3.6), layout="constrained")
    axes = fig.subplots(1, panels)
    ticks = [f"{n}\n{stats[n]['resolution'][0]}x{stats[n]['resolution'][1]}" for n in names]
    axes[0].bar(
        x, [stats[n]["zero_fraction"] for n in names], color="tab:blue", label="exact zeros"
    )
    axes[0].plot(x, [stats[n]["dead_map_fraction"] for n in names], "ko-", label="all-zero maps")
    axes[0].set_ylabel("fraction")
    axes[0].set_ylim(0, 1)
    axes[0].set_title("Sparsity")
    axes[0].legend(fontsize=8)
    axes[1].plot(x, [stats[n]["top10_mass_share"] for n in names], "o-", label="measured")
    axes[1].plot(x, [stats[n]["flat_map_top10_share"] for n in names], "k--", label="flat map")
    axes[1].set_ylabel("share of |activation| in top 10% positions")
    axes[1].set_ylim(0, 1)
    axes[1].set_title("Localisation (non-zero maps)")
    axes[1].legend(fontsize=8)
    for ax in axes[:2]:
        ax.set_xticks(x, ticks, fontsize=8)
    if centroid_accuracy:
        keys = ["input", *names]
        axes[2].plot(range(len(keys)), [centroid_accuracy[k] for k in keys], "o-")
        axes[2].set_xticks(range(len(keys)), keys, fontsize=8, rotation=45)
        axes[2].set_ylabel("test accuracy")
        axes[2].set_title("Nearest-class-mean accuracy on the maps")
    fig.suptitle("What changes going deeper")
    return fig
