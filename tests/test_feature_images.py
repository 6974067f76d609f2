"""Feature and neuron maximisation against exact answers: analytic receptive fields (with the
gradient's support as an empirical oracle) and the linear optima of conv1."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from helpers import random_cnn
from matplotlib.figure import Figure

from mnistlab import feature_images as fi
from mnistlab.activations import receptive_field
from mnistlab.ascent import AscentConfig
from mnistlab.model import MNIST_MEAN, MNIST_STD


@pytest.mark.parametrize("variant", ["plain", "bn"])
@pytest.mark.parametrize(
    ("layer", "position", "box"),
    [
        ("conv1", (14, 14), (13, 16, 13, 16)),  # 3x3
        ("conv2", (7, 7), (11, 19, 11, 19)),  # 3 + 1 * 1 + 2 * 2 = 8: 8x8
        ("conv2", (0, 0), (0, 5, 0, 5)),  # clipped by the border (zero padding)
        ("conv2", (13, 13), (23, 28, 23, 28)),
    ],
)
def test_receptive_field_is_the_support_of_the_gradient(variant, layer, position, box):
    field = receptive_field(random_cnn(variant), layer)
    assert field.box(position) == box
    # Empirical oracle: where the neuron's gradient is non-zero over many random images/channels.
    model = random_cnn(variant)
    x = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(0), requires_grad=True)
    maps = fi.preactivation(model, layer, x)
    (grad,) = torch.autograd.grad(maps[:, :, position[0], position[1]].sum(), x)
    support = grad.abs().sum(dim=(0, 1)) > 0
    rows, cols = support.any(1).nonzero().flatten(), support.any(0).nonzero().flatten()
    assert (int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1) == box


def test_preactivation_is_the_relu_input_and_stops_the_forward_pass():
    model = random_cnn("bn")
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    called = []
    handle = model.layers.fc2.register_forward_hook(lambda *args: called.append(1))
    try:
        got = fi.preactivation(model, "conv2", x)
    finally:
        handle.remove()
    assert not called
    layers = model.layers
    h = layers.pool1(layers.relu1(layers.bn1(layers.conv1((x - MNIST_MEAN) / MNIST_STD))))
    torch.testing.assert_close(got, layers.bn2(layers.conv2(h)))
    assert fi.relu_after(model, "conv1") == "relu1"
    assert fi.feature_map_size(model, "conv2") == (14, 14)
    assert fi.centre_position(model, "conv1") == (14, 14)
    with pytest.raises(ValueError, match="no layer"):
        fi.relu_after(model, "conv9")


@pytest.mark.parametrize("variant", ["plain", "bn"])
def test_conv1_neuron_ascent_reaches_its_linear_optimum(variant):
    model, lam = random_cnn(variant), 0.5
    config = AscentConfig(steps=150, step_size=0.1, l2=lam)  # contraction 1 - 2 lam step = 0.9
    result = fi.maximise_features(model, "conv1", config, position=(14, 14))
    expected = fi.linear_neuron_optimum(model, "conv1", (14, 14), lam)
    torch.testing.assert_close(result.images, expected, atol=1e-5, rtol=0)
    assert (fi.changed_box_sizes(result.images, result.start) <= 3).all()


def test_conv1_channel_mean_gives_a_flat_interior():
    # The mean of a conv1 channel is linear in the pixels; every interior pixel meets all 9
    # weights, so its gradient is sum(w) / (std H W) and its optimum clamp(sum(w) / (std 2 lam)).
    model, lam = random_cnn(), 0.2
    config = fi.per_position(AscentConfig(steps=150, step_size=0.1, l2=lam), 28 * 28)
    result = fi.maximise_features(model, "conv1", config, channels=[0, 5, 9])
    kernel_sums = model.layers.conv1.weight.detach()[[0, 5, 9]].sum(dim=(1, 2, 3))
    expected = (kernel_sums / (MNIST_STD * 2 * lam)).clamp(0, 1)
    interior = result.images[:, 0, 1:-1, 1:-1]
    torch.testing.assert_close(
        interior, expected.view(3, 1, 1).expand_as(interior), atol=1e-5, rtol=0
    )


def test_changed_box():
    start = torch.zeros(2, 1, 28, 28)
    images = start.clone()
    images[0, 0, 3, 4] = images[0, 0, 9, 6] = 0.5
    assert fi.changed_box_sizes(images, start).tolist() == [[7, 3], [0, 0]]


def test_figures_are_figures():
    model = random_cnn()
    for layer, position in (("conv1", (14, 14)), ("conv2", (7, 7))):
        r = fi.maximise_features(model, layer, AscentConfig(steps=1), position=position)
        weight = fi.effective_weight(model, layer)
        field = receptive_field(model, layer)
        fig = fi.plot_feature_images(layer, weight, r.images, r.images, field, position)
        assert isinstance(fig, Figure)


def test_feature_observations_against_the_analytic_answers():
    # bn: the BN scale must be folded into the kernels that the analytic answers use.
    model, judge = random_cnn("bn"), random_cnn("plain", seed=1)
    neuron_l2, mean_l2 = 0.5, 0.5  # conv1 contracts by 1 - 2 lambda step = 0.9 per step
    obs = {}
    for layer, steps, step_size in (("conv1", 150, 0.1), ("conv2", 20, 0.03)):
        position, size = fi.centre_position(model, layer), fi.feature_map_size(model, layer)
        config = AscentConfig(steps=steps, step_size=step_size)
        neuron = fi.maximise_features(
            model, layer, replace(config, l2=neuron_l2), position=position
        )
        mean = fi.maximise_features(
            model, layer, fi.per_position(replace(config, l2=mean_l2), math.prod(size))
        )
        obs[layer] = fi.feature_observations(
            model, judge, layer, mean, neuron, position, neuron_l2, mean_l2
        )
    o1, o2 = obs["conv1"], obs["conv2"]
    assert (o1["receptive_field"], o2["receptive_field"]) == (3, 8)
    assert o1["neuron_changed_pixels_outside_field"] == 0
    assert o2["neuron_changed_pixels_outside_field"] == 0
    assert max(o1["neuron_changed_box_max"]) <= 3 and max(o2["neuron_changed_box_max"]) <= 8
    assert o1["neuron_max_error_vs_analytic_optimum"] < 1e-5
    assert o1["mean_image_max_error_vs_analytic_interior"] < 1e-5
    assert o1["mean_image_interior_std"] < 1e-5
    assert 0 < o1["mean_image_interior_share_lit"] < 1  # random kernels: sums of both signs
    assert "neuron_max_error_vs_analytic_optimum" not in o2  # conv2 is not linear in the pixels
    assert 0 < o2["judge_max_probability_mean_images"] <= 1
