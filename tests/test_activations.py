"""Part 2 (b): feature maps are the layer outputs; statistics on hand-made maps; figures."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import image_axes, seeded_model

from mnistlab.activations import (
    activation_statistics,
    feature_layers,
    feature_maps,
    mosaic,
    nearest_centroid_accuracy,
    plot_activation_statistics,
    plot_feature_maps,
    receptive_field,
    top_mass_share,
)


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
    assert receptive_field(model, "pool2").size == 10 and receptive_field(model, "conv2").size == 8


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


def test_mosaic_places_tiles_row_major_with_nan_gaps():
    tiles = torch.arange(12, dtype=torch.float32).view(3, 2, 2)
    m = mosaic(tiles, ncols=2, gap=1)
    assert m.shape == (5, 5)
    assert (m[0:2, 0:2] == tiles[0].numpy()).all() and (m[0:2, 3:5] == tiles[1].numpy()).all()
    assert (m[3:5, 0:2] == tiles[2].numpy()).all()
    assert torch.isnan(torch.from_numpy(m[3:5, 3:5])).all()  # the unused fourth cell
    assert (
        torch.isnan(torch.from_numpy(m[2])).all() and torch.isnan(torch.from_numpy(m[:, 2])).all()
    )
