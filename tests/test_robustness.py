"""Robustness measured: robust accuracy under FGSM and PGD, and Part 3's attacks under a budget."""

from __future__ import annotations

import sys

import pytest
import torch
from helpers import linear_model
from torch import nn

from mnistlab.defenses import bit_depth_defense, bpda_surrogate
from mnistlab.model import MnistCNN
from mnistlab.robustness import (
    Part3Budget,
    autoattack_accuracy,
    autoattack_robust,
    headline_robustness,
    part3_success,
    robust_accuracy,
    standard_error,
    worst_case,
)
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


# ---------------------------------------------------------------------------------------------
# AutoAttack and the worst case per image


def grey_images(n: int, seed: int = 0) -> torch.Tensor:
    """Pixels in [0.3, 0.7]: within eps <= 0.3 of them the [0, 1] box never binds."""
    g = torch.Generator().manual_seed(seed)
    return 0.3 + 0.4 * torch.rand(n, 1, 28, 28, generator=g)


def exact_linear_robustness(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, eps: float):
    """Oracle for logits W x + b with the box not binding: robust iff every margin survives eps.

    The worst perturbation against class j moves each pixel by eps along -sign(w_y - w_j), which
    lowers the margin (w_y - w_j) x + b_y - b_j by exactly eps * ||w_y - w_j||_1.
    """
    w, b = model[1].weight, model[1].bias
    with torch.no_grad():
        flat = x.flatten(1)
        margins = (flat @ w.T + b).gather(1, y[:, None]) - (flat @ w.T + b)
        cost = eps * (w[y][:, None, :] - w[None, :, :]).abs().sum(-1)
        worst = margins - cost
        worst[torch.arange(len(y)), y] = float("inf")
        return worst.min(1).values > 0


@pytest.mark.slow  # images that survive face Square's 5,000 queries
def test_autoattack_on_a_linear_model_finds_the_exact_worst_case():
    model = linear_model(seed=1)
    x = grey_images(60)
    with torch.no_grad():
        y = model(x).argmax(1)
    eps = 0.004
    exact = exact_linear_robustness(model, x, y, eps)
    assert 0 < exact.float().mean() < 1  # some images robust, some not: the test can tell
    robust = autoattack_robust(model, x, y, eps, seed=0)
    assert list(robust) == ["clean", "apgd-ce", "apgd-t", "fab-t", "square"]
    assert robust["clean"].all()
    assert torch.equal(robust["square"], exact)


@pytest.mark.slow  # images that survive face Square's 5,000 queries
def test_autoattack_cannot_fool_a_model_with_a_huge_margin_so_the_worst_case_is_clean():
    # Logits barely depend on the image (weights 1e-3) and class 3 leads by 100: no image in
    # the eps ball can change the prediction. Half the labels are wrong, so clean is 0.5.
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    with torch.no_grad():
        model[1].weight.uniform_(-1e-3, 1e-3)
        model[1].bias.zero_()
        model[1].bias[3] = 100.0
    x = grey_images(20)
    y = torch.tensor([3, 5] * 10)
    result = autoattack_accuracy(model, x, y, 0.3, seed=0)
    assert result["clean_accuracy"] == 0.5
    assert result["accuracy"] == result["clean_accuracy"]
    assert result["fooled_by"] == {"apgd-ce": 0, "apgd-t": 0, "fab-t": 0, "square": 0}
    assert result["n"] == 20 and result["stderr"] == pytest.approx(standard_error(0.5, 20))


def test_autoattack_leaves_the_model_inputs_and_random_state_untouched():
    model = MnistCNN("bn").train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(6, 1, 28, 28)
    x_before = x.clone()
    with torch.no_grad():
        y = model.eval()(x).argmax(1)  # correct to begin with, so the attacks run
    model.train()
    rng = torch.get_rng_state()
    robust = autoattack_robust(model, x, y, 0.3, seed=0)
    assert robust["clean"].all() and not robust["square"].any()  # an untrained net falls
    assert model.training
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(x, x_before)
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.slow  # images that survive face Square's 5,000 queries
def test_autoattack_one_attack_at_a_time_is_the_packages_own_evaluation():
    # Oracle: AutoAttack's single call over the whole suite flags the same images.
    from pyautoattack import AutoAttack

    model = linear_model(seed=2)
    x = grey_images(40, seed=1)
    with torch.no_grad():
        y = model(x).argmax(1)
    robust = autoattack_robust(model, x, y, 0.004, seed=0)
    _, y_adv = AutoAttack(model, eps=0.004, version="standard", seed=0).run_standard_evaluation(
        x, y
    )
    assert torch.equal(robust["square"], y_adv == y)


