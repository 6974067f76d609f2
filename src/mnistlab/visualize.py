"""Part 2: seeing inside the network: filters, feature maps and occlusion maps.

Every measurement here runs in fp32 (autocast off), in eval mode, without gradients, and leaves the
model's mode as it found it; figure functions return a matplotlib Figure built without pyplot, so
nothing is shown or kept alive behind the caller's back.

Filters are described by a stated measure rather than by eye: each 3x3 kernel's energy is split
into orthogonal parts, its odd part (positive on one side, negative on the opposite side: an
oriented edge detector) and its part unchanged by 90-degree rotations and mirror flips (an
isotropic blob / spot detector).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import patheffects
from matplotlib.figure import Figure
from torch import nn

from .model import MNIST_MEAN, MnistCNN, frozen_eval

# --- Occlusion defaults -------------------------------------------------------------------------
# Grey levels of the assignment (0..255) converted once to the [0, 1] pixel scale the model takes.
GREY_128 = 128 / 255  # 0.502: the assignment's example, a mid-grey patch
# The patch should hide what it covers without drawing anything itself. Its default fill is the
# mean training pixel (0.1307, grey level 33, a dark grey), which the model's normalisation maps to
# 0, the value the convolutions' zero padding stands for. A mid-grey patch (GREY_128) is ink-like
# to the network (normalised 1.2, against 2.8 for full ink and -0.4 for background), so over a
# stroke it hides little and over the background it adds a blot; the notebook reports it beside
# the default, with black (0, MNIST's background, which can only erase).
OCCLUSION_FILL = MNIST_MEAN
# 6 px: wider than an MNIST stroke (2 to 4 px), so one position can hide a stroke segment, yet about
# a quarter of the 20 px box a digit is drawn in, so the map stays local.
OCCLUSION_PATCH = 6
# 2 px: 12 x 12 = 144 positions per image, each pixel covered by 9 of them; (28 - 6) / 2 is whole,
# so the last patch ends exactly on the border.
OCCLUSION_STRIDE = 2
# A position is "on the digit" when the patch covers a pixel of at least grey level 128, and
# "background only" when every pixel it covers is exactly 0 (MNIST's background); positions that
# cover only faint anti-aliased edge pixels are neither, and are counted separately.
STROKE_THRESHOLD = GREY_128

# --- Filter classification ----------------------------------------------------------------------
# A kernel is an oriented edge detector when its odd part (w(-x, -y) = -w(x, y): positive on one
# side, negative on the opposite side) holds at least half of its energy, a blob detector when its
# part unchanged by 90-degree rotations and mirror flips does (uniform or centre-surround); else
# "other" (lines, corners, mixtures). The two parts are orthogonal, so at most one reaches a half.
SHARE_THRESHOLD = 0.5
KERNEL_KINDS = ("edge", "blob", "other")
TOP_FRACTION = 0.1  # localisation: share of a map's activation mass in its strongest 10% positions


# ==================================================================================================
# Filters
# ==================================================================================================


@dataclass
class KernelShapes:
    """How much of each 3x3 kernel's energy is an edge ramp or an isotropic blob, and its kind."""

    edge_share: torch.Tensor  # (N,) energy share of the odd part (point-reflection antisymmetric)
    blob_share: torch.Tensor  # (N,) energy share of the rotation/flip-symmetric part
    direction: torch.Tensor  # (N,) degrees the best-fitting ramp rises towards: 0 right, 90 up
    kinds: list[str]  # "edge", "blob" or "other" per kernel

    def counts(self) -> dict[str, int]:
        """Number of kernels of each kind."""
        return {k: self.kinds.count(k) for k in KERNEL_KINDS}


def symmetric_part(kernels: torch.Tensor) -> torch.Tensor:
    """Average of each (..., k, k) kernel over the 8 rotations and flips of the square."""
    views = [
        torch.rot90(k, r, dims=(-2, -1)) for k in (kernels, kernels.flip(-1)) for r in range(4)
    ]
    return torch.stack(views).mean(0)


