"""The submission document: report/report.pdf and report/report.html, built from one run's results.

Written by `make report` (and `python -m mnistlab.tools.report --summary-only`) from the report folder's
metrics.json and figures/*.png. The assignment's questions come in its own order, each as a heading
that quotes it, answered in a few sentences with its numbers and its figures directly beneath;
engineering material (timings, benchmarks, the recipe search) is a short appendix at the end.

One content model, two renderers:

- `build_document` makes a `Document`: a list of `Section`s, one builder function per question,
  each reading metrics.json only (no number is typed in here; prose may depend on the numbers);
- `render_html` writes one self-contained HTML file (figures as base64 data URIs);
- `render_typst` writes Typst markup, compiled to PDF by the `typst` package (PyPI; no TeX, no
  browser) with its bundled fonts only and no date, so the same inputs give the same PDF bytes.

Tooling: the teaching modules never import this one.
"""

from __future__ import annotations

import base64
import html
import json
import statistics
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..activations import TOP_FRACTION
from ..attacks import CONFIDENT

PDF_NAME, HTML_NAME = "report.pdf", "report.html"

# Which figures (report/figures/<stem>.png) answer which question, in the order shown. Adding a
# figure is one line here; a figure listed but missing from figures/ is an error, so this list and
# the notebooks cannot drift apart silently.
FIGURES: dict[str, list[str]] = {
    "1.1": [
        "part1_training_curves",
    ],
    "1.2": [
        "part1_random_test_predictions",
        "part1_test_mistakes",
        "part1_confusion_matrix",
    ],
    "1.3": [],
    "1.4": [],
    "1.5": [],
    "1.6": [
        "part1_bn_comparison",
    ],
    "2.1": [
        "part2_conv1_filters",
        "part2_conv1_responses",
    ],
    "2.2": [
        "part2_conv2_filters",
    ],
    "2.3": [
        "part2_activations",
        "part2_activation_statistics",
    ],
    "2.4": [
        "part2_occlusion",
    ],
    "3a": [
        "part3_nontargeted_images",
        "part3_nontargeted_cost",
    ],
    "3b": [
        "part3_targeted_images",
        "part3_targeted_cost",
        "part3_targeted_beta_sweep",
        "part3_targeted_from_image",
    ],
    "3c": [
        "part3_noise_attack",
        "part3_noise_cost",
        "part3_noise_transfer",
        "part3_noise_vs_pgd",
        "part3_noise_linf_ball",
    ],
    "O1": [
        "optional_class_models",
        "optional_class_model_cost",
    ],
    "O1b": [
        "optional_features_conv1",
        "optional_features_conv2",
    ],
    "O2": [
        "defense_accuracy_vs_eps",
        "defense_adversarial_examples",
        "defense_part3_generated",
    ],
    "A": [],
}

VARIANTS = {"plain": "plain", "bn": "batch-norm"}  # how metrics.json's variant names read


def variant(name: str) -> str:
    """A network variant as the text says it: 'bn' -> 'batch-norm'."""
    return VARIANTS.get(name, name)


PARTS = {
    "1": "Part 1: MNIST classification using CNN",
    "2": "Part 2: Visualizing Convolutional Neural Network",
    "3": "Part 3: Adversarial Examples",
    "O": "Optional parts",
    "A": "Appendix",
}


class DocumentError(ValueError):
    """The report folder cannot make the document: a metric or a figure is missing."""


@dataclass(frozen=True)
class Table:
    """A small table: a header row, rows of strings, one alignment letter (l/r/c) per column."""

    header: tuple[str, ...]
    rows: list[tuple[str, ...]]
    align: str = ""


@dataclass
class Section:
    """One question: its quoted heading, the answer's paragraphs, a table and figure stems.

    Paragraphs are plain text in which `**...**` marks bold (the only markup): the renderers
    escape everything else, so text read from metrics.json can never turn into markup.
    """

    key: str
    question: str
    paragraphs: list[str]
    table: Table | None = None
    figures: list[str] = field(default_factory=list)

    @property
    def part(self) -> str:
        return PARTS[self.key[0]]

    @property
    def heading(self) -> str:
        return self.question if self.key == "A" else f"{self.key} {self.question}"


@dataclass
class Document:
    """The whole report: a title, a few header facts (label, value) and the sections in order."""

    title: str
    facts: list[tuple[str, str]]
    sections: list[Section]
    figure_dir: Path


# ---------------------------------------------------------------------------------------------
# Reading metrics and formatting numbers


class Found(dict):
    """A section of metrics.json that remembers its path, so a key missing below it is named whole."""

    path: tuple[str, ...] = ()


