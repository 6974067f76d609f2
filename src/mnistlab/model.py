"""The prescribed CNN (and its batch-norm variant), its layer table, parameter and neuron counts."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Mean and std of the MNIST training pixels on the [0, 1] scale; the model normalises inside so
# that every caller (training, plots, attacks) speaks the same [0, 1] pixel convention.
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
# The assignment states pixel values in grey levels (0..255); they are converted here, once.
GREY_LEVEL = 1.0 / 255.0  # one grey level on the [0, 1] scale
GREY_128 = 128 * GREY_LEVEL  # 0.502: the assignment's mid-grey (noise mean, occlusion example)
VARIANTS = ("plain", "bn")
INPUT_SHAPE = (1, 28, 28)


class MnistCNN(nn.Module):
    """conv(32,3x3,p1)-ReLU-pool-conv(32,3x3,p1)-ReLU-pool-FC500-ReLU-FC10, logits out.

    The "bn" variant inserts BatchNorm after conv1, conv2 and fc1, between the affine layer and its
    ReLU as in Ioffe & Szegedy (2015), so each ReLU sees standardised pre-activations. The affine
    layers keep their biases, so the BN network is exactly the plain one plus the BN layers.
    Softmax is not part of the model: the loss takes logits, probabilities come from `softmax`.
    """

    def __init__(self, variant: str = "plain") -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.variant = variant
        bn = variant == "bn"
        layers: list[tuple[str, nn.Module]] = [("conv1", nn.Conv2d(1, 32, 3, stride=1, padding=1))]
        layers += [("bn1", nn.BatchNorm2d(32))] if bn else []
        layers += [("relu1", nn.ReLU()), ("pool1", nn.MaxPool2d(2, stride=2))]
        layers += [("conv2", nn.Conv2d(32, 32, 3, stride=1, padding=1))]
        layers += [("bn2", nn.BatchNorm2d(32))] if bn else []
        layers += [("relu2", nn.ReLU()), ("pool2", nn.MaxPool2d(2, stride=2))]
        layers += [("flatten", nn.Flatten()), ("fc1", nn.Linear(32 * 7 * 7, 500))]
        layers += [("bn3", nn.BatchNorm1d(500))] if bn else []
        layers += [("relu3", nn.ReLU()), ("fc2", nn.Linear(500, 10))]
        self.layers = nn.Sequential(OrderedDict(layers))
        # The same layers with each ReLU -> max-pool pair run as max-pool -> ReLU (see
        # forward_pool_first). A plain list, so the modules are not registered twice.
        self._pool_first_order = _swap_relu_pool(list(self.layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images in [0, 1], shape (N, 1, 28, 28), to logits of shape (N, 10)."""
        return self.layers((x - MNIST_MEAN) / MNIST_STD)

    def forward_pool_first(self, x: torch.Tensor, fold_bn1: bool = True) -> torch.Tensor:
        """forward() with max-pooling before each ReLU: the same logits and gradients, cheaper.

        ReLU is monotone, so max(relu(a), relu(b)) == relu(max(a, b)) exactly, in any precision,
        and the gradients agree too (pooling routes the gradient to the window's maximum; ReLU
        then zeroes it where that maximum is not positive, in either order). Pooling first lets
        the ReLU and its backward touch a quarter of the values, which makes training faster on
        a CPU (tests/test_model.py checks that logits and gradients are equal).

        The BN variant also folds its 2-d BNs into the convolutions before them, which gives the
        same function up to float rounding and skips BN's passes over the conv maps: in eval mode
        both (conv_bn_eval), in training mode bn1 when `fold_bn1` (conv_bn_batch_stats).
        Forward hooks would see the swapped and folded layers, so everything that inspects
        layers (the layer table, Part 2's activations) uses forward().
        """
        z = (x - MNIST_MEAN) / MNIST_STD
        layers = iter(self._pool_first_order)
        for layer in layers:
            if self.variant == "bn" and isinstance(layer, nn.Conv2d):
                bn = next(layers)  # in the BN variant each conv is followed by its BN
                if not self.training:
                    z = conv_bn_eval(layer, bn, z)
                elif fold_bn1 and layer is self.layers.conv1:
                    z = conv_bn_batch_stats(layer, bn, z)
                else:
                    z = bn(layer(z))
            else:
                z = layer(z)
        return z


