"""Part 3 attacks: behaviour against exact answers on hand-built models, and the safety rules."""

from __future__ import annotations

import pytest
import torch
from helpers import TARGETS, cnn, digit_like, linear_model
from torch import nn

from mnistlab import attacks
from mnistlab.attack_analysis import pgd_minimal_radius, transfer_table
from mnistlab.attacks import (
    CONFIDENT,
    GREY_128,
    GREY_LEVEL,
    frozen_eval,
    gaussian_start,
    generate_digit,
    mse_per_image,
    noise_attack,
    targeted_attack,
)


def run_every_attack(model: nn.Module, images: torch.Tensor, other: torch.Tensor) -> None:
    generate_digit(model, images, TARGETS, step_size=0.01, iterations=3)
    targeted_attack(model, images, TARGETS, other, beta=10.0, step_size=0.01, iterations=3)
    noise_attack(model, images, TARGETS, max_iterations=3)
    pgd_minimal_radius(model, images, TARGETS, radii=[0.05, 0.1], iterations=3)
    pgd_minimal_radius(model, images, TARGETS, radii=[0.5], norm="l2", iterations=3)
    transfer_table(model, images, images - other)


def test_attacks_leave_model_and_inputs_untouched():
    model = cnn("bn")
    model.train()  # the attacks must switch to eval and back
    model.layers.conv1.weight.requires_grad_(False)  # a mixed set of flags, restored as it was
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    images, other = gaussian_start(10, 0.1, seed=0), digit_like()
    images_before, other_before = images.clone(), other.clone()

    run_every_attack(model, images, other)

    assert model.training
    assert [p.requires_grad for p in model.parameters()] == flags
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key  # bitwise, BN running statistics included
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(images, images_before) and torch.equal(other, other_before)
    assert not images.requires_grad and not other.requires_grad


def test_frozen_eval_restores_after_an_exception():
    model = cnn("bn")
    model.train()
    with pytest.raises(RuntimeError), frozen_eval(model):
        assert not model.training
        assert not any(p.requires_grad for p in model.parameters())
        raise RuntimeError("boom")
    assert model.training and all(p.requires_grad for p in model.parameters())


