"""Small models with known gradients, shared by the attack and defence tests."""

from __future__ import annotations

import torch
from torch import nn


def linear_model(seed: int = 0, scale: float = 1.0) -> nn.Module:
    """logits = W x + b on the flattened image: dC/dx of logits[t] is exactly W[t]."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    with torch.no_grad():
        model[1].weight.mul_(scale)
    return model
