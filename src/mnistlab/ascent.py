"""Gradient ascent on the input image: the engine of both optional parts (class models, features).

Climb J(I) = S(I) - lambda * ||I||^2 from a start image, where S is a score the model computes
(a class logit in `class_models`, an intermediate feature in `feature_images`), with
x <- clamp(x + step * dJ/dx, 0, 1). Two optional image priors regularise it: Gaussian blur every
few steps (Yosinski et al. 2015, "Understanding Neural Networks Through Deep Visualization") and
random jitter (Mordvintsev et al. 2015, DeepDream; Olah et al. 2017, "Feature Visualization"): the
gradient is taken through a randomly shifted copy of the image, so only patterns that raise the
score wherever they sit survive.

Conventions: pixels on the [0, 1] scale the model takes; the "zero image" is all-black pixels (0.0,
MNIST's background); ||I||^2 is the SUM of the 784 squared pixels (0 to 784); gradients are fp32
with respect to the image only (autocast off, parameters frozen and restored); the ascent is written
out (no torch optimiser), the image is clamped to [0, 1] after every step, and J is recorded before
every step and after the last, so a cost curve has steps + 1 points. Every image of a batch has its
own target, its own lambda and its own step, so a whole sweep is ONE batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torchvision.transforms.v2.functional as TF
from torch import nn
from tqdm.auto import tqdm

from .model import INPUT_SHAPE, frozen_eval
from .train import random_translate

ZERO_PIXEL = 0.0  # the "zero image": black, MNIST's background, on the model's [0, 1] scale

ScoreFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class AscentConfig:
    """Knobs of the ascent x <- clamp(x + step_size * dJ/dx, 0, 1), J = S - l2 * sum(x^2)."""

    steps: int = 200  # the assignment's 200 iterations
    step_size: float = 0.03
    l2: float = 0.03  # lambda; ||x||^2 is summed over the 784 pixels of a [0, 1] image
    jitter: int = 0  # > 0: gradient taken through a copy shifted by up to this many pixels
    blur_every: int = 0  # > 0: Gaussian-blur the image after every this many steps
    blur_sigma: float = 0.5  # pixels
    seed: int = 0  # seeds the jitter draws (each image of the batch gets its own shifts)


@dataclass
class AscentResult:
    """Final images and the cost history of one batched ascent."""

    images: torch.Tensor  # (N, 1, 28, 28) in [0, 1]
    start: torch.Tensor  # (N, 1, 28, 28) the starting images
    # (steps + 1, N): J of the (unshifted) image before each step, and after the last one
    objective: torch.Tensor
    score: torch.Tensor  # (steps + 1, N): the S part of J (logit, or feature activation)
    l2: torch.Tensor  # (N,) lambda of each image
    step_size: torch.Tensor  # (N,) step size of each image


def _blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur with a kernel reaching 3 sigma (torchvision, reflect padding)."""
    size = 2 * math.ceil(3 * sigma) + 1
    return TF.gaussian_blur(images, [size, size], [sigma, sigma])


def gradient_ascent(
    model: nn.Module,
    score_fn: ScoreFn,
    start: torch.Tensor,
    config: AscentConfig,
    l2: float | Sequence[float] | torch.Tensor | None = None,
    progress: bool = False,
    step_size: float | Sequence[float] | torch.Tensor | None = None,
) -> AscentResult:
    """Maximise J = score_fn(model, x) - l2 * ||x||^2 per image by projected gradient ascent.

    `score_fn` maps a batch (N, 1, 28, 28) to one score per image (N,), and image i's score must
    depend on image i only (true in eval mode). `l2` and `step_size` override config.l2 and
    config.step_size, per image when a sequence. `start` is not modified; the model's weights,
    modes and requires_grad flags are left as found.
    """
    device = start.device
    n = len(start)
    lam = _per_image(config.l2 if l2 is None else l2, n, device)
    step = _per_image(config.step_size if step_size is None else step_size, n, device)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    # Histories stay on the device until the end, so a GPU never waits for a copy mid-loop.
    objective = torch.empty(config.steps + 1, n, device=device)
    score = torch.empty(config.steps + 1, n, device=device)
    x = start.detach().float().clamp(0.0, 1.0).clone()

    def penalty(images: torch.Tensor) -> torch.Tensor:
        return lam * images.pow(2).sum(dim=(1, 2, 3))

    def record(t: int, s: torch.Tensor) -> None:
        score[t] = s.detach()
        objective[t] = s.detach() - penalty(x.detach())

    with frozen_eval(model):
        for t in tqdm(range(config.steps), desc="gradient ascent", disable=not progress):
            x = x.detach().requires_grad_(True)
            if config.jitter > 0:
                # J is recorded on the image itself; the step follows the gradient through a
                # shifted copy, so no pattern survives that only works at one exact position.
                with torch.no_grad():
                    record(t, score_fn(model, x))
                s_step = score_fn(model, random_translate(x, config.jitter, generator))
            else:
                s_step = score_fn(model, x)
                record(t, s_step)
            (grad,) = torch.autograd.grad((s_step - penalty(x)).sum(), x)
            with torch.no_grad():
                x = (x + step.view(-1, 1, 1, 1) * grad).clamp(0.0, 1.0)
                # Blur between steps, never after the last: the result is an ascent step's output.
                blur_now = config.blur_every > 0 and (t + 1) % config.blur_every == 0
                if blur_now and t + 1 < config.steps:
                    x = _blur(x, config.blur_sigma).clamp(0.0, 1.0)
        x = x.detach()
        with torch.no_grad():
            record(config.steps, score_fn(model, x))
    # Everything on the CPU, whatever device the model ran on: callers compare the images with
    # CPU references (analytic optima, plots) without device juggling.
    return AscentResult(
        x.cpu(), start.detach().cpu().clone(), objective.cpu(), score.cpu(), lam.cpu(), step.cpu()
    )


def _per_image(
    value: float | Sequence[float] | torch.Tensor, n: int, device: torch.device | str
) -> torch.Tensor:
    """`value` as an (n,) fp32 tensor on `device`: a scalar is repeated, a sequence taken as is."""
    return torch.as_tensor(value, dtype=torch.float32, device=device).expand(n).clone()


def subset(result: AscentResult, index: torch.Tensor) -> AscentResult:
    """The images `index` (indices or a boolean mask) of a batched result, with their histories."""
    return AscentResult(
        result.images[index],
        result.start[index],
        result.objective[:, index],
        result.score[:, index],
        result.l2[index],
        result.step_size[index],
    )


def rise_summary(objective: torch.Tensor) -> dict[str, float]:
    """How steadily J rose over the (steps + 1, N) history.

    A step "falls" when J drops by more than 1e-5 of the image's largest |J| (fp32 rounding of a
    converged J is below that); the largest drop is relative to that image's total gain, over the
    images that gained.
    """
    steps = objective.diff(dim=0)
    gain = objective[-1] - objective[0]
    falls = steps < -1e-5 * objective.abs().amax(dim=0)
    gained = gain > 0
    drop = (-steps.min(dim=0).values).clamp_min(0)
    worst = (drop[gained] / gain[gained]).max().item() if gained.any() else float("nan")
    return {
        "fraction_of_steps_falling": falls.float().mean().item(),
        "largest_drop_over_total_gain": worst,
        "mean_start": objective[0].mean().item(),
        "mean_end": objective[-1].mean().item(),
        "fraction_of_images_ending_higher": gained.float().mean().item(),
    }


def zero_images(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """n all-black images (pixel value ZERO_PIXEL), the assignment's "zero image"."""
    return torch.full((n, *INPUT_SHAPE), ZERO_PIXEL, device=device)
