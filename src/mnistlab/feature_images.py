"""Optional part 1, its last question: images that maximise an intermediate feature or one neuron.

The same ascent as the class models (`ascent`: J = S - lambda * ||I||^2 from a black image, clamped
to [0, 1]), with S an intermediate feature: the pre-activation of conv1 / conv2 (the input of the
ReLU after each, i.e. after BN in the bn variant), read with a forward pre-hook that also stops the
forward pass. Either a channel's mean over positions, or one neuron: one position of one channel,
which can only change the pixels of its receptive field (`activations.receptive_field`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import nn

from .activations import ReceptiveField, receptive_field, show_mosaic
from .ascent import AscentConfig, AscentResult, ScoreFn, gradient_ascent, rise_summary, zero_images
from .class_models import centre_share
from .model import MNIST_STD, frozen_eval
from .train import predict

# --- The settings the report uses ----------------------------------------------------------------
# A conv1 pre-activation is linear in the pixels, so J is concave and step 0.1 with
# lambda 0.5 contracts to its exact maximiser (factor 1 - 2 * lambda * step = 0.9 per step); conv2 is
# not, and rises smoothly with a smaller step. A channel MEAN is ascended as the channel SUM with the
# settings under "mean" (see per_position); the conv2 sum takes a 10x smaller step than one neuron,
# since each pixel feeds up to 16 conv2 positions, so its gradient is that much larger (the notebook
# reports how often J fell and how many images end higher than they began).

FEATURES = {
    "conv1": {
        "neuron": AscentConfig(step_size=0.1, l2=0.5),
        "mean": AscentConfig(step_size=0.1, l2=0.5),
    },
    "conv2": {
        "neuron": AscentConfig(step_size=0.03, l2=0.1),
        "mean": AscentConfig(step_size=0.003, l2=0.1),
    },
}


class _Captured(Exception):
    """Raised by a hook to stop the forward pass once the wanted activation is in hand."""


def relu_after(model: nn.Module, layer: str) -> str:
    """Name of the ReLU that follows `layer` in model.layers (its input is the pre-activation)."""
    names = [name for name, _ in model.layers.named_children()]
    if layer not in names:
        raise ValueError(f"no layer {layer!r} in model.layers ({', '.join(names)})")
    for name in names[names.index(layer) + 1 :]:
        if isinstance(model.layers.get_submodule(name), nn.ReLU):
            return name
    raise ValueError(f"no ReLU after {layer!r}")


def preactivation(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    """The input of the ReLU after `layer` (conv output; after BN in the bn variant), (N, C, H, W).

    The forward pass stops there, so the layers above cost nothing. The pre-activation is what is
    maximised: a ReLU output has zero gradient wherever the channel is off, which on a black start
    image can be everywhere, and the ascent would never move.
    """
    captured: list[torch.Tensor] = []

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        captured.append(inputs[0])
        raise _Captured

    handle = model.layers.get_submodule(relu_after(model, layer)).register_forward_pre_hook(hook)
    try:
        model(x)
    except _Captured:
        pass
    finally:
        handle.remove()
    return captured[0]


def feature_score(
    layer: str, channels: torch.Tensor, position: tuple[int, int] | None = None
) -> ScoreFn:
    """Score: image i's pre-activation in channel channels[i], spatial mean or the neuron at `position`."""

    def score(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        maps = preactivation(model, layer, x)
        picked = maps[torch.arange(len(x), device=x.device), channels.to(x.device)]  # (N, H, W)
        if position is None:
            return picked.mean(dim=(1, 2))
        return picked[:, position[0], position[1]]

    return score


def feature_map_size(model: nn.Module, layer: str) -> tuple[int, int]:
    """Height and width of `layer`'s feature maps for a 28x28 input."""
    device = next(model.parameters()).device
    with frozen_eval(model), torch.no_grad():
        maps = preactivation(model, layer, zero_images(1, device))
    return int(maps.shape[2]), int(maps.shape[3])


def centre_position(model: nn.Module, layer: str) -> tuple[int, int]:
    """The centre position (H // 2, W // 2) of `layer`'s feature maps."""
    h, w = feature_map_size(model, layer)
    return h // 2, w // 2


def per_position(config: AscentConfig, positions: int) -> AscentConfig:
    """The config that makes a spatial-MEAN ascent step exactly like a single-neuron one.

    A channel mean over H x W positions has gradients H x W times smaller than one neuron's, so the
    step is scaled up and lambda down by that factor (equivalent to maximising the channel's sum).
    """
    return replace(config, step_size=config.step_size * positions, l2=config.l2 / positions)


def maximise_features(
    model: nn.Module,
    layer: str,
    config: AscentConfig,
    position: tuple[int, int] | None = None,
    channels: Sequence[int] | torch.Tensor | None = None,
    progress: bool = False,
) -> AscentResult:
    """One image per channel of `layer` (one batch) maximising its mean, or one neuron at `position`."""
    device = next(model.parameters()).device
    if channels is None:
        channels = range(model.layers.get_submodule(layer).out_channels)
    channels = torch.as_tensor(list(channels), dtype=torch.long, device=device)
    score = feature_score(layer, channels, position)
    start = zero_images(len(channels), device)
    return gradient_ascent(model, score, start, config, progress=progress)


def effective_weight(model: nn.Module, layer: str) -> torch.Tensor:
    """`layer`'s kernels as its pre-activation sees them: times the BN scale when BN follows (eval)."""
    weight = model.layers.get_submodule(layer).weight.detach().float().cpu()
    names = [name for name, _ in model.layers.named_children()]
    nxt = model.layers.get_submodule(names[names.index(layer) + 1])
    if isinstance(nxt, nn.BatchNorm2d):
        scale = nxt.weight.detach().float().cpu() / (nxt.running_var.float().cpu() + nxt.eps).sqrt()
        weight = weight * scale.view(-1, 1, 1, 1)
    return weight


def linear_neuron_optimum(
    model: nn.Module, layer: str, position: tuple[int, int], l2: float
) -> torch.Tensor:
    """Exact maximiser of one conv1 neuron's pre-activation minus l2 * ||x||^2 in [0, 1], per channel.

    The pre-activation is linear in the pixels with gradient w / MNIST_STD (the model normalises)
    on the 3x3 window and 0 elsewhere, and J is separable and concave per pixel, so the box-
    constrained maximiser is clamp(w / (MNIST_STD * 2 * l2), 0, 1) in the window, black elsewhere.
    Only for a first conv layer, at a position whose window lies inside the image.
    """
    weight = effective_weight(model, layer)  # (C, 1, k, k)
    if weight.shape[1] != 1:
        raise ValueError(f"{layer} does not read the image directly")
    k = weight.shape[-1]
    r0, r1, c0, c1 = receptive_field(model, layer).box(position)
    if (r1 - r0, c1 - c0) != (k, k):
        raise ValueError(f"the window at {position} is cut by the border")
    out = zero_images(len(weight))
    out[:, :, r0:r1, c0:c1] = (weight / (MNIST_STD * 2 * l2)).clamp(0.0, 1.0)
    return out


def changed_box_sizes(images: torch.Tensor, start: torch.Tensor, tol: float = 1e-3) -> torch.Tensor:
    """(N, 2) height and width of the bounding box of pixels that moved more than `tol` (0: none)."""
    moved = ((images - start).abs() > tol)[:, 0].cpu()  # (N, H, W)
    sizes = []
    for m in moved:
        rows, cols = m.any(dim=1).nonzero(), m.any(dim=0).nonzero()
        if len(rows) == 0:
            sizes.append((0, 0))
        else:
            sizes.append((int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)))
    return torch.tensor(sizes, dtype=torch.long).view(-1, 2)


