"""Robustness measured: robust accuracy under FGSM and PGD, and Part 3's attacks under a budget."""

from __future__ import annotations

import pytest
import torch
from helpers import linear_model
from torch import nn

from mnistlab.defenses import bit_depth_defense, bpda_surrogate
from mnistlab.model import MnistCNN
from mnistlab.robustness import Part3Budget, part3_success, robust_accuracy
from mnistlab.train import evaluate


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_robust_accuracy_never_exceeds_clean_accuracy(attack):
    # A weak model (about 10% correct): random starts would make some wrong images right, and
    # they must not count.
    model = MnistCNN()
    x = torch.rand(100, 1, 28, 28)
    y = torch.randint(0, 10, (100,), generator=torch.Generator().manual_seed(0))
    clean = evaluate(model, x, y)["accuracy"]
    assert 0 < clean < 1
    for eps in (0.0, 0.01, 0.1):
        result = robust_accuracy(model, x, y, eps, attack=attack, steps=3, batch_size=32)
        assert result["accuracy"] <= clean
        assert result["n"] == 100
    assert robust_accuracy(model, x, y, 0.0, attack=attack)["accuracy"] == clean


def test_robust_accuracy_of_a_linear_model_matches_the_exact_worst_case():
    # Two classes, logits W x + b: the worst case in the ball is x + eps * sign(w_other - w_true)
    # (pixels away from 0 and 1), so the exact robust accuracy is computable.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 2))
    x = 0.3 + 0.4 * torch.rand(200, 1, 28, 28)
    with torch.no_grad():
        y = model(x).argmax(1)
        w = model[1].weight
        worst = x + 0.01 * (w[1 - y] - w[y]).sign().view_as(x)
        exact = (model(worst).argmax(1) == y).float().mean().item()
    assert 0 < exact < 1
    assert robust_accuracy(model, x, y, 0.01, attack="fgsm")["accuracy"] == pytest.approx(exact)
    assert robust_accuracy(model, x, y, 0.01, steps=20)["accuracy"] == pytest.approx(exact)


def test_robust_accuracy_restores_the_model():
    model = MnistCNN("bn").train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    robust_accuracy(model, torch.rand(10, 1, 28, 28), torch.arange(10), 0.1, steps=2)
    assert model.training
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_part3_success_counts_targets_reached_and_bpda_restores_the_gradient():
    model = linear_model(scale=20.0)
    g = torch.Generator().manual_seed(0)
    target_images, sources = torch.rand(2, 10, 1, 28, 28, generator=g)
    budget = Part3Budget(iterations=30, beta=1.0, noise_max_iterations=30)
    out, made = part3_success(model, budget, target_images, sources)
    for key in ("generate_reached", "targeted_reached", "noise_reached"):
        assert 0 <= out[key] <= 10
    assert out["generate_reached"] == 10  # a linear model's logits grow without bound
    assert made["generate"].images.shape == (10, 1, 28, 28)
    # Behind binarisation the true gradient is zero: (a) never moves from its noise, which the
    # model reads as one class at most; the straight-through gradient reaches the targets again.
    defended = bit_depth_defense(model)
    masked, _ = part3_success(defended, budget, target_images, sources)
    bpda, _ = part3_success(defended, budget, target_images, sources, bpda_surrogate(defended))
    assert masked["generate_reached"] <= 1
    assert bpda["generate_reached"] > masked["generate_reached"]