def need(metrics: dict[str, Any], *path: str) -> Any:
    """metrics[path[0]][path[1]]...; a missing key raises DocumentError naming the whole path."""
    node: Any = metrics
    where: tuple[str, ...] = getattr(metrics, "path", ())
    for key in path:
        if not isinstance(node, dict) or key not in node:
            name = ".".join((*where, key))
            raise DocumentError(f"metrics.json has no '{name}', which the report document needs")
        node, where = node[key], (*where, key)
    if isinstance(node, dict):
        node = Found(node)
        node.path = where
    return node


def pct(value: float | None, digits: int = 2) -> str:
    """A fraction as a percentage: 0.9951 -> '99.51%'."""
    return "n/a" if value is None else f"{100 * value:.{digits}f}%"


def fixed(value: float | None, digits: int = 2) -> str:
    """A number with a fixed number of decimals, 'n/a' for a missing one (NaN is stored as null)."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def count(value: int) -> str:
    """An integer with thousands separators: 799078 -> '799,078'."""
    return f"{value:,}"


def mean_sd(values: list[float], scale: float = 100.0, unit: str = "%", digits: int = 2) -> str:
    """'mean ± sample sd' of a list: [0.9945, 0.9936, 0.9942] -> '99.41 ± 0.05%'."""
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    mean = statistics.fmean(values) * scale
    sd = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {sd:.{digits}f}{unit}"


def shape(dims: list[int]) -> str:
    """A tensor shape per image: [32, 28, 28] -> '32 × 28 × 28'."""
    return " × ".join(str(d) for d in dims)


def of_ten(reached: int | list[bool], total: int | None = None) -> str:
    """'7 of 10' from a count (with its total) or a list of booleans."""
    if isinstance(reached, list):
        return f"{sum(map(bool, reached))} of {len(reached)}"
    return f"{reached} of {total}"


def welch_verdict(t: float | None, positive: str, negative: str, none: str) -> str:
    """Read a Welch t statistic the way notebook 01 does: |t| < 2 is within run-to-run noise."""
    if t is None:
        return "Too few seeds to judge"
    if abs(t) < 2:
        return none
    return positive if t > 0 else negative


# ---------------------------------------------------------------------------------------------
# One builder per question, in the assignment's order


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
            "(5,000 of them); the test set only reports. One exception is stated in the notebook: "
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
        f"{r['name']} {shape(r['output_shape'])} = {count(_product(r['output_shape']))}"
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


def kernel_side(conv: dict[str, Any]) -> int:
    """A square conv kernel's side, from its parameter count: out * in * k * k + out biases."""
    out_dim, in_dim = conv["output_shape"][0], conv["input_shape"][0]
    return round(((conv["params"] - out_dim) / (out_dim * in_dim)) ** 0.5)


def _product(dims: list[int]) -> int:
    out = 1
    for d in dims:
        out *= d
    return out


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
    accuracy = welch_verdict(
        t_acc,
        "Yes: BN improves test accuracy beyond seed noise",
        "No: BN lowers test accuracy beyond seed noise",
        "No: the difference is within seed-to-seed noise",
    )
    time = welch_verdict(
        t_time,
        "Yes: an epoch with BN is slower (its layers add normalisation passes and their backward)",
        "Yes: an epoch with BN is faster here",
        "Not beyond run-to-run noise",
    )
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
            "a difference stands out from seed-to-seed noise (|t| ≥ 2).",
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