def test_attacks_run_in_fp32_even_under_autocast():
    model = cnn("plain")
    start = gaussian_start(10, 0.1, seed=1)
    plain = generate_digit(model, start, TARGETS, step_size=0.01, iterations=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = generate_digit(model, start, TARGETS, step_size=0.01, iterations=3)
    assert under.images.dtype == torch.float32
    torch.testing.assert_close(under.costs, plain.costs)
    with pytest.raises(TypeError):
        generate_digit(model, start.double(), TARGETS, step_size=0.01, iterations=1)


def test_gaussian_start_is_centred_on_grey_128_and_seeded():
    assert pytest.approx(128 / 255) == GREY_128
    assert pytest.approx(1 / 255) == GREY_LEVEL
    x = gaussian_start(200, 0.1, seed=3)
    assert x.shape == (200, 1, 28, 28) and x.min() >= 0.0 and x.max() <= 1.0
    assert x.mean().item() == pytest.approx(GREY_128, abs=2e-3)
    assert x.std().item() == pytest.approx(0.1, rel=0.02)
    assert torch.equal(x, gaussian_start(200, 0.1, seed=3))


def test_one_step_of_a_moves_along_the_target_weight_row():
    model = linear_model()
    start = torch.full((10, 1, 28, 28), 0.5)
    step = 1e-3  # small enough that no pixel reaches 0 or 1, so no clamping
    result = generate_digit(model, start, TARGETS, step_size=step, iterations=1)
    weight = model[1].weight.detach().view(10, 1, 28, 28)
    torch.testing.assert_close(result.images - start, step * weight, rtol=1e-4, atol=1e-7)
    # The recorded cost is exactly logits[target] before and after the step.
    bias = model[1].bias.detach()
    before = (weight.flatten(1) * 0.5).sum(1) + bias
    after = (weight.flatten(1) * result.images.flatten(1)).sum(1) + bias
    torch.testing.assert_close(result.costs, torch.stack([before, after]))


def test_one_step_of_b_adds_the_mse_gradient():
    model = linear_model()
    start, goal = torch.full((10, 1, 28, 28), 0.5), digit_like()
    step, beta = 1e-3, 50.0
    result = targeted_attack(model, start, TARGETS, goal, beta=beta, step_size=step, iterations=1)
    weight = model[1].weight.detach().view(10, 1, 28, 28)
    expected = start + step * (weight - beta * 2 * (start - goal) / 784)
    torch.testing.assert_close(result.images, expected, rtol=1e-4, atol=1e-7)
    logit0 = (weight.flatten(1) * 0.5).sum(1) + model[1].bias.detach()
    torch.testing.assert_close(result.costs[0], logit0 - beta * mse_per_image(start, goal))
    # beta = 0 is attack (a).
    a = generate_digit(model, start, TARGETS, step_size=step, iterations=2)
    b0 = targeted_attack(model, start, TARGETS, goal, beta=0.0, step_size=step, iterations=2)
    assert torch.equal(a.images, b0.images) and torch.equal(a.costs, b0.costs)


def test_one_step_of_c_is_one_grey_level_in_std():
    model = linear_model()
    images = torch.full((10, 1, 28, 28), 0.5)
    result = noise_attack(model, images, TARGETS, max_iterations=1, confidence=1.1)
    weight = model[1].weight.detach().view(10, 1, 28, 28)
    alpha = GREY_LEVEL / (weight.flatten(1).std(1) + 1e-8)
    torch.testing.assert_close(result.noise, alpha.view(-1, 1, 1, 1) * weight, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(result.noise.flatten(1).std(1), torch.full((10,), GREY_LEVEL))
    torch.testing.assert_close(result.images, images + result.noise)
    assert torch.equal(result.steps, torch.ones(10, dtype=torch.long))


def test_c_stops_each_target_at_the_confidence_criterion():
    model = linear_model(scale=30.0)
    images = digit_like()
    result = noise_attack(model, images, TARGETS, max_iterations=300)
    assert result.reached.all()
    assert (result.confidence >= CONFIDENT).all()
    # Each row stopped at its own step: one step fewer and it had not reached the target yet.
    for i in range(10):
        k = int(result.steps[i])
        if k == 0:
            continue
        partial = noise_attack(model, images[i : i + 1], TARGETS[i : i + 1], max_iterations=k - 1)
        assert partial.confidence.item() < CONFIDENT
        torch.testing.assert_close(
            result.noise[i],
            noise_attack(model, images[i : i + 1], TARGETS[i : i + 1], max_iterations=k).noise[0],
        )
    frozen = result.costs[result.steps.max()] - result.costs[-1]
    assert torch.equal(frozen, torch.zeros(10))


@pytest.mark.parametrize("kind", ["a", "b", "c"])
def test_costs_increase_and_pixels_stay_in_range(kind):
    model = cnn("plain", seed=1)
    start, goal = gaussian_start(10, 0.2, seed=2), digit_like(seed=4)
    if kind == "a":
        result = generate_digit(model, start, TARGETS, step_size=0.05, iterations=60)
    elif kind == "b":
        result = targeted_attack(model, start, TARGETS, goal, 200.0, step_size=0.05, iterations=60)
    else:
        result = noise_attack(model, goal, TARGETS, max_iterations=60, confidence=1.1)
    diffs = result.costs.diff(dim=0)
    assert (result.costs[-1] > result.costs[0]).all()
    assert (diffs >= -1e-4).all(), diffs.min()  # ascent: no step lowers the cost
    assert result.images.min() >= 0.0 and result.images.max() <= 1.0
    if kind == "c":
        torch.testing.assert_close(result.images, goal + result.noise)


def test_beta_refinement_and_choice_on_a_hand_built_sweep():
    def row(beta, success, closer):
        return {"beta": beta, "success": success, "closer_to_target": closer}

    sweep = [row(0.0, 10, 0), row(10.0, 10, 3), row(100.0, 10, 8), row(1000.0, 4, 10)]
    finer = attacks.refine_betas(sweep, points=2)
    assert finer == pytest.approx([100 * 10 ** (1 / 3), 100 * 10 ** (2 / 3)], rel=1e-2)
    assert attacks.choose_beta(sweep) == (100.0, False)  # nothing qualifies: best compromise
    sweep += [row(215.0, 10, 10), row(464.0, 9, 10)]
    assert attacks.choose_beta(sweep) == (215.0, True)
    assert attacks.refine_betas([row(0.0, 10, 0), row(1.0, 3, 0)], points=1) == [
        pytest.approx(0.316, rel=1e-2)
    ]
    assert attacks.refine_betas([row(0.0, 2, 0), row(1.0, 3, 0)]) == []
    assert attacks.refine_betas([row(0.0, 10, 0), row(1.0, 10, 0)]) == []


def test_beta_sweep_rows_match_single_attacks():
    model = cnn("plain", seed=3)
    start, goal = gaussian_start(10, 0.1, seed=5), digit_like(seed=6)
    rows, results = attacks.beta_sweep(model, start, TARGETS, goal, [0.0, 50.0], 0.05, 4)
    for beta, row, result in zip([0.0, 50.0], rows, results, strict=True):
        single = targeted_attack(model, start, TARGETS, goal, beta, 0.05, 4)
        assert torch.equal(single.images, result.images)
        assert row["success"] == int(single.reached.sum())
        assert row["mean_mse"] == pytest.approx(mse_per_image(single.images, goal).mean().item())
        assert row["mean_mse_start"] == pytest.approx(
            mse_per_image(single.images, start).mean().item()
        )
    # beta as one value per row runs a whole sweep in one batch, with the same answer.
    both = targeted_attack(
        model,
        start.repeat(2, 1, 1, 1),
        TARGETS.repeat(2),
        goal.repeat(2, 1, 1, 1),
        torch.tensor([0.0, 50.0]).repeat_interleave(10),
        0.05,
        4,
    )
    torch.testing.assert_close(both.images, torch.cat([r.images for r in results]))


def test_bad_shapes_are_refused():
    model = linear_model()
    with pytest.raises(ValueError):
        generate_digit(model, torch.zeros(10, 28, 28), TARGETS, 0.01, 1)
    with pytest.raises(ValueError):
        noise_attack(model, torch.zeros(5, 1, 28, 28), TARGETS, 1)
    with pytest.raises(ValueError):
        pgd_minimal_radius(model, torch.zeros(10, 1, 28, 28), TARGETS, [0.1], norm="L1")
    assert attacks.NUM_CLASSES == 10


def test_c_in_an_linf_ball_never_leaves_it_and_matches_the_unbounded_run_inside_it():
    model = linear_model(scale=30.0)
    images = digit_like()
    free = noise_attack(model, images, TARGETS, max_iterations=40, confidence=1.1)
    for radius in (0.05, 0.2):
        bounded = noise_attack(model, images, TARGETS, 40, confidence=1.1, max_linf=radius)
        assert bounded.noise.abs().max() <= radius + 1e-6
        assert bounded.images.min() >= 0.0 and bounded.images.max() <= 1.0
    assert free.noise.abs().max() > 0.2  # so the bound above did bind
    # While no pixel has reached the bound the two runs take the same steps.
    first = noise_attack(model, images, TARGETS, 1, confidence=1.1)
    inside = noise_attack(model, images, TARGETS, 1, confidence=1.1, max_linf=1.0)
    torch.testing.assert_close(inside.noise, first.noise)
    with pytest.raises(ValueError):
        noise_attack(model, images, TARGETS, 1, max_linf=0.0)


def test_beta_in_grey_levels_leaves_the_cost_unchanged():
    # The same picture on both scales: logits are equal (the model takes [0, 1] pixels), so
    # beta_01 * mse_01 must equal beta_255 * mse_255.
    x, y = digit_like(seed=1), digit_like(seed=2)
    beta = 251.0
    mse_01 = mse_per_image(x, y)
    mse_255 = mse_per_image(255 * x, 255 * y)
    torch.testing.assert_close(beta * mse_01, attacks.beta_in_grey_levels(beta) * mse_255)
    assert attacks.beta_in_grey_levels(65025.0) == pytest.approx(1.0)


def test_beta_sweep_counts_what_a_judge_reads():
    model, judge = cnn("plain", seed=3), cnn("plain", seed=4)
    start, goal = gaussian_start(10, 0.1, seed=5), digit_like(seed=6)
    digits = (TARGETS + 1) % 10
    rows, results = attacks.beta_sweep(
        model, start, TARGETS, goal, [0.0, 50.0], 0.05, 4, judge=judge, image_digits=digits
    )
    for row, result in zip(rows, results, strict=True):
        read = judge(result.images).argmax(1)
        assert row["judge_reads_target"] == int((read == TARGETS).sum())
        assert row["judge_reads_image_digit"] == int((read == digits).sum())
        assert row["beta_grey_levels"] == pytest.approx(row["beta"] / 255**2)
    with pytest.raises(ValueError):
        attacks.beta_sweep(model, start, TARGETS, goal, [0.0], 0.05, 1, judge=judge)


def test_beta_by_judge_on_a_hand_built_sweep():
    def row(beta, success, digit):
        return {"beta": beta, "success": success, "judge_reads_image_digit": digit}

    sweep = [row(0.0, 10, 0), row(10.0, 10, 6), row(30.0, 10, 6), row(100.0, 7, 10)]
    assert attacks.choose_beta_by_judge(sweep) == (30.0, False)  # 6 < 8: not good enough
    sweep.append(row(50.0, 10, 9))
    assert attacks.choose_beta_by_judge(sweep) == (50.0, True)
    assert attacks.choose_beta_by_judge([row(1.0, 3, 9), row(2.0, 5, 0)]) == (2.0, False)


def test_b_with_a_stop_rule_freezes_each_row_once_its_target_is_reached():
    model = linear_model(scale=30.0)
    images = digit_like()
    targets = (TARGETS + 3) % 10  # none of them the class the model reads at the start
    beta, step = 10.0, 0.002
    stopped = targeted_attack(model, images, targets, images, beta, step, 300, stop_at=CONFIDENT)
    assert stopped.reached.all()
    assert 0 < stopped.steps.max() < 300
    for i in range(10):
        k, row = int(stopped.steps[i]), slice(i, i + 1)
        if k == 0:
            continue
        before = targeted_attack(model, images[row], targets[row], images[row], beta, step, k - 1)
        assert before.confidence.item() < CONFIDENT
        at_k = targeted_attack(model, images[row], targets[row], images[row], beta, step, k)
        torch.testing.assert_close(stopped.images[i], at_k.images[0])
    free = targeted_attack(model, images, targets, images, beta, step, 5)
    assert torch.equal(free.steps, torch.full((10,), 5))


def test_refined_beta_sweep_adds_the_refinement_and_sorts_by_beta():
    model = linear_model(scale=30.0)
    start, goal = gaussian_start(10, 0.1, seed=5), digit_like(seed=6)
    betas = [10_000.0, 0.0, 1000.0]  # unsorted on purpose; 1000 reaches all, 10,000 does not
    rows, results = attacks.refined_beta_sweep(model, start, TARGETS, goal, betas, 0.05, 4, 2)
    coarse, _ = attacks.beta_sweep(model, start, TARGETS, goal, betas, 0.05, 4)
    finer = attacks.refine_betas(coarse, points=2)
    assert finer  # the refinement is exercised
    expected = sorted(betas + finer)
    assert [r["beta"] for r in rows] == expected
    for row, result in zip(rows, results, strict=True):
        single = targeted_attack(model, start, TARGETS, goal, row["beta"], 0.05, 4)
        assert torch.equal(single.images, result.images)
