"""Part 3: adversarial examples by gradient ascent on the input (the assignment's three attacks).

(a) `generate_digit`: from Gaussian noise, ascend C = logits[target] w.r.t. the image.
(b) `targeted_attack`: ascend C = logits[target] - beta * mse(x, target_image) w.r.t. the image.
(c) `noise_attack`: ascend C = logits[target] w.r.t. an additive noise, alpha = 1 / std(d) steps.

Conventions shared by every attack here:
- pixels are on the [0, 1] scale the model takes; the assignment's grey levels (0..255) are
  converted once (model.GREY_LEVEL, model.GREY_128); images are clamped to [0, 1] after every
  step;
- one batch holds all targets (one row per target class), so a single forward/backward pass
  advances all 10 attacks at once;
- plain gradient ascent, x = x + step * dC/dx, no optimiser; the cost is recorded at every
  iterate, so that its rise can be checked (a fixed step and the clamping do not promise it);
- the model is evaluated in fp32 (autocast off) and in eval mode with its parameters frozen, and
  everything is restored afterwards (`frozen_eval`); gradients are taken only w.r.t. the image or
  the noise (`torch.autograd.grad`), so no parameter ever receives a gradient;
- input tensors are never modified in place.

FGSM and PGD live in `pgd`; what is measured around these attacks (the image pairs, targeted PGD
as a reference for (c), how far the noises carry over) in `attack_analysis`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .model import GREY_128, GREY_LEVEL, frozen_eval
from .pgd import check_batch

CONFIDENT = 0.99  # an attack "reaches" its target when softmax(target) >= this (and is the argmax)
STD_EPS = 1e-8  # the assignment's epsilon in alpha = 1 / (d.std() + 1e-8)
NUM_CLASSES = 10


@dataclass
class AttackResult:
    """The outcome of one batched attack: one row per target class."""

    images: torch.Tensor  # (N, 1, 28, 28) final inputs to the network, in [0, 1]
    targets: torch.Tensor  # (N,) target class of each row
    # (T + 1, N) cost C at every iterate, the start included; T <= iterations, fewer when every
    # row stopped early; a stopped row keeps its last iterate, so its cost stays flat
    costs: torch.Tensor
    probabilities: torch.Tensor  # (N, 10) softmax of the final logits
    steps: torch.Tensor  # (N,) gradient steps taken by each row before it stopped
    noise: torch.Tensor | None = None  # (N, 1, 28, 28) additive noise (attack (c) only)

    @property
    def predicted(self) -> torch.Tensor:
        """Predicted class of each final image."""
        return self.probabilities.argmax(1)

    @property
    def confidence(self) -> torch.Tensor:
        """Softmax probability of each row's target class."""
        return self.probabilities.gather(1, self.targets[:, None])[:, 0]

    @property
    def reached(self) -> torch.Tensor:
        """True where the target is the predicted class with confidence >= CONFIDENT."""
        return (self.predicted == self.targets) & (self.confidence >= CONFIDENT)


