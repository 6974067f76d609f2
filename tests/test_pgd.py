"""FGSM and PGD (L-inf and L2): bounds, exact answers on linear models, captum and hand-written
references as oracles, the safety rules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from captum.robust import FGSM, PGD
from torch import nn

from mnistlab.model import MnistCNN, frozen_eval
from mnistlab.pgd import (
    attack_objective,
    attack_succeeded,
    fgsm,
    pgd,
    project,
    project_l2,
    random_start,
)

# captum's FGSM warns when it switches on requires_grad for the input it was given. The oracle
# tests hand captum the same plain tensors our attacks take, after our attacks have run.
CAPTUM_SETS_REQUIRES_GRAD = "ignore:Input Tensor 0 did not already require gradients"


def linear_model(classes: int = 10, seed: int = 0, scale: float = 1.0) -> nn.Module:
    """logits = W x + b on the flattened image."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, classes))
    with torch.no_grad():
        model[1].weight.mul_(scale)
    return model


def cnn(seed: int = 0) -> MnistCNN:
    torch.manual_seed(seed)
    return MnistCNN("plain")


def images(n: int = 16, seed: int = 0, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(n, 1, 28, 28, generator=g)


def labels(n: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(seed))


def ce(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


@pytest.mark.parametrize("targeted", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_pgd_stays_in_the_eps_ball_and_the_pixel_range(eps, targeted):
    x, y = images(), labels()
    x[:4] = 0.0  # saturated images: the ball reaches outside [0, 1]
    x[4:8] = 1.0
    adv = pgd(cnn(), x, y, eps, steps=5, restarts=2, targeted=targeted, early_stop=False)
    assert (adv - x).abs().max() <= eps + 1e-6
    assert adv.min() >= 0.0 and adv.max() <= 1.0
    assert adv.dtype == torch.float32 and adv.shape == x.shape


@pytest.mark.parametrize("early_stop", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.5, 3.0])
def test_l2_pgd_stays_in_the_eps_ball_and_the_pixel_range(eps, early_stop):
    x, y = images(), labels()
    x[:4] = 0.0
    x[4:8] = 1.0
    adv = pgd(cnn(), x, y, eps, steps=5, restarts=2, early_stop=early_stop, norm="l2")
    assert ((adv - x).flatten(1).norm(dim=1) <= eps + 1e-5).all()
    assert adv.min() >= 0.0 and adv.max() <= 1.0
    assert adv.dtype == torch.float32 and adv.shape == x.shape


def test_l2_random_start_is_inside_the_ball_and_seeded():
    x = images(64, low=0.4, high=0.6)  # far enough from 0 and 1 that clamping never bites
    start = random_start(x, 0.5, torch.Generator().manual_seed(1), "l2")
    size = (start - x).flatten(1).norm(dim=1)
    assert (size <= 0.5 + 1e-5).all() and (size > 0.4).all()  # in 784 dimensions: near the rim
    assert torch.equal(start, random_start(x, 0.5, torch.Generator().manual_seed(1), "l2"))


def test_project_l2_scales_onto_the_ball_and_leaves_the_inside_alone():
    x = torch.full((2, 1, 2, 2), 0.5)
    x_adv = x + torch.tensor([0.3, 0.0, 0.4, 0.0]).view(1, 1, 2, 2)  # ||delta|| = 0.5
    x_adv = torch.cat([x_adv[:1], x[1:] + 0.05])  # second: ||delta|| = 0.1, inside
    out = project_l2(x_adv, x, 0.25)
    torch.testing.assert_close(out[0] - x[0], (x_adv[0] - x[0]) / 2)
    torch.testing.assert_close(out[1], x_adv[1])


def test_fgsm_stays_in_the_eps_ball_and_the_pixel_range():
    x, y = images(), labels()
    adv = fgsm(cnn(), x, y, 0.2)
    assert (adv - x).abs().max() <= 0.2 + 1e-6
    assert adv.min() >= 0.0 and adv.max() <= 1.0


def test_project_is_the_closest_point_of_the_box():
    x = torch.tensor([0.0, 0.5, 1.0, 0.95])
    x_adv = torch.tensor([-0.5, 0.9, 0.2, 1.3])
    assert torch.allclose(project(x_adv, x, 0.1), torch.tensor([0.0, 0.6, 0.9, 1.0]))


@pytest.mark.filterwarnings(CAPTUM_SETS_REQUIRES_GRAD)
def test_fgsm_matches_captum():
    model, x, y = linear_model(), images(low=0.2, high=0.8), labels()
    ours = fgsm(model, x, y, 0.1)
    loss = nn.CrossEntropyLoss(reduction="none")
    reference = FGSM(model, loss, lower_bound=0.0, upper_bound=1.0)
    reference.zero_thresh = 0.0  # captum skips gradients under 1e-6; sign() steps on all of them
    theirs = reference.perturb(x, 0.1, y)
    assert torch.allclose(ours, theirs, atol=1e-6)


@pytest.mark.filterwarnings(CAPTUM_SETS_REQUIRES_GRAD)
@pytest.mark.parametrize("targeted", [False, True])
@pytest.mark.parametrize("eps", [0.05, 0.2])
def test_pgd_matches_captum_without_random_start(eps, targeted):
    # Without early stopping PGD returns its last iterate, as captum does (eps = 0.05: the ball
    # binds after 5 of the 10 steps; eps = 0.2: it never does).
    model, x, y = linear_model(scale=0.3), images(low=0.1, high=0.9), labels()
    ours = pgd(model, x, y, eps, 10, 0.01, random_init=False, targeted=targeted, early_stop=False)
    loss = nn.CrossEntropyLoss(reduction="none")
    reference = PGD(model, loss, lower_bound=0.0, upper_bound=1.0)
    reference.fgsm.zero_thresh = 0.0
    theirs = reference.perturb(
        x, radius=eps, step_size=0.01, step_num=10, target=y, targeted=targeted
    )
    assert torch.allclose(ours, theirs, atol=1e-6)


@pytest.mark.filterwarnings(CAPTUM_SETS_REQUIRES_GRAD)
@pytest.mark.parametrize("targeted", [False, True])
def test_pgd_matches_captum_on_a_cnn(targeted):
    # The use in attack_analysis.pgd_minimal_radius: no random start, Madry's step 2.5 eps / steps,
    # last iterate. captum leaves pixels with |gradient| <= 1e-6 unmoved (zero_thresh); ours steps
    # along sign() everywhere, so the oracle is run with that threshold at 0.
    model, x, y = cnn(), images(10, low=0.1, high=0.9), labels(10)
    eps, steps = 0.1, 10
    ours = pgd(model, x, y, eps, steps, random_init=False, targeted=targeted, early_stop=False)
    loss = nn.CrossEntropyLoss(reduction="none")
    reference = PGD(model, loss, lower_bound=0.0, upper_bound=1.0)
    reference.fgsm.zero_thresh = 0.0
    with frozen_eval(model):
        theirs = reference.perturb(
            x, radius=eps, step_size=2.5 * eps / steps, step_num=steps, target=y, targeted=targeted
        )
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    with torch.no_grad():
        assert torch.equal(model(ours).argmax(1), model(theirs).argmax(1))


def l2_pgd_reference(model, x0, y, eps, steps, targeted):
    """PGD in the L2 ball written out: x -/+ step * g / ||g||, radial projection, clamp [0, 1]."""
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    step, x = 2.5 * eps / steps, x0.clone()
    for _ in range(steps):
        x.requires_grad_(True)
        (g,) = torch.autograd.grad(loss_fn(model(x), y).sum(), x)
        g = g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        x = x.detach() + (-step if targeted else step) * g
        delta = x - x0
        delta = delta * (eps / delta.flatten(1).norm(dim=1)).clamp(max=1.0).view(-1, 1, 1, 1)
        x = (x0 + delta).clamp(0.0, 1.0)
    return x


@pytest.mark.parametrize("targeted", [False, True])
@pytest.mark.parametrize("eps", [0.3, 2.0])
def test_l2_pgd_matches_a_written_out_reference(eps, targeted):
    model, x, y = cnn(), images(10, low=0.1, high=0.9), labels(10)
    ours = pgd(
        model, x, y, eps, 10, random_init=False, targeted=targeted, early_stop=False, norm="l2"
    )
    with frozen_eval(model):
        theirs = l2_pgd_reference(model, x, y, eps, 10, targeted)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_one_l2_step_against_the_closed_form():
    """Two-class linear model, CE gradient (p - onehot) W: one full step lands on the sphere."""
    model, x = linear_model(classes=2), torch.full((8, 1, 28, 28), 0.5)
    y = labels(8) % 2
    with torch.no_grad():
        p = model(x).softmax(1)
    w = model[1].weight.detach()
    grad = ((p - F.one_hot(y, 2)) @ w).view_as(x)
    unit = grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    eps = 0.2  # 2.5 eps in one step is cut back to eps by the projection; no pixel hits 0 or 1
    adv = pgd(model, x, y, eps, steps=1, random_init=False, early_stop=False, norm="l2")
    torch.testing.assert_close(adv - x, eps * unit, rtol=1e-4, atol=1e-7)


def test_on_two_class_linear_models_fgsm_is_optimal_and_pgd_finds_the_same_loss():
    # For logits W x + b with two classes the cross-entropy grows with the logit margin, which is
    # linear in x: its maximum over the L-inf ball is at x + eps * sign(w_other - w_true).
    model, x = linear_model(classes=2), images(low=0.3, high=0.7)
    y = labels() % 2
    w = model[1].weight.detach()
    direction = (w[1 - y] - w[y]).sign().view_as(x)
    exact = ce(model, x + 0.1 * direction, y)
    assert torch.allclose(ce(model, fgsm(model, x, y, 0.1), y), exact, atol=1e-5)
    adv = pgd(model, x, y, 0.1, steps=20, early_stop=False)
    assert torch.allclose(ce(model, adv, y), exact, atol=1e-4)


def test_pgd_loss_is_at_least_fgsm_loss_on_the_same_batch():
    model, x, y = cnn(), images(64), labels(64)
    with torch.no_grad():
        model.layers.fc2.weight.mul_(20)  # confident logits, so the loss has room to move
    fgsm_loss = ce(model, fgsm(model, x, y, 0.1), y)
    pgd_loss = ce(model, pgd(model, x, y, 0.1, steps=40, early_stop=False), y)
    assert pgd_loss.mean() >= fgsm_loss.mean()
    assert (pgd_loss >= fgsm_loss - 1e-4).float().mean() >= 0.9


def test_targeted_pgd_reaches_the_target_of_a_linear_model():
    model, x = linear_model(scale=5.0), images(20, low=0.3, high=0.7)
    targets = torch.arange(20) % 10
    adv = pgd(model, x, targets, 0.3, steps=20, targeted=True)
    with torch.no_grad():
        assert (model(adv).argmax(1) == targets).all()


def test_restarts_only_add_successes_and_the_seed_fixes_the_result():
    model, x, y = cnn(), images(64), labels(64)
    with torch.no_grad():
        y = model(x).argmax(1)  # every image correct before the attack

    def fooled(adv):
        with torch.no_grad():
            return model(adv).argmax(1) != y

    one = pgd(model, x, y, 0.05, steps=1, restarts=1, seed=3)
    five = pgd(model, x, y, 0.05, steps=1, restarts=5, seed=3)
    assert torch.equal(one, pgd(model, x, y, 0.05, steps=1, restarts=1, seed=3))
    assert not torch.equal(one, pgd(model, x, y, 0.05, steps=1, restarts=1, seed=4))
    assert (fooled(five) | ~fooled(one)).all()  # every image fooled once stays fooled
    assert fooled(five).sum() > fooled(one).sum()
    # Without early stopping (training), restarts keep the highest final loss per image.
    last_one = pgd(model, x, y, 0.05, steps=1, restarts=1, seed=3, early_stop=False)
    last_five = pgd(model, x, y, 0.05, steps=1, restarts=5, seed=3, early_stop=False)
    assert (ce(model, last_five, y) >= ce(model, last_one, y)).all()
    assert (ce(model, last_five, y) > ce(model, last_one, y)).any()


def test_early_stop_returns_the_first_iterate_that_fooled_the_model():
    # Oracle: the same iterates written out (signed step, projection), without early stopping.
    model, x = linear_model(scale=0.3), images(64, low=0.2, high=0.8)
    with torch.no_grad():
        y = model(x).argmax(1)
    eps, step, steps = 0.1, 0.01, 10
    first, fooled, current = x.clone(), torch.zeros(len(x), dtype=torch.bool), x
    for _ in range(steps + 1):
        with torch.no_grad():
            wrong = model(current).argmax(1) != y
        first[wrong & ~fooled] = current[wrong & ~fooled]
        fooled |= wrong
        current = project(fgsm(model, current, y, step), x, eps)
    assert 0 < fooled.sum() < len(y)  # some images fooled on the way, some never
    adv = pgd(model, x, y, eps, steps=steps, step_size=step, random_init=False)
    assert torch.allclose(adv[fooled], first[fooled], atol=1e-6)
    with torch.no_grad():
        assert (model(adv).argmax(1) != y).tolist() == fooled.tolist()


def test_attacks_restore_mode_flags_and_inputs():
    model = MnistCNN("bn")
    model.train()
    model.layers.conv1.weight.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = images(), labels()
    x_copy, y_copy = x.clone(), y.clone()
    pgd(model, x, y, 0.1, steps=3, restarts=2)
    fgsm(model, x, y, 0.1)
    assert model.training
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # BN stats too
    assert torch.equal(x, x_copy) and torch.equal(y, y_copy)
    assert all(p.grad is None for p in model.parameters())


def test_objective_and_success_conventions():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    y = torch.tensor([0, 0])
    assert torch.allclose(
        attack_objective(logits, y, False), F.cross_entropy(logits, y, reduction="none")
    )
    assert torch.allclose(
        attack_objective(logits, y, True), -F.cross_entropy(logits, y, reduction="none")
    )
    assert attack_succeeded(logits, y, False).tolist() == [False, True]
    assert attack_succeeded(logits, y, True).tolist() == [True, False]


def test_bad_arguments_are_refused():
    x, y = images(), labels()
    with pytest.raises(ValueError):
        pgd(cnn(), x, y[:3], 0.1)
    with pytest.raises(TypeError):
        pgd(cnn(), x.double(), y, 0.1)
    with pytest.raises(ValueError):
        pgd(cnn(), x, y, -0.1)
    with pytest.raises(ValueError, match="norm"):
        pgd(cnn(), x, y, 0.1, norm="l1")
