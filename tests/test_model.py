"""The prescribed network: shapes, exact parameter counts, neuron counts, torchinfo cross-check."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchinfo import summary

from mnistlab.model import (
    VARIANTS,
    MnistCNN,
    conv_patches,
    layer_table,
    neuron_counts,
    parameter_counts,
)


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


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_pool_first_forward_equals_forward_in_logits_and_gradients(variant, channels_last):
    torch.manual_seed(0)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = MnistCNN(variant).to(memory_format=memory_format).train()
    twin = copy.deepcopy(model)
    x = torch.rand(16, 1, 28, 28)
    x[:4] = 0.0  # blank images: every pooling window holds tied conv outputs (the bias)
    x = x.contiguous(memory_format=memory_format)
    y = torch.arange(16) % 10
    logits, fast = model(x), twin.forward_pool_first(x, fold_bn1=False)
    assert torch.equal(logits, fast)  # exactly, not approximately: max and ReLU commute
    F.cross_entropy(logits, y).backward()
    F.cross_entropy(fast, y).backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name
    if variant == "bn":  # batch statistics were updated identically
        assert torch.equal(model.layers.bn1.running_var, twin.layers.bn1.running_var)


def test_pool_first_order_reuses_the_layers_and_registers_nothing_new():
    model = MnistCNN("bn")
    order = model._pool_first_order
    assert sorted(map(id, order)) == sorted(map(id, model.layers))  # the same modules, moved
    kinds = [type(m).__name__ for m in order]
    assert kinds[:5] == ["Conv2d", "BatchNorm2d", "MaxPool2d", "ReLU", "Conv2d"]
    assert all(key.startswith("layers.") for key in model.state_dict())
    assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == 3


def test_folded_bn1_matches_the_batch_norm_modules_in_training():
    torch.manual_seed(0)
    model = MnistCNN("bn").train()
    twin = copy.deepcopy(model)
    x = torch.rand(32, 1, 28, 28)
    x[:4] = 0.0
    y = torch.arange(32) % 10
    reference, folded = model.forward_pool_first(x, fold_bn1=False), twin.forward_pool_first(x)
    torch.testing.assert_close(folded, reference, rtol=1e-4, atol=1e-4)
    F.cross_entropy(reference, y).backward()
    F.cross_entropy(folded, y).backward()
    params = dict(model.named_parameters())
    for (name, p), q in zip(params.items(), twin.parameters(), strict=True):
        # Biases in front of a BN have no effect, so their true gradient is 0: compare on the
        # scale of the layer's weight gradient, not of the (rounding-sized) bias gradient.
        scale = params[name.rsplit(".", 1)[0] + ".weight"].grad.abs().max().item()
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=1e-4 * scale, msg=name)
    for (name, a), b in zip(model.named_buffers(), twin.buffers(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    ("channels", "kernel", "stride", "padding", "dilation"),
    [(1, 3, 1, 1, 1), (3, 3, 2, 1, 1), (2, (3, 2), (1, 2), (0, 1), 1), (2, 3, 1, 2, 2)],
)
def test_conv_patches_equal_unfold(channels, kernel, stride, padding, dilation):
    conv = nn.Conv2d(channels, 4, kernel, stride=stride, padding=padding, dilation=dilation)
    z = torch.randn(5, channels, 11, 9)
    expected = F.unfold(z, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    assert torch.equal(conv_patches(conv, z), expected.transpose(0, 1).flatten(1))


def test_eval_mode_folds_the_conv_bns_into_the_same_function():
    torch.manual_seed(0)
    model = MnistCNN("bn")
    for _ in range(3):  # running statistics and affine parameters away from their defaults
        model.train()(torch.rand(64, 1, 28, 28))
    with torch.no_grad():
        for bn in (model.layers.bn1, model.layers.bn2):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    model.eval()
    x = torch.rand(64, 1, 28, 28)
    state = copy.deepcopy(model.state_dict())
    reference, folded = model(x), model.forward_pool_first(x)
    torch.testing.assert_close(folded, reference, rtol=1e-5, atol=1e-5)
    assert torch.equal(folded.argmax(1), reference.argmax(1))
    for key, value in model.state_dict().items():  # folding changed no weight or statistic
        assert torch.equal(value, state[key]), key