def conv_bn_eval(conv: nn.Conv2d, bn: nn.BatchNorm2d, z: torch.Tensor) -> torch.Tensor:
    """bn(conv(z)) in eval mode as one convolution: BN's fixed per-channel affine map folded
    into the weights and bias (the usual inference fold; the same function up to rounding)."""
    if bn.training or bn.running_var is None:
        return bn(conv(z))  # BN normalising with batch statistics: nothing fixed to fold
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    return _scaled_conv(conv, z, scale, (conv.bias - bn.running_mean) * scale + bn.bias)


def conv_bn_batch_stats(conv: nn.Conv2d, bn: nn.BatchNorm2d, z: torch.Tensor) -> torch.Tensor:
    """bn(conv(z)) in training mode, computed as one convolution with batch-folded weights.

    conv is linear in its input patches p, so the batch mean and variance of output channel c
    follow from the patches' mean m and covariance S: mean_c = w_c.m + b_c and var_c =
    w_c' S w_c. BN's output is then the convolution with weights w_c * s_c and bias
    beta_c - (w_c.m) s_c, where s_c = gamma_c / sqrt(var_c + eps): the same function of the
    parameters (so the same gradients, up to float rounding), and the running statistics get the
    same update. It skips BN's passes over conv1's 32 x 28 x 28 maps, the biggest in the net; for
    one input channel the patches are small (9 values each), so their statistics are cheap.
    """
    if not bn.training or bn.momentum is None or not bn.track_running_stats:
        return bn(conv(z))  # eval mode, or a running-average rule this fold does not implement
    out_channels = conv.weight.shape[0]
    # The statistics in fp32 even under autocast: a variance from bf16 sums would be too coarse.
    with torch.autocast(z.device.type, enabled=False):
        patches = conv_patches(conv, z.float())  # (values per patch, patches in the batch)
        n = patches.shape[1]
        patch_mean = patches.mean(1)
        centred = patches - patch_mean[:, None]
        patch_cov = centred @ centred.T / n
        w = conv.weight.float().reshape(out_channels, -1)
        mean = w @ patch_mean + conv.bias.float()
        var = ((w @ patch_cov) * w).sum(1)  # biased, as BN normalises with
        scale = bn.weight * torch.rsqrt(var + bn.eps)
        with torch.no_grad():  # as nn.BatchNorm2d: the running variance is the unbiased one
            bn.running_mean.lerp_(mean, bn.momentum)
            bn.running_var.lerp_(var * n / (n - 1), bn.momentum)
            bn.num_batches_tracked += 1
        bias = bn.bias + (conv.bias - mean) * scale
    return _scaled_conv(conv, z, scale, bias)


def conv_patches(conv: nn.Conv2d, z: torch.Tensor) -> torch.Tensor:
    """The input patches `conv` sees in `z`, as columns: (in_channels * kh * kw, N * H_out * W_out).

    The values of F.unfold(...).transpose(0, 1).flatten(1), in its order, gathered as one shifted
    slice of the zero-padded input per kernel tap, which costs a CPU less than unfold's im2col.
    """
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    ph, pw = conv.padding
    padded = F.pad(z, (pw, pw, ph, ph))
    n, c, h, w = padded.shape
    h_out, w_out = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    taps = [
        padded[
            :,
            :,
            i * dh : i * dh + sh * (h_out - 1) + 1 : sh,
            j * dw : j * dw + sw * (w_out - 1) + 1 : sw,
        ]
        for i in range(kh)
        for j in range(kw)
    ]
    # (taps, N, C, H_out, W_out) -> (C, taps, N, H_out, W_out): unfold's (channel, tap) row order.
    return torch.stack(taps).permute(2, 0, 1, 3, 4).reshape(c * kh * kw, n * h_out * w_out)