def section_2_1(m: dict[str, Any]) -> Section:
    """conv1 filters: measured against random kernels."""
    v = need(m, "visualization")
    c1 = need(v, "conv1")
    n = need(c1, "kernels")
    counts, chance, sd = (
        need(c1, "counts"),
        need(c1, "chance_fractions"),
        need(c1, "chance_count_sd"),
    )
    z = {k: (counts[k] - chance[k] * n) / sd[k] for k in counts}
    smooth, smooth_chance = (
        need(c1, "neighbour_correlation"),
        need(c1, "neighbour_correlation_chance"),
    )
    patterns = []
    if z["edge"] >= 2:
        patterns.append("more edge detectors than random kernels would give")
    if smooth - smooth_chance >= 0.1:
        patterns.append("smoother kernels than random ones")
    answer = f"Yes, measurably: {' and '.join(patterns)}." if patterns else "Not clearly."
    directions = need(c1, "directions_deg")
    octants = len({round(d / 45) % 8 for d in directions})
    regions = need(c1, "response_regions")
    area = need(c1, "region_area")
    drift = need(v, "weight_drift")
    cosine = {name: need(d, "cosine_with_initial") for name, d in drift.items()}
    drift_text = (
        f"Training moved conv1 least of all layers: its weights have cosine similarity "
        f"{fixed(cosine['conv1'])} with their random initial values (conv2 {fixed(cosine['conv2'])})."
        if cosine["conv1"] >= max(cosine.values())
        else f"conv1's weights have cosine similarity {fixed(cosine['conv1'])} with their random "
        "initial values."
    )
    return Section(
        "2.1",
        "Plot the conv1 layer filters. Do you observe interesting patterns?",
        [
            f"**{answer}** Each 3×3 kernel is classed by where its energy lies: an odd "
            "(antisymmetric) part makes an oriented edge detector, a symmetric part a blob "
            f"(centre-surround) detector. Of the {n} kernels, {counts['edge']} are edges (random "
            f"kernels: {fixed(chance['edge'] * n, 1)} ± {fixed(sd['edge'], 1)}, z = "
            f"{z['edge']:+.1f}), {counts['blob']} blobs ({fixed(chance['blob'] * n, 1)} ± "
            f"{fixed(sd['blob'], 1)}), {counts['other']} other. Adjacent weights correlate "
            f"{smooth:+.2f} (random: {smooth_chance:+.2f}). The edge detectors' rising directions "
            f"cover {octants} of the 8 compass octants.",
            f"Behaviour (second figure: each kernel above its ReLU response): edge filters put "
            f"{pct(need(regions, 'edge', 'border'), 0)} of their output on the border ring around "
            f"strokes, which is {pct(need(area, 'border'), 0)} of the pixels; blob filters put "
            f"{pct(need(regions, 'blob', 'background'), 0)} on background "
            f"({pct(need(area, 'background'), 0)} of the pixels). {drift_text}",
        ],
    )


def section_2_2(m: dict[str, Any]) -> Section:
    """conv2 filters compared with conv1."""
    v = need(m, "visualization")
    c1, c2 = need(v, "conv1"), need(v, "conv2")
    drift = need(v, "weight_drift")

    def distance(s: dict[str, Any]) -> float:
        # Total variation distance of the edge / blob / other mix from the random-kernel mix.
        return sum(abs(s["fractions"][k] - s["chance_fractions"][k]) for k in s["fractions"]) / 2

    rows = [
        (
            f"{kind} kernels",
            pct(need(c1, "fractions", kind), 0),
            pct(need(c2, "fractions", kind), 0),
            pct(need(c2, "chance_fractions", kind), 0),
        )
        for kind in need(c2, "fractions")
    ]
    rows += [
        (
            "adjacent-weight correlation",
            f"{need(c1, 'neighbour_correlation'):+.2f}",
            f"{need(c2, 'neighbour_correlation'):+.2f}",
            f"{need(c2, 'neighbour_correlation_chance'):+.2f}",
        ),
        (
            "energy in the strongest 10% of kernels",
            pct(need(c1, "energy_share_of_top_10pct_kernels"), 0),
            pct(need(c2, "energy_share_of_top_10pct_kernels"), 0),
            pct(need(c2, "energy_share_of_top_10pct_kernels_chance"), 0),
        ),
        (
            "within a filter: energy in its strongest 10% of inputs",
            "(1 input)",
            pct(need(c2, "per_filter_energy_share_of_top_10pct_inputs"), 0),
            pct(need(c2, "per_filter_energy_share_of_top_10pct_inputs_chance"), 0),
        ),
        (
            "sign coherence |Σw| / Σ|w|",
            fixed(need(c1, "sign_coherence")),
            fixed(need(c2, "sign_coherence")),
            fixed(need(c2, "sign_coherence_chance")),
        ),
        (
            "cosine with the initial weights",
            fixed(need(drift, "conv1", "cosine_with_initial")),
            fixed(need(drift, "conv2", "cosine_with_initial")),
            "",
        ),
    ]
    d1, d2 = distance(c1), distance(c2)
    closer = "closer to" if d2 < d1 else "no closer to"
    smoother = (
        "smoother" if c2["neighbour_correlation"] > c1["neighbour_correlation"] else "rougher"
    )
    return Section(
        "2.2",
        "Plot filters of a higher layer. Compare it with conv1 layer filters.",
        [
            f"conv2 has {need(c2, 'kernels')} kernels, one 3×3 kernel per pair (output filter, "
            "input map): too many to read one by one. The figure shows the strength (L2 norm) of "
            "every kernel as a map (rows: conv2 filters, columns: the conv1 maps they read) and, "
            f"enlarged, the strongest input kernels of the {len(need(c2, 'strongest_reads'))} "
            "strongest conv2 filters beside the conv1 filter each one reads. A conv2 kernel is read "
            "against feature maps, not pixels, so it is no longer a picture of a stroke.",
            f"**Compared with conv1:** by kind, conv2's kernels are {closer} random kernels than "
            f"conv1's (their edge / blob / other mix differs from the random mix by "
            f"{pct(d2, 0)} of the kernels; conv1 {pct(d1, 0)}); they are {smoother} "
            f"(adjacent weights {need(c2, 'neighbour_correlation'):+.2f} against "
            f"{need(c1, 'neighbour_correlation'):+.2f}); and each conv2 filter leans on a few conv1 "
            f"maps: its strongest 10% of inputs carry "
            f"{pct(need(c2, 'per_filter_energy_share_of_top_10pct_inputs'), 0)} of its weight "
            f"energy (random weights: "
            f"{pct(need(c2, 'per_filter_energy_share_of_top_10pct_inputs_chance'), 0)}). Their "
            f"weights mostly share one sign (sign coherence |Σw| / Σ|w| "
            f"{fixed(need(c2, 'sign_coherence'))} against {fixed(need(c1, 'sign_coherence'))} for "
            f"conv1 and {fixed(need(c2, 'sign_coherence_chance'))} for random kernels): conv1 "
            "kernels compare neighbouring pixels, conv2 kernels mostly add up one conv1 feature "
            "over a neighbourhood, with a sign that says whether it excites or inhibits.",
        ],
        Table(("", "conv1", "conv2", "random weights"), rows, "lrrr"),
    )


