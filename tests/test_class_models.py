"""Class models and feature maximisation against exact answers: linear models, analytic receptive
fields, one-image-at-a-time runs, and the model left exactly as it was found."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from matplotlib.figure import Figure
from torch import nn

from mnistlab import class_models as cm
from mnistlab.model import MNIST_MEAN, MNIST_STD, MnistCNN


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


def cnn(variant: str = "plain", seed: int = 0) -> MnistCNN:
    """A random network; in the bn variant with non-trivial running statistics and scales."""
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


def test_linear_class_models_reach_the_box_constrained_maximiser():
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(10, 784, generator=gen), torch.randn(10, generator=gen)
    model, lam = Linear(weight, bias), 1.0
    # J = w_c.x + b_c - lam ||x||^2 is separable and concave: per pixel, clamp(w / (2 lam), 0, 1).
    expected = (weight / (2 * lam)).clamp(0, 1).view(10, 1, 28, 28)
    result = cm.class_models(model, range(10), cm.AscentConfig(steps=100, step_size=0.25, l2=lam))
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
    summary = cm.rise_summary(result.objective)
    assert summary["fraction_of_images_ending_higher"] == 1.0


def test_each_image_of_a_batch_is_its_own_ascent():
    model = cnn("bn")
    classes = torch.tensor([3, 0, 7, 7])
    lambdas = torch.tensor([0.0, 0.01, 0.1, 1.0])
    steps = torch.tensor([0.05, 0.2, 0.05, 0.01])
    config = cm.AscentConfig(steps=15, step_size=0.5)  # overridden per image
    batch = cm.class_models(model, classes, config, l2=lambdas, step_size=steps)
    for i in range(len(classes)):
        alone_config = cm.AscentConfig(steps=15, step_size=float(steps[i]))
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
    model = cnn("bn")
    model.train()
    model.layers.bn2.eval()  # a mixed state must come back mixed
    model.layers.conv1.bias.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    start = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    start_copy = start.clone()
    config = cm.AscentConfig(steps=5, step_size=0.1, jitter=2, blur_every=2)
    result = cm.gradient_ascent(model, cm.class_score(torch.tensor([1, 2, 3, 4])), start, config)

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
        cm.gradient_ascent(model, failing, start, config)
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags


def test_jitter_draws_are_seeded_and_differ_between_images():
    model = cnn()
    classes = torch.tensor([5, 5, 5])
    config = cm.AscentConfig(steps=12, step_size=0.1, jitter=2, blur_every=4, seed=3)
    a = cm.class_models(model, classes, config).images
    b = cm.class_models(model, classes, config).images
    c = cm.class_models(model, classes, cm.AscentConfig(**{**config.__dict__, "seed": 4})).images
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a[0], a[1])  # same class, own shifts


def test_no_blur_after_the_last_step():
    # One step from black with blur_every=1: a blur would spread the step beyond its own pixels.
    weight = torch.zeros(10, 784)
    weight[0, 14 * 28 + 14] = 1.0  # class 0 scores one pixel
    model = Linear(weight, torch.zeros(10))
    result = cm.class_models(
        model, [0], cm.AscentConfig(steps=1, step_size=0.5, l2=0.0, blur_every=1)
    )
    assert (result.images > 0).sum() == 1


@pytest.mark.parametrize("variant", ["plain", "bn"])
@pytest.mark.parametrize(
    ("layer", "position", "box"),
    [
        ("conv1", (14, 14), (13, 16, 13, 16)),  # 3x3
        ("conv2", (7, 7), (11, 19, 11, 19)),  # 3 + 1 * 1 + 2 * 2 = 8: 8x8
        ("conv2", (0, 0), (0, 5, 0, 5)),  # clipped by the border (zero padding)
        ("conv2", (13, 13), (23, 28, 23, 28)),
    ],
)
def test_receptive_field_is_the_support_of_the_gradient(variant, layer, position, box):
    field = cm.receptive_field(cnn(variant), layer)
    assert field.box(position) == box
    # Empirical oracle: where the neuron's gradient is non-zero over many random images/channels.
    model = cnn(variant)
    x = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(0), requires_grad=True)
    maps = cm.preactivation(model, layer, x)
    (grad,) = torch.autograd.grad(maps[:, :, position[0], position[1]].sum(), x)
    support = grad.abs().sum(dim=(0, 1)) > 0
    rows, cols = support.any(1).nonzero().flatten(), support.any(0).nonzero().flatten()
    assert (int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1) == box


def test_preactivation_is_the_relu_input_and_stops_the_forward_pass():
    model = cnn("bn")
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    called = []
    handle = model.layers.fc2.register_forward_hook(lambda *args: called.append(1))
    try:
        got = cm.preactivation(model, "conv2", x)
    finally:
        handle.remove()
    assert not called
    layers = model.layers
    h = layers.pool1(layers.relu1(layers.bn1(layers.conv1((x - MNIST_MEAN) / MNIST_STD))))
    torch.testing.assert_close(got, layers.bn2(layers.conv2(h)))
    assert cm.relu_after(model, "conv1") == "relu1"
    assert cm.feature_map_size(model, "conv2") == (14, 14)
    assert cm.centre_position(model, "conv1") == (14, 14)
    with pytest.raises(ValueError, match="no layer"):
        cm.relu_after(model, "conv9")


@pytest.mark.parametrize("variant", ["plain", "bn"])
def test_conv1_neuron_ascent_reaches_its_linear_optimum(variant):
    model, lam = cnn(variant), 0.5
    config = cm.AscentConfig(steps=150, step_size=0.1, l2=lam)  # contraction 1 - 2 lam step = 0.9
    result = cm.maximise_features(model, "conv1", config, position=(14, 14))
    expected = cm.linear_neuron_optimum(model, "conv1", (14, 14), lam)
    torch.testing.assert_close(result.images, expected, atol=1e-5, rtol=0)
    assert (cm.changed_box_sizes(result.images, result.start) <= 3).all()


def test_conv1_channel_mean_gives_a_flat_interior():
    # The mean of a conv1 channel is linear in the pixels; every interior pixel meets all 9
    # weights, so its gradient is sum(w) / (std H W) and its optimum clamp(sum(w) / (std 2 lam)).
    model, lam = cnn(), 0.2
    config = cm.per_position(cm.AscentConfig(steps=150, step_size=0.1, l2=lam), 28 * 28)
    result = cm.maximise_features(model, "conv1", config, channels=[0, 5, 9])
    kernel_sums = model.layers.conv1.weight.detach()[[0, 5, 9]].sum(dim=(1, 2, 3))
    expected = (kernel_sums / (MNIST_STD * 2 * lam)).clamp(0, 1)
    interior = result.images[:, 0, 1:-1, 1:-1]
    torch.testing.assert_close(
        interior, expected.view(3, 1, 1).expand_as(interior), atol=1e-5, rtol=0
    )


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


def test_changed_box_and_rise_summary():
    start = torch.zeros(2, 1, 28, 28)
    images = start.clone()
    images[0, 0, 3, 4] = images[0, 0, 9, 6] = 0.5
    assert cm.changed_box_sizes(images, start).tolist() == [[7, 3], [0, 0]]
    objective = torch.tensor([[0.0, 1.0], [1.0, 2.0], [0.5, 3.0], [2.0, 4.0]])
    summary = cm.rise_summary(objective)
    assert summary["fraction_of_steps_falling"] == pytest.approx(1 / 6)
    assert summary["fraction_of_images_ending_higher"] == 1.0
    assert summary["largest_drop_over_total_gain"] == pytest.approx(0.25)


def test_figures_are_figures():
    model = cnn()
    classes = cm.grid_classes(2)
    result = cm.class_models(model, classes, cm.AscentConfig(steps=2))
    judged = [cm.predicted_classes(model, result.images)]
    fig = cm.plot_class_model_grids([("plain", result.images, ["a", "b"])], classes, judged)
    assert isinstance(fig, Figure)
    assert isinstance(cm.plot_objective([("J", result.objective, classes)]), Figure)
    for layer, position in (("conv1", (14, 14)), ("conv2", (7, 7))):
        r = cm.maximise_features(model, layer, cm.AscentConfig(steps=1), position=position)
        weight = cm.effective_weight(model, layer)
        field = cm.receptive_field(model, layer)
        fig = cm.plot_feature_images(layer, weight, r.images, r.images, field, position)
        assert isinstance(fig, Figure)


def test_sweep_grids_are_the_runs_at_their_step():
    """Each step's grid of the one-batch sweep equals that step's own 10 x L run (layout oracle)."""
    model = cnn()
    steps, l2s, config = (0.02, 0.3), (0.0, 0.05, 1.0), cm.AscentConfig(steps=8)
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


def test_feature_observations_against_the_analytic_answers():
    # bn: the BN scale must be folded into the kernels that the analytic answers use.
    model, judge = cnn("bn"), cnn("plain", seed=1)
    neuron_l2, mean_l2 = 0.5, 0.5  # conv1 contracts by 1 - 2 lambda step = 0.9 per step
    obs = {}
    for layer, steps, step_size in (("conv1", 150, 0.1), ("conv2", 20, 0.03)):
        position, size = cm.centre_position(model, layer), cm.feature_map_size(model, layer)
        config = cm.AscentConfig(steps=steps, step_size=step_size)
        neuron = cm.maximise_features(
            model, layer, replace(config, l2=neuron_l2), position=position
        )
        mean = cm.maximise_features(
            model, layer, cm.per_position(replace(config, l2=mean_l2), math.prod(size))
        )
        obs[layer] = cm.feature_observations(
            model, judge, layer, mean, neuron, position, neuron_l2, mean_l2
        )
    o1, o2 = obs["conv1"], obs["conv2"]
    assert (o1["receptive_field"], o2["receptive_field"]) == (3, 8)
    assert o1["neuron_changed_pixels_outside_field"] == 0
    assert o2["neuron_changed_pixels_outside_field"] == 0
    assert max(o1["neuron_changed_box_max"]) <= 3 and max(o2["neuron_changed_box_max"]) <= 8
    assert o1["neuron_max_error_vs_analytic_optimum"] < 1e-5
    assert o1["mean_image_max_error_vs_analytic_interior"] < 1e-5
    assert o1["mean_image_interior_std"] < 1e-5
    assert 0 < o1["mean_image_interior_share_lit"] < 1  # random kernels: sums of both signs
    assert "neuron_max_error_vs_analytic_optimum" not in o2  # conv2 is not linear in the pixels
    assert 0 < o2["judge_max_probability_mean_images"] <= 1