def _scaled_conv(
    conv: nn.Conv2d, z: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """conv(z) with each output channel's weights scaled by `scale` and the given bias."""
    weight = conv.weight * scale.view(-1, 1, 1, 1)
    return F.conv2d(z, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def _swap_relu_pool(layers: list[nn.Module]) -> list[nn.Module]:
    """The layer sequence with every ReLU that is followed by a max-pool moved after it."""
    order = list(layers)
    for i in range(len(order) - 1):
        if isinstance(order[i], nn.ReLU) and isinstance(order[i + 1], nn.MaxPool2d):
            order[i], order[i + 1] = order[i + 1], order[i]
    return order


@contextmanager
def frozen_eval(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode, fp32 (autocast off) and frozen parameters; every mode and flag restored after.

    Attacks and visualisations use it: eval mode keeps batch-norm statistics fixed (train mode
    would use batch statistics and update the running ones, i.e. change the model), and frozen
    parameters mean a backward pass computes gradients for the input only.
    """
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    device_type = flags[0][0].device.type if flags else "cpu"
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        with torch.autocast(device_type, enabled=False):
            yield model
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag in flags:
            p.requires_grad_(flag)


@dataclass(frozen=True)
class LayerRow:
    """One row of the layer table."""

    name: str
    kind: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    params: int


def layer_table(model: MnistCNN) -> list[LayerRow]:
    """Input and output shape (per image, C x H x W or features) and parameters of every layer."""
    rows: list[LayerRow] = []
    hooks = []
    for name, layer in model.layers.named_children():

        def record(mod, inputs, output, name=name):
            n_params = sum(p.numel() for p in mod.parameters())
            in_shape, out_shape = tuple(inputs[0].shape[1:]), tuple(output.shape[1:])
            rows.append(LayerRow(name, type(mod).__name__, in_shape, out_shape, n_params))

        hooks.append(layer.register_forward_hook(record))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *INPUT_SHAPE, device=next(model.parameters()).device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return rows


def parameter_counts(model: MnistCNN) -> dict[str, int]:
    """Trainable parameters split into conv, fully connected and batch-norm layers, and the total."""
    counts = {"conv": 0, "fc": 0, "bn": 0}
    for layer in model.layers:
        n = sum(p.numel() for p in layer.parameters() if p.requires_grad)
        if isinstance(layer, nn.Conv2d):
            counts["conv"] += n
        elif isinstance(layer, nn.Linear):
            counts["fc"] += n
        elif isinstance(layer, nn.BatchNorm1d | nn.BatchNorm2d):
            counts["bn"] += n
    counts["total"] = counts["conv"] + counts["fc"] + counts["bn"]
    return counts


NEURON_CONVENTION = (
    "one neuron per output value of a conv or fully connected layer (a weighted sum followed by a "
    "non-linearity, or the output logits); pooling, ReLU and BN outputs and the input pixels are "
    "not neurons"
)


def neuron_counts(model: MnistCNN) -> dict[str, object]:
    """Neurons under the stated convention, split conv / FC, plus the other reasonable counts."""
    table = layer_table(model)

    def size(shape: tuple[int, ...]) -> int:
        return int(torch.tensor(shape).prod())

    conv = sum(size(r.output_shape) for r in table if r.kind == "Conv2d")
    fc = sum(size(r.output_shape) for r in table if r.kind == "Linear")
    pooled = sum(size(r.output_shape) for r in table if r.kind == "MaxPool2d")
    channels = sum(r.output_shape[0] for r in table if r.kind in ("Conv2d", "Linear"))
    return {
        "convention": NEURON_CONVENTION,
        "conv": conv,
        "fc": fc,
        "total": conv + fc,
        "alternatives": {
            "with_pooling_outputs": conv + fc + pooled,
            "with_input_pixels": conv + fc + size(INPUT_SHAPE),
            "hidden_only_without_output_layer": conv + fc - table[-1].output_shape[0],
            "one_per_filter_or_unit": channels,
        },
    }
