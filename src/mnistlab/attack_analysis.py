"""Part 3, measured around the attacks: the image pairs they run on, a standard attack to compare
(c) with, how far the noises of (c) carry over to other images, and the distance to real digits.

The reference for (c) is targeted PGD (Madry et al. 2018) from `pgd.pgd`, the package's one PGD,
in the L-infinity or the L2 ball. Pixels on the [0, 1] scale; the models run in eval mode and
fp32 with their parameters frozen and restored (`frozen_eval`); inputs are never modified.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .attacks import CONFIDENT
from .data import one_per_class
from .model import frozen_eval
from .pgd import check_batch, pgd
from .train import predict


def images_of_digits(
    labels: torch.Tensor,
    digits: torch.Tensor,
    seed: int,
    pool: torch.Tensor | None = None,
    model: nn.Module | None = None,
    images: torch.Tensor | None = None,
) -> torch.Tensor:
    """Index of one image showing each digit of `digits`: the image pairs of Part 3 (b) and (c).

    Row i is an image of digit digits[i], the one `one_per_class` picks with `seed` from `pool`
    (indices into `labels`; default all of them). With a `model`, only the images of the pool it
    classifies correctly are candidates (their pixels, `images`, are then needed).
    """
    if (model is None) != (images is None):
        raise ValueError("pass both model and images, or neither")
    pool = torch.arange(len(labels), device=labels.device) if pool is None else pool
    if model is not None:
        pool = pool[predict(model, images[pool]).argmax(1) == labels[pool]]
    return pool[one_per_class(labels[pool], seed)[digits]]


def pgd_minimal_radius(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    radii: Sequence[float],
    norm: str = "linf",
    iterations: int = 30,
    confidence: float = CONFIDENT,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for (c): smallest radius of a grid at which a targeted PGD succeeds, per pair.

    For each radius of `radii` (increasing, on the [0, 1] scale) `pgd.pgd` takes `iterations`
    steps of 2.5 * radius / iterations from the image itself (no random start), lowering the
    cross-entropy of the target class inside the `norm` ball ("linf" or "l2"), and keeps its last
    iterate (no early stop: success here is a confidence, not just the argmax). A pair succeeds at
    the first radius where softmax(target) >= `confidence`; later radii are tried on the pairs
    still unsolved only. Returns the perturbation (adversarial - image) found at that radius and
    the radius, per pair; both NaN where no radius of the grid succeeds.
    """
    check_batch(images, targets)
    if norm not in ("linf", "l2"):
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    x = images.detach()
    found = torch.zeros_like(targets, dtype=torch.bool)
    delta = torch.full_like(x, float("nan"))
    radius_found = torch.full(targets.shape, float("nan"), device=x.device)
    for radius in sorted(radii):
        todo = (~found).nonzero()[:, 0]
        if len(todo) == 0:
            break
        adv = pgd(
            model,
            x[todo],
            targets[todo],
            radius,
            iterations,
            random_init=False,
            targeted=True,
            early_stop=False,
            norm=norm,
        )
        with torch.no_grad(), frozen_eval(model):
            probs = model(adv).softmax(1).gather(1, targets[todo][:, None])[:, 0]
        ok = probs >= confidence
        delta[todo[ok]] = adv[ok] - x[todo[ok]]
        radius_found[todo[ok]] = radius
        found[todo[ok]] = True
    return delta, radius_found


@torch.no_grad()
def transfer_table(
    model: nn.Module, images: torch.Tensor, noises: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every noise added to every image, classified in one batch.

    Returns the predicted class (n_images, n_noises) of clamp(images[i] + noises[j], 0, 1) and the
    prediction on the clean images (n_images,).
    """
    noisy = (images[:, None] + noises[None]).clamp(0.0, 1.0)
    with frozen_eval(model):
        logits = model(noisy.flatten(0, 1))
        clean = model(images).argmax(1)
    return logits.argmax(1).view(len(images), len(noises)), clean


def transfer_rates(
    predicted: torch.Tensor, clean: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor
) -> dict[str, float]:
    """How often a noise made for `targets[j]` turns image i into that class, or changes it at all.

    target_rate: share of the (image, noise) pairs whose true label differs from the noise's
    target in which the prediction becomes the target. changed_rate: share of all pairs whose
    prediction differs from the prediction on the clean image.
    """
    is_target = predicted == targets[None, :]
    eligible = labels[:, None] != targets[None, :]
    return {
        "target_rate": (is_target & eligible).sum().item() / max(int(eligible.sum()), 1),
        "changed_rate": (predicted != clean[:, None]).float().mean().item(),
    }


@torch.no_grad()
def nearest_mse(images: torch.Tensor, reference: torch.Tensor, chunk: int = 10_000) -> torch.Tensor:
    """MSE (per pixel, [0, 1] scale) from each image to its nearest neighbour in `reference`."""
    flat = images.flatten(1)
    best = torch.full((len(images),), float("inf"), device=images.device)
    for start in range(0, len(reference), chunk):
        ref = reference[start : start + chunk].flatten(1)
        best = torch.minimum(best, torch.cdist(flat, ref).amin(1).pow(2) / flat.shape[1])
    return best
