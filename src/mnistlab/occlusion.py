"""Part 2 (c): occlusion maps: slide a patch over a digit, record the class probabilities.

Every measurement runs the network in fp32 (autocast off), in eval mode, without gradients, and
leaves the model's mode as it found it; the softmax of its logits is taken in float64. The figure
function returns a matplotlib Figure built without pyplot.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from matplotlib import patheffects
from matplotlib.colors import SymLogNorm
from matplotlib.figure import Figure
from torch import nn

from .model import GREY_128, MNIST_MEAN, frozen_eval

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
# The maps are coloured by the drop in the class probability on a symmetric log scale, linear within
# +-DROP_LINEAR_WITHIN: a network this sure of a digit (p within 1e-4 of 1, often within 1e-6) moves
# the probability by 1e-5 at most positions and by 0.5 at a few, so a linear scale shows only those
# few. Below 1e-6 a change is nothing a reader would act on; the float64 softmax resolves far less.
DROP_LINEAR_WITHIN = 1e-6


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
    clean: torch.Tensor  # (10,) probabilities without a patch (float64)
    probabilities: torch.Tensor  # (rows, cols, 10) float64: [i, j] = patch at (rows[i], cols[j])
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
        # Softmax in float64: in float32 a probability near 1 moves in steps of 6e-8, which erases
        # the small drops of a confident model (the maps show drops down to DROP_LINEAR_WITHIN).
        probs = model(batch).float().double().softmax(1).cpu()
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


def fill_name(fill: float) -> str:
    """A patch fill as the figures name it: its value, and what it is for the three known fills."""
    for value, name in ((MNIST_MEAN, "mean pixel"), (GREY_128, "grey 128"), (0.0, "black")):
        if math.isclose(fill, value, abs_tol=1e-6):
            return f"{fill:.3f} ({name})"
    return f"{fill:.3f}"


def format_probability(p: float) -> str:
    """`p` to 3 decimals, or as 1 - x once it rounds to 1.000, so a confident p stays readable."""
    return f"1 − {1 - p:.1e}" if p >= 0.9995 else f"{p:.3f}"


def _short(x: float) -> str:
    """A drop for a title: two decimals, or one significant digit as 3e-4 below 0.01."""
    if abs(x) >= 0.01:
        return f"{x:.2f}"
    mantissa, exponent = f"{x:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _symlog_ticks(linear_within: float) -> tuple[list[float], list[str]]:
    """Colour-bar ticks every other decade from +-linear_within to +-1, and 0."""
    decades = list(range(0, math.floor(math.log10(linear_within)) - 1, -2))[::-1]  # ..., -2, 0
    positive = [(10.0**d, "1" if d == 0 else f"1e{d}") for d in decades]
    ticks = [(-t, f"−{label}") for t, label in reversed(positive)] + [(0.0, "0")] + positive
    return [t for t, _ in ticks], [label for _, label in ticks]


def _draw_drop(ax, occ: Occlusion, norm: SymLogNorm):
    """One occlusion map on the image's pixel grid: the drop per position, outline, flips."""
    h, w = occ.image.shape[-2:]
    half = occ.patch / 2
    # One cell per position, centred on the patch centre (offset + patch/2 in pixel-edge
    # coordinates); cell edges halfway between centres, so an extra flush position fits too.
    mesh = ax.pcolormesh(
        _cell_edges([c + half for c in occ.cols]),
        _cell_edges([r + half for r in occ.rows]),
        occ.drop.numpy(),
        cmap="RdBu_r",
        norm=norm,
    )
    ax.contour(
        np.arange(w) + 0.5,
        np.arange(h) + 0.5,
        occ.image[0].numpy(),
        [0.5],
        colors="black",
        linewidths=0.6,
    )
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_aspect("equal")  # square pixels, as in the image above it
    ax.set_facecolor("0.7")  # the frame no patch centre reaches
    predicted = occ.probabilities.argmax(-1)
    flips = occ.flips.nonzero().tolist()
    for i, j in flips:
        ax.text(
            occ.cols[j] + half,
            occ.rows[i] + half,
            str(int(predicted[i, j])),
            color="black",
            fontsize=5.5,
            ha="center",
            va="center",
            fontweight="bold",
            path_effects=[patheffects.withStroke(linewidth=1.5, foreground="white")],
        )
    ax.set_title(f"largest drop {_short(float(occ.drop.max()))}, {len(flips)} flips", fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])
    return mesh


def plot_occlusion(
    *fills: Sequence[Occlusion],
    image_names: Sequence[str] | None = None,
    linear_within: float = DROP_LINEAR_WITHIN,
) -> Figure:
    """The images in the top row, then one row of occlusion maps per patch fill in `fills`.

    Each map shows the drop of the class-of-interest probability (clean minus occluded) at every
    patch position, on one symmetric log colour scale shared by all maps, linear within
    +-`linear_within`. The map is drawn on the image's own pixel grid: each cell sits at its
    patch's centre, so up, down, left and right mean the same in every panel. Digits mark the
    positions where the patch flips the prediction, naming the class predicted there.
    """
    if not fills or not fills[0]:
        raise ValueError("need at least one non-empty row of occlusion results")
    first = fills[0]
    for row in fills[1:]:
        same = len(row) == len(first) and all(
            torch.equal(a.image, b.image) and a.target == b.target
            for a, b in zip(first, row, strict=False)
        )
        if not same:
            raise ValueError("every row must occlude the same images for the same classes")
    n, nrows = len(first), 1 + len(fills)
    fig = Figure(figsize=(1.45 * n + 1.9, 1.6 * nrows + 1.0), layout="constrained")
    axes = fig.subplots(nrows, n, squeeze=False)
    for k, occ in enumerate(first):
        ax = axes[0, k]
        ax.imshow(occ.image[0].numpy(), cmap="gray", vmin=0, vmax=1)
        name = f", {image_names[k]}" if image_names else ""
        wrong = f", predicted {occ.clean_prediction}" if occ.clean_prediction != occ.target else ""
        p = format_probability(float(occ.clean[occ.target]))
        ax.set_title(f"class {occ.target}{name}{wrong}\np = {p}", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_ylabel("test image\n(p without patch)", fontsize=8)
    norm = SymLogNorm(linthresh=linear_within, linscale=0.5, vmin=-1.0, vmax=1.0, base=10)
    mesh = None
    for r, row in enumerate(fills, start=1):
        for k, occ in enumerate(row):
            mesh = _draw_drop(axes[r, k], occ, norm)
        axes[r, 0].set_ylabel(f"patch fill\n{fill_name(row[0].fill)}", fontsize=8)
    ticks, labels = _symlog_ticks(linear_within)
    bar = fig.colorbar(mesh, ax=axes[1:], shrink=0.9, ticks=ticks, aspect=15)
    bar.ax.set_yticklabels(labels, fontsize=7)
    bar.set_label(
        f"drop in p(class): p without patch − p with patch\n(symmetric log scale, linear within "
        f"±{_short(linear_within)}; red: p falls, blue: p rises)",
        fontsize=8,
    )
    fig.suptitle(
        f"Occlusion: a {first[0].patch}x{first[0].patch} patch slid with stride {first[0].stride} "
        "px (pixel scale: 0 black background, 1 white ink); each map cell sits at its patch's "
        "centre (grey frame: no centre there)\nblack line: digit outline (pixel 0.5); digits in the "
        "map: the prediction flips to that class there",
        fontsize=9,
    )
    return fig
