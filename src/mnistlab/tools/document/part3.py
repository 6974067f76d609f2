"""Part 3: adversarial examples, questions (a), (b) and (c)."""

from __future__ import annotations

import statistics
from typing import Any

from ...attacks import CONFIDENT
from .helpers import (
    Section,
    Table,
    fixed,
    need,
    of_ten,
    pct,
    product,
)


def section_3a(m: dict[str, Any]) -> Section:
    """(a) Non-targeted attack: generating digits from noise."""
    a = need(m, "adversarial", "nontargeted")
    confidence = need(a, "confidence")
    mse = need(a, "nearest_train_mse")
    ratio = need(mse, "generated") / need(mse, "real")
    look = (
        f"**No**: they are {fixed(ratio, 0)} times farther from the nearest training image than "
        "real digits are"
        if ratio > 3
        else f"**Somewhat**: they are {fixed(ratio, 1)} times as far from the nearest training "
        "image as real digits are"
    )
    return Section(
        "3a",
        "Non-Targeted Attack: show the generated image for each of the classes of MNIST",
        [
            f"From Gaussian noise around grey level 128 (sd {need(a, 'noise_std')} on the [0, 1] "
            f"scale), {need(a, 'iterations')} steps of x = x + {need(a, 'step_size')} · dC/dx with "
            "C = logits[target], one image per target class, pixels clamped to [0, 1].",
            f"**Is the network always predicting a digit with high confidence for the generated "
            f"images?** {'Yes' if need(a, 'success') == len(confidence) else 'Not always'}: the "
            f"target is predicted with confidence ≥ {CONFIDENT} for "
            f"**{need(a, 'success')} of {len(confidence)}** classes (lowest confidence "
            f"{fixed(min(confidence), 4)}).",
            f"**Do the generated images look like a number? If not, why?** {look} (mean squared "
            f"pixel error {fixed(need(mse, 'generated'), 4)} against {fixed(need(mse, 'real'), 4)}). "
            f"Yet an independently trained network reads the target class in "
            f"{need(a, 'other_model_agrees')} of {len(confidence)}: the pictures carry class "
            "evidence, stroke fragments, on a noise background no real digit has. Nothing in "
            "C = logits[target] asks the image to stay among the digits the network was trained "
            "on, and the softmax saturates long before the picture becomes a digit.",
            "**Plot the cost function. Is it increasing or decreasing?** Increasing (second "
            "figure, one curve per class): every step moves x along the gradient of C, plain "
            "gradient ascent.",
        ],
    )


def section_3b(m: dict[str, Any]) -> Section:
    """(b) Targeted attack: look like one digit, be read as another."""
    t = need(m, "adversarial", "targeted")
    beta = need(t, "beta")
    confidence = need(t, "confidence")
    n = len(confidence)
    reached = sum(c >= CONFIDENT for c in confidence)
    sweep = need(t, "beta_sweep")
    rows = [
        (
            f"{need(r, 'beta'):g}",
            f"{need(r, 'success')} of {n}",
            fixed(need(r, "mean_confidence"), 4),
            fixed(need(r, "mean_mse"), 4),
            f"{need(r, 'closer_to_target')} of {n}",
        )
        for r in sweep
    ]
    reads_image = need(t, "other_model_reads_target_image_digit")
    chosen = next(r for r in sweep if r["beta"] == beta)
    closer = need(chosen, "closer_to_target")
    mse_target, mse_start = need(t, "mse_target"), need(t, "mse_start")
    f = need(t, "from_target_image")
    f_beta, f_reads = need(f, "beta"), need(f, "other_model_reads_target_image_digit")
    f_sweep = need(f, "beta_sweep")
    all_reached = [r for r in f_sweep if need(r, "success") == n]
    most_digit = max(f_sweep, key=lambda r: (need(r, "judge_reads_image_digit"), r["beta"]))
    from_image = (
        "**Started from the target image itself** (the imperceptible case the question is "
        "about; the same cost, step and number of steps, each picture stopped once its target is "
        f"reached): the chosen **β = {f_beta:g}** ({need(f, 'beta_grey_levels'):.3g} in 0..255 "
        "units) is the one at which every target is reached and an independent network most "
        f"often still reads the target image's digit. There {need(f, 'success')} of {n} targets "
        f"are reached and the independent network reads the image's digit in **{f_reads} of "
        f"{n}** (the target class in {need(f, 'other_model_reads_target_class')}); the pictures "
        f"change by up to {fixed(max(need(f, 'linf')))} on the [0, 1] scale (L∞). "
        + (
            "So an image that still looks like its digit is read as another class."
            if need(f, "qualifies")
            else f"Across the sweep, wherever every target is reached ({len(all_reached)} β "
            "values) the independent network reads the image's digit in at most "
            f"{max((need(r, 'judge_reads_image_digit') for r in all_reached), default=0)} of "
            f"{n}, and where it reads it most ({need(most_digit, 'judge_reads_image_digit')} of "
            f"{n}, β = {need(most_digit, 'beta'):g}) only {need(most_digit, 'success')} targets "
            "are reached: at no β does this gradient ascent turn the 10 target images into "
            "adversarial examples at once; where it reaches the targets it changes the picture "
            "in ways a second network reads too."
        )
    )
    return Section(
        "3b",
        "Targeted Attack: do the generated images now look like a number?",
        [
            f"**Show the generated image for each of the classes of MNIST** (first figure: target "
            "images above, generated images below). C = logits[target] − β · mse(x, target image), "
            "from the same noise and steps as (a); "
            "the target image for class t is a validation image of digit (t + 1) mod 10. β is "
            f"swept (table, third figure); the chosen **β = {beta:g}** "
            f"({need(t, 'beta_grey_levels'):.3g} in the assignment's 0..255 units) is the largest "
            "at which every "
            f"target is reached (confidence ≥ {CONFIDENT}) and every picture is closer to its "
            f"target image than to the starting noise. There {reached} of {n} targets are reached, "
            f"and the mean MSE to the target image is {fixed(statistics.fmean(mse_target), 4)} "
            f"(from {fixed(statistics.fmean(mse_start), 4)} at the start).",
            f"**Do the generated images now look like a number?** Partly: every picture is closer "
            f"to its target image than to the starting noise ({closer} of {n}), but an independent "
            f"network reads the target image's digit in {reads_image} of {n} of them, so at this β the ascent still draws strokes of the "
            "attacked class over the target image. A larger β looks more like the target image "
            "and fools less often (table)."
            if reads_image < n / 2
            else f"**Do the generated images now look like a number?** Yes: an independent "
            f"network reads the target image's digit in {reads_image} of {n} of them, while the "
            "attacked network reads the target class.",
            from_image,
        ],
        Table(
            ("β", "reached", "mean confidence", "mean MSE to target image", "closer to target"),
            rows,
            "rrrrr",
        ),
    )


