"""Part 2: occlusion against captum and a hand-built model, filters, feature maps, figures."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from captum.attr import Occlusion as CaptumOcclusion
from matplotlib.collections import QuadMesh
from torch import nn

from mnistlab.data import Split
from mnistlab.model import MnistCNN
from mnistlab.train import TrainConfig, config_dict, train
from mnistlab.visualize import (
    OCCLUSION_FILL,
    activation_statistics,
    chance_kind_rates,
    feature_layers,
    feature_maps,
    filter_summary,
    initial_model,
    kernel_mosaic,
    kernel_shapes,
    kind_distance_from_chance,
    nearest_centroid_accuracy,
    neighbour_correlation,
    occlusion_map,
    occlusion_masks,
    occlusion_summary,
    patch_positions,
    pixel_regions,
    plot_activation_statistics,
    plot_conv1_filters,
    plot_conv2_filters,
    plot_feature_maps,
    plot_filter_responses,
    plot_occlusion,
    receptive_fields,
    response_regions,
    top_energy_share,
    top_mass_share,
    weight_drift,
)


def seeded_model(variant: str = "plain") -> MnistCNN:
    torch.manual_seed(0)
    return MnistCNN(variant).eval()


def image_axes(fig) -> list:
    """Axes that draw a picture (an image or a mesh of cells), colour bars excluded."""
    return [
        ax
        for ax in fig.axes
        if getattr(ax, "_colorbar", None) is None  # matplotlib marks a colour bar's axes so
        and (ax.images or any(isinstance(c, QuadMesh) for c in ax.collections))
    ]


# --------------------------------------------------------------------------------------------------
# Occlusion
# --------------------------------------------------------------------------------------------------


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
    expected = torch.empty(len(occ.rows), len(occ.cols))
    for i, top in enumerate(occ.rows):  # rows of the map are patch rows (vertical position)
        for j, left in enumerate(occ.cols):
            hidden = overlap(top, top + patch, r0, r1) * overlap(left, left + patch, c0, c1)
            expected[i, j] = torch.sigmoid(torch.tensor(20 * ((block - hidden) / block - 0.5)))
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
        torch.testing.assert_close(occ.drop, per_window, atol=1e-5, rtol=0)
        # Within a window captum's value is constant: the comparison is per window, not on average.
        expanded = occ.drop.repeat_interleave(patch, 0).repeat_interleave(patch, 1)
        torch.testing.assert_close(expanded, attribution, atol=1e-5, rtol=0)


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
        expected = model(manual[None]).softmax(1)[0]
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


# --------------------------------------------------------------------------------------------------
# Filters
# --------------------------------------------------------------------------------------------------


def test_kernel_shapes_on_known_kernels():
    ramp = torch.tensor([-1.0, 0.0, 1.0])
    rising_right = ramp.view(1, 3).expand(3, 3)
    rising_up = -ramp.view(3, 1).expand(3, 3)  # row 0 (drawn on top) largest
    centre_surround = -torch.ones(3, 3)
    centre_surround[1, 1] = 8.0
    middle_row_edge = torch.zeros(3, 3)
    middle_row_edge[1] = -ramp  # rises to the left
    saddle = torch.tensor([[1.0, 0.0, -1.0], [0.0, 0.0, 0.0], [-1.0, 0.0, 1.0]])
    kernels = [rising_right, rising_up, middle_row_edge, centre_surround, torch.ones(3, 3), saddle]
    shapes = kernel_shapes(torch.stack(kernels))
    assert shapes.kinds == ["edge", "edge", "edge", "blob", "blob", "other"]
    torch.testing.assert_close(shapes.edge_share[:3], torch.ones(3))
    torch.testing.assert_close(shapes.blob_share[3:5], torch.ones(2))
    assert shapes.edge_share[5] == 0.0 and shapes.blob_share[5] == 0.0
    torch.testing.assert_close(shapes.direction[:3], torch.tensor([0.0, 90.0, 180.0]))
    # The two parts are orthogonal: their shares never add up to more than the whole energy.
    random = kernel_shapes(torch.randn(1000, 3, 3, generator=torch.Generator().manual_seed(0)))
    assert (random.edge_share + random.blob_share <= 1 + 1e-6).all()


def test_chance_rates_match_the_beta_distribution():
    # For i.i.d. Gaussian weights the odd part's energy share (4 of 9 dimensions) is Beta(2, 5/2):
    # P(share >= 1/2) = (35/4) * integral_0^(1/2) (1 - u) u^(3/2) du.
    exact = 35 / 4 * (0.5**2.5 / 2.5 - 0.5**3.5 / 3.5)
    rates = chance_kind_rates(200_000)
    assert rates["edge"] == pytest.approx(exact, abs=0.004)
    assert sum(rates.values()) == pytest.approx(1.0)


def test_pixel_regions_and_a_filter_that_sees_only_ink():
    image = torch.zeros(1, 1, 28, 28)
    image[0, 0, 10, 10:13] = 1.0  # a 3-pixel stroke: 3 ink pixels, a 5 x 3 ring of 12 border pixels
    regions = pixel_regions(image)
    assert [int((regions == r).sum()) for r in range(3)] == [3, 12, 28 * 28 - 15]
    assert regions[0, 0, 9, 9] == 1 and regions[0, 0, 8, 10] == 2
    # conv1 = identity on the normalised pixels: the response is positive exactly on the ink.
    model = seeded_model()
    with torch.no_grad():
        model.layers.conv1.weight.zero_()
        model.layers.conv1.weight[:, 0, 1, 1] = 1.0
        model.layers.conv1.bias.zero_()
    found = response_regions(model, image.expand(5, 1, 28, 28), batch_size=2)
    torch.testing.assert_close(found["share"][0], torch.ones(32))
    torch.testing.assert_close(found["area"], torch.tensor([3, 12, 28 * 28 - 15]) / 28**2)


def test_neighbour_correlation_and_top_energy_share_on_known_kernels():
    assert neighbour_correlation(torch.ones(3, 3)) == pytest.approx(12 / 9)  # 12 adjacent pairs
    checker = (torch.arange(9).view(3, 3) % 2 * 2 - 1).float()  # +-1 alternating
    assert neighbour_correlation(checker) == pytest.approx(-12 / 9)
    weight = torch.zeros(2, 10, 3, 3)
    weight[0, :, 0, 0] = 1.0  # output 0 spreads evenly over its 10 inputs
    weight[1, 3, 1, 1] = 2.0  # output 1 reads one input only
    # 20 kernels: the strongest 2 hold 4 + 1 of the 14 units of energy.
    assert top_energy_share(weight) == pytest.approx(5 / 14)
    assert top_energy_share(weight, per_output=True) == pytest.approx((1 / 10 + 1) / 2)


def test_initial_model_is_where_training_starts_and_drift_measures_the_change():
    gen = torch.Generator().manual_seed(0)
    images, labels = torch.rand(40, 1, 28, 28, generator=gen), torch.arange(40) % 10
    split = Split(images[:32], labels[:32], images[32:], labels[32:], torch.arange(8))
    config = TrainConfig(epochs=1, batch_size=16, lr=0.0, seed=7, mixed_precision="off")
    untouched = train(config, split, "cpu", progress=False).model  # lr 0: weights stay at init
    start = initial_model(config_dict(config))
    for name, value in start.state_dict().items():
        if "running" not in name and "num_batches" not in name:
            assert torch.equal(value, untouched.state_dict()[name]), name
    drift = weight_drift(untouched, start)
    assert set(drift) == {"conv1", "conv2", "fc1", "fc2"}
    assert all(d["cosine_with_initial"] == pytest.approx(1.0) for d in drift.values())
    assert all(d["relative_change"] == 0.0 for d in drift.values())
    moved = initial_model({"seed": 8, "variant": "plain"})
    assert weight_drift(moved, start)["conv1"]["cosine_with_initial"] < 0.5


def test_filter_summary_of_a_layer_of_pure_edges():
    ramp = torch.tensor([-1.0, 0.0, 1.0]).view(1, 3).expand(3, 3)
    weight = ramp.expand(4, 8, 3, 3) * torch.arange(1.0, 33.0).view(4, 8, 1, 1)  # 32 edge kernels
    summary = filter_summary(weight)
    assert summary["counts"] == {"edge": 32, "blob": 0, "other": 0}
    chance = summary["chance_fractions"]
    assert kind_distance_from_chance(summary) == pytest.approx(1 - chance["edge"])
    assert summary["chance_count_sd"]["edge"] == pytest.approx(
        math.sqrt(32 * chance["edge"] * (1 - chance["edge"]))
    )
    assert summary["mean_edge_share_chance"] == pytest.approx(4 / 9, abs=0.01)
    assert summary["mean_blob_share_chance"] == pytest.approx(3 / 9, abs=0.01)
    assert abs(summary["neighbour_correlation_chance"]) < 0.02
    with pytest.raises(ValueError, match="conv weights"):
        filter_summary(weight[0])


def test_conv1_figure_has_one_panel_per_kernel_and_one_colour_bar():
    weight = seeded_model().layers.conv1.weight.detach()
    fig = plot_conv1_filters(weight)
    assert len(image_axes(fig)) == 32
    colorbars = [ax for ax in fig.axes if getattr(ax, "_colorbar", None) is not None]
    assert len(colorbars) == 1
    limits = {im.get_clim() for ax in image_axes(fig) for im in ax.images}
    assert len(limits) == 1 and limits.pop()[0] == -float(weight.abs().max())  # one symmetric scale


def test_conv2_figure_tiles_all_kernels():
    weight = seeded_model().layers.conv2.weight.detach()
    mosaic = kernel_mosaic(weight)
    assert mosaic.shape == (32 * 4 - 1, 32 * 4 - 1)
    assert float(mosaic[4 * 5 + 1, 4 * 7 + 2]) == pytest.approx(float(weight[5, 7, 1, 2]))
    fig = plot_conv2_filters(weight)
    assert len(image_axes(fig)) == 2
    assert len([ax for ax in fig.axes if getattr(ax, "_colorbar", None) is not None]) == 2


def test_filter_response_figure_panel_count():
    model = seeded_model()
    images = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    fig = plot_filter_responses(model, images)
    # 32 kernels, 32 x 3 responses, and the 3 inputs repeated in each of the 2 blocks.
    assert len(image_axes(fig)) == 32 + 32 * 3 + 2 * 3
    assert len([ax for ax in fig.axes if getattr(ax, "_colorbar", None) is not None]) == 2


# --------------------------------------------------------------------------------------------------
# Activations
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["plain", "bn"])
def test_feature_maps_are_the_layer_outputs(variant):
    model = seeded_model(variant)
    images = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    maps = feature_maps(model, images)
    expected_names = ["conv1", "relu1", "pool1", "conv2", "relu2", "pool2"]
    if variant == "bn":
        expected_names = ["conv1", "bn1", "relu1", "pool1", "conv2", "bn2", "relu2", "pool2"]
    assert list(maps) == feature_layers(model) == expected_names
    assert maps["conv1"].shape == (4, 32, 28, 28) and maps["pool1"].shape == (4, 32, 14, 14)
    assert maps["pool2"].shape == (4, 32, 7, 7)
    before_relu = maps["bn1" if variant == "bn" else "conv1"]
    assert torch.equal(maps["relu1"], before_relu.clamp_min(0))
    assert torch.equal(maps["pool1"], F.max_pool2d(maps["relu1"], 2))
    assert receptive_fields(model)["pool2"] == 10 and receptive_fields(model)["conv2"] == 8


def test_top_mass_share_on_flat_peaked_and_empty_maps():
    maps = torch.zeros(1, 3, 7, 7)
    maps[0, 0] = 1.0  # flat: the top 5 of 49 positions hold 5/49
    maps[0, 1, 3, 3] = 2.0  # one hot spot
    share = top_mass_share(maps)[0]
    assert share[0] == pytest.approx(math.ceil(0.1 * 49) / 49)
    assert share[1] == 1.0 and share[2].isnan()


def test_activation_statistics_count_zeros_exactly():
    model = seeded_model()
    images = torch.rand(10, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    stats = activation_statistics(model, images, batch_size=4)  # several batches
    maps = feature_maps(model, images)
    for name, values in maps.items():
        assert stats[name]["zero_fraction"] == pytest.approx(float((values == 0).float().mean()))
        assert stats[name]["resolution"] == list(values.shape[-2:])
    assert stats["relu1"]["zero_fraction"] > 0.0 and stats["conv1"]["zero_fraction"] == 0.0


def test_nearest_centroid_accuracy_on_separable_classes():
    labels = torch.arange(10).repeat(5)
    images = (labels.float() / 9).view(-1, 1, 1, 1).expand(-1, 1, 28, 28).contiguous()
    accuracy = nearest_centroid_accuracy(seeded_model(), images, labels, images, labels)
    assert accuracy["input"] == 1.0
    assert set(accuracy) == {"input", *feature_layers(seeded_model())}


# --------------------------------------------------------------------------------------------------
# Figures of activations and occlusion
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["plain", "bn"])
def test_feature_map_figure_has_a_panel_per_image_and_layer(variant):
    model = seeded_model(variant)
    images = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    fig = plot_feature_maps(model, images, labels=[1, 2, 3])
    assert len(image_axes(fig)) == 3 * (1 + len(feature_layers(model)))
    labels = torch.arange(3)
    accuracy = nearest_centroid_accuracy(model, images, labels, images, labels)
    fig = plot_activation_statistics(activation_statistics(model, images), accuracy)
    assert len(fig.axes) == 3


def test_occlusion_figure_has_an_image_and_a_map_per_result():
    model = seeded_model()
    images = torch.rand(10, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    results = [occlusion_map(model, x) for x in images]
    fig = plot_occlusion(results)
    assert len(image_axes(fig)) == 20
    # Map cells sit on the patch centres: first centre 3, then every 2 px, on the image's grid.
    mesh = next(c for ax in fig.axes for c in ax.collections if isinstance(c, QuadMesh))
    edges = mesh.get_coordinates()[0, :, 0]
    torch.testing.assert_close(
        torch.tensor(edges), torch.arange(2.0, 27.0, 2.0, dtype=torch.float64)
    )
    irregular = plot_occlusion([occlusion_map(model, images[0], patch=6, stride=4)])
    mesh = next(c for ax in irregular.axes for c in ax.collections if isinstance(c, QuadMesh))
    centres = [3, 7, 11, 15, 19, 23, 25]  # the last position is flush with the border
    edges = mesh.get_coordinates()[0, :, 0]
    assert list(edges) == [1, 5, 9, 13, 17, 21, 24, 26] and len(edges) == len(centres) + 1
