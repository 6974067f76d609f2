"""FGSM and PGD in the L-infinity norm, untargeted and targeted, with random start and restarts.

FGSM: Goodfellow, Shlens & Szegedy (2015), arXiv:1412.6572: one step x + eps * sign(grad).
PGD: Madry et al. (2018), arXiv:1706.06083: start at a uniform random point of the eps ball, take
`steps` signed-gradient steps of `step_size`, and after every step project back onto the ball
{x' : |x' - x|_inf <= eps} and the pixel range [0, 1]; restart from new random points.

Shapes and scale: images (N, C, H, W) float32 in [0, 1] (eps and step sizes on the same scale);
labels (N,) int64: the true classes (untargeted) or the target classes (targeted). The objective
ascended is the cross-entropy of the true class (untargeted) or minus the cross-entropy of the
target class (targeted), computed per image in fp32 (autocast off). The model is run in eval mode
with its parameters frozen and both are restored afterwards (`frozen_eval`); gradients are taken
w.r.t. the input only, and input tensors are never modified in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .model import frozen_eval

MADRY_STEP_FACTOR = 2.5  # default step = 2.5 * eps / steps: the steps can cross the ball 1.25 times


def attack_objective(logits: torch.Tensor, labels: torch.Tensor, targeted: bool) -> torch.Tensor:
    """Per-image objective the attack maximises: CE(true class), or -CE(target class) if targeted."""
    loss = F.cross_entropy(logits.float(), labels, reduction="none")
    return -loss if targeted else loss


def attack_succeeded(logits: torch.Tensor, labels: torch.Tensor, targeted: bool) -> torch.Tensor:
    """True per image where the prediction is wrong (untargeted) or is the target (targeted)."""
    predicted = logits.argmax(1)
    return predicted == labels if targeted else predicted != labels


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Closest point to `x_adv` in the L-infinity ball of radius `eps` around `x`, within [0, 1]."""
    return torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp(0.0, 1.0)


def random_start(x: torch.Tensor, eps: float, generator: torch.Generator) -> torch.Tensor:
    """A uniform random point of the eps ball around `x`, clamped to [0, 1]."""
    noise = torch.rand(x.shape, generator=generator, device=generator.device).to(x.device)
    return (x + (2.0 * noise - 1.0) * eps).clamp(0.0, 1.0)


