"""Part 1: MNIST classification, questions 1.1 to 1.6."""

from __future__ import annotations

import statistics
from typing import Any

from ...pipeline import VAL_SIZE
from ...results import mean_sd
from ...verdicts import NOISE_T, welch_reading
from .helpers import (
    Section,
    Table,
    count,
    fixed,
    kernel_side,
    need,
    pct,
    product,
    shape,
    variant,
)

TOO_FEW = "Too few seeds to judge"


def section_1_1(m: dict[str, Any]) -> Section:
    """Training curves and the test accuracy."""
    c = need(m, "classification")
    best, config = need(c, "best"), need(c, "config")
    first = need(c, "first_epoch_config")
    n_test = sum(map(sum, need(c, "confusion_matrix")))
    return Section(
        "1.1",
        "Show the plot of training error, validation error and prediction accuracy as the "
        "training progresses",
        [
            f"Training error (running error on the augmented training batches), validation error "
            f"and validation accuracy, recorded {need(config, 'evals_per_epoch')} times per epoch, "
            f"for every run of the batch-norm study ({len(need(c, 'seeds'))} seeds per variant, "
            f"{need(config, 'epochs')} epochs each) and for the final model "
            f"({variant(need(best, 'variant'))}, {need(best, 'epochs')} epochs, drawn thick). "
            "Recipe: SGD with Nesterov momentum, a one-cycle schedule (it cycles the momentum "
            f"with the learning rate, which peaks at {need(config, 'lr'):g}), weight decay "
            f"{need(config, 'weight_decay'):g}, "
            f"batch {need(config, 'batch_size')}, random shifts of up to "
            f"{need(config, 'max_shift')} px; each run keeps the weights of its best validation "
            "check. Every choice is made on a validation split carved from the training images "
            f"({count(VAL_SIZE)} of them); the test set only reports. One exception is stated in "
            "the notebook: "
            "the final-model rule (the better variant's recipe, trained longer) replaced an "
            "earlier one (the single run with the best validation accuracy) after a run had shown "
            "both candidates' test accuracies; here the earlier rule would have picked "
            f"{need(c, 'final', 'highest_single_val_accuracy_run', 'run')} (test accuracy "
            f"{pct(need(c, 'final', 'highest_single_val_accuracy_run', 'test_accuracy'))}).",
            f"**Average prediction accuracy for the whole test set of {count(n_test)} images:** "
            f"**{pct(need(best, 'test_accuracy'))}** for the final model "
            f"({need(best, 'test_errors')} errors; validation accuracy "
            f"{pct(need(best, 'val_accuracy'))} at its best check, whose weights it keeps). The {need(config, 'epochs')}-epoch study gives "
            f"{mean_sd(need(c, 'plain', 'test_accuracy'))} for the plain network and "
            f"{mean_sd(need(c, 'bn', 'test_accuracy'))} with batch norm (mean ± sd over seeds). "
            f"A separate run with the whole schedule squeezed into one epoch (its own recipe, "
            f"chosen on validation: the {variant(need(first, 'variant'))} network, batch "
            f"{need(first, 'batch_size')}, peak learning rate {need(first, 'lr'):g}, "
            f"{fixed(need(c, 'first_epoch_seconds'), 1)} s) reaches "
            f"{pct(need(c, 'first_epoch_test_accuracy'))} after that single epoch.",
        ],
    )


def section_1_2(m: dict[str, Any]) -> Section:
    """Random test images with their true and predicted class."""
    c = need(m, "classification")
    matrix = need(c, "confusion_matrix")
    n_test = sum(map(sum, matrix))
    errors = n_test - sum(matrix[i][i] for i in range(len(matrix)))
    worst, true, predicted = max(
        (matrix[i][j], i, j) for i in range(len(matrix)) for j in range(len(matrix)) if i != j
    )
    return Section(
        "1.2",
        "Plot randomly selected test images showing the true class label as well as predicted "
        "class label",
        [
            "Test images drawn at random (fixed seed), each titled with its test-set index, true "
            "class, predicted class and the predicted probability; mistakes are drawn in red.",
            f"Below them, the first 24 of the final model's mistakes on the test set and the "
            f"confusion matrix of "
            f"all {count(n_test)} test images: {errors} errors, the most frequent a true {true} "
            f"read as {predicted} ({worst} times).",
        ],
    )