def feature_observations(
    model: nn.Module,
    judge: nn.Module,
    layer: str,
    mean_result: AscentResult,
    neuron_result: AscentResult,
    position: tuple[int, int],
    neuron_l2: float,
    mean_l2: float,
) -> dict[str, object]:
    """What one layer's maximisers show, measured: where a neuron's image changes, how flat a mean is.

    mean_result: one image per channel maximising its mean, ascended in sum units with lambda
    `mean_l2` (see per_position); neuron_result: one per channel maximising the neuron at
    `position` with lambda `neuron_l2`. For a layer that reads the image (conv1) the pre-activation
    is linear, so both are also compared with their exact maximisers.
    """
    field = receptive_field(model, layer)
    r0, r1, c0, c1 = field.box(position)
    boxes = changed_box_sizes(neuron_result.images, neuron_result.start)
    outside = (neuron_result.images - neuron_result.start).abs() > 1e-3
    outside[:, :, r0:r1, c0:c1] = False
    # Pixel 0 and 27 meet the zero padding, so only rows and columns 1..26 see every weight.
    interior = mean_result.images[:, 0, 1:-1, 1:-1].flatten(1)
    judge_probs = predict(judge, mean_result.images.to(next(judge.parameters()).device))
    obs: dict[str, object] = {
        "receptive_field": field.size,
        "neuron_changed_box_max": boxes.max(dim=0).values.tolist(),
        "neuron_changed_box_mean": boxes.float().mean(dim=0).tolist(),
        "neuron_changed_pixels_outside_field": int(outside.sum()),
        "mean_image_interior_std": interior.std(dim=1).mean().item(),
        "mean_image_centre_share": centre_share(mean_result.images).mean().item(),
        "mean_rise": rise_summary(mean_result.objective),
        "neuron_rise": rise_summary(neuron_result.objective),
        "judge_max_probability_mean_images": judge_probs.max(dim=1).values.mean().item(),
    }
    weight = effective_weight(model, layer)
    if weight.shape[1] == 1:
        optimum = linear_neuron_optimum(model, layer, position, neuron_l2)
        window = optimum[:, 0, r0:r1, c0:c1]
        # Every interior pixel meets all k x k weights of a channel once in its sum, so its gradient
        # is the kernel sum / MNIST_STD, and the sum's maximiser is flat there.
        flat = (weight.sum(dim=(1, 2, 3)) / (MNIST_STD * 2 * mean_l2)).clamp(0.0, 1.0)
        obs |= {
            "neuron_max_error_vs_analytic_optimum": (neuron_result.images - optimum)
            .abs()
            .max()
            .item(),
            "neuron_window_pixels_strictly_inside_0_1": ((window > 0) & (window < 1))
            .float()
            .mean()
            .item(),
            "mean_image_max_error_vs_analytic_interior": (interior - flat.view(-1, 1))
            .abs()
            .max()
            .item(),
            "mean_image_interior_share_lit": (flat > 0).float().mean().item(),
        }
    return obs


