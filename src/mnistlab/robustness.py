"""How robust a model is, measured honestly: robust accuracy under attack, with its standard error.

Robust accuracy (`robust_accuracy`) counts an image as robust when the model classifies it
correctly AND no iterate of the attack fooled it, on the [0, 1] pixel scale, in fp32.
Used on the defences of `mnistlab.defenses` (optional question 2): FGSM and PGD at several
radii, Part 3's three attacks under one budget, and the tables and figures of notebook 05.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib.figure
import torch
from matplotlib.figure import Figure
from torch import nn
from tqdm.auto import tqdm

from . import attacks
from .model import frozen_eval
from .pgd import check_batch, fgsm, objective_and_gradient, pgd
from .train import evaluate

# ---------------------------------------------------------------------------------------------
# Evaluation


def standard_error(accuracy: float, n: int) -> float:
    """Binomial standard error of an accuracy measured on n images."""
    return math.sqrt(max(accuracy * (1.0 - accuracy), 0.0) / n) if n else float("nan")


@torch.no_grad()
def _correct(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    with frozen_eval(model):
        return model(images).argmax(1) == labels


def robust_per_image(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    eps: float,
    attack: str = "pgd",
    steps: int = 40,
    restarts: int = 1,
    step_size: float | None = None,
    surrogate: nn.Module | None = None,
    batch_size: int = 250,
    seed: int = 0,
) -> torch.Tensor:
    """Per image, whether it is robust to the attack of `robust_accuracy` (same arguments)."""
    if attack not in ("fgsm", "pgd"):
        raise ValueError(f"attack must be 'fgsm' or 'pgd', got {attack!r}")
    surrogate = model if surrogate is None else surrogate
    robust = []
    for i in range(0, len(images), batch_size):
        x, y = images[i : i + batch_size], labels[i : i + batch_size]
        correct = _correct(model, x, y)
        if eps > 0 and correct.any():
            x, y, kept = x[correct], y[correct], correct.nonzero()[:, 0]
            if attack == "fgsm":
                adv = fgsm(surrogate, x, y, eps)
            else:
                adv = pgd(surrogate, x, y, eps, steps, step_size, restarts=restarts, seed=seed + i)
            correct[kept] = _correct(model, adv, y)
        robust.append(correct)
    return torch.cat(robust) if robust else torch.zeros(0, dtype=torch.bool)


def robust_accuracy(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    eps: float,
    attack: str = "pgd",
    steps: int = 40,
    restarts: int = 1,
    step_size: float | None = None,
    surrogate: nn.Module | None = None,
    batch_size: int = 250,
    seed: int = 0,
) -> dict[str, float]:
    """Accuracy of `model` under an untargeted L-infinity attack of radius `eps`.

    `attack` is "fgsm" or "pgd" (random start, `steps`, `restarts`, Madry's step 2.5 eps / steps
    unless `step_size` is given). The attack follows the gradients of `surrogate` (default: the
    model itself; a BPDA surrogate for an input-transformation defence), and its images are
    judged by `model`. An image counts as robust when it is classified correctly both clean and
    after the attack. Returns accuracy, its standard error, n and the seconds taken.
    """
    if len(images) == 0:
        raise ValueError("no images to attack")
    start = time.perf_counter()
    robust = robust_per_image(
        model, images, labels, eps, attack, steps, restarts, step_size, surrogate, batch_size, seed
    )
    accuracy = int(robust.sum()) / len(images)
    return {
        "accuracy": accuracy,
        "stderr": standard_error(accuracy, len(images)),
        "n": len(images),
        "seconds": time.perf_counter() - start,
    }


def fixed_subset(n_total: int, n: int, seed: int) -> torch.Tensor:
    """Sorted indices of a seeded random subset of n out of n_total (the whole set if n >= n_total)."""
    if n >= n_total:
        return torch.arange(n_total)
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))[:n].sort().values


def evaluate_defense(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    eps_values: Sequence[float],
    steps: int = 40,
    surrogate: nn.Module | None = None,
    with_fgsm: bool = True,
    progress: bool = True,
    desc: str = "",
) -> dict[str, Any]:
    """Clean accuracy, and accuracy under FGSM and PGD-`steps` (random start) at each eps.

    Accuracies under attack are keyed by the eps as a string ("0.1", ...), with PGD's standard
    errors; the attacks follow `surrogate`'s gradients when one is given (BPDA).
    """
    record: dict[str, Any] = {
        "clean_accuracy_subset": evaluate(model, images, labels)["accuracy"],
        "eval_images": len(images),
        "pgd_steps": steps,
        "fgsm_accuracy": {},
        "pgd_accuracy": {},
        "pgd_stderr": {},
    }
    start = time.perf_counter()
    for eps in tqdm(eps_values, desc=desc or "eps", disable=not progress):
        key = f"{eps:g}"
        if with_fgsm:
            fgsm_result = robust_accuracy(model, images, labels, eps, "fgsm", surrogate=surrogate)
            record["fgsm_accuracy"][key] = fgsm_result["accuracy"]
        result = robust_accuracy(model, images, labels, eps, "pgd", steps, surrogate=surrogate)
        record["pgd_accuracy"][key] = result["accuracy"]
        record["pgd_stderr"][key] = result["stderr"]
    record["eval_seconds"] = time.perf_counter() - start
    return record


def input_gradient_norm(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """L1 norm per image of the loss gradient w.r.t. the input: 0 means gradient attacks are blind."""
    with frozen_eval(model):
        _, _, grad = objective_and_gradient(model, images, labels, targeted=False)
    return grad.flatten(1).abs().sum(1)


# ---------------------------------------------------------------------------------------------
# AutoAttack, and the headline: the worst case per image over every attack

AUTOATTACK_VERSIONS = ("standard", "plus")


def _autoattack_class() -> type:
    try:
        from pyautoattack import AutoAttack
    except ImportError as error:  # an optional extra: a student's install stays small
        raise ModuleNotFoundError(
            "AutoAttack needs the optional package pyautoattack: pip install 'mnistlab[robust]'"
        ) from error
    return AutoAttack


def _check_suite_inputs(images: torch.Tensor, labels: torch.Tensor, eps: float) -> None:
    check_batch(images, labels, eps)
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if len(images) == 0:
        raise ValueError("no images to attack")
    if images.min() < 0 or images.max() > 1:
        raise ValueError(
            "AutoAttack's radius is on the [0, 1] pixel scale: images must lie in [0, 1], got "
            f"[{images.min().item():.3g}, {images.max().item():.3g}]"
        )


def autoattack_robust(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    eps: float = 0.3,
    version: str = "standard",
    seed: int = 0,
    batch_size: int = 250,
    progress: bool = False,
    judge: nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """Per image, robust or not after each attack of AutoAttack (Croce and Hein 2020, L-infinity).

    AutoAttack (arXiv:2003.01690, the authors' package `pyautoattack`) runs its attacks in turn,
    each on the images no earlier one fooled: "standard" is APGD-CE, APGD-T (9 target classes),
    FAB-T (9 targets) and the black-box Square attack (5,000 queries). It is run here one
    attack per call, which is what its `run_standard_evaluation` does inside, so that the
    images left after every attack are kept. Each adversarial image is judged again by `judge`
    (default: `model`, the network attacked) and checked to lie in the eps ball and in [0, 1]. Images in [0, 1], shape (N, C, H, W);
    `model` returns logits. For an input-transformation defence pass its BPDA surrogate: the
    defence's exact forward pass, with the straight-through gradient.

    Returns {"clean": correct clean, attack: still robust after it, ...} in the suite's order;
    the last entry is the worst case over the suite. Weights, mode, inputs and torch's global
    random state (the package reseeds it) are left as they were.
    """
    if version not in AUTOATTACK_VERSIONS:
        raise ValueError(f"version must be one of {AUTOATTACK_VERSIONS}, got {version!r}")
    _check_suite_inputs(images, labels, eps)
    auto_attack = _autoattack_class()
    judge = model if judge is None else judge
    # The package seeds every CUDA device's generator too, whatever device the images are on.
    devices = list(range(torch.cuda.device_count()))
    robust = {"clean": _correct(judge, images, labels)}
    alive = robust["clean"].clone()
    with frozen_eval(model), torch.random.fork_rng(devices=devices):
        suite = auto_attack(model, eps=eps, version=version, seed=seed, device=images.device)
        order = list(suite.attacks_to_run)
        for attack in tqdm(order, desc="AutoAttack", disable=not progress):
            kept = alive.nonzero()[:, 0]
            if len(kept):
                x, y = images[kept], labels[kept]
                suite.attacks_to_run = [attack]
                adv, _ = suite.run_standard_evaluation(x, y, batch_size=batch_size)
                distance = (adv - x).abs().flatten(1).amax(1).max().item()
                if distance > eps + 1e-5 or adv.min() < 0 or adv.max() > 1:
                    raise RuntimeError(f"{attack} left the eps ball or [0, 1] ({distance:.4g})")
                alive[kept] = _correct(judge, adv, y)
            robust[attack] = alive.clone()
    return robust


def _suite_summary(robust: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Accuracies of `autoattack_robust`'s result: clean, after each attack, and in the end."""
    n = len(robust["clean"])
    names = list(robust)
    accuracy = int(robust[names[-1]].sum()) / n
    return {
        "n": n,
        "attacks": names[1:],
        "clean_accuracy": int(robust["clean"].sum()) / n,
        "accuracy_after": {k: int(robust[k].sum()) / n for k in names[1:]},
        # Images each attack fooled that every earlier one had not: Square (black-box) fooling
        # images the white-box attacks could not is AutoAttack's sign of gradient masking.
        "fooled_by": {
            k: int(robust[prev].sum() - robust[k].sum())
            for prev, k in zip(names, names[1:], strict=False)
        },
        "accuracy": accuracy,
        "stderr": standard_error(accuracy, n),
    }


def autoattack_accuracy(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    eps: float = 0.3,
    version: str = "standard",
    seed: int = 0,
    batch_size: int = 250,
    progress: bool = False,
) -> dict[str, Any]:
    """AutoAttack's robust accuracy: after each attack, the worst case per image over the suite.

    Also the clean accuracy on the same images, n, the standard error and the seconds taken
    (see `autoattack_robust` for the attacks and the arguments).
    """
    start = time.perf_counter()
    robust = autoattack_robust(model, images, labels, eps, version, seed, batch_size, progress)
    summary = _suite_summary(robust)
    return summary | {
        "eps": eps,
        "version": version,
        "seed": seed,
        "seconds": time.perf_counter() - start,
    }


def worst_case(robust: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Accuracy under each attack and under the worst case per image over all of them.

    `robust` maps attack names to per-image robust flags on the same images. Also counts the
    images that one attack alone fooled (what the worst case owes to that attack), with n and
    the standard error of the worst case.
    """
    if not robust:
        raise ValueError("no attacks to combine")
    names = list(robust)
    flags = torch.stack([robust[k].bool().cpu() for k in names])
    n = flags.shape[1]
    worst = flags.all(0)
    accuracy = int(worst.sum()) / n
    others_missed = [
        flags[[j for j in range(len(names)) if j != i]].all(0) for i in range(len(names))
    ]
    return {
        "n": n,
        "accuracy": accuracy,
        "stderr": standard_error(accuracy, n),
        "per_attack": {k: int(flags[i].sum()) / n for i, k in enumerate(names)},
        "fooled_only_by": {
            k: int((~flags[i] & others_missed[i]).sum()) for i, k in enumerate(names)
        },
    }


def headline_robustness(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    eps: float,
    surrogate: nn.Module | None = None,
    pgd_runs: Sequence[tuple[int, int]] = ((40, 1),),
    version: str = "standard",
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """A defended model's headline robust accuracy: the worst case per image over AutoAttack and PGD.

    AutoAttack (`version`) and PGD-steps with restarts for each (steps, restarts) in `pgd_runs`
    attack the same images; an image counts as robust only when no attack fooled it. Attacks
    follow the gradients of `surrogate` (default: the model; a BPDA surrogate, whose forward
    pass must be the model's) and are judged by `model`. Returns the worst case with n and its
    standard error, each attack's accuracy, AutoAttack's summary, the images only one attack
    fooled, the clean accuracy on the same images and the seconds per attack.
    """
    surrogate = model if surrogate is None else surrogate
    if surrogate is not model and not torch.equal(
        _correct(model, images, labels), _correct(surrogate, images, labels)
    ):
        raise ValueError("the surrogate's forward pass must classify the images like the model")
    seconds = {}
    start = time.perf_counter()
    suite = autoattack_robust(
        surrogate, images, labels, eps, version, seed, progress=progress, judge=model
    )
    seconds["AutoAttack"] = time.perf_counter() - start
    robust = {"AutoAttack": suite[list(suite)[-1]]}
    for steps, restarts in pgd_runs:
        name = f"PGD-{steps}" + (f" x {restarts} restarts" if restarts > 1 else "")
        start = time.perf_counter()
        robust[name] = robust_per_image(
            model, images, labels, eps, "pgd", steps, restarts, surrogate=surrogate, seed=seed
        )
        seconds[name] = time.perf_counter() - start
    return worst_case(robust) | {
        "eps": eps,
        "clean_accuracy": int(suite["clean"].sum()) / len(images),
        "autoattack": _suite_summary(suite) | {"version": version, "seed": seed},
        "seconds": seconds,
    }


# ---------------------------------------------------------------------------------------------
# Part 3's attacks against a model


@dataclass
class Part3Budget:
    """The settings of Part 3's three attacks (notebook 03's defaults), the same for every model."""

    noise_std: float = 0.1  # (a), (b): Gaussian start around grey level 128, [0, 1] scale
    step_size: float = 0.02  # (a), (b): x + step_size * dC/dx
    iterations: int = 200  # (a), (b)
    beta: float = 100.0  # (b): weight of the MSE to the target image
    noise_max_iterations: int = 1000  # (c): alpha = 1 / std(d) steps until softmax >= 0.99
    seed: int = 0


def part3_success(
    model: nn.Module,
    budget: Part3Budget,
    target_images: torch.Tensor,
    sources: torch.Tensor,
    surrogate: nn.Module | None = None,
) -> tuple[dict[str, float], dict[str, attacks.AttackResult]]:
    """How many of the 10 targets (classes 0..9) Part 3's three attacks reach within `budget`.

    (a) generate a digit from Gaussian noise; (b) from the same noise, the targeted attack that
    also pulls the image towards `target_images` (row t: a digit other than t); (c) additive
    noise on `sources` (row t: a correctly classified test image of another class). A target is
    reached when it is the predicted class with softmax >= 0.99. The attacks follow the gradients
    of `surrogate` (default the model; a BPDA surrogate for an input transformation) and the
    images are judged by `model`. Also returns (b)'s mean MSE to its target images and (c)'s
    median noise norms and steps, and the attacks' results (images, noise) by name.
    """
    surrogate = model if surrogate is None else surrogate
    device = target_images.device
    targets = torch.arange(attacks.NUM_CLASSES, device=device)
    start = attacks.gaussian_start(len(targets), budget.noise_std, budget.seed, device=device)
    made = {
        "generate": attacks.generate_digit(
            surrogate, start, targets, budget.step_size, budget.iterations
        ),
        "targeted": attacks.targeted_attack(
            surrogate,
            start,
            targets,
            target_images,
            budget.beta,
            budget.step_size,
            budget.iterations,
        ),
        "noise": attacks.noise_attack(surrogate, sources, targets, budget.noise_max_iterations),
    }
    out: dict[str, float] = {}
    with torch.no_grad(), frozen_eval(model):
        for name, result in made.items():
            probs = model(result.images).softmax(1)
            confidence = probs.gather(1, targets[:, None])[:, 0]
            reached = (probs.argmax(1) == targets) & (confidence >= attacks.CONFIDENT)
            out[f"{name}_reached"] = int(reached.sum())
    out["targeted_mse"] = (
        attacks.mse_per_image(made["targeted"].images, target_images).mean().item()
    )
    norms = attacks.perturbation_norms(made["noise"].images - sources)
    out["noise_linf_median"] = norms["linf"].median().item()
    out["noise_l2_median"] = norms["l2"].median().item()
    out["noise_steps_median"] = made["noise"].steps.float().median().item()
    return out, made


# ---------------------------------------------------------------------------------------------
# Tables and figures


PART3_KEYS = ("generate_reached", "targeted_reached", "noise_reached")


def results_table(rows: dict[str, dict[str, Any]], eps_values: Sequence[float]) -> str:
    """A Markdown table: per model, clean / FGSM / PGD-40 accuracy (%) and Part 3's counts."""
    keys = [f"{e:g}" for e in eps_values]
    head = ["model", "clean"] + [f"FGSM {k}" for k in keys] + [f"PGD {k}" for k in keys]
    head += ["(a) reached", "(b) reached", "(c) reached"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]

    def pct(record: dict[str, Any], key: str, k: str, err: bool = False) -> str:
        if k not in record.get(key, {}):
            return "-"
        text = f"{100 * record[key][k]:.1f}"
        return text + f" ± {100 * record['pgd_stderr'][k]:.1f}" if err else text

    for name, r in rows.items():
        cells = [name, f"{100 * r['clean_accuracy']:.2f}"]
        cells += [pct(r, "fgsm_accuracy", k) for k in keys]
        cells += [pct(r, "pgd_accuracy", k, err=True) for k in keys]
        p3 = r.get("part3", {})
        cells += [f"{p3[a]}/10" if a in p3 else "-" for a in PART3_KEYS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_accuracy_vs_eps(rows: dict[str, dict[str, Any]]) -> matplotlib.figure.Figure:
    """Accuracy (%) against eps per model: PGD solid with standard errors, FGSM dashed.

    Rows flagged `masked` (an attack blinded by the defence's zero gradient) are drawn grey and
    dotted: they show gradient masking, not robustness.
    """
    fig = Figure(figsize=(7.5, 4.8))
    ax = fig.subplots()
    colors = iter(f"C{i}" for i in range(10))
    for name, r in rows.items():
        masked = r.get("masked", False)
        color = "0.55" if masked else next(colors)
        keys = sorted(r["pgd_accuracy"], key=float)
        eps = [0.0] + [float(k) for k in keys]
        clean = r.get("clean_accuracy_subset", r["clean_accuracy"])  # same images as the attacks
        acc = [clean] + [r["pgd_accuracy"][k] for k in keys]
        err = [0.0] + [r["pgd_stderr"][k] for k in keys]
        ax.errorbar(
            eps,
            [100 * a for a in acc],
            yerr=[100 * e for e in err],
            color=color,
            capsize=3,
            marker="o",
            ls=":" if masked else "-",
            label=name if masked else f"{name}: {r.get('pgd_label', 'PGD')}",
        )
        if r.get("fgsm_accuracy"):
            fk = sorted(r["fgsm_accuracy"], key=float)
            fgsm_acc = [clean] + [r["fgsm_accuracy"][k] for k in fk]
            ax.plot(
                [0.0] + [float(k) for k in fk],
                [100 * a for a in fgsm_acc],
                color=color,
                ls="--",
                marker="x",
                alpha=0.8,
                label=f"{name}: FGSM",
            )
    ax.set_xlabel("L-infinity radius eps (pixels in [0, 1])")
    ax.set_ylabel("test accuracy under attack (%)")
    ax.set_ylim(-2, 102)
    ax.set_xticks([0.0, 0.1, 0.2, 0.3])
    ax.set_title("Accuracy under untargeted attacks (error bars: one standard error)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return fig


def plot_image_rows(
    rows: dict[str, tuple[torch.Tensor, list[str], list[bool]]], title: str
) -> matplotlib.figure.Figure:
    """A grid of images: one row per entry (label: (images, titles, highlight)), grey 0 to 1.

    Titles flagged in `highlight` are drawn red (e.g. a wrong prediction).
    """
    n_rows = len(rows)
    n_cols = max(len(images) for images, _, _ in rows.values())
    fig = Figure(figsize=(1.25 * n_cols + 1.6, 1.45 * n_rows + 0.5))
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for r, (label, (images, titles, highlight)) in enumerate(rows.items()):
        for c in range(n_cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(images):
                ax.axis("off")
                continue
            ax.imshow(images[c, 0].detach().cpu(), cmap="gray", vmin=0.0, vmax=1.0)
            ax.set_title(titles[c], fontsize=7, color="red" if highlight[c] else "black")
        axes[r, 0].set_ylabel(label, fontsize=8, rotation=0, ha="right", va="center")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_headline(headline: dict[str, dict[str, Any]]) -> matplotlib.figure.Figure:
    """Per defended model, accuracy (%) under each attack and the worst case per image over all.

    AutoAttack's bars are cumulative (each attack runs on what the earlier ones left); error
    bars are one standard error of the worst case, which is the headline.
    """
    fig = Figure(figsize=(7.5, 1.0 + 2.2 * len(headline)))
    axes = fig.subplots(len(headline), 1, squeeze=False)[:, 0]
    for ax, (name, h) in zip(axes, headline.items(), strict=True):
        pgd_names = [k for k in h["per_attack"] if k != "AutoAttack"]
        labels = ["clean"] + pgd_names
        values = [h["clean_accuracy"]] + [h["per_attack"][k] for k in pgd_names]
        steps = h["autoattack"]["accuracy_after"]
        labels += [("AutoAttack: " if i == 0 else "+ ") + k.upper() for i, k in enumerate(steps)]
        values += list(steps.values())
        labels.append("worst case per image")
        values.append(h["accuracy"])
        colors = ["0.7"] + ["C0"] * len(pgd_names) + ["C1"] * len(steps) + ["C3"]
        y = list(range(len(labels)))[::-1]
        ax.barh(y, [100 * v for v in values], color=colors)
        ax.errorbar(100 * h["accuracy"], y[-1], xerr=100 * h["stderr"], color="k", capsize=3)
        ends = [100 * v for v in values[:-1]] + [100 * (h["accuracy"] + h["stderr"])]
        for yi, v, end in zip(y, values, ends, strict=True):
            ax.text(end + 0.3, yi, f"{100 * v:.1f}", va="center", fontsize=7)
        ax.set_yticks(y, labels, fontsize=7.5)
        low = 100 * min(values)
        ax.set_xlim(max(0.0, low - 10), 101)
        ax.set_title(f"{name}: eps {h['eps']:g}, {h['n']:,} test images", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[-1].set_xlabel("test accuracy under attack (%)")
    fig.tight_layout()
    return fig