def section_2_3(m: dict[str, Any]) -> Section:
    """Activations: what changes going deeper."""
    a = need(m, "visualization", "activations")
    layers = need(a, "layers")
    shapes = {r["name"]: r["output_shape"] for r in need(m, "layers")}
    zeros, top = need(a, "zero_fraction"), need(a, "top10_mass_share")
    field_, centroid = need(a, "receptive_field"), need(a, "nearest_centroid_accuracy")
    rows = [
        ("input", "", "", "", "", pct(need(centroid, "input"), 1)),
        *[
            (
                name,
                shape(shapes[name]) if name in shapes else "",
                f"{field_[name]} px",
                pct(zeros[name], 1),
                fixed(top[name]),
                pct(centroid[name], 1),
            )
            for name in layers
        ],
    ]
    rectified = [n for n in layers if n.startswith(("relu", "pool"))]
    first, last = layers[0], layers[-1]
    relus = [n for n in layers if n.startswith("relu")]
    deeper = top[relus[-1]] - top[relus[0]] if len(relus) > 1 else 0.0
    return Section(
        "2.3",
        "Visualize the activations of the convolutional layers. What do you observe as you go "
        "deeper?",
        [
            "Feature maps of test digits after every layer (first figure); the statistics "
            f"(second figure, table) are measured over {need(a, 'images')} test images.",
            f"**Going deeper:** resolution falls from {shape(shapes[first][1:])} to "
            f"{shape(shapes[last][1:])} while the receptive field grows from {field_[first]} px "
            f"to {field_[last]} px, so each position summarises a larger piece of the digit. The "
            f"maps get sparser after each ReLU (exact zeros: "
            + ", ".join(f"{n} {pct(zeros[n], 0)}" for n in rectified)
            + ") and "
            + (
                f"more localised (share of the activation in the strongest 10% of positions, "
                f"{fixed(TOP_FRACTION)} for a flat map: {relus[0]} {fixed(top[relus[0]])}, {relus[-1]} "
                f"{fixed(top[relus[-1]])})"
                if deeper > 0
                else f"no more localised ({relus[0]} {fixed(top[relus[0]])}, {relus[-1]} "
                f"{fixed(top[relus[-1]])})"
            )
            + ". A nearest-class-mean classifier on the flattened maps reaches "
            f"{pct(centroid['input'], 1)} on the pixels and {pct(centroid[last], 1)} after "
            f"{last}: the maps become less about where the ink is and more about which digit it "
            "is.",
        ],
        Table(
            (
                "layer",
                "maps",
                "receptive field",
                "zeros",
                "top-10% share",
                "nearest-mean accuracy",
            ),
            rows,
            "lrrrrr",
        ),
    )


