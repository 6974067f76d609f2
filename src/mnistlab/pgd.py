"""FGSM and PGD, untargeted and targeted, with random start and restarts: the project's one PGD.

FGSM: Goodfellow, Shlens & Szegedy (2015), arXiv:1412.6572: one step x + eps * sign(grad).
PGD: Madry et al. (2018), arXiv:1706.06083: start at a uniform random point of the eps ball, take
`steps` steps of `step_size`, and after every step project back onto the ball and the pixel range
[0, 1]; restart from new random points. Two balls: L-infinity {x' : |x' - x|_inf <= eps}, stepped
along the sign of the gradient (the steepest direction for that norm), and L2
{x' : ||x' - x||_2 <= eps}, stepped along the gradient divided by its L2 norm (a signed step
would spend most of an L2 budget on pixels that barely matter).

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
NORMS = ("linf", "l2")
TINY = 1e-12  # keeps a zero gradient or a zero perturbation from dividing by zero


def check_batch(images: torch.Tensor, labels: torch.Tensor, eps: float = 0.0) -> None:
    """Refuse what no attack takes: images not (N, C, H, W) fp32, labels not (N,), eps < 0.

    Every attack of the package (this module, `attacks`, `attack_analysis`) checks its input here.
    """
    if images.dim() != 4 or labels.shape != (len(images),):
        raise ValueError(
            f"expected images (N, C, H, W) and labels or targets (N,), got "
            f"{tuple(images.shape)} and {tuple(labels.shape)}"
        )
    if images.dtype != torch.float32:
        raise TypeError(f"attacks run in fp32; got images of dtype {images.dtype}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")


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


def _per_image_norm(t: torch.Tensor) -> torch.Tensor:
    """L2 norm of each image of `t`, shaped (N, 1, 1, 1) to scale the images, at least TINY."""
    return t.flatten(1).norm(dim=1).clamp_min(TINY).view(-1, 1, 1, 1)


def project_l2(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """`x_adv` pulled into the L2 ball of radius `eps` around `x` (radially), then into [0, 1].

    Clamping after the radial projection keeps the point in the ball: it only moves pixels back
    towards `x`, which lies in [0, 1].
    """
    delta = x_adv - x
    delta = delta * (eps / _per_image_norm(delta)).clamp(max=1.0)
    return (x + delta).clamp(0.0, 1.0)


def pgd_step(
    current: torch.Tensor,
    grad: torch.Tensor,
    x: torch.Tensor,
    eps: float,
    step_size: float,
    norm: str = "linf",
) -> torch.Tensor:
    """One ascent step of `step_size` along the steepest direction for `norm`, then projection."""
    if norm == "linf":
        return project(current + step_size * grad.sign(), x, eps)
    return project_l2(current + step_size * grad / _per_image_norm(grad), x, eps)


def random_start(
    x: torch.Tensor, eps: float, generator: torch.Generator, norm: str = "linf"
) -> torch.Tensor:
    """A uniform random point of the eps ball (of `norm`) around `x`, clamped to [0, 1]."""
    if norm == "linf":
        noise = torch.rand(x.shape, generator=generator, device=generator.device).to(x.device)
        return (x + (2.0 * noise - 1.0) * eps).clamp(0.0, 1.0)
    # Uniform in the L2 ball: a uniform direction (normalised Gaussian) and radius eps * U^(1/d).
    direction = torch.randn(x.shape, generator=generator, device=generator.device).to(x.device)
    u = torch.rand(len(x), generator=generator, device=generator.device).to(x.device)
    radius = eps * u.pow(1.0 / x[0].numel())
    return (x + direction / _per_image_norm(direction) * radius.view(-1, 1, 1, 1)).clamp(0.0, 1.0)


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


def fgsm(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    eps: float,
    targeted: bool = False,
) -> torch.Tensor:
    """Fast gradient sign method: one step of `eps` along the sign of the objective's gradient."""
    check_batch(images, labels, eps)
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
    norm: str,
) -> torch.Tensor:
    """Madry et al.'s PGD run: every image takes every step; returns the last iterate."""
    current = start
    for _ in range(steps):
        _, _, grad = objective_and_gradient(model, current, labels, targeted)
        current = pgd_step(current, grad, x, eps, step_size, norm)
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
    norm: str,
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
        current = pgd_step(current, grad, x[active], eps, step_size, norm)[~ok]
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
    norm: str = "linf",
) -> torch.Tensor:
    """Projected gradient descent (Madry et al. 2018) in the `norm` ball of radius `eps`.

    `norm` is "linf" (steps along the sign of the gradient) or "l2" (along the gradient over its
    L2 norm). Each of the `restarts` runs starts from a uniform random point of the ball
    (`random_init`; else from the images themselves) and takes `steps` steps of `step_size`
    (default 2.5 * eps / steps), projecting onto the ball and [0, 1] after each. The random
    starts come from a generator seeded with `seed`: the attack is deterministic.

    With `early_stop` (evaluation): returns, per image, the first iterate that fooled the model
    (misclassified, or classified as the target when `targeted`) if any did, else the iterate of
    highest objective; fooled images leave the batch, and restarts after the first only run on
    the images not yet fooled. Without it (adversarial training): every image takes every step
    and the last iterate is returned, as in Madry et al.; with restarts, the restart whose last
    iterate has the highest objective.
    """
    check_batch(images, labels, eps)
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
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
            start = random_start(xs, eps, generator, norm) if random_init else xs.clone()
            if early_stop:
                run, objective, run_success = _pgd_first_success(
                    model, xs, ys, start, eps, steps, step_size, targeted, norm
                )
                success[todo] = run_success
            else:
                run = _pgd_last_iterate(model, xs, ys, start, eps, steps, step_size, targeted, norm)
                if restarts == 1:
                    return run
                with torch.no_grad():
                    objective = attack_objective(model(run), ys, targeted)
            better = success[todo] | (objective > best_objective[todo])
            best[todo[better]] = run[better]
            best_objective[todo[better]] = objective[better]
    return best
