"""The prescribed CNN (and its batch-norm variant), its layer table, parameter and neuron counts."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
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
    Training and `train.evaluate` may compute the same function faster (speed.py: pools before
    ReLUs, BN folded into the convolutions; equal up to float rounding); the rest calls forward().
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images in [0, 1], shape (N, 1, 28, 28), to logits of shape (N, 10)."""
        return self.layers((x - MNIST_MEAN) / MNIST_STD)


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