def section_2_4(m: dict[str, Any]) -> Section:
    """Occlusion maps: is the network using the digit?"""
    o = need(m, "visualization", "occlusion")
    digit, background = need(o, "drop_on_digit"), need(o, "drop_on_background")
    # The notebook's rule: "yes" needs the stroke drop to exceed the background drop five-fold.
    verdict = (
        "Yes"
        if digit > 5 * max(background, 1e-6)
        else "Not clearly"
        if digit > background
        else "No"
    )
    fills = [(f"this run ({fixed(need(o, 'fill'), 3)})", o)]
    labels = {"mid_grey_patch": "mid-grey (grey level 128)", "black_patch": "black (0)"}
    fills += [(label, o[key]) for key, label in labels.items() if key in o]
    rows = [
        (
            name,
            fixed(need(r, "drop_on_digit"), 4),
            fixed(need(r, "drop_on_background"), 4),
            pct(need(r, "flip_rate_on_digit"), 1),
            pct(need(r, "flip_rate_on_background"), 1),
        )
        for name, r in fills
    ]
    images = need(o, "images")
    grey = need(o, "mid_grey_patch")
    grey_digit, grey_background = need(grey, "drop_on_digit"), need(grey, "drop_on_background")
    # The same five-fold rule for the mid-grey patch, which the assignment names as its example.
    grey_verdict = (
        "gives the same answer"
        if grey_digit > 5 * max(grey_background, 1e-6)
        else "gives a weaker answer: a mid-grey blot is itself ink-like, so it also lowers the "
        "probability where it lands on background"
    )
    scale = need(o, "colour_scale")
    return Section(
        "2.4",
        "Occluding parts of the image: the probability of the class of interest against the "
        "patch position",
        [
            f"A {need(o, 'patch')} × {need(o, 'patch')} px patch of grey level "
            f"{fixed(need(o, 'fill'), 4)} (the mean training pixel, which the network normalises "
            f"to 0) slides over {len(images)} random test images, one of each class "
            f"{', '.join(map(str, need(o, 'classes')))}, with stride {need(o, 'stride')} px; "
            "each map shows, at every patch position, how much the patch lowers the probability "
            "of the true class (p without patch − p with patch; second row of maps), and the "
            "third row does the same with a mid-grey patch (grey level 128). The network is so "
            "sure of most test digits that the drop is tiny almost everywhere, so the colour "
            f"scale is symmetric-logarithmic ({scale['norm']}, linear within "
            f"±{scale['linear_within']:g}): small drops show, and the largest still stand out "
            "(the line traces the digit; digits in a map mark positions where the prediction "
            "flips, and to which class).",
            f"**Is it picking up on the main part of the digit, not the background?** {verdict}: "
            f"covering stroke lowers the true class's probability by {fixed(digit, 4)} on average "
            f"({need(o, 'positions_on_digit')} positions), covering background by "
            f"{background:.1e} ({need(o, 'positions_on_background')} positions; on the log "
            "scale such drops still show as colour); the prediction flips at "
            f"{pct(need(o, 'flip_rate_on_digit'), 1)} of the stroke positions and "
            f"{pct(need(o, 'flip_rate_on_background'), 1)} of the background ones; the stroke "
            f"drop is at least five times the background drop in "
            f"{need(o, 'images_stroke_drop_5x_background')} of {len(images)} images. This patch "
            "is close to the black background, so over background it changes the image little "
            "by construction; the stricter test is the assignment's grey patch, which changes "
            f"the image wherever it lands. The mid-grey patch {grey_verdict}: stroke "
            f"{fixed(grey_digit, 4)} against background {fixed(grey_background, 4)}, the "
            f"largest drop on the stroke in {need(grey, 'images_largest_drop_on_stroke')} of "
            f"{len(images)} images (table, third row of maps).",
        ],
        Table(
            (
                "patch fill",
                "drop on stroke",
                "drop on background",
                "flips on stroke",
                "flips on bg.",
            ),
            rows,
            "lrrrr",
        ),
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
    white_l2 = _product(need(m, "layers")[0]["input_shape"]) ** 0.5  # every pixel 1
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
    # Notebook 04's verdict: a second network's reading, then the pixels' on the real digits' scale.
    judge_says = "Yes" if agreement >= 0.9 else "Mostly" if agreement >= 0.5 else "No"
    resemblance = need(plain, "template_correlation") / need(real, "template_correlation")
    as_real = need(plain, "template_match") >= need(real, "template_match") and resemblance >= 0.75
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
            f"weights; here {need(trained, 'config', 'epochs')} epochs of "
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


def section_appendix(m: dict[str, Any], report: Path) -> Section:
    """Engineering notes: wall times, the machine probe, benchmarks, the recipe search."""
    timing = need(m, "timing")
    env = need(m, "environment")
    notebooks = need(timing, "notebook_seconds")
    lines = []
    total = timing.get("report_seconds")
    gemm = timing.get("fp32_gemm_gflops", {})
    lines.append(
        (
            f"The whole make report run took {fixed(total / 60, 1)} min"
            if total
            else "Notebook wall times"
        )
        + f" on {need(env, 'device')}, torch {env.get('torch', '?')}, Python "
        f"{env.get('python', '?')}: "
        + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in notebooks.items())
        + "."
        + (
            f" A machine-speed probe (fp32 matrix products) ran at {gemm['before']:.0f} GFLOP/s "
            f"before the notebooks and {gemm['after']:.0f} after, so the times hold for a machine "
            "this fast."
            if "before" in gemm and "after" in gemm
            else ""
        )
    )
    for path in sorted(report.glob("bench*.json")):
        b = json.loads(path.read_text())
        t, r = b.get("throughput", {}), b.get("ratio", {})
        if not t:
            continue
        lines.append(
            f"Training throughput (make bench, {b.get('device', '?')}, {path.name}): "
            f"{t.get('project', 0):,.0f} images/s, {fixed(r.get('vs_naive'))}× a naive fp32 eager "
            f"loop and {fixed(r.get('vs_dataloader'))}× a DataLoader pipeline."
        )
    for path in sorted(report.glob("recipe_search*.jsonl")):
        runs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        by_candidate: dict[str, list[float]] = {}
        for run in runs:
            by_candidate.setdefault(run["candidate"], []).append(run["best_val_accuracy"])
        ranked = sorted(by_candidate.items(), key=lambda kv: -statistics.fmean(kv[1]))
        lines.append(
            f"Recipe search on validation ({path.name}: {len(by_candidate)} candidates, "
            f"{len(runs)} runs); best mean validation accuracy: "
            + ", ".join(f"{name} {pct(statistics.fmean(v))}" for name, v in ranked[:3])
            + "."
        )
    lines.append(
        "Full tables: report/README.md; the executed notebooks: report/*.html; every number: "
        "report/metrics.json."
    )
    return Section("A", "Engineering notes: timings, benchmarks, recipe search", lines)


