"""The prescribed network: shapes, exact parameter counts, neuron counts, torchinfo cross-check."""

from __future__ import annotations

import pytest
import torch
from torchinfo import summary

from mnistlab.model import MnistCNN, layer_table, neuron_counts, parameter_counts


def test_parameter_counts_equal_the_analytic_values():
    conv1 = 32 * 1 * 3 * 3 + 32  # 320
    conv2 = 32 * 32 * 3 * 3 + 32  # 9,248
    fc1 = 32 * 7 * 7 * 500 + 500  # 784,500
    fc2 = 500 * 10 + 10  # 5,010
    counts = parameter_counts(MnistCNN("plain"))
    assert counts == {"conv": conv1 + conv2, "fc": fc1 + fc2, "bn": 0, "total": 799_078}
    assert counts["conv"] == 9_568 and counts["fc"] == 789_510


def test_bn_variant_adds_exactly_the_bn_scales_and_shifts():
    counts = parameter_counts(MnistCNN("bn"))
    assert counts["bn"] == 2 * (32 + 32 + 500)
    assert counts["total"] == 799_078 + 1_128
    assert counts["total"] == sum(p.numel() for p in MnistCNN("bn").parameters())


@pytest.mark.parametrize("variant", ["plain", "bn"])
def test_layer_table_shapes(variant):
    rows = {r.name: r for r in layer_table(MnistCNN(variant))}
    assert rows["conv1"].input_shape == (1, 28, 28) and rows["conv1"].output_shape == (32, 28, 28)
    assert rows["pool1"].output_shape == (32, 14, 14)
    assert rows["conv2"].output_shape == (32, 14, 14)
    assert rows["pool2"].output_shape == (32, 7, 7)
    assert rows["flatten"].output_shape == (1568,)
    assert rows["fc1"].output_shape == (500,) and rows["fc2"].output_shape == (10,)
    assert sum(r.params for r in rows.values()) == parameter_counts(MnistCNN(variant))["total"]


@pytest.mark.parametrize("variant", ["plain", "bn"])
def test_layer_table_agrees_with_torchinfo(variant):
    model = MnistCNN(variant)
    info = summary(model, input_size=(1, 1, 28, 28), verbose=0, depth=2)
    leaves = [layer for layer in info.summary_list if layer.depth == 2]
    ours = layer_table(model)
    assert [r.name for r in ours] == [layer.var_name for layer in leaves]
    assert [list(r.output_shape) for r in ours] == [layer.output_size[1:] for layer in leaves]
    assert info.total_params == parameter_counts(model)["total"]


def test_neuron_counts():
    counts = neuron_counts(MnistCNN("plain"))
    assert counts["conv"] == 32 * 28 * 28 + 32 * 14 * 14 == 31_360
    assert counts["fc"] == 500 + 10
    assert counts["total"] == 31_870
    alt = counts["alternatives"]
    assert alt["with_pooling_outputs"] == 31_870 + 32 * 14 * 14 + 32 * 7 * 7 == 39_710
    assert alt["with_input_pixels"] == 31_870 + 784
    assert alt["hidden_only_without_output_layer"] == 31_860
    assert alt["one_per_filter_or_unit"] == 32 + 32 + 500 + 10
    assert neuron_counts(MnistCNN("bn"))["total"] == 31_870  # BN adds no neurons


def test_forward_takes_unit_range_images_and_returns_logits():
    model = MnistCNN("plain").eval()
    x = torch.rand(4, 1, 28, 28)
    logits = model(x)
    assert logits.shape == (4, 10)
    # Logits, not probabilities: rows do not sum to one (a softmax inside would make them).
    assert not torch.allclose(logits.sum(1), torch.ones(4))
    # Normalisation lives inside: the same weights on a standardised copy give other logits.
    assert not torch.allclose(model((x - 0.1307) / 0.3081), logits)


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="variant"):
        MnistCNN("resnet")


def test_layer_table_leaves_mode_alone():
    model = MnistCNN("bn").train()
    layer_table(model)
    assert model.training