def kernel_shapes(weight: torch.Tensor) -> KernelShapes:
    """Edge and blob energy shares of every 3x3 kernel in `weight` (leading dims flattened)."""
    w = weight.detach().reshape(-1, 3, 3).double().cpu()
    energy = w.pow(2).sum((1, 2)).clamp_min(1e-30)
    ramp = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64) / math.sqrt(6.0)
    ramp_right = ramp.view(1, 3).expand(3, 3)  # rises left to right (unit norm)
    ramp_down = ramp.view(3, 1).expand(3, 3)  # rises top to bottom (row 0 is drawn on top)
    g_right = (w * ramp_right).sum((1, 2))
    g_down = (w * ramp_down).sum((1, 2))
    odd = (w - torch.rot90(w, 2, dims=(-2, -1))) / 2  # w(-x, -y) = -w(x, y): one side + other -
    edge_share = odd.pow(2).sum((1, 2)) / energy
    blob_share = symmetric_part(w).pow(2).sum((1, 2)) / energy
    direction = torch.rad2deg(torch.atan2(-g_down, g_right)) % 360
    kinds = [
        "edge" if e >= SHARE_THRESHOLD else "blob" if b >= SHARE_THRESHOLD else "other"
        for e, b in zip(edge_share.tolist(), blob_share.tolist(), strict=True)
    ]
    return KernelShapes(edge_share.float(), blob_share.float(), direction.float(), kinds)


def chance_kind_rates(n: int = 100_000, seed: int = 0) -> dict[str, float]:
    """Share of each kind among kernels with i.i.d. Gaussian weights: the no-structure baseline."""
    gen = torch.Generator().manual_seed(seed)
    counts = kernel_shapes(torch.randn(n, 3, 3, generator=gen)).counts()
    return {k: v / n for k, v in counts.items()}


def top_energy_share(weight: torch.Tensor, per_output: bool = False) -> float:
    """Share of the weight energy held by the strongest 10% of a conv layer's k x k kernels.

    per_output: computed within each output filter (over its input channels), then averaged.
    """
    energy = weight.detach().double().pow(2).sum((-2, -1))  # (out, in)
    energy = energy if per_output else energy.reshape(1, -1)
    ranked = energy.sort(dim=1, descending=True).values
    top = max(1, math.ceil(TOP_FRACTION * ranked.shape[1]))
    return float((ranked[:, :top].sum(1) / ranked.sum(1)).mean())


def neighbour_correlation(weight: torch.Tensor) -> float:
    """Smoothness of k x k kernels: sum of products of horizontally and vertically adjacent weights
    over the sum of squared weights, averaged over kernels (about 0 for independent weights)."""
    w = weight.detach().double().reshape(-1, *weight.shape[-2:])
    pairs = (w[:, :, 1:] * w[:, :, :-1]).sum((1, 2)) + (w[:, 1:, :] * w[:, :-1, :]).sum((1, 2))
    return float((pairs / w.pow(2).sum((1, 2)).clamp_min(1e-30)).mean())


