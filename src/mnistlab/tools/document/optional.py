"""The optional parts: class models (O1), intermediate features (O1b), defences (O2)."""

from __future__ import annotations

from typing import Any

from ...verdicts import looks_like_a_number
from .helpers import (
    Section,
    Table,
    count,
    fixed,
    need,
    pct,
    shape,
)


def section_o1(m: dict[str, Any]) -> Section:
    """Optional 1: class models by gradient ascent on the image."""
    c = need(m, "optional", "class_model")
    plain, reg, real = need(c, "plain"), need(c, "regularised"), need(c, "real_digits")
    rise = need(c, "rise_plain")
    cfg_plain, cfg_reg = need(c, "config_plain"), need(c, "config_regularised")
    lambdas = need(cfg_plain, "l2")
    rows = [
        (
            "generating model: share assigned to the target class",
            pct(need(plain, "generator_agreement"), 0),
            pct(need(reg, "generator_agreement"), 0),
            "",
        ),
        (
            f"independent model ({need(m, 'optional', 'independent_model')}): share assigned to "
            "the target class",
            pct(need(plain, "agreement"), 0),
            pct(need(reg, "agreement"), 0),
            "",
        ),
        (
            "correlation with the class's mean training image",
            fixed(need(plain, "template_correlation")),
            fixed(need(reg, "template_correlation")),
            fixed(need(real, "template_correlation")),
        ),
        (
            "closest class template is its own class",
            pct(need(plain, "template_match"), 0),
            pct(need(reg, "template_match"), 0),
            pct(need(real, "template_match"), 0),
        ),
    ]
    selection = need(c, "step_selection", "plain")
    chosen = need(selection, "chosen_step")
    formed = next(r for r in need(selection, "by_step") if r["step_size"] == chosen)
    by_class = need(c, "plain_by_class")
    agreement = need(plain, "agreement")
    # Notebook 04's readings (mnistlab.verdicts): a second network's, then the pixels' on the real
    # digits' scale.
    reading = looks_like_a_number(
        plain, need(real, "template_correlation"), need(real, "template_match")
    )
    judge_says, resemblance, as_real = reading["judge"], reading["resemblance"], reading["as_real"]
    return Section(
        "O1",
        "Optimization over images: show 10 images for each of the 10 classes",
        [
            f"From a black (zero) image, {need(cfg_plain, 'steps')} steps of ascent on "
            "J(I) = S_c(I) − λ‖I‖² (S_c the class logit, ‖I‖² the sum of squared pixels). Left "
            f"grid, the assignment's recipe: the {len(lambdas)} images of a class take {len(lambdas)} "
            f"values of λ from {lambdas[0]:g} to {lambdas[-1]:g}; the ascent's step size is "
            f"{chosen:g}, the candidate at which the generating "
            f"network reads the most grid images as their class with probability ≥ "
            f"{need(c, 'step_selection', 'formed_probability'):g} ({pct(need(formed, 'formed_share'), 0)} "
            f"here; lowest probability over the grid "
            f"{fixed(min(need(by_class, 'generator_min_probability')), 4)}). Right grid: fixed "
            f"λ = {need(cfg_reg, 'l2'):g} plus random jitter (up to {need(cfg_reg, 'jitter')} px) "
            f"and a blur every {need(cfg_reg, 'blur_every')} steps, two image priors from the "
            "literature.",
            f"**Do those images look like a number?** {judge_says} to a second network: an "
            f"independently trained network, which took no part in the ascent or in choosing the "
            f"step, reads **{pct(agreement, 0)}** of the assignment's images as their target class "
            f"(worst class {pct(min(need(by_class, 'judge_agreement')), 0)}; jitter + blur "
            f"{pct(need(reg, 'agreement'), 0)}). By the pixels, "
            + ("as clearly as real digits" if as_real else "less clearly than real digits")
            + f": they correlate {fixed(need(plain, 'template_correlation'))} with their class's "
            f"mean training image, {pct(resemblance, 0)} of what real digits reach "
            f"({fixed(need(real, 'template_correlation'))}; jitter + blur "
            f"{fixed(need(reg, 'template_correlation'))}). They are the network's evidence for a "
            "class, strokes where that digit has them with fragments between, not pen strokes: "
            "nothing in J asks for one connected stroke on a clean background.",
            f"**Plot cost vs optimization iteration.** J rises (second figure): with the plain "
            f"recipe from {fixed(need(rise, 'mean_start'))} to {fixed(need(rise, 'mean_end'))} on "
            f"average, falling in {pct(need(rise, 'fraction_of_steps_falling'), 1)} of the steps "
            "(a fixed step sometimes overshoots a kink of the piecewise-linear network); "
            f"{pct(need(rise, 'fraction_of_images_ending_higher'), 0)} of the images end higher "
            "than they started.",
        ],
        Table(("measure", "plain L2 (λ sweep)", "jitter + blur", "real digits"), rows, "lrrr"),
    )