def objective_and_gradient(
    model: nn.Module, x: torch.Tensor, labels: torch.Tensor, targeted: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Objective per image, logits, and the gradient of the objective w.r.t. `x` (fp32).

    Images are independent, so the gradient of the summed objective is each image's own gradient.
    Call inside `frozen_eval(model)`.
    """
    x = x.detach().requires_grad_(True)
    logits = model(x)
    objective = attack_objective(logits, labels, targeted)
    (grad,) = torch.autograd.grad(objective.sum(), x)
    return objective.detach(), logits.detach(), grad


def _check(images: torch.Tensor, labels: torch.Tensor, eps: float) -> None:
    if images.dim() != 4 or labels.shape != (len(images),):
        raise ValueError(
            f"expected images (N, C, H, W) and labels (N,), got {tuple(images.shape)} and "
            f"{tuple(labels.shape)}"
        )
    if images.dtype != torch.float32:
        raise TypeError(f"attacks run in fp32; got images of dtype {images.dtype}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")


def fgsm(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    eps: float,
    targeted: bool = False,
) -> torch.Tensor:
    """Fast gradient sign method: one step of `eps` along the sign of the objective's gradient."""
    _check(images, labels, eps)
    x = images.detach()
    with frozen_eval(model):
        _, _, grad = objective_and_gradient(model, x, labels, targeted)
    return project(x + eps * grad.sign(), x, eps)


def _pgd_last_iterate(
    model: nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor,
    start: torch.Tensor,
    eps: float,
    steps: int,
    step_size: float,
    targeted: bool,
) -> torch.Tensor:
    """Madry et al.'s PGD run: every image takes every step; returns the last iterate."""
    current = start
    for _ in range(steps):
        _, _, grad = objective_and_gradient(model, current, labels, targeted)
        current = project(current + step_size * grad.sign(), x, eps)
    return current


def _pgd_first_success(
    model: nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor,
    start: torch.Tensor,
    eps: float,
    steps: int,
    step_size: float,
    targeted: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A PGD run for evaluation: (image, its objective, succeeded) per image.

    Every iterate, the start included, is scored. An image that fools the model keeps the first
    iterate that did and leaves the batch (its remaining passes are saved); the others keep their
    iterate of highest objective. Call inside `frozen_eval(model)`.
    """
    n = len(x)
    best = start.clone()
    best_objective = torch.full((n,), -torch.inf, device=x.device)
    success = torch.zeros(n, dtype=torch.bool, device=x.device)
    active = torch.arange(n, device=x.device)
    current = start
    for i in range(steps + 1):
        if i < steps:
            objective, logits, grad = objective_and_gradient(
                model, current, labels[active], targeted
            )
        else:  # the last iterate needs no gradient
            with torch.no_grad():
                logits = model(current)
                objective = attack_objective(logits, labels[active], targeted)
        ok = attack_succeeded(logits, labels[active], targeted)
        keep = ok | (objective > best_objective[active])
        best[active[keep]] = current[keep]
        best_objective[active[keep]] = objective[keep]
        success[active] = ok
        if i == steps:
            break
        current = project(current + step_size * grad.sign(), x[active], eps)[~ok]
        active = active[~ok]
        if len(active) == 0:
            break
    return best, best_objective, success


def pgd(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    eps: float,
    steps: int = 40,
    step_size: float | None = None,
    random_init: bool = True,
    restarts: int = 1,
    targeted: bool = False,
    early_stop: bool = True,
    seed: int = 0,
) -> torch.Tensor:
    """Projected gradient descent (Madry et al. 2018) in the L-infinity ball of radius `eps`.

    Each of the `restarts` runs starts from a uniform random point of the ball (`random_init`;
    else from the images themselves) and takes `steps` steps of `step_size` (default
    2.5 * eps / steps) along the sign of the gradient, projecting onto the ball and [0, 1] after
    each. The random starts come from a generator seeded with `seed`: the attack is deterministic.

    With `early_stop` (evaluation): returns, per image, the first iterate that fooled the model
    (misclassified, or classified as the target when `targeted`) if any did, else the iterate of
    highest objective; fooled images leave the batch, and restarts after the first only run on
    the images not yet fooled. Without it (adversarial training): every image takes every step
    and the last iterate is returned, as in Madry et al.; with restarts, the restart whose last
    iterate has the highest objective.
    """
    _check(images, labels, eps)
    if steps < 0 or restarts < 1:
        raise ValueError(f"need steps >= 0 and restarts >= 1, got {steps} and {restarts}")
    step_size = MADRY_STEP_FACTOR * eps / max(steps, 1) if step_size is None else step_size
    x = images.detach()
    generator = torch.Generator(device=x.device).manual_seed(seed)
    best = x.clone()
    best_objective = torch.full((len(x),), -torch.inf, device=x.device)
    success = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    with frozen_eval(model):
        for _ in range(restarts):
            todo = (~success).nonzero()[:, 0]
            if len(todo) == 0:
                break
            xs, ys = x[todo], labels[todo]
            start = random_start(xs, eps, generator) if random_init else xs.clone()
            if early_stop:
                run, objective, run_success = _pgd_first_success(
                    model, xs, ys, start, eps, steps, step_size, targeted
                )
                success[todo] = run_success
            else:
                run = _pgd_last_iterate(model, xs, ys, start, eps, steps, step_size, targeted)
                if restarts == 1:
                    return run
                with torch.no_grad():
                    objective = attack_objective(model(run), ys, targeted)
            better = success[todo] | (objective > best_objective[todo])
            best[todo[better]] = run[better]
            best_objective[todo[better]] = objective[better]
    return best
