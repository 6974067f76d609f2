"""Part 2 (c): occlusion maps against captum's Occlusion and a hand-built model; their figure."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from captum.attr import Occlusion as CaptumOcclusion
from helpers import image_axes, seeded_model
from matplotlib.collections import QuadMesh
from matplotlib.colors import SymLogNorm
from torch import nn

from mnistlab import occlusion
from mnistlab.model import GREY_128
from mnistlab.occlusion import (
    DROP_LINEAR_WITHIN,
    OCCLUSION_FILL,
    format_probability,
    occlusion_map,
    occlusion_masks,
    occlusion_summary,
    patch_positions,
)


class OneBlockModel(nn.Module):
    """Class 1's logit is 20 x (mean of rows 2..4, columns 20..25 - 0.5); class 0's logit is 0.

    The block is off-centre and not square, so a transposed or flipped map cannot pass.
    """

    ROWS, COLS = (2, 5), (20, 26)

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))  # gives the model a device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (r0, r1), (c0, c1) = self.ROWS, self.COLS
        score = 20 * (x[:, 0, r0:r1, c0:c1].mean((1, 2)) - 0.5)
        return torch.stack([torch.zeros_like(score), score], 1)


def overlap(a0: int, a1: int, b0: int, b1: int) -> int:
    return max(0, min(a1, b1) - max(a0, b0))


@pytest.mark.parametrize(("patch", "stride"), [(6, 2), (5, 3), (4, 4)])
def test_occlusion_orientation_on_a_model_that_reads_one_block(patch, stride):
    model = OneBlockModel()
    image = torch.zeros(1, 28, 28)
    (r0, r1), (c0, c1) = OneBlockModel.ROWS, OneBlockModel.COLS
    image[0, r0:r1, c0:c1] = 1.0
    occ = occlusion_map(model, image, target=1, patch=patch, stride=stride, fill=0.0)
    block = (r1 - r0) * (c1 - c0)
    expected = torch.empty(len(occ.rows), len(occ.cols), dtype=torch.float64)
    for i, top in enumerate(occ.rows):  # rows of the map are patch rows (vertical position)
        for j, left in enumerate(occ.cols):
            hidden = overlap(top, top + patch, r0, r1) * overlap(left, left + patch, c0, c1)
            logit = torch.tensor(20 * ((block - hidden) / block - 0.5), dtype=torch.float64)
            expected[i, j] = torch.sigmoid(logit)
    torch.testing.assert_close(occ.target_map, expected, atol=1e-6, rtol=0)
    # The drop sits in the map's top rows and right-hand columns (where the block is), nowhere else.
    changed = (occ.drop > 1e-6).nonzero()
    assert len(changed) > 0
    assert changed[:, 0].max() < len(occ.rows) // 2 <= changed[:, 1].min()


@pytest.mark.parametrize("patch", [4, 7])
def test_occlusion_equals_captum_when_stride_equals_window(trained_model, mnist, patch):
    model = trained_model
    probability = nn.Sequential(model, nn.Softmax(dim=1)).eval()
    captum = CaptumOcclusion(probability)
    for index in (0, 1, 2):
        image, label = mnist.test_images[index], int(mnist.test_labels[index])
        occ = occlusion_map(model, image, target=label, patch=patch, stride=patch)
        attribution = captum.attribute(
            image[None],
            sliding_window_shapes=(1, patch, patch),
            strides=(1, patch, patch),
            baselines=OCCLUSION_FILL,
            target=label,
            perturbations_per_eval=64,  # all windows in one batch, as occlusion_map does
        )[0, 0]
        # captum gives each pixel the drop of the one window covering it; compare per window.
        per_window = F.avg_pool2d(attribution[None, None], patch)[0, 0]
        assert per_window.shape == occ.drop.shape == (28 // patch, 28 // patch)
        assert occ.drop.abs().max() > 1e-3  # the patch matters, so a transposed map would fail
        # captum's softmax runs in float32, occlusion_map's in float64: equal to float32 rounding.
        torch.testing.assert_close(occ.drop, per_window.double(), atol=1e-5, rtol=0)
        # Within a window captum's value is constant: the comparison is per window, not on average.
        expanded = occ.drop.repeat_interleave(patch, 0).repeat_interleave(patch, 1)
        torch.testing.assert_close(expanded, attribution.double(), atol=1e-5, rtol=0)


def test_occlusion_runs_in_one_batch_fp32_and_leaves_model_and_image_untouched():
    model = seeded_model("bn").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    hook = model.register_forward_hook(lambda m, i, o: calls.append((i[0].shape, o.dtype)))
    image = torch.rand(1, 28, 28, generator=torch.Generator().manual_seed(1))
    copy = image.clone()
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            occ = occlusion_map(model, image, patch=6, stride=2)
    finally:
        hook.remove()
    assert calls == [(torch.Size([1 + 12 * 12, 1, 28, 28]), torch.float32)]
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN stats too
    assert torch.equal(image, copy)
    # Position (i, j) is the image with the patch at rows[i], cols[j]: check one by hand, in eval.
    i, j = 3, 8
    manual = image.clone()
    manual[0, occ.rows[i] : occ.rows[i] + 6, occ.cols[j] : occ.cols[j] + 6] = OCCLUSION_FILL
    model.eval()
    with torch.no_grad():
        expected = model(manual[None]).double().softmax(1)[0]
    torch.testing.assert_close(occ.probabilities[i, j], expected, atol=1e-6, rtol=0)


def test_patch_positions_cover_every_pixel_without_padding():
    assert patch_positions(28, 6, 2) == list(range(0, 23, 2))
    assert patch_positions(28, 6, 4) == [0, 4, 8, 12, 16, 20, 22]  # last one flush with the border
    assert patch_positions(28, 28, 5) == [0]
    masks = occlusion_masks(28, 28, 5, 3)
    assert masks.any(0).any(0).all()  # every pixel covered at least once
    assert (masks.sum((-2, -1)) == 25).all()  # every patch whole inside the image
    with pytest.raises(ValueError):
        patch_positions(28, 30, 2)


def test_occlusion_summary_separates_digit_and_background_positions():
    model = OneBlockModel()
    image = torch.zeros(1, 28, 28)
    image[0, 2:5, 20:26] = 1.0
    image[0, 12, 12] = 0.2  # a faint pixel: positions covering only it are neither class
    occ = occlusion_map(model, image, target=1, patch=6, stride=2, fill=0.0)
    covered = torch.zeros(12, 12)
    for i, top in enumerate(occ.rows):
        for j, left in enumerate(occ.cols):
            covered[i, j] = image[0, top : top + 6, left : left + 6].max()
    torch.testing.assert_close(occ.covered_max(), covered)
    summary = occlusion_summary([occ])
    on_digit, background = covered >= 0.5, covered == 0
    assert summary["positions_on_digit"] == int(on_digit.sum()) > 0
    assert summary["positions_on_background"] == int(background.sum()) > 0
    assert summary["positions_excluded"] == 9  # the 3 x 3 positions whose patch covers (12, 12)
    assert summary["drop_on_background"] == 0.0
    assert summary["drop_on_digit"] == pytest.approx(float(occ.drop[on_digit].mean()))
    assert summary["flip_rate_on_digit"] == pytest.approx(float(occ.flips[on_digit].float().mean()))


def test_small_drops_of_a_confident_model_are_resolved():
    # Clean p(1) = sigmoid(30 x 0.5 x 2) = 1 - 9e-14; hiding a little of the block lowers it by
    # 1e-13..1e-9, all of which a float32 softmax rounds to "no change" (its steps near 1: 6e-8).
    model = OneBlockModel()
    image = torch.zeros(1, 28, 28)
    (r0, r1), (c0, c1) = OneBlockModel.ROWS, OneBlockModel.COLS
    image[0, r0:r1, c0:c1] = 2.0  # beyond the pixel range: a margin no digit gives, on purpose
    occ = occlusion_map(model, image, target=1, patch=6, stride=2, fill=0.0)
    block = (r1 - r0) * (c1 - c0)
    clean_logit = 20 * (2.0 - 0.5)
    expected = torch.empty(len(occ.rows), len(occ.cols), dtype=torch.float64)
    for i, top in enumerate(occ.rows):
        for j, left in enumerate(occ.cols):
            hidden = overlap(top, top + 6, r0, r1) * overlap(left, left + 6, c0, c1)
            logit = 20 * (2.0 * (block - hidden) / block - 0.5)
            # p_clean - p = sigmoid(-logit) - sigmoid(-clean_logit), without cancellation.
            expected[i, j] = torch.sigmoid(
                torch.tensor(-logit, dtype=torch.float64)
            ) - torch.sigmoid(torch.tensor(-clean_logit, dtype=torch.float64))
    small = (expected > 0) & (expected < 1e-6)
    assert small.sum() >= 3  # the case float32 loses
    torch.testing.assert_close(occ.drop[small], expected[small], rtol=1e-3, atol=0)
    torch.testing.assert_close(occ.drop, expected, rtol=1e-3, atol=1e-12)


def test_format_probability_keeps_a_confident_p_readable():
    assert format_probability(0.5) == "0.500"
    assert format_probability(0.9994) == "0.999"
    assert format_probability(1 - 3.7e-7) == "1 − 3.7e-07"
    assert format_probability(1.0) == "1 − 0.0e+00"


def mesh_of(ax) -> QuadMesh:
    return next(c for c in ax.collections if isinstance(c, QuadMesh))


def test_occlusion_figure_has_a_row_of_images_and_a_row_of_drop_maps_per_fill():
    model = seeded_model()
    images = torch.rand(10, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    rows = [
        [occlusion_map(model, x, target=3, fill=f) for x in images]
        for f in (OCCLUSION_FILL, GREY_128)
    ]
    fig = occlusion.plot_occlusion(*rows, image_names=[f"#{k}" for k in range(10)])
    drawn = image_axes(fig)
    assert len(drawn) == 10 * 3
    # Row-major, images first: each map shows its own drop map, untransposed, cell for cell.
    for r, row in enumerate(rows, start=1):
        for k, occ in enumerate(row):
            mesh = mesh_of(drawn[10 * r + k])
            np.testing.assert_array_equal(np.asarray(mesh.get_array()), occ.drop.numpy())
    # One symmetric-log scale for every map: small drops get colour, signs are told apart.
    norms = [mesh_of(ax).norm for ax in drawn[10:]]
    assert all(isinstance(n, SymLogNorm) for n in norms)
    assert {(n.vmin, n.vmax, n.linthresh) for n in norms} == {(-1.0, 1.0, DROP_LINEAR_WITHIN)}
    colour = mesh_of(drawn[10]).to_rgba(np.array([0.0, 1e-4, -1e-4]))
    assert np.abs(colour[1] - colour[0]).max() > 0.2  # a drop of 1e-4 is far from 0's colour
    assert not np.allclose(colour[1], colour[2])  # a rise is not a drop
    bars = [ax for ax in fig.axes if getattr(ax, "_colorbar", None) is not None]
    assert len(bars) == 1
    assert "drop" in bars[0].get_ylabel() and "log" in bars[0].get_ylabel()
    assert "0.502 (grey 128)" in drawn[20].get_ylabel()
    # Map cells sit on the patch centres: first centre 3, then every 2 px, on the image's grid.
    edges = mesh_of(drawn[10]).get_coordinates()[0, :, 0]
    torch.testing.assert_close(
        torch.tensor(edges), torch.arange(2.0, 27.0, 2.0, dtype=torch.float64)
    )
    irregular = occlusion.plot_occlusion([occlusion_map(model, images[0], patch=6, stride=4)])
    centres = [3, 7, 11, 15, 19, 23, 25]  # the last position is flush with the border
    edges = mesh_of(image_axes(irregular)[1]).get_coordinates()[0, :, 0]
    assert list(edges) == [1, 5, 9, 13, 17, 21, 24, 26] and len(edges) == len(centres) + 1
    with pytest.raises(ValueError, match="same images"):
        occlusion.plot_occlusion(rows[0], rows[1][::-1])


def test_occlusion_figure_names_the_class_at_every_flip():
    model = OneBlockModel()
    image = torch.zeros(1, 28, 28)
    image[0, 2:5, 20:26] = 1.0
    occ = occlusion_map(model, image, target=1, patch=6, stride=2, fill=0.0)
    assert 0 < int(occ.flips.sum()) < occ.flips.numel()
    fig = occlusion.plot_occlusion([occ])
    ax = image_axes(fig)[1]
    labels = sorted((t.get_position(), t.get_text()) for t in ax.texts)
    expected = sorted(
        ((occ.cols[j] + 3, occ.rows[i] + 3), "0") for i, j in occ.flips.nonzero().tolist()
    )
    assert labels == expected
