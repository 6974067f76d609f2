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