def section_o1b(m: dict[str, Any]) -> Section:
    """Optional 1: maximising intermediate features."""
    f = need(m, "optional", "features")
    c1, c2 = need(f, "conv1"), need(f, "conv2")
    box1, box2 = need(c1, "neuron_changed_box_max"), need(c2, "neuron_changed_box_max")
    outside = need(c1, "neuron_changed_pixels_outside_field") + need(
        c2, "neuron_changed_pixels_outside_field"
    )
    return Section(
        "O1b",
        "Maximize some intermediate conv layer features or neurons. What do you observe?",
        [
            "The same ascent on a channel's pre-activation (the input of its ReLU): the mean of "
            "each conv1 and conv2 channel over all positions, and one neuron at the centre "
            "position, all channels of a layer in one batch.",
            f"**What do you observe?** A neuron's image changes only inside its receptive field: "
            f"at most {shape(box1)} px for conv1 (receptive field {need(c1, 'receptive_field')} px) "
            f"and {shape(box2)} px for conv2 ({need(c2, 'receptive_field')} px), with "
            f"{outside} pixels changed outside. A conv1 neuron draws its own kernel: the objective "
            "is linear in the pixels, and the ascent reaches the analytic optimum to within "
            f"{need(c1, 'neuron_max_error_vs_analytic_optimum'):.1e}. A conv1 channel mean is flat "
            f"(interior pixel sd {fixed(need(c1, 'mean_image_interior_std'), 3)}), since every "
            "interior pixel meets every weight of the kernel. A conv2 channel mean fills the frame "
            "with a "
            f"texture (share of brightness in the central box "
            f"{fixed(need(c2, 'mean_image_centre_share'))}, like a uniform image): a channel mean "
            "rewards the same local pattern everywhere, and only the fully connected layers "
            "arrange the pieces in a digit's layout.",
        ],
    )


def section_o2(m: dict[str, Any]) -> Section:
    """Optional 2: defences, measured against attacks that know them."""
    d = need(m, "defenses")
    names = {
        "plain": "no defence (Part 1 model)",
        "pgd_trained": "adversarial training (PGD)",
        "binarised": "binarised input, BPDA attack",
    }
    eps = list(need(d, "plain", "pgd_accuracy"))
    rows = []
    # The undefended model first, then the named defences, then any new one.
    for key in sorted(d, key=lambda k: list(names).index(k) if k in names else len(names)):
        rec = d[key]
        if not isinstance(rec, dict) or "pgd_accuracy" not in rec:
            continue
        strong = rec.get("strong_attack", {}).get("accuracy")
        rows.append(
            (
                names.get(key, key),
                pct(need(rec, "clean_accuracy")),
                *(pct(need(rec, "pgd_accuracy", e), 1) for e in eps),
                pct(strong, 1) if strong is not None else "",
            )
        )
    trained, binar, plain = need(d, "pgd_trained"), need(d, "binarised"), need(d, "plain")
    top = eps[-1]
    cost = need(trained, "step_cost", "ratio")
    masked = need(binar, "masked_attack", "pgd_accuracy", top)
    plain_top, trained_top = need(plain, "pgd_accuracy", top), need(trained, "pgd_accuracy", top)
    binar_top = need(binar, "pgd_accuracy", top)
    targets = len(need(m, "adversarial", "noise", "success"))  # one per class, as in Part 3
    return Section(
        "O2",
        "Can you think of some ways to prevent the adversarial attacks described above?",
        [
            "Two defences, built and attacked by attacks that know them: **adversarial training** "
            "(Madry et al. 2018: fine-tune the network on PGD adversarial examples of its current "
            f"weights; here {need(trained, 'config', 'train', 'epochs')} epochs of "
            f"{need(trained, 'config', 'steps')}-step PGD at ε = "
            f"{need(trained, 'config', 'eps'):g}, from the Part 1 model) and an **input "
            "transformation** (binarise every pixel at 0.5 before the network). Untargeted L∞ attacks of radius ε on the [0, 1] scale, PGD with "
            f"{need(plain, 'pgd_steps')} steps, on {count(need(plain, 'eval_images'))} test images; "
            f"the last column is PGD-{need(trained, 'strong_attack', 'steps')} with "
            f"{need(trained, 'strong_attack', 'restarts')} restarts at ε = {top} on "
            f"{need(trained, 'strong_attack', 'n')} images.",
            f"**Adversarial training {'works' if trained_top - plain_top >= 0.5 else 'helps'}:** "
            f"under PGD at ε = {top} the undefended network keeps "
            f"{pct(plain_top, 1)} of the images, the PGD-trained one "
            f"**{pct(trained_top, 1)}**, for "
            f"{fixed(100 * (need(plain, 'clean_accuracy') - need(trained, 'clean_accuracy')))} "
            f"points of clean accuracy and {fixed(cost, 1)}× the cost of a training step. "
            f"**Binarisation helps less than it seems:** plain PGD through the rounding sees a "
            f"zero gradient and leaves {pct(masked, 1)} correct (gradient masking), but passing "
            f"the gradient straight through (BPDA) brings it to {pct(binar_top, 1)}, and to "
            f"{pct(need(binar, 'strong_attack', 'accuracy'), 1)} with restarts: "
            f"{'below' if binar_top < trained_top else 'not below'} adversarial training. Part 3's "
            f"noise attack (c), unbounded as the assignment writes it and with the same step "
            f"budget, reaches {need(trained, 'part3', 'noise_reached')} of {targets} targets on "
            f"the PGD-trained model against {need(plain, 'part3', 'noise_reached')} of {targets} "
            f"on the plain one. No defence here stops attack (a), which is not an attack on a "
            f"digit at all: from noise it still reaches {need(trained, 'part3', 'generate_reached')} "
            f"of {targets} classes on the PGD-trained model (figure), so robustness near the "
            "data says nothing about confident answers far from it. Other ways, not measured "
            "here: detecting inputs far from the data, ensembles, certified defences.",
            headline_paragraph(trained, binar),
        ],
        Table(
            (
                "model",
                "clean",
                *(f"PGD ε = {e}" for e in eps),
                f"PGD-{need(trained, 'strong_attack', 'steps')} × "
                f"{need(trained, 'strong_attack', 'restarts')}",
            ),
            rows,
            "l" + "r" * (len(eps) + 2),
        ),
    )