# ==================================================================================================
# Figures (each returns a Figure built without pyplot)
# ==================================================================================================


def _label_tiles(ax, n: int, ncols: int, pitch: tuple[int, int], colour: str = "yellow") -> None:
    """Write each tile's index in its top-left corner."""
    for i in range(n):
        r, c = divmod(i, ncols)
        ax.text(c * pitch[1], r * pitch[0], str(i), color=colour, fontsize=6, va="top", ha="left")


def plot_feature_images(
    layer: str,
    weight: torch.Tensor,
    mean_images: torch.Tensor,
    neuron_images: torch.Tensor,
    field: ReceptiveField,
    position: tuple[int, int],
    margin: int = 3,
    ncols: int = 8,
) -> Figure:
    """A layer's filters, its channel-mean maximisers and its single-neuron maximisers (cropped).

    weight: the layer's effective kernels (C_out, C_in, k, k); for C_in = 1 each kernel is a tile,
    otherwise the whole C_out x C_in mosaic. The neuron crops show the receptive field plus
    `margin` pixels; the red frame is the analytic receptive field. Tiles are numbered by channel.
    """
    n = len(mean_images)
    fig = Figure(figsize=(19, 5.4), layout="constrained")
    ax_w, ax_m, ax_n = fig.subplots(1, 3)
    limit = float(weight.abs().max())
    c_out, c_in, k, _ = weight.shape
    if c_in == 1:
        im, pitch = show_mosaic(ax_w, weight[:, 0], ncols, cmap="RdBu_r", vmin=-limit, vmax=limit)
        _label_tiles(ax_w, n, ncols, pitch, colour="black")
        ax_w.set_title(f"{layer} kernels (effective), one per channel: red +, blue -", fontsize=10)
    else:
        im, pitch = show_mosaic(
            ax_w, weight.flatten(0, 1), c_in, cmap="RdBu_r", vmin=-limit, vmax=limit
        )
        ticks = np.arange(0, max(c_out, c_in), 8)
        ax_w.set_xticks(ticks[ticks < c_in] * pitch[1] + (k - 1) / 2, ticks[ticks < c_in])
        ax_w.set_yticks(ticks[ticks < c_out] * pitch[0] + (k - 1) / 2, ticks[ticks < c_out])
        ax_w.set(xlabel="input channel (a map, not pixels)", ylabel="output channel")
        ax_w.set_title(f"{layer} kernels (effective): {c_out} x {c_in} of {k}x{k}", fontsize=10)
    fig.colorbar(im, ax=ax_w, shrink=0.75, label="weight")
    _, pitch = show_mosaic(ax_m, mean_images[:, 0], ncols, cmap="gray", vmin=0, vmax=1)
    _label_tiles(ax_m, n, ncols, pitch)
    ax_m.set_title(f"maximise the MEAN of each {layer} channel (28x28 image)", fontsize=10)
    r0, r1, c0, c1 = field.box(position)
    top, left = max(r0 - margin, 0), max(c0 - margin, 0)
    bottom, right = min(r1 + margin, 28), min(c1 + margin, 28)
    crops = neuron_images[:, 0, top:bottom, left:right]
    _, pitch = show_mosaic(ax_n, crops, ncols, cmap="gray", vmin=0, vmax=1)
    for i in range(n):
        r, c = divmod(i, ncols)
        corner = (c * pitch[1] + c0 - left - 0.5, r * pitch[0] + r0 - top - 0.5)
        ax_n.add_patch(Rectangle(corner, c1 - c0, r1 - r0, fill=False, ec="red", lw=0.6))
    _label_tiles(ax_n, n, ncols, pitch)
    ax_n.set_title(
        f"maximise ONE {layer} neuron at {position}: crop rows {top}-{bottom - 1}, "
        f"cols {left}-{right - 1}\n(red: its {field.size}x{field.size} receptive field)",
        fontsize=10,
    )
    return fig