BUILDERS: list[Callable[[dict[str, Any]], Section]] = [
    section_1_1,
    section_1_2,
    section_1_3,
    section_1_4,
    section_1_5,
    section_1_6,
    section_2_1,
    section_2_2,
    section_2_3,
    section_2_4,
    section_3a,
    section_3b,
    section_3c,
    section_o1,
    section_o1b,
    section_o2,
]


def build_document(report: Path, metrics: dict[str, Any] | None = None) -> Document:
    """The document's content from a report folder (metrics.json, figures/, bench*.json)."""
    report = Path(report)
    if metrics is None:
        metrics = json.loads((report / "metrics.json").read_text(encoding="utf-8"))
    sections = []
    for builder in [*BUILDERS, lambda m: section_appendix(m, report)]:
        try:
            section = builder(metrics)
        except (KeyError, TypeError, IndexError, ZeroDivisionError) as error:
            # A metric of an unexpected shape: say which section could not be written.
            raise DocumentError(
                f"{builder.__name__}: unexpected metrics.json content ({error!r})"
            ) from error
        section.figures = list(FIGURES[section.key])
        sections.append(section)
    missing = [
        s
        for s in (f for sec in sections for f in sec.figures)
        if not (report / "figures" / f"{s}.png").is_file()
    ]
    if missing:
        raise DocumentError(f"figures missing from {report / 'figures'}: {', '.join(missing)}")
    return Document(
        "Programming Assignment 2: Convolutional Neural Networks (MNIST)",
        header_facts(metrics),
        sections,
        report / "figures",
    )


def header_facts(m: dict[str, Any]) -> list[tuple[str, str]]:
    """Title block: what the network is, the final model's test accuracy, when and where it ran."""
    layers = need(m, "layers")
    parts = []
    for r in layers:
        if r["kind"] == "Conv2d":
            k = kernel_side(r)
            parts.append(
                f"{r['name']} ({r['output_shape'][0]} filters {k}×{k}, stride 1, padding 1)"
            )
        elif r["kind"] == "MaxPool2d":
            f = r["input_shape"][-1] // r["output_shape"][-1]
            parts.append(f"max-pool {f}×{f}")
        elif r["kind"] == "Linear":
            parts.append(f"{r['name']} ({r['output_shape'][0]})")
        elif r["kind"] == "ReLU":
            parts.append("ReLU")
    best = need(m, "classification", "best")
    env = need(m, "environment")
    facts = [
        (
            "Network",
            f"input {shape(layers[0]['input_shape'])} → "
            + " → ".join(parts)
            + f" → softmax; {count(need(m, 'params', 'total'))} parameters",
        ),
        (
            "Final model",
            f"{variant(need(best, 'variant'))}, {need(best, 'epochs')} epochs (recipe chosen on "
            "validation), "
            f"used by Parts 2 and 3: test accuracy **{pct(need(best, 'test_accuracy'))}**",
        ),
        (
            "Run",
            (f"{env['date']}, " if "date" in env else "")
            + f"{need(env, 'device')}, torch {env.get('torch', '?')}, "
            f"Python {env.get('python', '?')}",
        ),
    ]
    if m.get("quick"):
        facts.append(("Quick mode", "smoke-test settings: the numbers are not meaningful"))
    return facts


