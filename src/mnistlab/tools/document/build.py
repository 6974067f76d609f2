"""The document from a report folder: which builder answers which question with which figures,
and writing report.pdf and report.html."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .appendix import header_facts, section_appendix
from .helpers import Document, DocumentError, Section
from .optional import section_o1, section_o1b, section_o2
from .part1 import section_1_1, section_1_2, section_1_3, section_1_4, section_1_5, section_1_6
from .part2 import section_2_1, section_2_2, section_2_3, section_2_4
from .part3 import section_3a, section_3b, section_3c
from .render import compile_pdf, render_html, render_typst

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
        "defense_headline_autoattack",
        "defense_adversarial_examples",
        "defense_part3_generated",
    ],
    "A": [],
}

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


def write_document(report: Path, metrics: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """Write report.pdf and report.html into the report folder; return their paths."""
    report = Path(report).resolve()
    doc = build_document(report, metrics)
    pdf_path, html_path = report / PDF_NAME, report / HTML_NAME
    pdf_path.write_bytes(compile_pdf(render_typst(doc), report))
    html_path.write_text(render_html(doc), encoding="utf-8")
    return pdf_path, html_path
