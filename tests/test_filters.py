"""Part 2 (a): kernel shapes on known kernels, chance baselines, filter figures."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import image_axes, seeded_model

from mnistlab.data import Split
from mnistlab.filters import (
    chance_kind_rates,
    filter_summary,
    initial_model,
    input_energy_by_kind,
    kernel_shapes,
    kind_distance_from_chance,
    neighbour_correlation,
    pixel_regions,
    plot_conv1_filters,
    plot_conv2_filters,
    plot_filter_responses,
    response_regions,
    sign_coherence,
    strongest_reads,
    top_energy_share,
    weight_drift,
)
from mnistlab.train import TrainConfig, config_dict, train


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
    config = TrainConfig(epochs=1, batch_size=16, lr=0.0, seed=7, speed="fp32")
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
    assert summary["sign_coherence"] == pytest.approx(0.0)
    assert 0.2 < summary["sign_coherence_chance"] < 0.5
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


def test_sign_coherence_on_known_kernels():
    ramp = torch.tensor([-1.0, 0.0, 1.0]).view(1, 3).expand(3, 3)
    assert sign_coherence(torch.ones(2, 1, 3, 3)) == 1.0
    assert sign_coherence(-torch.ones(3, 3)) == 1.0
    assert sign_coherence(ramp + 1) == 1.0  # weights 0, 1, 2: one sign, however uneven
    assert sign_coherence(ramp) == 0.0  # an edge detector cancels
    assert sign_coherence(torch.stack([torch.ones(3, 3), ramp])) == pytest.approx(0.5)


def test_strongest_reads_rank_filters_then_their_inputs():
    weight = torch.zeros(3, 5, 3, 3)
    weight[1, 4, 0, 0], weight[1, 2, 1, 1] = 3.0, 1.0  # filter 1: energy 10, input 4 then 2
    weight[0, 0, 2, 2], weight[0, 3, 0, 1] = 2.0, 1.5  # filter 0: energy 6.25, input 0 then 3
    weight[2, 1, 1, 1] = 0.5
    assert strongest_reads(weight, n_outputs=2, n_inputs=2) == [(1, [4, 2]), (0, [0, 3])]
    assert strongest_reads(weight, n_outputs=3, n_inputs=1)[2] == (2, [1])


def test_input_energy_by_kind_weighs_what_each_kind_of_input_receives():
    ramp = torch.tensor([-1.0, 0.0, 1.0]).view(1, 3).expand(3, 3)
    saddle = torch.tensor([[1.0, 0.0, -1.0], [0.0, 0.0, 0.0], [-1.0, 0.0, 1.0]])
    inputs = kernel_shapes(torch.stack([ramp, torch.ones(3, 3), saddle, ramp]))
    assert inputs.kinds == ["edge", "blob", "other", "edge"]
    weight = torch.zeros(2, 4, 3, 3)
    weight[0, 0, 1, 1] = 1.0  # edge input 0: energy 1
    weight[1, 1, 0, :] = 1.0  # blob input 1: energy 3
    table = input_energy_by_kind(weight, inputs)
    assert table["edge"] == {"maps": 0.5, "energy": 0.25}
    assert table["blob"] == {"maps": 0.25, "energy": 0.75}
    assert table["other"] == {"maps": 0.25, "energy": 0.0}
    with pytest.raises(ValueError, match="input kinds"):
        input_energy_by_kind(weight[:, :3], inputs)


def test_conv2_figure_shows_the_norms_and_the_strongest_reads_beside_their_conv1_kernels():
    model = seeded_model()
    w1, w2 = model.layers.conv1.weight.detach(), model.layers.conv2.weight.detach()
    fig = plot_conv2_filters(w2, w1, n_outputs=3, n_inputs=2)
    drawn = image_axes(fig)
    assert len(drawn) == 1 + 3 * 2 * 2
    heat = drawn[0]
    # Rows are conv2 filters, columns the conv1 maps they read (the weight is not symmetric).
    norms = w2.flatten(2).norm(dim=2)
    assert not torch.allclose(norms, norms.T)
    np.testing.assert_allclose(np.asarray(heat.images[0].get_array()), norms.numpy(), rtol=1e-6)
    pairs = [(o, c) for o, inputs in strongest_reads(w2, 3, 2) for c in inputs]
    for k, (o, c) in enumerate(pairs):
        conv1_ax, conv2_ax = drawn[1 + 2 * k], drawn[2 + 2 * k]
        np.testing.assert_array_equal(np.asarray(conv1_ax.images[0].get_array()), w1[c, 0])
        np.testing.assert_array_equal(np.asarray(conv2_ax.images[0].get_array()), w2[o, c])
        assert conv1_ax.get_title().startswith(f"conv1 #{c}\n")
    boxes = {(round(b.get_x() + 0.5), round(b.get_y() + 0.5)) for b in heat.patches}
    assert boxes == {(c, o) for o, c in pairs}  # the enlarged kernels are boxed on the heat map
    # One scale per layer, each its whole range, so the enlarged kernels compare across panels.
    limits1 = {drawn[1 + 2 * k].images[0].get_clim() for k in range(len(pairs))}
    limits2 = {drawn[2 + 2 * k].images[0].get_clim() for k in range(len(pairs))}
    assert limits1 == {(-float(w1.abs().max()), float(w1.abs().max()))}
    assert limits2 == {(-float(w2.abs().max()), float(w2.abs().max()))}
    assert len([ax for ax in fig.axes if getattr(ax, "_colorbar", None) is not None]) == 3


def test_filter_response_figure_panel_count():
    model = seeded_model()
    images = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    fig = plot_filter_responses(model, images)
    # 32 kernels, 32 x 3 responses, and the 3 inputs repeated in each of the 2 blocks.
    assert len(image_axes(fig)) == 32 + 32 * 3 + 2 * 3
    assert len([ax for ax in fig.axes if getattr(ax, "_colorbar", None) is not None]) == 2
