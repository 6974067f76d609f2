"""Class models and the ascent behind them against exact answers: linear models,
one-image-at-a-time runs, and the model left exactly as it was found."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from helpers import random_cnn
from matplotlib.figure import Figure
from torch import nn

from mnistlab import ascent
from mnistlab import class_models as cm


class Linear(nn.Module):
    """logits = W x + b on the flattened [0, 1] image: J is concave and its maximiser is known."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.fc = nn.Linear(784, len(weight))
        with torch.no_grad():
            self.fc.weight.copy_(weight)
            self.fc.bias.copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


class Constant(nn.Module):
    """Predicts `label` for every image."""

    def __init__(self, label: int) -> None:
        super().__init__()
        self.label = label
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(len(x), 10, device=x.device)
        logits[:, self.label] = 5.0
        return logits + 0 * self.dummy


def test_linear_class_models_reach_the_box_constrained_maximiser():
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(10, 784, generator=gen), torch.randn(10, generator=gen)
    model, lam = Linear(weight, bias), 1.0
    # J = w_c.x + b_c - lam ||x||^2 is separable and concave: per pixel, clamp(w / (2 lam), 0, 1).
    expected = (weight / (2 * lam)).clamp(0, 1).view(10, 1, 28, 28)
    result = cm.class_models(
        model, range(10), ascent.AscentConfig(steps=100, step_size=0.25, l2=lam)
    )
    torch.testing.assert_close(result.images, expected, atol=1e-5, rtol=0)
    assert (result.start == 0).all()
    # J recorded at the end is J of the returned image, and it never fell (step < 1 / curvature).
    final = (
        (weight * result.images.flatten(1)).sum(1)
        + bias
        - lam * result.images.pow(2).sum((1, 2, 3))
    )
    torch.testing.assert_close(result.objective[-1], final, atol=1e-4, rtol=0)
    assert (result.objective.diff(dim=0) >= -1e-3).all()  # fp32 rounding of J ~ 200 at the top
    assert result.objective.shape == result.score.shape == (101, 10)
    summary = ascent.rise_summary(result.objective)
    assert summary["fraction_of_images_ending_higher"] == 1.0


def test_each_image_of_a_batch_is_its_own_ascent():
    model = random_cnn("bn")
    classes = torch.tensor([3, 0, 7, 7])
    lambdas = torch.tensor([0.0, 0.01, 0.1, 1.0])
    steps = torch.tensor([0.05, 0.2, 0.05, 0.01])
    config = ascent.AscentConfig(steps=15, step_size=0.5)  # overridden per image
    batch = cm.class_models(model, classes, config, l2=lambdas, step_size=steps)
    for i in range(len(classes)):
        alone_config = ascent.AscentConfig(steps=15, step_size=float(steps[i]))
        alone = cm.class_models(model, classes[i : i + 1], alone_config, l2=float(lambdas[i]))
        # Batched and single convolutions round differently, and a larger step carries the
        # difference further (up to 4e-3 here after 15 steps); leaking between images, or one step
        # size for all, would move pixels by O(0.1).
        torch.testing.assert_close(batch.images[i : i + 1], alone.images, atol=1e-2, rtol=0)
        torch.testing.assert_close(batch.objective[:, i], alone.objective[:, 0], atol=1e-2, rtol=0)
    torch.testing.assert_close(batch.l2, lambdas)
    torch.testing.assert_close(batch.step_size, steps)
    assert batch.images.min() >= 0 and batch.images.max() <= 1


def test_model_weights_modes_and_flags_are_left_as_found():
    model = random_cnn("bn")
    model.train()
    model.layers.bn2.eval()  # a mixed state must come back mixed
    model.layers.conv1.bias.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    start = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    start_copy = start.clone()
    config = ascent.AscentConfig(steps=5, step_size=0.1, jitter=2, blur_every=2)
    result = ascent.gradient_ascent(
        model, cm.class_score(torch.tensor([1, 2, 3, 4])), start, config
    )

    for key, value in model.state_dict().items():  # BN running statistics too: eval mode was used
        assert torch.equal(value, before[key]), key
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(start, start_copy)
    torch.testing.assert_close(result.start, start)
    assert result.images.min() >= 0 and result.images.max() <= 1

    def failing(model, x):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        ascent.gradient_ascent(model, failing, start, config)
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags


def test_jitter_draws_are_seeded_and_differ_between_images():
    model = random_cnn()
    classes = torch.tensor([5, 5, 5])
    config = ascent.AscentConfig(steps=12, step_size=0.1, jitter=2, blur_every=4, seed=3)
    a = cm.class_models(model, classes, config).images
    b = cm.class_models(model, classes, config).images
    c = cm.class_models(
        model, classes, ascent.AscentConfig(**{**config.__dict__, "seed": 4})
    ).images
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a[0], a[1])  # same class, own shifts


def test_no_blur_after_the_last_step():
    # One step from black with blur_every=1: a blur would spread the step beyond its own pixels.
    weight = torch.zeros(10, 784)
    weight[0, 14 * 28 + 14] = 1.0  # class 0 scores one pixel
    model = Linear(weight, torch.zeros(10))
    result = cm.class_models(
        model, [0], ascent.AscentConfig(steps=1, step_size=0.5, l2=0.0, blur_every=1)
    )
    assert (result.images > 0).sum() == 1


def test_agreement_probability_and_templates():
    images = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    classes = torch.tensor([3, 3, 1, 2])
    assert cm.agreement(Constant(3), images, classes) == 0.5
    assert cm.predicted_classes(Constant(1), images).tolist() == [1, 1, 1, 1]
    probs = cm.target_probability(Constant(3), images, classes)
    p3 = torch.tensor(5.0).exp() / (torch.tensor(5.0).exp() + 9)
    other = (1 - p3) / 9
    torch.testing.assert_close(probs, torch.stack([p3, p3, other, other]))

    templates = cm.class_templates(torch.rand(50, 1, 28, 28), torch.arange(50) % 10)
    assert templates.shape == (10, 1, 28, 28)
    scores = cm.template_scores(templates[[4, 7]] * 0.5 + 0.1, torch.tensor([4, 2]), templates)
    torch.testing.assert_close(scores["own_correlation"][0], torch.tensor(1.0))
    assert scores["nearest"].tolist() == [4, 7]

    a = torch.zeros(4, 1, 28, 28)
    a[0, 0, :14], a[1, 0, :14] = 1, 1  # class 0: top half twice
    a[2, 0, 14:], a[3, 0, 14:] = 1, 1  # class 1: bottom half twice
    wb = cm.within_between_correlation(a, torch.tensor([0, 0, 1, 1]))
    assert wb["within_class"] == pytest.approx(1.0)
    assert wb["between_class"] == pytest.approx(-1.0)
    torch.testing.assert_close(cm.centre_share(torch.ones(1, 1, 28, 28)), torch.tensor([400 / 784]))
    assert cm.grid_classes(2, 3).tolist() == [0, 0, 1, 1, 2, 2]


def test_rise_summary():
    objective = torch.tensor([[0.0, 1.0], [1.0, 2.0], [0.5, 3.0], [2.0, 4.0]])
    summary = ascent.rise_summary(objective)
    assert summary["fraction_of_steps_falling"] == pytest.approx(1 / 6)
    assert summary["fraction_of_images_ending_higher"] == 1.0
    assert summary["largest_drop_over_total_gain"] == pytest.approx(0.25)


def test_figures_are_figures():
    model = random_cnn()
    classes = cm.grid_classes(2)
    result = cm.class_models(model, classes, ascent.AscentConfig(steps=2))
    judged = [cm.predicted_classes(model, result.images)]
    fig = cm.plot_class_model_grids([("plain", result.images, ["a", "b"])], classes, judged)
    assert isinstance(fig, Figure)
    assert isinstance(cm.plot_objective([("J", result.objective, classes)]), Figure)


