"""Small models and figure helpers shared by the tests."""

from __future__ import annotations

import torch
from matplotlib.collections import QuadMesh
from torch import nn

from mnistlab.model import MnistCNN


def linear_model(seed: int = 0, scale: float = 1.0) -> nn.Module:
    """logits = W x + b on the flattened image: dC/dx of logits[t] is exactly W[t]."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    with torch.no_grad():
        model[1].weight.mul_(scale)
    return model


TARGETS = torch.arange(10)  # one attack per class, in one batch


def cnn(variant: str = "bn", seed: int = 0) -> MnistCNN:
    """An untrained network; the bn variant with non-trivial running statistics, so a train-mode
    pass would change them."""
    torch.manual_seed(seed)
    model = MnistCNN(variant)
    if variant == "bn":
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.1, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
    return model


def digit_like(n: int = 10, seed: int = 0) -> torch.Tensor:
    """Sparse bright strokes on black, like MNIST, in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, 28, 28, generator=g) > 0.8).float() * torch.rand(
        n, 1, 28, 28, generator=g
    )


def random_cnn(variant: str = "plain", seed: int = 0) -> MnistCNN:
    """A random network in eval mode; the bn variant with non-trivial running statistics and
    scales (negative ones included)."""
    torch.manual_seed(seed)
    model = MnistCNN(variant)
    if variant == "bn":
        with torch.no_grad():
            for bn in (model.layers.bn1, model.layers.bn2, model.layers.bn3):
                bn.running_mean.uniform_(-0.3, 0.3)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(-1.5, 1.5)  # negative scales flip a channel's sign
                bn.bias.uniform_(-0.2, 0.2)
    return model.eval()


def seeded_model(variant: str = "plain") -> MnistCNN:
    """An untrained network with fixed weights (seed 0), in eval mode."""
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
