"""Around the Part 3 attacks: the image pairs, targeted PGD's smallest radius, transfer, distances."""

from __future__ import annotations

import pytest
import torch
from helpers import TARGETS, cnn, digit_like, linear_model
from torch import nn

from mnistlab.attack_analysis import (
    images_of_digits,
    nearest_mse,
    pgd_minimal_radius,
    transfer_rates,
    transfer_table,
)
from mnistlab.attacks import CONFIDENT, mse_per_image, perturbation_norms
from mnistlab.data import one_per_class


def test_pgd_minimal_radius_finds_the_smallest_successful_radius():
    model = linear_model(scale=5.0)
    images = digit_like()
    for norm, radii in (("linf", [0.02, 0.05, 0.1, 0.2, 0.4, 0.8]), ("l2", [0.5, 1.0, 2.0, 4.0])):
        delta, radius = pgd_minimal_radius(model, images, TARGETS, radii, norm, iterations=30)
        solved = ~radius.isnan()
        assert solved.sum() >= 5, norm
        assert delta[~solved].isnan().all()
        size = perturbation_norms(delta[solved])[norm]
        assert (size <= radius[solved] + 1e-5).all(), norm
        adv = (images + delta)[solved]
        assert adv.min() >= 0.0 and adv.max() <= 1.0
        probs = model(adv).softmax(1).gather(1, TARGETS[solved][:, None])[:, 0]
        assert (probs >= CONFIDENT).all()
        # The radius is the first of the grid that works: one grid step smaller fails.
        for i in solved.nonzero()[:, 0].tolist():
            smaller = [r for r in radii if r < radius[i]]
            if smaller:
                _, r = pgd_minimal_radius(
                    model, images[i : i + 1], TARGETS[i : i + 1], smaller, norm, iterations=30
                )
                assert r.isnan().all(), (norm, i)


def test_one_pgd_step_against_the_closed_form():
    """On a linear model the cross-entropy gradient is W^T (softmax - onehot): one step, exactly."""
    model = linear_model()
    x0 = torch.full((10, 1, 28, 28), 0.5)
    weight = model[1].weight.detach()
    with torch.no_grad():
        probs = model(x0).softmax(1)
    grad = ((probs - torch.eye(10)) @ weight).view(10, 1, 28, 28)
    radius = 0.01  # Madry's step is 2.5 radius, so one step ends on the boundary of the ball
    delta, r = pgd_minimal_radius(model, x0, TARGETS, [radius], "l2", iterations=1, confidence=0)
    unit = grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    torch.testing.assert_close(delta, -radius * unit, rtol=1e-4, atol=1e-7)
    delta, r = pgd_minimal_radius(model, x0, TARGETS, [radius], "linf", iterations=1, confidence=0)
    torch.testing.assert_close(delta, -radius * grad.sign())
    assert torch.equal(r, torch.full((10,), radius))


class ReadsCorner(nn.Module):
    """Predicts class c for an image whose top-left pixel is c / 10."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -1000 * (x[:, 0, 0, :1] - torch.arange(10) / 10) ** 2


def test_images_of_digits_picks_one_per_class_among_the_correct_ones():
    labels = torch.arange(200) % 10
    digits = (TARGETS + 1) % 10
    every = images_of_digits(labels, digits, seed=0)
    assert torch.equal(every, one_per_class(labels, seed=0)[digits])
    assert torch.equal(labels[every], digits)
    # With a model: only images it classifies correctly; the pool limits the candidates.
    model = ReadsCorner()
    predicted = torch.arange(200) % 10
    images = torch.zeros(200, 1, 28, 28)
    images[:, 0, 0, 0] = predicted / 10
    labels = predicted.clone()
    labels[:100] = (labels[:100] + 1) % 10  # the first half is misclassified
    pool = torch.arange(0, 200, 3)
    present = labels[pool[pool >= 100]].unique()
    picked = images_of_digits(labels, present, 3, pool, model, images)
    assert (picked >= 100).all() and (picked % 3 == 0).all()
    assert torch.equal(labels[picked], present)
    with pytest.raises(ValueError):
        images_of_digits(labels, digits, 0, model=model)


def test_transfer_table_matches_one_image_at_a_time():
    model = cnn("plain", seed=2)
    images, noises = digit_like(10, seed=5), 0.3 * torch.randn(10, 1, 28, 28)
    predicted, clean = transfer_table(model, images, noises)
    model.eval()
    with torch.no_grad():
        for i in range(10):
            assert clean[i] == model(images[i : i + 1]).argmax()
            for j in range(10):
                noisy = (images[i] + noises[j]).clamp(0, 1)[None]
                assert predicted[i, j] == model(noisy).argmax()


def test_transfer_rates_on_a_hand_built_table():
    labels = torch.tensor([0, 1])
    clean = torch.tensor([0, 2])  # image 1 is misclassified when clean
    targets = torch.tensor([0, 1, 2])
    predicted = torch.tensor([[0, 1, 0], [2, 2, 2]])
    rates = transfer_rates(predicted, clean, labels, targets)
    # eligible pairs (label != target): (0,1) (0,2) (1,0) (1,2); reached: (0,1) and (1,2)
    assert rates["target_rate"] == pytest.approx(2 / 4)
    assert rates["changed_rate"] == pytest.approx(1 / 6)  # only (0,1) changed


def test_nearest_mse_against_brute_force():
    images, reference = torch.rand(3, 1, 28, 28), torch.rand(25, 1, 28, 28)
    expected = torch.stack(
        [mse_per_image(img[None].expand_as(reference), reference).min() for img in images]
    )
    torch.testing.assert_close(nearest_mse(images, reference, chunk=7), expected)