def test_sweep_grids_are_the_runs_at_their_step():
    """Each step's grid of the one-batch sweep equals that step's own 10 x L run (layout oracle)."""
    model = random_cnn()
    steps, l2s, config = (0.02, 0.3), (0.0, 0.05, 1.0), ascent.AscentConfig(steps=8)
    templates = torch.rand(10, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    sweep = cm.sweep_steps(model, steps, l2s, 2, config, templates)
    grid_classes = cm.grid_classes(2)
    for k, step in enumerate(steps):
        alone = cm.class_models(
            model,
            grid_classes,
            replace(config, step_size=step),
            l2=torch.tensor(l2s[:2]).repeat(10),
        )
        grid = sweep.grid(k)
        torch.testing.assert_close(grid.images, alone.images, atol=1e-4, rtol=0)
        torch.testing.assert_close(grid.objective, alone.objective, atol=1e-4, rtol=0)
        assert torch.equal(sweep.classes[sweep.grid_index(k)], grid_classes)
        torch.testing.assert_close(
            sweep.probability[k, :, :2].flatten(),
            cm.target_probability(model, alone.images, grid_classes),
            atol=1e-4,
            rtol=0,
        )
    assert sweep.probability.shape == sweep.likeness.shape == (2, 10, 3)
    assert [row["step_size"] for row in sweep.summary()] == list(steps)


def test_the_formed_share_counts_the_grid_only_and_picks_the_step():
    sweep = cm.StepSweep(
        step_sizes=(0.1, 0.3, 1.0),
        l2s=(0.0, 0.1, 5.0),
        grid_columns=2,
        result=None,
        classes=cm.grid_classes(3).repeat(3),
        probability=torch.full((3, 10, 3), 0.999),
        likeness=torch.zeros(3, 10, 3),
    )
    sweep.probability[0, 4, 1] = 0.5  # step 0.1: one grid image not formed
    sweep.probability[:, :, 2] = 0.1  # the lambda beyond the grid never forms: it must not count
    sweep.likeness[1] = 0.2
    sweep.likeness[2] = 0.3
    torch.testing.assert_close(sweep.grid_formed_share(), torch.tensor([0.95, 1.0, 1.0]))
    assert sweep.formed()[:, :, 2].sum() == 0
    assert sweep.chosen() == 2  # equal shares: the better likeness wins
    assert sweep.grid_index(1).tolist() == [30 + 3 * c + j for c in range(10) for j in range(2)]


def test_select_step_prefers_formed_images_then_likeness():
    assert cm.select_step([0.8, 1.0, 1.0, 0.9], [0.9, 0.2, 0.3, 0.99]) == 2
    assert cm.select_step([0.5, 0.6], [0.9, 0.0]) == 1  # likeness never outweighs formed images
    assert cm.select_step([0.0, 0.0, 0.0], [0.1, 0.3, 0.2]) == 1


def test_evidence_of_constant_models():
    images = torch.rand(20, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    classes = cm.grid_classes(2)
    templates = torch.rand(10, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    p3 = (torch.tensor(5.0).exp() / (torch.tensor(5.0).exp() + 9)).item()
    other = (1 - p3) / 9
    mostly_7 = torch.tensor([7] * 5 + [3] * 2 + [0] * 13)
    ev = cm.class_evidence(Constant(3), Constant(7), images, mostly_7, templates)
    assert ev["generator_agreement"] == pytest.approx(0.1)
    assert ev["agreement"] == pytest.approx(0.25)  # the judge's, not the generating model's
    assert ev["generator_confidence"] == pytest.approx(0.1 * p3 + 0.9 * other)
    assert ev["judge_confidence"] == pytest.approx(0.25 * p3 + 0.75 * other)
    by_class = cm.evidence_by_class(Constant(3), Constant(7), images, classes)
    expected_min = torch.full((10,), other)
    expected_min[3] = p3
    torch.testing.assert_close(by_class["generator_min_probability"], expected_min)
    assert by_class["generator_formed"].tolist() == [0.0] * 10  # p3 < 0.99
    assert by_class["judge_agreement"].tolist() == [float(c == 7) for c in range(10)]
    torch.testing.assert_close(by_class["judge_confidence"][7], torch.tensor(p3))
    # Row-major grid of 10 classes x 2 columns: a model that always says 7 gets row 7 right.
    torch.testing.assert_close(
        cm.column_agreement(Constant(7), images, classes, 2), torch.tensor([0.1, 0.1])
    )
    flipped = classes.clone()
    flipped[1::2] = 7  # every second column targets 7
    torch.testing.assert_close(
        cm.column_agreement(Constant(7), images, flipped, 2), torch.tensor([0.1, 1.0])
    )