def initial_model(config: dict[str, object]) -> MnistCNN:
    """The untrained network a run started from: `train` seeds torch with the run's seed, then
    builds the model; this repeats that without touching the global random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(config["seed"]))
        return MnistCNN(str(config["variant"])).eval()


def weight_drift(model: nn.Module, start: nn.Module) -> dict[str, dict[str, float]]:
    """Per conv / linear layer: cosine similarity of the trained weights with their initial values
    and the size of the change relative to the initial weights (how much training moved them)."""
    drift = {}
    start_layers = dict(start.layers.named_children())
    for name, layer in model.layers.named_children():
        if isinstance(layer, nn.Conv2d | nn.Linear):
            w = layer.weight.detach().double().cpu().flatten()
            w0 = start_layers[name].weight.detach().double().cpu().flatten()
            drift[name] = {
                "cosine_with_initial": float(F.cosine_similarity(w, w0, dim=0)),
                "relative_change": float((w - w0).norm() / w0.norm()),
            }
    return drift


def filter_summary(weight: torch.Tensor, seed: int = 0, draws: int = 20) -> dict[str, object]:
    """Kind counts and mean energy shares of a conv layer's (out, in, 3, 3) kernels, smoothness, and
    how unevenly its weight energy is spread, each beside its value for i.i.d. Gaussian weights."""
    if weight.dim() != 4:
        raise ValueError(f"expected conv weights (out, in, k, k), got shape {tuple(weight.shape)}")
    shapes = kernel_shapes(weight)
    n = len(shapes.kinds)
    gen = torch.Generator().manual_seed(seed)
    randoms = [torch.randn(weight.shape, generator=gen, dtype=torch.float64) for _ in range(draws)]
    chance = chance_kind_rates(seed=seed)
    random_shapes = kernel_shapes(torch.randn(20_000, 3, 3, generator=gen, dtype=torch.float64))
    summary: dict[str, object] = {
        "kernels": n,
        "counts": shapes.counts(),
        "fractions": {k: v / n for k, v in shapes.counts().items()},
        # Kinds among n random kernels: binomial, mean n p and standard deviation sqrt(n p (1 - p)).
        "chance_fractions": chance,
        "chance_count_sd": {k: math.sqrt(n * p * (1 - p)) for k, p in chance.items()},
        "mean_edge_share": float(shapes.edge_share.mean()),
        "mean_edge_share_chance": float(random_shapes.edge_share.mean()),  # 4/9 in expectation
        "mean_blob_share": float(shapes.blob_share.mean()),
        "mean_blob_share_chance": float(random_shapes.blob_share.mean()),  # 3/9 in expectation
        "neighbour_correlation": neighbour_correlation(weight),
        "neighbour_correlation_chance": float(np.mean([neighbour_correlation(r) for r in randoms])),
        "energy_share_of_top_10pct_kernels": top_energy_share(weight),
        "energy_share_of_top_10pct_kernels_chance": float(
            np.mean([top_energy_share(r) for r in randoms])
        ),
    }
    if weight.shape[1] > 1:  # within each output filter: how few input maps it leans on
        summary["per_filter_energy_share_of_top_10pct_inputs"] = top_energy_share(weight, True)
        summary["per_filter_energy_share_of_top_10pct_inputs_chance"] = float(
            np.mean([top_energy_share(r, True) for r in randoms])
        )
    return summary


def kind_distance_from_chance(summary: dict[str, object]) -> float:
    """Share of kernels whose kind would have to change to match the random-kernel mix (the total
    variation distance between the layer's edge / blob / other fractions and the chance ones)."""
    fractions, chance = summary["fractions"], summary["chance_fractions"]
    return sum(abs(fractions[k] - chance[k]) for k in KERNEL_KINDS) / 2


REGIONS = ("ink", "border", "background")


def pixel_regions(images: torch.Tensor, threshold: float = STROKE_THRESHOLD) -> torch.Tensor:
    """Label each pixel (N, 1, H, W) 0 = ink (>= threshold), 1 = border (not ink, but next to ink
    in its 3x3 neighbourhood), 2 = background (the rest)."""
    ink = images >= threshold
    near_ink = F.max_pool2d(ink.float(), 3, stride=1, padding=1) > 0
    return torch.where(ink, 0, torch.where(near_ink, 1, 2))


def response_regions(
    model: nn.Module, images: torch.Tensor, layer: str = "relu1", batch_size: int = 250
) -> dict[str, torch.Tensor]:
    """Where each conv1 filter responds: per channel of `layer` (at input resolution), the share of
    its total response on ink, border and background pixels, pooled over `images`; plus the share
    of the pixels each region covers (the share a filter blind to the image would get), and each
    channel's peak response (0: the filter never fires on these images)."""
    mass: torch.Tensor | float = 0.0
    area: torch.Tensor | float = 0.0
    peak: torch.Tensor | float = 0.0
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        maps = feature_maps(model, chunk, [layer])[layer]  # (n, C, H, W)
        regions = pixel_regions(chunk.float().cpu())
        if maps.shape[-2:] != regions.shape[-2:]:
            raise ValueError(f"{layer} maps are {tuple(maps.shape[-2:])}, not at input resolution")
        per_region = torch.stack([(maps * (regions == r)).sum((0, 2, 3)) for r in range(3)])
        mass = mass + per_region
        area = area + torch.stack([(regions == r).sum() for r in range(3)]).float()
        peak = torch.maximum(torch.as_tensor(peak), maps.amax((0, 2, 3)))
    shares = mass / mass.sum(0, keepdim=True).clamp_min(1e-30)
    return {"share": shares, "area": area / area.sum(), "peak": peak}  # share: (regions, C)


def regions_by_kind(regions: dict[str, torch.Tensor], shapes: KernelShapes) -> dict[str, dict]:
    """Mean share of the response on ink, border and background for each kind of conv1 filter."""
    table = {}
    for kind in KERNEL_KINDS:
        members = [i for i, k in enumerate(shapes.kinds) if k == kind]
        if members:
            shares = regions["share"][:, members].mean(1).tolist()
            table[kind] = {"filters": len(members), **dict(zip(REGIONS, shares, strict=True))}
    return table


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table (for the notebooks' answers) from a header and rows of cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _kind_label(shapes: KernelShapes, i: int) -> str:
    if shapes.kinds[i] == "edge":
        return f"edge {shapes.direction[i]:.0f}°"
    return shapes.kinds[i]


def plot_conv1_filters(weight: torch.Tensor, ncols: int = 8) -> Figure:
    """All conv1 kernels on one symmetric colour scale with one colour bar, titled by their kind."""
    kernels = weight.detach().float().cpu().reshape(-1, 3, 3)
    shapes = kernel_shapes(kernels)
    n = len(kernels)
    nrows = math.ceil(n / ncols)
    limit = float(kernels.abs().max())
    fig = Figure(figsize=(1.35 * ncols + 1.2, 1.45 * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    image = None
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i >= n:
            continue
        image = ax.imshow(kernels[i].numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit)
        ax.set_title(f"#{i} {_kind_label(shapes, i)}", fontsize=8)
    fig.colorbar(image, ax=axes, shrink=0.8, label="weight (symmetric scale)")
    counts = shapes.counts()
    fig.suptitle(
        f"conv1: {n} kernels 3x3 (red +, blue -); {counts['edge']} edge, {counts['blob']} blob, "
        f"{counts['other']} other\n(edge: odd part >= {SHARE_THRESHOLD:.0%} of the energy, angle = "
        f"direction the weights rise to; blob: rotation/flip-symmetric part >= "
        f"{SHARE_THRESHOLD:.0%})",
        fontsize=9,
    )
    return fig


def plot_filter_responses(
    model: nn.Module, images: torch.Tensor, layer: str = "relu1", per_row: int = 16
) -> Figure:
    """Each conv1 kernel above its response (`layer`'s map) to each of a few digits; one scale."""
    kernels = model.layers.conv1.weight.detach().float().cpu()[:, 0]
    shapes = kernel_shapes(kernels)
    maps = feature_maps(model, images, [layer])[layer]
    n_filters, n_images = len(kernels), len(images)
    blocks = math.ceil(n_filters / per_row)
    rows_per_block = 1 + n_images
    n_rows = rows_per_block * blocks
    width, height = 1.0 * (per_row + 1) + 1.3, 1.0 * n_rows + 0.7
    # A fixed grid rather than constrained layout: with ~140 axes the layout solver alone takes
    # several seconds per render.
    fig = Figure(figsize=(width, height))
    grid = fig.add_gridspec(
        n_rows,
        per_row + 1,
        left=0.01,
        right=1 - 1.2 / width,
        bottom=0.01,
        top=1 - 0.7 / height,
        wspace=0.08,
        hspace=0.3,
    )
    axes = grid.subplots(squeeze=False)
    limit = float(kernels.abs().max())
    top = float(torch.quantile(maps.flatten(), 0.999)) or 1.0
    for ax in axes.flat:
        ax.set_axis_off()
    kernel_im = response_im = None
    for b in range(blocks):
        r0 = b * rows_per_block
        axes[r0, 0].text(0.5, 0.5, "kernel", ha="center", va="center", fontsize=8)
        for j in range(n_images):
            axes[r0 + 1 + j, 0].imshow(images[j, 0].cpu().numpy(), cmap="gray", vmin=0, vmax=1)
            axes[r0 + 1 + j, 0].set_title("input", fontsize=7)
        for c in range(per_row):
            f = b * per_row + c
            if f >= n_filters:
                continue
            ax = axes[r0, c + 1]
            kernel_im = ax.imshow(kernels[f].numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit)
            ax.set_title(f"#{f} {_kind_label(shapes, f)}", fontsize=7)
            for j in range(n_images):
                response_im = axes[r0 + 1 + j, c + 1].imshow(
                    maps[j, f].numpy(), cmap="magma", vmin=0, vmax=top
                )
    bar_left, bar_width = 1 - 0.95 / width, 0.15 / width
    fig.colorbar(
        kernel_im, cax=fig.add_axes((bar_left, 0.56, bar_width, 0.3)), label="kernel weight"
    )
    fig.colorbar(
        response_im,
        cax=fig.add_axes((bar_left, 0.1, bar_width, 0.3)),
        label=f"{layer} output (top 0.1% clipped)",
    )
    fig.suptitle(
        f"Each conv1 kernel (top of each block) and its {layer} response to {n_images} test digits "
        "(one colour scale for all responses)",
        fontsize=11,
        y=1 - 0.15 / height,
    )
    return fig


def kernel_mosaic(weight: torch.Tensor, gap: int = 1) -> np.ndarray:
    """The (out, in, k, k) kernels of a conv layer tiled as one image, NaN between kernels."""
    w = weight.detach().float().cpu().numpy()
    n_out, n_in, k, _ = w.shape
    step = k + gap
    mosaic = np.full((n_out * step - gap, n_in * step - gap), np.nan, dtype=np.float32)
    for o in range(n_out):
        for i in range(n_in):
            mosaic[o * step : o * step + k, i * step : i * step + k] = w[o, i]
    return mosaic


def plot_conv2_filters(weight: torch.Tensor) -> Figure:
    """conv2's out x in grid of 3x3 kernels (symmetric scale) beside the norm of each kernel."""
    n_out, n_in, k, _ = weight.shape
    mosaic = kernel_mosaic(weight)
    norms = weight.detach().float().cpu().flatten(2).norm(dim=2)
    limit = float(np.nanmax(np.abs(mosaic)))
    fig = Figure(figsize=(17, 9.5), layout="constrained")
    ax_k, ax_n = fig.subplots(1, 2, width_ratios=[1.45, 1])
    step = k + 1
    ticks = np.arange(0, n_in, 4)
    im = ax_k.imshow(mosaic, cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
    ax_k.set_facecolor("0.35")  # the NaN gaps between kernels
    ax_k.set_xticks(ticks * step + (k - 1) / 2, ticks)
    ax_k.set_yticks(np.arange(0, n_out, 4) * step + (k - 1) / 2, np.arange(0, n_out, 4))
    ax_k.set_xlabel("input channel (conv1 filter)")
    ax_k.set_ylabel("output channel (conv2 filter)")
    ax_k.set_title(f"conv2: {n_out} x {n_in} kernels of {k}x{k} (symmetric scale)")
    fig.colorbar(im, ax=ax_k, shrink=0.8, label="weight")
    im_n = ax_n.imshow(norms.numpy(), cmap="viridis", interpolation="nearest")
    ax_n.set_xticks(ticks, ticks)
    ax_n.set_yticks(np.arange(0, n_out, 4), np.arange(0, n_out, 4))
    ax_n.set_xlabel("input channel (conv1 filter)")
    ax_n.set_ylabel("output channel (conv2 filter)")
    ax_n.set_title("L2 norm of each kernel: which conv1 maps each conv2 filter reads")
    fig.colorbar(im_n, ax=ax_n, shrink=0.8, label="kernel L2 norm")
    return fig


# ==================================================================================================
# Activations
# ==================================================================================================


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


def receptive_fields(model: nn.Module) -> dict[str, int]:
    """Side of the input square (pixels) that one position of each feature layer can see."""
    size, jump, fields = 1, 1, {}
    modules = dict(model.layers.named_children())
    for name in feature_layers(model):
        layer = modules[name]
        if isinstance(layer, nn.Conv2d | nn.MaxPool2d):
            k = layer.kernel_size if isinstance(layer.kernel_size, int) else layer.kernel_size[0]
            s = layer.stride if isinstance(layer.stride, int) else layer.stride[0]
            size, jump = size + (k - 1) * jump, jump * s
        fields[name] = size
    return fields


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
    fields = receptive_fields(model)
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
            "receptive_field": fields[name],
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


def _tile(maps: torch.Tensor, ncols: int = 8, gap: int = 1) -> np.ndarray:
    """(C, H, W) maps tiled into one image (ncols per row), NaN between tiles."""
    c, h, w = maps.shape
    nrows = math.ceil(c / ncols)
    out = np.full((nrows * (h + gap) - gap, ncols * (w + gap) - gap), np.nan, dtype=np.float32)
    for i in range(c):
        r, q = divmod(i, ncols)
        out[r * (h + gap) : r * (h + gap) + h, q * (w + gap) : q * (w + gap) + w] = maps[i].numpy()
    return out


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
            im = ax.imshow(_tile(stack[c]), interpolation="nearest", vmax=limit, **style)
            ax.set_facecolor("0.6")  # the gaps between channels
            zeros = float((stack[c] == 0).float().mean())
            ax.set_title(f"{name}: zeros {zeros:.0%}", fontsize=8)
            label_row(ax, f"{name}\n{channels} x {h}x{w}" if c == 0 else "")
        fig.colorbar(im, ax=axes[r, :], location="right", shrink=0.9, aspect=10)
    fig.suptitle(
        "Feature maps after every conv / BN / ReLU / pool layer, deeper going down "
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


# ==================================================================================================
# Occlusion
# ==================================================================================================


def patch_positions(size: int, patch: int, stride: int) -> list[int]:
    """Top-left offsets of a patch slid along an axis of `size` pixels, never hanging over the edge.

    Offsets are 0, stride, 2 stride, ... up to size - patch. When that leaves pixels uncovered at
    the far border, one more offset flush with the border is added, so every pixel is covered and
    no padding is needed.
    """
    if not 0 < patch <= size or stride < 1:
        raise ValueError(
            f"need 0 < patch <= {size} and stride >= 1, got patch={patch}, stride={stride}"
        )
    offsets = list(range(0, size - patch + 1, stride))
    if offsets[-1] != size - patch:
        offsets.append(size - patch)
    return offsets


def occlusion_masks(height: int, width: int, patch: int, stride: int) -> torch.Tensor:
    """Boolean masks (rows, cols, H, W): True where the patch at position (row, col) lies."""
    rows = torch.tensor(patch_positions(height, patch, stride))
    cols = torch.tensor(patch_positions(width, patch, stride))
    r, c = torch.arange(height), torch.arange(width)
    in_rows = (r >= rows[:, None]) & (r < rows[:, None] + patch)  # (rows, H)
    in_cols = (c >= cols[:, None]) & (c < cols[:, None] + patch)  # (cols, W)
    return in_rows[:, None, :, None] & in_cols[None, :, None, :]


@dataclass
class Occlusion:
    """Class probabilities of one image with the patch at every position (row-major grid)."""

    image: torch.Tensor  # (1, H, W) the clean image
    target: int  # the class of interest
    clean: torch.Tensor  # (10,) probabilities without a patch
    probabilities: torch.Tensor  # (rows, cols, 10): [i, j] = patch at top-left (rows[i], cols[j])
    rows: list[int]
    cols: list[int]
    patch: int
    stride: int
    fill: float

    @property
    def target_map(self) -> torch.Tensor:
        """(rows, cols) probability of the class of interest with the patch at each position."""
        return self.probabilities[..., self.target]

    @property
    def drop(self) -> torch.Tensor:
        """(rows, cols) clean probability of the class of interest minus its occluded value."""
        return self.clean[self.target] - self.target_map

    @property
    def clean_prediction(self) -> int:
        """The class the network predicts without a patch."""
        return int(self.clean.argmax())

    @property
    def flips(self) -> torch.Tensor:
        """(rows, cols) True where the patch changes the predicted class."""
        return self.probabilities.argmax(-1) != self.clean_prediction

    def covered_max(self) -> torch.Tensor:
        """(rows, cols) brightest image pixel under the patch at each position."""
        h, w = self.image.shape[-2:]
        masks = occlusion_masks(h, w, self.patch, self.stride)
        return torch.where(masks, self.image[0], torch.zeros(())).amax((-2, -1))


def occlusion_map(
    model: nn.Module,
    image: torch.Tensor,
    target: int | None = None,
    patch: int = OCCLUSION_PATCH,
    stride: int = OCCLUSION_STRIDE,
    fill: float = OCCLUSION_FILL,
) -> Occlusion:
    """Slide a `fill` patch over `image` (1, H, W); record the class probabilities at each position.

    All positions (and the clean image) go through the network in one batch, fp32, eval mode.
    `target` defaults to the predicted class. Unlike captum's `Occlusion`, which spreads each drop
    over the window's pixels and averages overlapping windows, this keeps one value per position and
    every class's probability (needed to find where the prediction flips).
    """
    image = image.detach().float()
    if image.dim() != 3 or image.shape[0] != 1:
        raise ValueError(f"image must have shape (1, H, W), got {tuple(image.shape)}")
    h, w = image.shape[-2:]
    device = next(model.parameters()).device
    masks = occlusion_masks(h, w, patch, stride).to(device)
    x = image.to(device)
    occluded = torch.where(masks, torch.tensor(float(fill), device=device), x[0])  # (R, C, H, W)
    n_rows, n_cols = masks.shape[:2]
    batch = torch.cat([x[None], occluded.reshape(n_rows * n_cols, 1, h, w)])
    with frozen_eval(model), torch.no_grad():
        probs = model(batch).float().softmax(1).cpu()
    clean = probs[0]
    return Occlusion(
        image=image.cpu(),
        target=int(clean.argmax()) if target is None else int(target),
        clean=clean,
        probabilities=probs[1:].reshape(n_rows, n_cols, -1),
        rows=patch_positions(h, patch, stride),
        cols=patch_positions(w, patch, stride),
        patch=patch,
        stride=stride,
        fill=float(fill),
    )


def occlusion_summary(
    results: Sequence[Occlusion], stroke_threshold: float = STROKE_THRESHOLD
) -> dict[str, float | int]:
    """Mean drop of the class-of-interest probability over positions on the digit versus
    background-only positions, pooled over `results`, with the position counts and flips."""
    drops = {"digit": [], "background": []}
    flips = {"digit": [], "background": []}
    excluded = 0
    for occ in results:
        covered = occ.covered_max()
        on_digit, background = covered >= stroke_threshold, covered == 0
        excluded += int((~on_digit & ~background).sum())
        for key, where in (("digit", on_digit), ("background", background)):
            drops[key].append(occ.drop[where])
            flips[key].append(occ.flips[where])
    summary: dict[str, float | int] = {}
    for key in ("digit", "background"):
        d, f = torch.cat(drops[key]), torch.cat(flips[key])
        summary[f"drop_on_{key}"] = float(d.mean()) if len(d) else float("nan")
        summary[f"positions_on_{key}"] = len(d)
        summary[f"flip_rate_on_{key}"] = float(f.float().mean()) if len(f) else float("nan")
    summary["positions_excluded"] = excluded
    return summary


def _cell_edges(centres: Sequence[float]) -> np.ndarray:
    """Edges of cells around increasing centres: halfway between neighbours, mirrored at the ends."""
    c = np.asarray(centres, dtype=float)
    if len(c) == 1:
        return np.array([c[0] - 0.5, c[0] + 0.5])
    middle = (c[1:] + c[:-1]) / 2
    return np.concatenate([[c[0] - (middle[0] - c[0])], middle, [c[-1] + (c[-1] - middle[-1])]])


def plot_occlusion(results: Sequence[Occlusion], pairs_per_row: int = 2) -> Figure:
    """Each image beside its occlusion map (class-of-interest probability at each patch position).

    The map is drawn on the image's own pixel grid: each cell sits at its patch's centre, so up,
    down, left and right mean the same in both panels. Digits mark the positions where the patch
    flips the prediction, naming the class predicted there.
    """
    n = len(results)
    nrows = math.ceil(n / pairs_per_row)
    fig = Figure(figsize=(3.3 * pairs_per_row * 2 * 0.62 + 1.0, 2.15 * nrows + 0.8))
    fig.set_layout_engine("constrained")
    axes = fig.subplots(nrows, 2 * pairs_per_row, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    im = None
    for k, occ in enumerate(results):
        r, q = divmod(k, pairs_per_row)
        ax_img, ax_map = axes[r, 2 * q], axes[r, 2 * q + 1]
        h, w = occ.image.shape[-2:]
        ax_img.imshow(occ.image[0].numpy(), cmap="gray", vmin=0, vmax=1)
        ax_img.set_title(
            f"class {occ.target}: p={occ.clean[occ.target]:.3f}\npredicted {occ.clean_prediction}",
            fontsize=8,
        )
        half = occ.patch / 2
        # One cell per position, centred on the patch centre (offset + patch/2 in pixel-edge
        # coordinates); cell edges halfway between centres, so an extra flush position fits too.
        im = ax_map.pcolormesh(
            _cell_edges([c + half for c in occ.cols]),
            _cell_edges([r + half for r in occ.rows]),
            occ.target_map.numpy(),
            cmap="viridis",
            vmin=0,
            vmax=1,
        )
        ax_map.contour(
            np.arange(w) + 0.5,
            np.arange(h) + 0.5,
            occ.image[0].numpy(),
            [0.5],
            colors="white",
            linewidths=0.6,
        )
        ax_map.set_xlim(0, w)
        ax_map.set_ylim(h, 0)
        ax_map.set_facecolor("0.85")  # the frame no patch centre reaches
        flips = occ.flips.nonzero().tolist()
        predicted = occ.probabilities.argmax(-1)
        for i, j in flips:
            ax_map.text(
                occ.cols[j] + half,
                occ.rows[i] + half,
                str(int(predicted[i, j])),
                color="red",
                fontsize=6,
                ha="center",
                va="center",
                fontweight="bold",
                path_effects=[patheffects.withStroke(linewidth=1.5, foreground="white")],
            )
        ax_map.set_title(f"min p={occ.target_map.min():.2f}, {len(flips)} flips", fontsize=8)
        ax_map.set_axis_on()
        ax_map.set_xticks([])
        ax_map.set_yticks([])
    fig.colorbar(im, ax=axes, shrink=0.6, label="probability of the class of interest")
    first = results[0]
    fig.suptitle(
        f"Occlusion: {first.patch}x{first.patch} patch filled with {first.fill:.3f} (pixel scale: "
        f"0 black background, 1 white ink), stride {first.stride}\nEach map cell sits at its "
        "patch's centre; white line: digit outline (pixel 0.5); red digit: the prediction flips "
        "to that class there",
        fontsize=9,
    )
    return fig