# ---------------------------------------------------------------------------------------------
# Figure sizes, shared by both renderers

TEXT_WIDTH_CM = 17.4  # A4 (21 cm) less two 1.8 cm margins
MAX_FIGURE_HEIGHT_CM = 14.0  # the tall grids (feature maps, occlusion maps) stay readable
NATURAL_SCALE = 0.65  # at most 65% of the size matplotlib drew at (150 dpi): labels stay >= 6.5 pt
FIGURE_DPI = 150


def png_size(path: Path) -> tuple[int, int]:
    """Width and height in pixels, read from the PNG header."""
    with open(path, "rb") as file:
        head = file.read(24)
    if head[:8] != b"\x89PNG\r\n\x1a\n":
        raise DocumentError(f"{path} is not a PNG file")
    return struct.unpack(">II", head[16:24])


def figure_width_cm(path: Path) -> float:
    """Display width: the text width, capped so no figure is taller than MAX_FIGURE_HEIGHT_CM and
    none is blown up beyond NATURAL_SCALE of its drawn size."""
    width, height = png_size(path)
    natural = width / FIGURE_DPI * 2.54
    return round(
        min(TEXT_WIDTH_CM, NATURAL_SCALE * natural, MAX_FIGURE_HEIGHT_CM * width / height), 2
    )


# ---------------------------------------------------------------------------------------------
# Renderers


def bold_runs(text: str) -> list[tuple[str, bool]]:
    """Split a paragraph on its `**` marks into (text, bold) runs."""
    return [(piece, i % 2 == 1) for i, piece in enumerate(text.split("**")) if piece]


def anchor(section: Section) -> str:
    return f"q{section.key.lower()}"


HTML_STYLE = """
body{font-family:Georgia,serif;max-width:46em;margin:2em auto;padding:0 1em;line-height:1.45;color:#222}
h1{font-size:1.6em;margin-bottom:.3em} h2{margin-top:1.6em;border-bottom:1px solid #ccc}
h3{font-size:1.05em;margin:1.6em 0 .4em} .facts td{padding:.1em .6em .1em 0;vertical-align:top}
table.data{border-collapse:collapse;font-size:.85em;margin:.6em auto}
table.data td,table.data th{border:1px solid #bbb;padding:.2em .5em}
td.r,th.r{text-align:right} figure{margin:.8em 0;text-align:center}
figure img{max-width:100%;height:auto} figcaption{font-size:.75em;color:#777}
nav ol{columns:2;font-size:.9em}
"""


def render_html(doc: Document) -> str:
    """One self-contained HTML page: the same content, figures embedded as data URIs."""
    esc = html.escape

    def inline(text: str) -> str:
        return "".join(f"<strong>{esc(t)}</strong>" if b else esc(t) for t, b in bold_runs(text))

    out = [
        f"<!doctype html><html lang='en'><meta charset='utf-8'><title>{esc(doc.title)}</title>",
        f"<style>{HTML_STYLE}</style><h1>{esc(doc.title)}</h1><table class='facts'>",
    ]
    out += [f"<tr><td><b>{esc(k)}</b></td><td>{inline(v)}</td></tr>" for k, v in doc.facts]
    out.append("</table><nav><h2>Contents</h2><ol>")
    out += [f"<li><a href='#{anchor(s)}'>{esc(s.heading)}</a></li>" for s in doc.sections]
    out.append("</ol></nav>")
    part = None
    for s in doc.sections:
        if s.part != part:
            part = s.part
            out.append(f"<h2>{esc(part)}</h2>")
        out.append(f"<h3 id='{anchor(s)}'>{esc(s.heading)}</h3>")
        out += [f"<p>{inline(p)}</p>" for p in s.paragraphs]
        if s.table:
            align = s.table.align or "l" * len(s.table.header)
            out.append("<table class='data'><tr>")
            out += [
                f"<th class='{a}'>{esc(h)}</th>" for h, a in zip(s.table.header, align, strict=True)
            ]
            out.append("</tr>")
            for row in s.table.rows:
                cells = "".join(
                    f"<td class='{a}'>{esc(c)}</td>" for c, a in zip(row, align, strict=True)
                )
                out.append(f"<tr>{cells}</tr>")
            out.append("</table>")
        for k, stem in enumerate(s.figures, start=1):
            path = doc.figure_dir / f"{stem}.png"
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            width_px = round(figure_width_cm(path) / 2.54 * 96)  # CSS pixels are 1/96 inch
            out.append(
                f"<figure><img src='data:image/png;base64,{data}' alt='{esc(stem)}' "
                f"style='width:{width_px}px'><figcaption>{esc(caption(s.key, k, stem))}</figcaption>"
                "</figure>"
            )
    out.append("</html>\n")
    return "\n".join(out)