def section_1_3(m: dict[str, Any]) -> Section:
    """The input and output dimensions of every layer."""
    layers = need(m, "layers")
    by_name = {need(row, "name"): row for row in layers}
    rows = [
        (
            need(r, "name"),
            need(r, "kind"),
            shape(need(r, "input_shape")),
            shape(need(r, "output_shape")),
        )
        for r in layers
    ]
    convs = [r for r in layers if r["kind"] == "Conv2d"]
    pools = [r for r in layers if r["kind"] == "MaxPool2d"]
    flat = by_name.get("flatten", layers[-1])
    k = kernel_side(convs[0])
    f = pools[0]["input_shape"][-1] // pools[0]["output_shape"][-1]
    sizes = " → ".join(
        ["×".join(map(str, convs[0]["input_shape"][1:]))]
        + ["×".join(map(str, p["output_shape"][1:])) for p in pools]
    )
    return Section(
        "1.3",
        "Write down the dimensions of the input and output at each layer",
        [
            f"Per image: channels × height × width, or features. The {k}×{k} convolutions "
            f"(stride 1, zero padding 1) keep height and width; each {f}×{f} max-pool with stride "
            f"{f} divides them by {f} ({sizes}); flatten gives fc1 its {shape(flat['output_shape'])} inputs. The softmax "
            f"turns fc2's {shape(layers[-1]['output_shape'])} logits into class probabilities "
            "(it is applied in the loss, so the network outputs logits).",
        ],
        Table(("layer", "type", "input", "output"), rows, "llrr"),
    )


def section_1_4(m: dict[str, Any]) -> Section:
    """Exact parameter counts."""
    params, params_bn = need(m, "params"), need(m, "params_bn")
    total, conv, fc = need(params, "total"), need(params, "conv"), need(params, "fc")
    rows = []
    for r in need(m, "layers"):
        if not r["params"]:
            continue
        out_dim, in_dim = r["output_shape"][0], r["input_shape"][0]
        if r["kind"] == "Conv2d":
            side = kernel_side(r)
            how = f"{out_dim} × {in_dim} × {side} × {side} weights + {out_dim} biases"
        else:
            how = f"{out_dim} × {in_dim} weights + {out_dim} biases"
        rows.append((r["name"], how, count(r["params"])))
    rows += [
        ("convolutional layers", "", count(conv)),
        ("fully connected layers", "", count(fc)),
        ("total", "", count(total)),
    ]
    fc1 = next(r["params"] for r in m["layers"] if r["kind"] == "Linear")
    return Section(
        "1.4",
        "Exactly how many parameters does your network have?",
        [
            f"**{count(total)} parameters. How many in the fully connected layers and how many in "
            f"the convolutional layers?** **{count(fc)}** in the fully connected layers "
            f"({pct(fc / total, 1)} of all; the first alone has {count(fc1)}) and **{count(conv)}** "
            "in the convolutional layers. Pooling, ReLU and flatten have none.",
            f"The batch-norm variant adds {count(need(params_bn, 'bn'))} trainable BN parameters "
            f"(a scale and a shift per channel or unit): {count(need(params_bn, 'total'))} in all.",
        ],
        Table(("layer", "what", "parameters"), rows, "llr"),
    )


def section_1_5(m: dict[str, Any]) -> Section:
    """Exact neuron counts, with the convention stated."""
    neurons = need(m, "neurons")
    per_layer = [
        f"{r['name']} {shape(r['output_shape'])} = {count(product(r['output_shape']))}"
        if len(r["output_shape"]) > 1
        else f"{r['name']} {count(r['output_shape'][0])}"
        for r in need(m, "layers")
        if r["kind"] in ("Conv2d", "Linear")
    ]
    conv_parts = [p for p, r in zip(per_layer, _weighted(m), strict=True) if r == "Conv2d"]
    fc_parts = [p for p, r in zip(per_layer, _weighted(m), strict=True) if r == "Linear"]
    labels = {
        "with_pooling_outputs": "counting pooling outputs too",
        "with_input_pixels": "counting the input pixels too",
        "hidden_only_without_output_layer": "hidden neurons only, without the output logits",
        "one_per_filter_or_unit": "one per filter or unit (the weight-sharing view)",
    }
    others = "; ".join(
        f"{labels.get(k, k.replace('_', ' '))} {count(v)}"
        for k, v in need(neurons, "alternatives").items()
    )
    return Section(
        "1.5",
        'Exactly how many "neurons" does your network have?',
        [
            f"**{count(need(neurons, 'total'))} neurons. How many in the fully connected layers "
            f"and how many in the convolutional layers?** **{count(need(neurons, 'fc'))}** in the "
            f"fully connected layers ({'; '.join(fc_parts)}) and "
            f"**{count(need(neurons, 'conv'))}** in the convolutional layers "
            f"({'; '.join(conv_parts)}).",
            f"Convention: {need(neurons, 'convention')}. Other counts, for comparison: {others}.",
        ],
    )