def test_worst_case_per_image_is_at_most_every_attack():
    robust = {
        "a": torch.tensor([1, 1, 0, 1, 0], dtype=torch.bool),
        "b": torch.tensor([1, 0, 0, 1, 1], dtype=torch.bool),
        "c": torch.tensor([1, 1, 0, 1, 1], dtype=torch.bool),
    }
    result = worst_case(robust)
    assert result["accuracy"] == pytest.approx(2 / 5)  # images 0 and 3 survive all three
    assert result["per_attack"] == pytest.approx({"a": 3 / 5, "b": 3 / 5, "c": 4 / 5})
    assert all(result["accuracy"] <= acc for acc in result["per_attack"].values())
    assert result["fooled_only_by"] == {"a": 1, "b": 1, "c": 0}
    assert result["n"] == 5 and result["stderr"] == pytest.approx(standard_error(0.4, 5))


@pytest.mark.slow  # images that survive face Square's 5,000 queries
def test_headline_is_the_worst_case_over_autoattack_and_pgd_and_bpda_reaches_binarisation():
    model = linear_model(seed=1, scale=3.0)
    defended = bit_depth_defense(model)
    x = grey_images(30)
    with torch.no_grad():
        y = defended(x).argmax(1)
    surrogate = bpda_surrogate(defended)
    head = headline_robustness(defended, x, y, 0.2, surrogate, pgd_runs=[(10, 1), (10, 2)])
    assert set(head["per_attack"]) == {"AutoAttack", "PGD-10", "PGD-10 x 2 restarts"}
    assert all(head["accuracy"] <= acc for acc in head["per_attack"].values())
    assert head["clean_accuracy"] == 1.0 and head["n"] == 30
    assert head["per_attack"]["AutoAttack"] == head["autoattack"]["accuracy"]
    assert head["accuracy"] <= 0.1  # through the straight-through gradient the defence falls
    # Through the rounding's zero gradient, the white-box attacks are blind.
    masked = autoattack_accuracy(defended, x, y, 0.2, seed=0)
    assert masked["fooled_by"]["apgd-ce"] == 0


def test_autoattack_rejects_bad_input():
    model = linear_model()
    x, y = grey_images(4), torch.arange(4)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        autoattack_robust(model, x * 255, y)
    with pytest.raises(ValueError, match="eps"):
        autoattack_robust(model, x, y, eps=0.0)
    with pytest.raises(ValueError, match="version"):
        autoattack_robust(model, x, y, version="rand")
    with pytest.raises(ValueError, match="labels"):
        autoattack_robust(model, x, y[:3])
    with pytest.raises(TypeError, match="fp32"):
        autoattack_robust(model, x.double(), y)
    with pytest.raises(ValueError, match="no attacks"):
        worst_case({})
    with pytest.raises(ValueError, match="surrogate"):
        headline_robustness(model, x, y, 0.1, surrogate=linear_model(seed=5))


def test_autoattack_without_its_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyautoattack", None)  # import fails as if not installed
    with pytest.raises(ModuleNotFoundError, match=r"mnistlab\[robust\]"):
        autoattack_robust(linear_model(), grey_images(2), torch.arange(2))


def test_autoattack_counts_what_the_judge_says_not_the_attacked_network():
    # The attacks follow `model`'s gradients, but every verdict is the judge's: a judge that
    # always answers 3 keeps every image labelled 3, whatever the attacked network reads.
    judge = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    with torch.no_grad():
        judge[1].weight.zero_()
        judge[1].bias.zero_()
        judge[1].bias[3] = 100.0
    x, y = grey_images(8), torch.full((8,), 3)
    robust = autoattack_robust(linear_model(seed=1), x, y, 0.3, seed=0, judge=judge)
    assert all(v.all() for v in robust.values())


def test_robust_accuracy_of_no_images_is_an_error_not_a_division_by_zero():
    with pytest.raises(ValueError, match="no images"):
        robust_accuracy(
            linear_model(), torch.zeros(0, 1, 28, 28), torch.zeros(0, dtype=torch.long), 0.1
        )