# Every character with a meaning in Typst markup: code (#), math ($), strong (*), emphasis (_),
# raw (`), references and labels (@ < >), content blocks ([ ]), non-breaking space (~), headings (=),
# lists (- + and "1."), term lists and comments (/), smart quotes (" '), shorthands (-- ... -?),
# and the backslash itself. Typst accepts a backslash before any of them as the literal character.
TYPST_SPECIAL = frozenset("\\#$*_`@<>[]~=-+/\"'.:{}()")


def typst_escape(text: str) -> str:
    """Text that Typst markup shows literally, whatever it contains (newlines become spaces)."""
    text = " ".join(text.splitlines())
    return "".join(f"\\{ch}" if ch in TYPST_SPECIAL else ch for ch in text)


TYPST_PREAMBLE = """\
#set document(title: [{title}], author: "mnistlab", date: none)
#set page(paper: "a4", margin: (x: 1.8cm, top: 1.6cm, bottom: 1.8cm), numbering: "1 / 1")
#set text(font: "Libertinus Serif", size: 10pt, lang: "en")
#set par(justify: false, spacing: 0.75em)
#show heading.where(level: 1): set text(size: 13.5pt)
#show heading.where(level: 1): set block(above: 1.4em, below: 0.8em)
#show heading.where(level: 2): set text(size: 10.5pt)
#show heading.where(level: 2): set block(above: 1.3em, below: 0.65em)
#set table(inset: (x: 4pt, y: 2.2pt), stroke: 0.4pt + luma(170))
#show table: set text(size: 8.5pt)
#show raw: set text(font: "DejaVu Sans Mono", size: 8.5pt)
"""


def render_typst(doc: Document) -> str:
    """Typst markup of the document; figure paths are relative to the report folder."""
    esc = typst_escape

    def inline(text: str) -> str:
        return "".join(f"#strong[{esc(t)}]" if b else esc(t) for t, b in bold_runs(text))

    out = [TYPST_PREAMBLE.format(title=esc(doc.title))]
    out.append(f'#text(size: 16pt, weight: "bold")[{esc(doc.title)}]\n')
    cells = ", ".join(f"[#strong[{esc(k)}]], [{inline(v)}]" for k, v in doc.facts)
    out.append(f"#grid(columns: (auto, 1fr), column-gutter: 0.8em, row-gutter: 0.5em, {cells})\n")
    out.append("#outline(title: [Contents], depth: 2, indent: 1.2em)\n")
    part = None
    for s in doc.sections:
        if s.part != part:
            part = s.part
            out.append(f"= {esc(part)}\n")
        out.append(f"== {esc(s.heading)}\n")
        out += [f"{inline(p)}\n" for p in s.paragraphs]
        if s.table:
            align = s.table.align or "l" * len(s.table.header)
            aligns = ", ".join({"l": "left", "r": "right", "c": "center"}[a] for a in align)
            header = ", ".join(f"[#strong[{esc(h)}]]" for h in s.table.header)
            body = ", ".join(f"[{esc(c)}]" for row in s.table.rows for c in row)
            out.append(
                f"#align(center, table(columns: {len(s.table.header)}, align: ({aligns},), "
                f"table.header({header}), {body}))\n"
            )
        for k, stem in enumerate(s.figures, start=1):
            width = figure_width_cm(doc.figure_dir / f"{stem}.png")
            label = esc(caption(s.key, k, stem))
            out.append(
                f'#block(breakable: false, width: 100%)[#align(center)[#image("figures/{stem}.png", '
                f"width: {width}cm) #v(-0.4em) #text(size: 7pt, fill: luma(120))[{label}]]]\n"
            )
    return "\n".join(out)


def caption(key: str, number: int, stem: str) -> str:
    """'Figure 3b.2 (figures/part3_targeted_cost.png)': the k-th figure of a question, and its file."""
    return f"Figure {key}.{number} (figures/{stem}.png)"


def compile_pdf(source: str, root: Path) -> bytes:
    """Compile Typst markup to PDF with the bundled fonts only; a warning is an error."""
    import typst

    pdf, warnings = typst.compile_with_warnings(
        source.encode("utf-8"), root=str(root), ignore_system_fonts=True
    )
    if warnings:
        raise DocumentError(f"typst warned: {warnings}")
    return pdf


def write_document(report: Path, metrics: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """Write report.pdf and report.html into the report folder; return their paths."""
    report = Path(report).resolve()
    doc = build_document(report, metrics)
    pdf_path, html_path = report / PDF_NAME, report / HTML_NAME
    pdf_path.write_bytes(compile_pdf(render_typst(doc), report))
    html_path.write_text(render_html(doc), encoding="utf-8")
    return pdf_path, html_path