def _weighted(m: dict[str, Any]) -> list[str]:
    return [r["kind"] for r in m["layers"] if r["kind"] in ("Conv2d", "Linear")]


def section_1_6(m: dict[str, Any]) -> Section:
    """Batch norm: test accuracy and training time."""
    c = need(m, "classification")
    effect = need(c, "bn_effect")
    final_val = need(c, "final", "study_mean_val_accuracy")
    rows = [
        (
            name,
            mean_sd(need(c, variant, "test_accuracy")),
            ", ".join(pct(a) for a in need(c, variant, "test_accuracy")),
            mean_sd(need(c, variant, "seconds_per_epoch"), 1, " s"),
        )
        for variant, name in (("plain", "plain"), ("bn", "batch norm"))
    ]
    t_acc, t_time = effect.get("welch_t_accuracy"), effect.get("welch_t_time")
    # Notebook 01's reading of Welch's t (mnistlab.verdicts), worded as the question's answer.
    accuracy = {
        "higher": "Yes: BN improves test accuracy beyond seed noise",
        "lower": "No: BN lowers test accuracy beyond seed noise",
        "noise": "No: the difference is within seed-to-seed noise",
        "too few": TOO_FEW,
    }[welch_reading(t_acc)]
    time = {
        "higher": "Yes: an epoch with BN is slower (its layers add normalisation passes and their "
        "backward)",
        "lower": "Yes: an epoch with BN is faster here",
        "noise": "Not beyond run-to-run noise",
        "too few": TOO_FEW,
    }[welch_reading(t_time)]
    early = need(effect, "val_accuracy_after_first_epoch")
    seeds = len(need(c, "seeds"))
    # BN's faster start is worth saying only when the final choice went the other way.
    start = (
        f"BN starts faster (validation accuracy after the first epoch {pct(need(early, 'bn'))} "
        f"against {pct(need(early, 'plain'))}) but does not finish ahead"
        if need(early, "bn") > need(early, "plain")
        and need(final_val, "bn") <= need(final_val, "plain")
        else f"Validation accuracy after the first epoch: {pct(need(early, 'bn'))} with BN, "
        f"{pct(need(early, 'plain'))} without"
    )
    return Section(
        "1.6",
        "Use batch-normalization. Does it improve the test accuracy? Does it affect training time?",
        [
            f"The study trains each variant with {seeds} seeds for "
            f"{need(c, 'config', 'epochs')} epochs with otherwise identical settings (BN between "
            "each conv or fc1 and its ReLU); mean ± sd over the seeds, and Welch's t says whether "
            "a difference stands out from seed-to-seed noise "
            f"(|t| ≥ {NOISE_T:g}).",
            f"**Does it improve the test accuracy?** BN changes the mean test accuracy by "
            f"{fixed(need(effect, 'accuracy_points'), 3)} points (Welch t = {fixed(t_acc)}). "
            f"{accuracy}. {start}: the study's mean validation accuracy is "
            f"{pct(need(final_val, 'bn'), 3)} with BN and {pct(need(final_val, 'plain'), 3)} "
            f"without, so the final model is **{variant(need(c, 'best', 'variant'))}**.",
            f"**Does it affect training time?** {time}: {fixed(_mean(c, 'bn'))} s per epoch against "
            f"{fixed(_mean(c, 'plain'))} s ({need(effect, 'time_percent'):+.0f}%, Welch t = "
            f"{fixed(t_time)}) on {need(m, 'environment', 'device')}.",
        ],
        Table(("variant", "test accuracy", "per seed", "seconds per epoch"), rows, "lrrr"),
    )


def _mean(c: dict[str, Any], variant: str) -> float:
    return statistics.fmean(need(c, variant, "seconds_per_epoch"))