def section_3c(m: dict[str, Any]) -> Section:
    """(c) Additive noise."""
    a = need(m, "adversarial", "noise")
    success, steps = need(a, "success"), need(a, "steps")
    l2, linf = need(a, "l2"), need(a, "linf")
    transfer, pgd = need(a, "transfer"), need(a, "pgd")
    white_l2 = product(need(m, "layers")[0]["input_shape"]) ** 0.5  # every pixel 1
    ball = need(a, "linf_ball")
    radii, in_ball, pgd_in_ball = (
        need(ball, "radii"),
        need(ball, "success"),
        need(ball, "pgd_success"),
    )
    pairs = need(ball, "pairs")
    budget = (
        "**Within an L∞ budget** (the same update, the noise clipped to [−r, r] after every "
        "step; next to it the pairs targeted PGD solves within r; last figure): "
        + ", ".join(
            f"r = {r:g} ({255 * r:.0f} grey levels): {a_} of {pairs} (PGD {b_})"
            for r, a_, b_ in zip(radii, in_ball, pgd_in_ball, strict=True)
        )
        + "."
    )
    return Section(
        "3c",
        "Adding Noise: show the generated adversarial image, and the noise for each of the "
        "classes of MNIST",
        [
            "For each target t a correctly classified test image of digit (t + 1) mod 10 gets a "
            "noise that starts at zero and grows by noise = noise + α · dC/dnoise with "
            "α = 1 / (d.std() + 1e-8) on the assignment's 0..255 pixels (a step whose standard "
            "deviation is one grey level, 1/255 on the [0, 1] scale the network takes), until the "
            "target's "
            f"probability reaches {CONFIDENT}.",
            f"Targets reached: **{of_ten(success)}**, after {min(steps)} to {max(steps)} steps "
            f"(median {statistics.median(steps):g}). Noise size on the [0, 1] scale: median L2 "
            f"{fixed(statistics.median(l2))} (an all-white image has {fixed(white_l2, 0)}), median L∞ "
            f"{fixed(statistics.median(linf))}: the rule follows the raw gradient with no budget "
            "per pixel, so it changes a few pixels a lot: it is "
            f"{fixed(need(pgd, 'median_ratio_l2'))}× (L2) and "
            f"{fixed(need(pgd, 'median_ratio_linf'))}× (L∞) the size of a targeted PGD's on the "
            "same pairs (median ratios, last figure).",
            f"**Sample a fixed set of 10 test examples, add the adversarial noise and classify; "
            f"repeat for all 10 noise matrices** (the 10 × 10 figure: true and predicted class "
            f"of each pair). The prediction becomes the noise's target in "
            f"**{pct(need(transfer, 'target_rate'), 0)}** of the eligible pairs and changes at all "
            f"in {pct(need(transfer, 'changed_rate'), 0)}: each noise was grown until its own "
            "image just flipped, so it is tuned to that image and mostly does not carry over.",
            budget,
        ],
    )
