"""Optional part 1: images that maximise a class score or an intermediate feature, by gradient ascent.

Class models follow Simonyan, Vedaldi & Zisserman (2014), "Deep Inside Convolutional Networks":
start from a zero image and climb J(I) = S_c(I) - lambda * ||I||^2, where S_c is the logit of class
c, with x <- clamp(x + step * dJ/dx, 0, 1). The better-regularised version adds two image priors:
Gaussian blur every few steps (Yosinski et al. 2015, "Understanding Neural Networks Through Deep
Visualization") and random jitter (Mordvintsev et al. 2015, DeepDream; Olah et al. 2017, "Feature
Visualization"): the gradient is taken through a randomly shifted copy of the image, so only
patterns that raise the score wherever they sit survive.

Conventions: pixels on the [0, 1] scale the model takes; the "zero image" is all-black pixels (0.0,
MNIST's background); ||I||^2 is the SUM of the 784 squared pixels (0 to 784); gradients are fp32
with respect to the image only (autocast off, parameters frozen and restored); the ascent is written
out (no torch optimiser), the image is clamped to [0, 1] after every step, and J is recorded before
every step and after the last, so a cost curve has steps + 1 points. Every image of a batch has its
own target (class or channel), its own lambda and its own step, so a whole sweep is ONE batch.

Intermediate features are the pre-activations of conv1 / conv2 (the input of the ReLU after each,
i.e. after BN in the bn variant), read with a forward pre-hook that also stops the forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import nn
from tqdm.auto import tqdm

from .activations import mosaic
from .model import INPUT_SHAPE, MNIST_STD, frozen_eval
from .train import predict, random_translate

NUM_CLASSES = 10
ZERO_PIXEL = 0.0  # the "zero image": black, MNIST's background, on the model's [0, 1] scale
DIGIT_BOX = 20  # MNIST digits are drawn in a 20 x 20 box centred in the 28 x 28 image

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


# --- The settings the report uses (chosen with the generating model and training-set class means,
# never with the independent model that judges the images, nor the test set) ----------------------
# Both class-model versions take their step from a list of candidates, picked in the run by
# select_step: every candidate is run on every class and column in ONE batch (sweep_steps).
# Plain version, the assignment's recipe exactly (zero start, ascent on J, 200 steps, clamp): only
# the step and lambda are free. The steps are a factor ~3 apart, from too small (some classes never
# leave the black start within 200 steps: at black the logit's gradient is small) to large (J
# zig-zags). The grid's lambdas run from 0 (no regulariser) to the largest value tried at which
# every class still formed; L2_BEYOND is swept but not drawn, so the notebook shows where images
# start to stay black (lambda pulls each pixel back harder than the logit pushes it).
# Better-regularised version: the same J with lambda 0.03, plus jitter of up to 2 pixels (the
# shifts the model was trained with) and a sigma 0.5 px blur every 4 steps. Blur removes part of
# each gain, so its candidates start at a larger step. The 10 images of a class differ only by
# their jitter draws.
# Features: a conv1 pre-activation is linear in the pixels, so J is concave and step 0.1 with
# lambda 0.5 contracts to its exact maximiser (factor 1 - 2 * lambda * step = 0.9 per step); conv2 is
# not, and rises smoothly with a smaller step. A channel MEAN is ascended as the channel SUM with the
# settings under "mean" (see per_position); the conv2 sum takes a 10x smaller step than one neuron,
# since each pixel feeds up to 16 conv2 positions, so its gradient is that much larger (the notebook
# reports how often J fell and how many images end higher than they began).

# "Formed": the generating network reads the image as its class with at least this probability.
FORMED_PROBABILITY = 0.99
PLAIN_STEPS = (0.03, 0.1, 0.3, 1.0)  # candidate step sizes
L2_SWEEP = (0.0, 0.003, 0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2)  # the grid's 10 columns
L2_BEYOND = (0.3, 1.0)
REGULARISED_STEPS = (0.1, 0.3, 1.0)  # candidate step sizes; REGULARISED.step_size is not used
REGULARISED = AscentConfig(l2=0.03, jitter=2, blur_every=4, blur_sigma=0.5)
FEATURES = {
    "conv1": {
        "neuron": AscentConfig(step_size=0.1, l2=0.5),
        "mean": AscentConfig(step_size=0.1, l2=0.5),
    },
    "conv2": {
        "neuron": AscentConfig(step_size=0.03, l2=0.1),
        "mean": AscentConfig(step_size=0.003, l2=0.1),
    },
}


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


# ==================================================================================================
# Class models
# ==================================================================================================


def class_score(classes: torch.Tensor) -> ScoreFn:
    """Score function: the logit of image i's own target class classes[i]."""

    def score(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model(x).gather(1, classes.to(x.device).view(-1, 1)).squeeze(1)

    return score


def zero_images(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """n all-black images (pixel value ZERO_PIXEL), the assignment's "zero image"."""
    return torch.full((n, *INPUT_SHAPE), ZERO_PIXEL, device=device)


def grid_classes(per_class: int, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """Targets of a class-by-variant grid: [0]*per_class + [1]*per_class + ... (row = class)."""
    return torch.arange(num_classes).repeat_interleave(per_class)


def class_models(
    model: nn.Module,
    classes: Sequence[int] | torch.Tensor,
    config: AscentConfig,
    l2: float | Sequence[float] | torch.Tensor | None = None,
    progress: bool = False,
    step_size: float | Sequence[float] | torch.Tensor | None = None,
) -> AscentResult:
    """Class-model images for every entry of `classes` (one batch), started from zero images."""
    device = next(model.parameters()).device
    classes = torch.as_tensor(classes, dtype=torch.long, device=device)
    start = zero_images(len(classes), device)
    return gradient_ascent(model, class_score(classes), start, config, l2, progress, step_size)


def target_probability(
    model: nn.Module, images: torch.Tensor, classes: torch.Tensor
) -> torch.Tensor:
    """Softmax probability that `model` gives each image's own target class (fp32, eval mode)."""
    device = next(model.parameters()).device
    probs = predict(model, images.to(device).float())
    return probs.gather(1, classes.to(device).view(-1, 1)).squeeze(1).cpu()


def predicted_classes(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The class `model` assigns (argmax) to each image."""
    device = next(model.parameters()).device
    return predict(model, images.to(device).float()).argmax(1).cpu()


def agreement(model: nn.Module, images: torch.Tensor, classes: torch.Tensor) -> float:
    """Fraction of `images` that `model` assigns (argmax) to their target class."""
    return (predicted_classes(model, images) == classes.cpu()).float().mean().item()


def correlation_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, M) Pearson correlation between the pixels of images a[i] and b[j] (0 for a flat image)."""

    def standardise(x: torch.Tensor) -> torch.Tensor:
        x = x.detach().float().cpu().flatten(1)
        x = x - x.mean(dim=1, keepdim=True)
        return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)

    return standardise(a) @ standardise(b).T


def class_templates(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(10, 1, 28, 28) mean image of each class: a network-free reference for "looks like a c"."""
    return torch.stack([images[labels == c].float().mean(dim=0) for c in range(NUM_CLASSES)])


def template_scores(
    images: torch.Tensor, classes: torch.Tensor, templates: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per image: correlation with its own class template, and the class of the closest template."""
    corr = correlation_matrix(images, templates)
    return {
        "own_correlation": corr.gather(1, classes.cpu().view(-1, 1)).squeeze(1),
        "nearest": corr.argmax(dim=1),
    }


def within_between_correlation(images: torch.Tensor, classes: torch.Tensor) -> dict[str, float]:
    """Mean pixel correlation between different images of the same class, and of different classes."""
    corr = correlation_matrix(images, images)
    classes = classes.cpu()
    same = classes.view(-1, 1) == classes.view(1, -1)
    off_diagonal = ~torch.eye(len(classes), dtype=torch.bool)
    return {
        "within_class": corr[same & off_diagonal].mean().item(),
        "between_class": corr[~same].mean().item(),
    }


def centre_share(images: torch.Tensor, box: int = DIGIT_BOX) -> torch.Tensor:
    """Per image: share of its total brightness inside the central box x box pixels.

    A uniform image scores (box / 28)^2 = 0.51 for box 20; real digits, drawn in that box, about 1.
    """
    h, w = images.shape[-2:]
    top, left = (h - box) // 2, (w - box) // 2
    total = images.flatten(1).sum(dim=1).clamp_min(1e-12)
    inside = images[..., top : top + box, left : left + box].flatten(1).sum(dim=1)
    return (inside / total).cpu()


def class_evidence(
    model: nn.Module,
    judge: nn.Module,
    images: torch.Tensor,
    classes: torch.Tensor,
    templates: torch.Tensor,
) -> dict[str, float]:
    """Whether images show their class: the generating model's, the judge's and the templates' view."""
    scores = template_scores(images, classes, templates)
    return {
        "generator_confidence": target_probability(model, images, classes).mean().item(),
        "generator_agreement": agreement(model, images, classes),
        "agreement": agreement(judge, images, classes),
        "judge_confidence": target_probability(judge, images, classes).mean().item(),
        "template_correlation": scores["own_correlation"].mean().item(),
        "template_match": (scores["nearest"] == classes.cpu()).float().mean().item(),
        **within_between_correlation(images, classes),
        "centre_share": centre_share(images).mean().item(),
    }


def evidence_by_class(
    model: nn.Module, judge: nn.Module, images: torch.Tensor, classes: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per class (10,): the generating model's lowest target probability, share formed, judge's view."""
    classes = classes.cpu()
    generator = target_probability(model, images, classes)
    hit = (predicted_classes(judge, images) == classes).float()
    judge_p = target_probability(judge, images, classes)

    def per_class(values: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor]):
        return torch.stack([reduce(values[classes == c]) for c in range(NUM_CLASSES)])

    return {
        "generator_min_probability": per_class(generator, torch.min),
        "generator_formed": per_class((generator >= FORMED_PROBABILITY).float(), torch.mean),
        "judge_agreement": per_class(hit, torch.mean),
        "judge_confidence": per_class(judge_p, torch.mean),
    }


def column_agreement(
    judge: nn.Module, images: torch.Tensor, classes: torch.Tensor, columns: int
) -> torch.Tensor:
    """(columns,) share of each column of a row-major class-by-column grid that `judge` reads right."""
    hit = predicted_classes(judge, images) == classes.cpu()
    return hit.view(-1, columns).float().mean(dim=0)


# ==================================================================================================
# Choosing the step
# ==================================================================================================


def select_step(formed_share: Sequence[float], likeness: Sequence[float]) -> int:
    """Index of the step with the largest share of formed images; among equals, the best likeness."""
    formed_share, likeness = torch.as_tensor(formed_share), torch.as_tensor(likeness)
    return max(range(len(formed_share)), key=lambda i: (float(formed_share[i]), float(likeness[i])))


@dataclass
class StepSweep:
    """Class models for every candidate step, class and column (lambda), and what picks the step.

    Nothing here looks at the independent model or the test set: an image is "formed" when the
    generating model reads it as its class with probability >= FORMED_PROBABILITY, and its likeness
    is its correlation with its class template (the mean training image).
    """

    step_sizes: tuple[float, ...]
    # lambda of each column: the grid's first, then any swept beyond it; a repeated lambda makes
    # columns that differ only by their jitter draws
    l2s: tuple[float, ...]
    grid_columns: int  # how many of l2s the grid draws
    result: AscentResult  # one batch, in (step, class, column) row-major order
    classes: torch.Tensor  # (N,) target class of each image
    probability: torch.Tensor  # (steps, classes, columns) generating model's target probability
    likeness: torch.Tensor  # (steps, classes, columns) correlation with the class template

    def formed(self) -> torch.Tensor:
        """(steps, classes, columns): True where the generating model reads the image as its class."""
        return self.probability >= FORMED_PROBABILITY

    def grid_formed_share(self) -> torch.Tensor:
        """(steps,) share of each step's grid images (columns beyond the grid left out) formed."""
        return self.formed()[..., : self.grid_columns].float().mean(dim=(1, 2))

    def grid_likeness(self) -> torch.Tensor:
        """(steps,) mean template correlation of each step's grid images."""
        return self.likeness[..., : self.grid_columns].mean(dim=(1, 2))

    def chosen(self) -> int:
        """Index of the step select_step picks."""
        return select_step(self.grid_formed_share(), self.grid_likeness())

    def grid_index(self, step: int) -> torch.Tensor:
        """Batch indices of step `step`'s grid images, row-major (row = class)."""
        layout = torch.arange(len(self.classes)).view(len(self.step_sizes), NUM_CLASSES, -1)
        return layout[step, :, : self.grid_columns].flatten()

    def grid(self, step: int) -> AscentResult:
        """Step `step`'s 10 x grid_columns images (row = class) with their cost histories."""
        return subset(self.result, self.grid_index(step))

    def summary(self) -> list[dict[str, object]]:
        """Per step: formed share and likeness of its grid, how often J fell, classes formed per column."""
        shares, likeness = self.grid_formed_share(), self.grid_likeness()
        return [
            {
                "step_size": step,
                "formed_share": shares[k].item(),
                "template_correlation": likeness[k].item(),
                "fraction_of_steps_falling": rise_summary(self.grid(k).objective)[
                    "fraction_of_steps_falling"
                ],
                "classes_formed_by_column": self.formed()[k].sum(dim=0).tolist(),
            }
            for k, step in enumerate(self.step_sizes)
        ]


def sweep_steps(
    model: nn.Module,
    step_sizes: Sequence[float],
    l2s: Sequence[float],
    grid_columns: int,
    config: AscentConfig,
    templates: torch.Tensor,
    progress: bool = False,
) -> StepSweep:
    """Class models for every (step, class, column of l2s), one batch from zero images, scored."""
    n_steps, n_l2 = len(step_sizes), len(l2s)
    classes = grid_classes(n_l2).repeat(n_steps)
    steps = torch.tensor(step_sizes, dtype=torch.float32).repeat_interleave(NUM_CLASSES * n_l2)
    lam = torch.tensor(l2s, dtype=torch.float32).repeat(NUM_CLASSES * n_steps)
    result = class_models(model, classes, config, l2=lam, progress=progress, step_size=steps)
    shape = (n_steps, NUM_CLASSES, n_l2)
    probability = target_probability(model, result.images, classes).view(shape)
    likeness = template_scores(result.images, classes, templates)["own_correlation"].view(shape)
    return StepSweep(
        tuple(step_sizes), tuple(l2s), grid_columns, result, classes, probability, likeness
    )


# ==================================================================================================
# Intermediate features
# ==================================================================================================


class _Captured(Exception):
    """Raised by a hook to stop the forward pass once the wanted activation is in hand."""


def relu_after(model: nn.Module, layer: str) -> str:
    """Name of the ReLU that follows `layer` in model.layers (its input is the pre-activation)."""
    names = [name for name, _ in model.layers.named_children()]
    if layer not in names:
        raise ValueError(f"no layer {layer!r} in model.layers ({', '.join(names)})")
    for name in names[names.index(layer) + 1 :]:
        if isinstance(model.layers.get_submodule(name), nn.ReLU):
            return name
    raise ValueError(f"no ReLU after {layer!r}")


def preactivation(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    """The input of the ReLU after `layer` (conv output; after BN in the bn variant), (N, C, H, W).

    The forward pass stops there, so the layers above cost nothing. The pre-activation is what is
    maximised: a ReLU output has zero gradient wherever the channel is off, which on a black start
    image can be everywhere, and the ascent would never move.
    """
    captured: list[torch.Tensor] = []

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        captured.append(inputs[0])
        raise _Captured

    handle = model.layers.get_submodule(relu_after(model, layer)).register_forward_pre_hook(hook)
    try:
        model(x)
    except _Captured:
        pass
    finally:
        handle.remove()
    return captured[0]


def feature_score(
    layer: str, channels: torch.Tensor, position: tuple[int, int] | None = None
) -> ScoreFn:
    """Score: image i's pre-activation in channel channels[i], spatial mean or the neuron at `position`."""

    def score(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        maps = preactivation(model, layer, x)
        picked = maps[torch.arange(len(x), device=x.device), channels.to(x.device)]  # (N, H, W)
        if position is None:
            return picked.mean(dim=(1, 2))
        return picked[:, position[0], position[1]]

    return score


def feature_map_size(model: nn.Module, layer: str) -> tuple[int, int]:
    """Height and width of `layer`'s feature maps for a 28x28 input."""
    device = next(model.parameters()).device
    with frozen_eval(model), torch.no_grad():
        maps = preactivation(model, layer, zero_images(1, device))
    return int(maps.shape[2]), int(maps.shape[3])


def centre_position(model: nn.Module, layer: str) -> tuple[int, int]:
    """The centre position (H // 2, W // 2) of `layer`'s feature maps."""
    h, w = feature_map_size(model, layer)
    return h // 2, w // 2


def per_position(config: AscentConfig, positions: int) -> AscentConfig:
    """The config that makes a spatial-MEAN ascent step exactly like a single-neuron one.

    A channel mean over H x W positions has gradients H x W times smaller than one neuron's, so the
    step is scaled up and lambda down by that factor (equivalent to maximising the channel's sum).
    """
    return replace(config, step_size=config.step_size * positions, l2=config.l2 / positions)


def maximise_features(
    model: nn.Module,
    layer: str,
    config: AscentConfig,
    position: tuple[int, int] | None = None,
    channels: Sequence[int] | torch.Tensor | None = None,
    progress: bool = False,
) -> AscentResult:
    """One image per channel of `layer` (one batch) maximising its mean, or one neuron at `position`."""
    device = next(model.parameters()).device
    if channels is None:
        channels = range(model.layers.get_submodule(layer).out_channels)
    channels = torch.as_tensor(list(channels), dtype=torch.long, device=device)
    score = feature_score(layer, channels, position)
    start = zero_images(len(channels), device)
    return gradient_ascent(model, score, start, config, progress=progress)


def effective_weight(model: nn.Module, layer: str) -> torch.Tensor:
    """`layer`'s kernels as its pre-activation sees them: times the BN scale when BN follows (eval)."""
    weight = model.layers.get_submodule(layer).weight.detach().float().cpu()
    names = [name for name, _ in model.layers.named_children()]
    nxt = model.layers.get_submodule(names[names.index(layer) + 1])
    if isinstance(nxt, nn.BatchNorm2d):
        scale = nxt.weight.detach().float().cpu() / (nxt.running_var.float().cpu() + nxt.eps).sqrt()
        weight = weight * scale.view(-1, 1, 1, 1)
    return weight


def linear_neuron_optimum(
    model: nn.Module, layer: str, position: tuple[int, int], l2: float
) -> torch.Tensor:
    """Exact maximiser of one conv1 neuron's pre-activation minus l2 * ||x||^2 in [0, 1], per channel.

    The pre-activation is linear in the pixels with gradient w / MNIST_STD (the model normalises)
    on the 3x3 window and 0 elsewhere, and J is separable and concave per pixel, so the box-
    constrained maximiser is clamp(w / (MNIST_STD * 2 * l2), 0, 1) in the window, black elsewhere.
    Only for a first conv layer, at a position whose window lies inside the image.
    """
    weight = effective_weight(model, layer)  # (C, 1, k, k)
    if weight.shape[1] != 1:
        raise ValueError(f"{layer} does not read the image directly")
    k = weight.shape[-1]
    r0, r1, c0, c1 = receptive_field(model, layer).box(position)
    if (r1 - r0, c1 - c0) != (k, k):
        raise ValueError(f"the window at {position} is cut by the border")
    out = zero_images(len(weight))
    out[:, :, r0:r1, c0:c1] = (weight / (MNIST_STD * 2 * l2)).clamp(0.0, 1.0)
    return out


@dataclass(frozen=True)
class ReceptiveField:
    """How one position of a feature map sees the input: side `size`, stride `jump`, first centre."""

    size: int
    jump: int
    first_centre: float  # input coordinate of the centre of output position 0

    def box(self, position: tuple[int, int], image_size: int = 28) -> tuple[int, int, int, int]:
        """(row0, row1, col0, col1), half-open, of the input pixels `position` sees, clipped."""
        bounds = []
        for p in position:
            lo = math.ceil(self.first_centre + p * self.jump - (self.size - 1) / 2)
            bounds += [max(lo, 0), min(lo + self.size, image_size)]
        return bounds[0], bounds[1], bounds[2], bounds[3]


def receptive_field(model: nn.Module, layer: str) -> ReceptiveField:
    """Receptive field of `layer`, derived analytically from its kernels, strides and paddings.

    r_out = r_in + (k - 1) j_in;  j_out = j_in s;  centre_out = centre_in + ((k - 1) / 2 - p) j_in.
    """
    size, jump, first = 1, 1, 0.0
    for name, module in model.layers.named_children():
        if isinstance(module, nn.Conv2d | nn.MaxPool2d):
            k, s, p = (
                v if isinstance(v, int) else v[0]
                for v in (module.kernel_size, module.stride, module.padding)
            )
            first += ((k - 1) / 2 - p) * jump
            size += (k - 1) * jump
            jump *= s
        if name == layer:
            return ReceptiveField(size, jump, first)
    raise ValueError(f"no layer {layer!r} in model.layers")


def changed_box_sizes(images: torch.Tensor, start: torch.Tensor, tol: float = 1e-3) -> torch.Tensor:
    """(N, 2) height and width of the bounding box of pixels that moved more than `tol` (0: none)."""
    moved = ((images - start).abs() > tol)[:, 0].cpu()  # (N, H, W)
    sizes = []
    for m in moved:
        rows, cols = m.any(dim=1).nonzero(), m.any(dim=0).nonzero()
        if len(rows) == 0:
            sizes.append((0, 0))
        else:
            sizes.append((int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)))
    return torch.tensor(sizes, dtype=torch.long).view(-1, 2)


def feature_observations(
    model: nn.Module,
    judge: nn.Module,
    layer: str,
    mean_result: AscentResult,
    neuron_result: AscentResult,
    position: tuple[int, int],
    neuron_l2: float,
    mean_l2: float,
) -> dict[str, object]:
    """What one layer's maximisers show, measured: where a neuron's image changes, how flat a mean is.

    mean_result: one image per channel maximising its mean, ascended in sum units with lambda
    `mean_l2` (see per_position); neuron_result: one per channel maximising the neuron at
    `position` with lambda `neuron_l2`. For a layer that reads the image (conv1) the pre-activation
    is linear, so both are also compared with their exact maximisers.
    """
    field = receptive_field(model, layer)
    r0, r1, c0, c1 = field.box(position)
    boxes = changed_box_sizes(neuron_result.images, neuron_result.start)
    outside = (neuron_result.images - neuron_result.start).abs() > 1e-3
    outside[:, :, r0:r1, c0:c1] = False
    # Pixel 0 and 27 meet the zero padding, so only rows and columns 1..26 see every weight.
    interior = mean_result.images[:, 0, 1:-1, 1:-1].flatten(1)
    judge_probs = predict(judge, mean_result.images.to(next(judge.parameters()).device))
    obs: dict[str, object] = {
        "receptive_field": field.size,
        "neuron_changed_box_max": boxes.max(dim=0).values.tolist(),
        "neuron_changed_box_mean": boxes.float().mean(dim=0).tolist(),
        "neuron_changed_pixels_outside_field": int(outside.sum()),
        "mean_image_interior_std": interior.std(dim=1).mean().item(),
        "mean_image_centre_share": centre_share(mean_result.images).mean().item(),
        "mean_rise": rise_summary(mean_result.objective),
        "neuron_rise": rise_summary(neuron_result.objective),
        "judge_max_probability_mean_images": judge_probs.max(dim=1).values.mean().item(),
    }
    weight = effective_weight(model, layer)
    if weight.shape[1] == 1:
        optimum = linear_neuron_optimum(model, layer, position, neuron_l2)
        window = optimum[:, 0, r0:r1, c0:c1]
        # Every interior pixel meets all k x k weights of a channel once in its sum, so its gradient
        # is the kernel sum / MNIST_STD, and the sum's maximiser is flat there.
        flat = (weight.sum(dim=(1, 2, 3)) / (MNIST_STD * 2 * mean_l2)).clamp(0.0, 1.0)
        obs |= {
            "neuron_max_error_vs_analytic_optimum": (neuron_result.images - optimum)
            .abs()
            .max()
            .item(),
            "neuron_window_pixels_strictly_inside_0_1": ((window > 0) & (window < 1))
            .float()
            .mean()
            .item(),
            "mean_image_max_error_vs_analytic_interior": (interior - flat.view(-1, 1))
            .abs()
            .max()
            .item(),
            "mean_image_interior_share_lit": (flat > 0).float().mean().item(),
        }
    return obs


# ==================================================================================================
# Figures (each returns a Figure built without pyplot)
# ==================================================================================================


def _show_mosaic(ax, tiles: torch.Tensor, ncols: int, gap: int = 1, **imshow):
    """Draw a mosaic on `ax` (grey gaps, no ticks); return the image and the tile pitch (h, w)."""
    image = ax.imshow(mosaic(tiles, ncols, gap), interpolation="nearest", **imshow)
    ax.set_facecolor("0.75")
    ax.set_xticks([])
    ax.set_yticks([])
    return image, (tiles.shape[1] + gap, tiles.shape[2] + gap)


def plot_class_model_grids(
    panels: Sequence[tuple[str, torch.Tensor, Sequence[str]]],
    classes: torch.Tensor,
    judged: Sequence[torch.Tensor] | None = None,
    judge_name: str = "independent model",
) -> Figure:
    """Side-by-side class-by-variant grids (row = class); each image tagged with `judged` class.

    panels: (title, images (rows * cols, 1, 28, 28) row-major, column labels) per grid.
    """
    fig = Figure(figsize=(7.4 * len(panels), 8.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for k, (ax, (title, images, col_labels)) in enumerate(zip(axes, panels, strict=True)):
        cols = len(col_labels)
        rows = math.ceil(len(images) / cols)
        _, (ph, pw) = _show_mosaic(ax, images[:, 0], cols, cmap="gray", vmin=0, vmax=1)
        ax.set_xticks(np.arange(cols) * pw + (pw - 2) / 2, col_labels, fontsize=7, rotation=45)
        ax.xaxis.tick_top()
        ax.set_yticks(np.arange(rows) * ph + (ph - 2) / 2, [str(r) for r in range(rows)])
        ax.set_ylabel("target class")
        ax.set_title(title, fontsize=11)
        if judged is not None:
            for i, pred in enumerate(judged[k].tolist()):
                r, c = divmod(i, cols)
                ok = pred == int(classes[i])
                colour = "lime" if ok else "red"
                ax.text(
                    c * pw + 1, r * ph + 4.5, str(pred), color=colour, fontsize=6.5, weight="bold"
                )
    if judged is not None:
        fig.supxlabel(
            f"corner digit: class assigned by the {judge_name} (green = the target class, red = not)",
            fontsize=9,
        )
    return fig


def plot_objective(
    curves: Sequence[tuple[str, torch.Tensor, torch.Tensor]], ylabel: str = "J(I)"
) -> Figure:
    """J against iteration, one line per class (mean over its images, band = min to max).

    curves: (title, objective (steps + 1, N), classes (N,)) per panel.
    """
    fig = Figure(figsize=(6.2 * len(curves), 4.3), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(curves)))
    for ax, (title, objective, classes) in zip(axes, curves, strict=True):
        steps = torch.arange(len(objective))
        for c in classes.unique().tolist():
            j = objective[:, classes.cpu() == c]
            ax.plot(steps, j.mean(dim=1), color=f"C{c % 10}", lw=1.3, label=str(c))
            if j.shape[1] > 1:
                low, high = j.min(dim=1).values, j.max(dim=1).values
                ax.fill_between(steps, low, high, color=f"C{c % 10}", alpha=0.15, lw=0)
        ax.set(title=title, xlabel="iteration (gradient-ascent step)", ylabel=ylabel)
        ax.grid(alpha=0.3)
    axes[-1].legend(title="class", fontsize=8, ncol=2, loc="lower right")
    return fig


def _label_tiles(ax, n: int, ncols: int, pitch: tuple[int, int], colour: str = "yellow") -> None:
    """Write each tile's index in its top-left corner."""
    for i in range(n):
        r, c = divmod(i, ncols)
        ax.text(c * pitch[1], r * pitch[0], str(i), color=colour, fontsize=6, va="top", ha="left")


def plot_feature_images(
    layer: str,
    weight: torch.Tensor,
    mean_images: torch.Tensor,
    neuron_images: torch.Tensor,
    field: ReceptiveField,
    position: tuple[int, int],
    margin: int = 3,
    ncols: int = 8,
) -> Figure:
    """A layer's filters, its channel-mean maximisers and its single-neuron maximisers (cropped).

    weight: the layer's effective kernels (C_out, C_in, k, k); for C_in = 1 each kernel is a tile,
    otherwise the whole C_out x C_in mosaic. The neuron crops show the receptive field plus
    `margin` pixels; the red frame is the analytic receptive field. Tiles are numbered by channel.
    """
    n = len(mean_images)
    fig = Figure(figsize=(19, 5.4), layout="constrained")
    ax_w, ax_m, ax_n = fig.subplots(1, 3)
    limit = float(weight.abs().max())
    c_out, c_in, k, _ = weight.shape
    if c_in == 1:
        im, pitch = _show_mosaic(ax_w, weight[:, 0], ncols, cmap="RdBu_r", vmin=-limit, vmax=limit)
        _label_tiles(ax_w, n, ncols, pitch, colour="black")
        ax_w.set_title(f"{layer} kernels (effective), one per channel: red +, blue -", fontsize=10)
    else:
        im, pitch = _show_mosaic(
            ax_w, weight.flatten(0, 1), c_in, cmap="RdBu_r", vmin=-limit, vmax=limit
        )
        ticks = np.arange(0, max(c_out, c_in), 8)
        ax_w.set_xticks(ticks[ticks < c_in] * pitch[1] + (k - 1) / 2, ticks[ticks < c_in])
        ax_w.set_yticks(ticks[ticks < c_out] * pitch[0] + (k - 1) / 2, ticks[ticks < c_out])
        ax_w.set(xlabel="input channel (a map, not pixels)", ylabel="output channel")
        ax_w.set_title(f"{layer} kernels (effective): {c_out} x {c_in} of {k}x{k}", fontsize=10)
    fig.colorbar(im, ax=ax_w, shrink=0.75, label="weight")
    _, pitch = _show_mosaic(ax_m, mean_images[:, 0], ncols, cmap="gray", vmin=0, vmax=1)
    _label_tiles(ax_m, n, ncols, pitch)
    ax_m.set_title(f"maximise the MEAN of each {layer} channel (28x28 image)", fontsize=10)
    r0, r1, c0, c1 = field.box(position)
    top, left = max(r0 - margin, 0), max(c0 - margin, 0)
    bottom, right = min(r1 + margin, 28), min(c1 + margin, 28)
    crops = neuron_images[:, 0, top:bottom, left:right]
    _, pitch = _show_mosaic(ax_n, crops, ncols, cmap="gray", vmin=0, vmax=1)
    for i in range(n):
        r, c = divmod(i, ncols)
        corner = (c * pitch[1] + c0 - left - 0.5, r * pitch[0] + r0 - top - 0.5)
        ax_n.add_patch(Rectangle(corner, c1 - c0, r1 - r0, fill=False, ec="red", lw=0.6))
    _label_tiles(ax_n, n, ncols, pitch)
    ax_n.set_title(
        f"maximise ONE {layer} neuron at {position}: crop rows {top}-{bottom - 1}, "
        f"cols {left}-{right - 1}\n(red: its {field.size}x{field.size} receptive field)",
        fontsize=10,
    )
    return fig
