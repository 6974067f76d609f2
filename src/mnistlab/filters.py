"""Part 2 (a): the learned filters, described by a stated measure rather than by eye.

Each 3x3 kernel's energy is split into orthogonal parts: its odd part (positive on one side,
negative on the opposite side: an oriented edge detector) and its part unchanged by 90-degree
rotations and mirror flips (an isotropic blob / spot detector). `filter_summary` gives each of its
numbers beside its value for random Gaussian kernels, the no-structure baseline. Measurements run in
fp32, in eval mode, without gradients; figure functions return a matplotlib Figure built without
pyplot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import nn

from .activations import TOP_FRACTION, feature_maps
from .model import MnistCNN
from .occlusion import STROKE_THRESHOLD

# A kernel is an oriented edge detector when its odd part (w(-x, -y) = -w(x, y): positive on one
# side, negative on the opposite side) holds at least half of its energy, a blob detector when its
# part unchanged by 90-degree rotations and mirror flips does (uniform or centre-surround); else
# "other" (lines, corners, mixtures). The two parts are orthogonal, so at most one reaches a half.
SHARE_THRESHOLD = 0.5
KERNEL_KINDS = ("edge", "blob", "other")


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


def sign_coherence(weight: torch.Tensor) -> float:
    """How one-signed k x k kernels are: |sum of weights| / sum of |weights|, averaged over kernels
    (1: every weight has the same sign; 0: they cancel, as in an edge detector)."""
    w = weight.detach().double().reshape(-1, weight.shape[-2] * weight.shape[-1])
    return float((w.sum(1).abs() / w.abs().sum(1).clamp_min(1e-30)).mean())


def strongest_reads(
    weight: torch.Tensor, n_outputs: int = 4, n_inputs: int = 4
) -> list[tuple[int, list[int]]]:
    """The `n_outputs` output filters of a conv layer with the most weight energy, strongest first,
    each with the `n_inputs` input channels whose kernels have the largest L2 norm, strongest first."""
    energy = weight.detach().double().pow(2).sum((-2, -1))  # (out, in)
    outputs = energy.sum(1).argsort(descending=True)[:n_outputs].tolist()
    return [(o, energy[o].argsort(descending=True)[:n_inputs].tolist()) for o in outputs]


def input_energy_by_kind(weight: torch.Tensor, inputs: KernelShapes) -> dict[str, dict[str, float]]:
    """Per kind of the input filters (e.g. conv1's): their share of the input maps and the share of
    the layer's weight energy spent on reading them (equal shares: no preference for the kind)."""
    per_input = weight.detach().double().pow(2).sum((0, 2, 3))  # (in,)
    if len(inputs.kinds) != len(per_input):
        raise ValueError(f"{len(inputs.kinds)} input kinds for {len(per_input)} input channels")
    table = {}
    for kind in KERNEL_KINDS:
        members = [i for i, k in enumerate(inputs.kinds) if k == kind]
        table[kind] = {
            "maps": len(members) / len(per_input),
            "energy": float(per_input[members].sum() / per_input.sum()),
        }
    return table


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
    """Kind counts and mean energy shares of a conv layer's (out, in, 3, 3) kernels, smoothness,
    sign coherence, and how unevenly its weight energy is spread, each beside its value for i.i.d.
    Gaussian weights."""
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
        "sign_coherence": sign_coherence(weight),
        "sign_coherence_chance": float(np.mean([sign_coherence(r) for r in randoms])),
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


def plot_conv2_filters(
    weight: torch.Tensor, conv1_weight: torch.Tensor, n_outputs: int = 4, n_inputs: int = 4
) -> Figure:
    """conv2's kernel norms as an output x input heat map, beside its strongest filters' strongest
    input kernels, each enlarged next to the conv1 kernel whose map it reads."""
    w2 = weight.detach().float().cpu()
    w1 = conv1_weight.detach().float().cpu()[:, 0]
    n_out, n_in = w2.shape[:2]
    norms = w2.flatten(2).norm(dim=2)
    shapes1 = kernel_shapes(w1)
    reads = strongest_reads(w2, n_outputs, n_inputs)
    fig = Figure(figsize=(18, 7.2), layout="constrained")
    left, right = fig.subfigures(1, 2, width_ratios=[1, 1.3])
    ax = left.subplots()
    im = ax.imshow(norms.numpy(), cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(n_in), range(n_in), fontsize=6)
    ax.set_yticks(range(n_out), range(n_out), fontsize=6)
    kinds = ax.secondary_xaxis("top")
    kinds.set_xticks(range(n_in), [shapes1.kinds[c][0] for c in range(n_in)], fontsize=6)
    kinds.set_xlabel("kind of that conv1 filter: e edge, b blob, o other", fontsize=8)
    ax.set_xlabel("input channel = conv1 filter whose (ReLU, pooled) map is read")
    ax.set_ylabel("output channel = conv2 filter")
    for o, inputs in reads:
        for c in inputs:  # the kernels enlarged on the right
            ax.add_patch(Rectangle((c - 0.5, o - 0.5), 1, 1, fill=False, ec="red", lw=1.2))
    left.colorbar(im, ax=ax, shrink=0.75, label="L2 norm of the 3x3 kernel")
    ax.set_title(
        f"conv2: how strongly each of its {n_out} filters reads each conv1 map\n"
        "(red boxes: the kernels enlarged on the right)",
        fontsize=10,
    )
    # Pairs (conv1 kernel, conv2 kernel) sit together, a narrow empty column between pairs.
    ratios = ([1.0, 1.0, 0.35] * n_inputs)[:-1]
    grid = right.subplots(len(reads), len(ratios), squeeze=False, width_ratios=ratios)
    for spacer in grid[:, 2::3].flat:
        spacer.set_axis_off()
    axes = np.delete(grid, np.s_[2::3], axis=1)
    limit1, limit2 = float(w1.abs().max()), float(w2.abs().max())
    im1 = im2 = None
    for r, (o, inputs) in enumerate(reads):
        for q, c in enumerate(inputs):
            a1, a2 = axes[r, 2 * q], axes[r, 2 * q + 1]
            im1 = a1.imshow(w1[c].numpy(), cmap="PuOr_r", vmin=-limit1, vmax=limit1)
            a1.set_title(f"conv1 #{c}\n{_kind_label(shapes1, c)}", fontsize=7)
            im2 = a2.imshow(w2[o, c].numpy(), cmap="RdBu_r", vmin=-limit2, vmax=limit2)
            a2.set_title(f"conv2 kernel\nsum {float(w2[o, c].sum()):+.2f}", fontsize=7)
            for a in (a1, a2):
                a.set_xticks([])
                a.set_yticks([])
        axes[r, 0].set_ylabel(f"conv2 #{o}", fontsize=9)
    right.colorbar(im2, ax=grid, shrink=0.6, label="conv2 weight (all of conv2's range)")
    right.colorbar(im1, ax=grid, shrink=0.6, label="conv1 weight (all of conv1's range)")
    right.suptitle(
        f"The {len(reads)} conv2 filters with the most weight energy (rows), each with its "
        f"{n_inputs} strongest input kernels:\nthe conv1 kernel (orange +, purple -) whose map "
        "it reads, then the conv2 kernel reading it (red +, blue -; sum > 0: that feature "
        "nearby excites the filter)",
        fontsize=9,
    )
    return fig