def headline_paragraph(trained: dict[str, Any], binar: dict[str, Any]) -> str:
    """The defended models' headline: the worst case per image over AutoAttack and PGD."""
    h_pgd, h_bin = need(trained, "headline"), need(binar, "headline")
    pgd = next(name for name in need(h_pgd, "per_attack") if name != "AutoAttack")  # PGD-40

    def masking(h: dict[str, Any], name: str) -> str:
        square = need(h, "autoattack", "fooled_by").get("square", 0)
        more = need(h, "masking_check", "pgd_more_steps_restarts_drop")
        beyond = need(h, "masking_check", "pgd_accuracy_beyond")
        far = max(beyond, key=float)
        return (
            f"{name}: Square fooled {square} image{'s' if square != 1 else ''} the white-box "
            f"attacks had not, more PGD steps and restarts took {fixed(100 * more, 1)} more "
            f"points, and PGD at ε = {far} leaves {pct(beyond[far], 1)}"
        )

    subset = (
        ""
        if h_pgd["n"] == h_bin["n"] == 10_000
        else (
            " These are seeded subsets of the test set, what AutoAttack fits in a CPU run; the "
            "full 10,000-image evaluation is still to be run on a GPU."
        )
    )
    return (
        "**The headline, as the field measures robustness:** the worst case per image over "
        "AutoAttack (Croce and Hein 2020, standard: APGD-CE, APGD-T, FAB-T and the black-box "
        f"Square) and {pgd}, at ε = {need(h_pgd, 'eps'):g}. The PGD-trained model keeps "
        f"**{pct(need(h_pgd, 'accuracy'), 1)} ± {pct(need(h_pgd, 'stderr'), 1)}** of "
        f"{count(need(h_pgd, 'n'))} test images ({pct(need(h_pgd, 'clean_accuracy'), 1)} clean "
        f"on the same images; {pgd} alone {pct(need(h_pgd, 'per_attack', pgd), 1)}); "
        f"the binarised model, attacked through BPDA, "
        f"**{pct(need(h_bin, 'accuracy'), 1)} ± {pct(need(h_bin, 'stderr'), 1)}** of "
        f"{count(need(h_bin, 'n'))} ({pgd} alone {pct(need(h_bin, 'per_attack', pgd), 1)}"
        "); ± is one standard error. Checks for gradient masking: "
        f"{masking(h_pgd, 'PGD-trained')}; {masking(h_bin, 'binarised')}.{subset}"
    )