def gaussian_start(
    n: int, std: float, seed: int, mean: float = GREY_128, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """n images of Gaussian noise N(mean, std^2) on the [0, 1] scale, clamped to [0, 1], seeded."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, 1, 28, 28, generator=generator) * std + mean
    return noise.clamp_(0.0, 1.0).to(device)


def _target_logits(
    model: nn.Module, x: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits[i, targets[i]] for every row, plus the logits themselves."""
    logits = model(x)
    return logits.gather(1, targets[:, None])[:, 0], logits


def _image_ascent(
    model: nn.Module,
    start: torch.Tensor,
    targets: torch.Tensor,
    step_size: float,
    iterations: int,
    penalty: Callable[[torch.Tensor], torch.Tensor] | None = None,
    stop_at: float | None = None,
) -> AttackResult:
    """x <- clamp(x + step_size * dC/dx, 0, 1) for C = logits[target] - penalty(x), per row.

    With `stop_at`, a row stops (its image is frozen) once softmax(target) >= stop_at, as in (c).
    """
    check_batch(start, targets)
    x = start.detach().clone()
    active = torch.ones_like(targets, dtype=torch.bool)
    steps = torch.zeros_like(targets)
    costs = []
    with frozen_eval(model):
        for i in range(iterations + 1):
            x.requires_grad_(True)
            score, logits = _target_logits(model, x, targets)
            cost = score - penalty(x) if penalty is not None else score
            costs.append(cost.detach())
            if stop_at is not None:
                active &= logits.detach().softmax(1).gather(1, targets[:, None])[:, 0] < stop_at
            if i == iterations or not active.any():
                break
            (grad,) = torch.autograd.grad(cost.sum(), x)  # rows are independent: sum = per row
            x = (x.detach() + step_size * grad * active.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)
            steps += active.long()
    return AttackResult(x.detach(), targets, torch.stack(costs), logits.detach().softmax(1), steps)


def generate_digit(
    model: nn.Module,
    start: torch.Tensor,
    targets: torch.Tensor,
    step_size: float,
    iterations: int,
) -> AttackResult:
    """(a) Non-targeted attack: gradient ascent on C = logits[target] from `start` (e.g. noise).

    Every row of `start` (N, 1, 28, 28) is pushed towards its own `targets` class for a fixed
    number of `iterations` (no early stop, so every cost curve has the same length); `step_size`
    is on the [0, 1] pixel scale, and pixels are clamped to [0, 1] after each step.
    """
    return _image_ascent(model, start, targets, step_size, iterations)


def mse_per_image(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the pixels of each image (784 per MNIST image), [0, 1] scale."""
    return (x - y).pow(2).flatten(1).mean(1)


def targeted_attack(
    model: nn.Module,
    start: torch.Tensor,
    targets: torch.Tensor,
    target_images: torch.Tensor,
    beta: float | torch.Tensor,
    step_size: float,
    iterations: int,
    stop_at: float | None = None,
) -> AttackResult:
    """(b) Targeted attack: gradient ascent on C = logits[target] - beta * mse(x, target_image).

    The MSE is the mean over the 784 pixels on the [0, 1] scale (`mse_per_image`), so beta is
    measured in logits per unit of mean squared pixel error; `beta = 0` is attack (a). `beta` may
    be one value per row (shape (N,)), so a whole sweep of beta runs as one batch.
    The fixed step is stable for the MSE term while step_size * 2 * beta / 784 < 2. With
    `stop_at`, each row stops once softmax(target) >= stop_at (for a start that is already close,
    such as the target image itself, so the picture changes no more than it must).
    """
    check_batch(target_images, targets)
    goal = target_images.detach()
    if isinstance(beta, torch.Tensor):
        beta = beta.detach().to(goal)
    return _image_ascent(
        model,
        start,
        targets,
        step_size,
        iterations,
        lambda x: beta * mse_per_image(x, goal),
        stop_at,
    )


def beta_sweep(
    model: nn.Module,
    start: torch.Tensor,
    targets: torch.Tensor,
    target_images: torch.Tensor,
    betas: Sequence[float],
    step_size: float,
    iterations: int,
    judge: nn.Module | None = None,
    image_digits: torch.Tensor | None = None,
    stop_at: float | None = None,
) -> tuple[list[dict[str, float]], list[AttackResult]]:
    """(b) once per beta: targets reached, mean confidence, mean MSE to the target image and start.

    Each row of the returned table also counts the images closer to their target image than to
    their starting point (`closer_to_target`); the attacks themselves come back in the same order.
    With a `judge` (an independently trained network) and the digit each target image shows
    (`image_digits`), each row also counts how often the judge reads the result as the target
    class (`judge_reads_target`) or as the target image's digit (`judge_reads_image_digit`).
    `stop_at` is passed to `targeted_attack`.
    """
    if (judge is None) != (image_digits is None):
        raise ValueError("pass both judge and image_digits, or neither")
    rows, results = [], []
    for beta in betas:
        result = targeted_attack(
            model, start, targets, target_images, beta, step_size, iterations, stop_at
        )
        mse_target = mse_per_image(result.images, target_images)
        mse_start = mse_per_image(result.images, start)
        row = {
            "beta": float(beta),
            "beta_grey_levels": beta_in_grey_levels(beta),
            "success": int(result.reached.sum()),
            "mean_confidence": result.confidence.mean().item(),
            "mean_mse": mse_target.mean().item(),
            "mean_mse_start": mse_start.mean().item(),
            "closer_to_target": int((mse_target < mse_start).sum()),
        }
        if judge is not None:
            with torch.no_grad(), frozen_eval(judge):
                read = judge(result.images).argmax(1)
            row["judge_reads_target"] = int((read == targets).sum())
            row["judge_reads_image_digit"] = int((read == image_digits).sum())
        rows.append(row)
        results.append(result)
    return rows, results


def refined_beta_sweep(
    model: nn.Module,
    start: torch.Tensor,
    targets: torch.Tensor,
    target_images: torch.Tensor,
    betas: Sequence[float],
    step_size: float,
    iterations: int,
    refine_points: int,
    **options,
) -> tuple[list[dict[str, float]], list[AttackResult]]:
    """`beta_sweep` over `betas`, then over `refine_betas`' values between them; sorted by beta.

    `options` (judge, image_digits, stop_at) go to both sweeps.
    """
    args = (model, start, targets, target_images)
    rows, results = beta_sweep(*args, betas, step_size, iterations, **options)
    finer = refine_betas(rows, points=refine_points)
    if finer:
        more_rows, more_results = beta_sweep(*args, finer, step_size, iterations, **options)
        rows, results = rows + more_rows, results + more_results
    order = sorted(range(len(rows)), key=lambda k: rows[k]["beta"])
    return [rows[k] for k in order], [results[k] for k in order]


def beta_in_grey_levels(beta: float) -> float:
    """The same beta for the assignment's 0..255 pixels: its MSE is 255^2 times ours, so beta / 255^2.

    C = logits[target] - beta * mse must be the same number on either scale, and the logits are
    (the network normalises inside), so beta_255 * 255^2 * mse_01 = beta_01 * mse_01.
    """
    return float(beta) * GREY_LEVEL**2


def refine_betas(
    rows: Sequence[dict[str, float]], n_targets: int = 10, points: int = 5
) -> list[float]:
    """Betas between the largest swept beta that reaches every target and the next one up.

    `points` values spaced geometrically (3 significant digits) in that open interval; from 0 the
    interval starts at a tenth of the next beta. Empty when no beta, or the largest, reaches all.
    """
    betas = sorted(row["beta"] for row in rows)
    reached_all = [row["beta"] for row in rows if row["success"] == n_targets]
    if not reached_all or max(reached_all) == betas[-1]:
        return []
    high = min(b for b in betas if b > max(reached_all))
    low = max(reached_all) or high / 10
    ratios = [(k + 1) / (points + 1) for k in range(points)]
    return [float(f"{low * (high / low) ** r:.3g}") for r in ratios]


def choose_beta(rows: Sequence[dict[str, float]], n_targets: int = 10) -> tuple[float, bool]:
    """The largest beta at which every target is reached and every image is closer to its target
    image than to its start: (beta, True). Where none qualifies, (best compromise, False): most
    targets reached, then most images closer to the target image, then the largest beta."""
    good = [r["beta"] for r in rows if r["success"] == r["closer_to_target"] == n_targets]
    if good:
        return max(good), True
    best = max(rows, key=lambda r: (r["success"], r["closer_to_target"], r["beta"]))
    return best["beta"], False


def choose_beta_by_judge(
    rows: Sequence[dict[str, float]], n_targets: int = 10, needed: int = 8
) -> tuple[float, bool]:
    """(b) from the target image: the beta whose pictures the judge reads most as the image's digit.

    Among the betas at which every target is reached (the attacked network reads the target class
    with confidence >= CONFIDENT), the one with the most `judge_reads_image_digit`, then the
    largest beta; (beta, True) when the judge reads the image's digit in at least `needed` of them.
    Where no beta reaches every target: the most targets reached, then the judge, then the beta.
    """
    ranked = max(rows, key=lambda r: (r["success"], r["judge_reads_image_digit"], r["beta"]))
    ok = ranked["success"] == n_targets and ranked["judge_reads_image_digit"] >= needed
    return ranked["beta"], ok


def noise_attack(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    max_iterations: int,
    confidence: float = CONFIDENT,
    max_linf: float | None = None,
) -> AttackResult:
    """(c) Additive noise: ascend C = logits[target] of x + noise w.r.t. the noise, from zero.

    The assignment's step is noise += alpha * d with alpha = 1 / (d.std() + 1e-8) on 0..255
    pixels. Write X = 255 x for grey levels: dC/dX = d / 255, whose std is d.std() / 255, so the
    step in grey levels is d / d.std() (the scale cancels: one step moves the noise by one grey
    level in standard deviation) and on the [0, 1] scale it is (1/255) * d / (d.std() + 1e-8),
    with d = dC/dx w.r.t. [0, 1] pixels. The std is taken per image (each row its own target).
    After each step x + noise is clamped to [0, 1] (noise = clamp(x + noise) - x).
    Stop criterion: a row stops (its noise is frozen) as soon as softmax(target) >= `confidence`,
    or after `max_iterations` steps; rows that are already there take no step.
    The assignment bounds nothing, so a noise may grow to the full pixel range; with `max_linf`
    the same update is followed by clipping the noise to [-max_linf, max_linf] (the L-infinity
    ball of that radius, [0, 1] scale), which asks how far the procedure gets within a budget.
    """
    check_batch(images, targets)
    if max_linf is not None and max_linf <= 0:
        raise ValueError(f"max_linf must be positive, got {max_linf}")
    x = images.detach()
    noise = torch.zeros_like(x)
    active = torch.ones_like(targets, dtype=torch.bool)
    steps = torch.zeros_like(targets)
    costs = []
    with frozen_eval(model):
        for i in range(max_iterations + 1):
            noise.requires_grad_(True)
            cost, logits = _target_logits(model, x + noise, targets)
            costs.append(cost.detach())
            probs = logits.detach().softmax(1).gather(1, targets[:, None])[:, 0]
            active &= probs < confidence
            if i == max_iterations or not active.any():
                break
            (d,) = torch.autograd.grad(cost.sum(), noise)
            alpha = GREY_LEVEL / (d.flatten(1).std(1) + STD_EPS)
            step = alpha.view(-1, 1, 1, 1) * d * active.view(-1, 1, 1, 1)
            noise = noise.detach() + step
            if max_linf is not None:
                noise = noise.clamp(-max_linf, max_linf)
            noise = (x + noise).clamp_(0.0, 1.0) - x  # clamping x + noise only shrinks |noise|
            steps += active.long()
    noise = noise.detach()
    final = x + noise
    return AttackResult(
        final, targets, torch.stack(costs), logits.detach().softmax(1), steps, noise
    )


def perturbation_norms(delta: torch.Tensor) -> dict[str, torch.Tensor]:
    """L2 and L-infinity norm of each perturbation (rows of `delta`), on the [0, 1] pixel scale."""
    flat = delta.flatten(1)
    return {"l2": flat.norm(dim=1), "linf": flat.abs().amax(1)}
