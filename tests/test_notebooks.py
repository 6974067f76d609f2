"""Every notebook runs headlessly, top to bottom, in quick mode on the real data (the `make report` path)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mnistlab.results import FIGURE_KEY
from mnistlab.tools.report import main as make_report

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory, mnist_dir):
    out = tmp_path_factory.mktemp("report")
    code = make_report(
        ["--quick", "--out", str(out), "--checkpoints", str(out / "checkpoints"), "--no-readme"]
    )
    assert code == 0
    return out


def shown_figures(notebook: dict) -> tuple[list[str], list[str]]:
    """The figure names of a notebook's image outputs, and the figures it printed as text."""
    shown, as_text = [], []
    for cell in notebook["cells"]:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if "image/png" in data:
                shown.append(output.get("metadata", {}).get(FIGURE_KEY, "<unnamed image>"))
            elif "".join(data.get("text/plain", "")).startswith("<Figure size"):
                as_text.append("".join(data["text/plain"]))
    return shown, as_text


def figure_problems(report: Path) -> list[str]:
    """What a reader would miss: figures printed as text, saved figures not shown, and the reverse."""
    problems, shown_anywhere = [], []
    for executed in sorted((report / "notebooks").glob("*.ipynb")):
        shown, as_text = shown_figures(json.loads(executed.read_text()))
        problems += [f"{executed.name}: a figure printed as text: {text}" for text in as_text]
        html = (report / f"{executed.stem}.html").read_text()
        # Each image output becomes one <img> with the PNG inline in the HTML page.
        if len(re.findall(r'<img [^>]*src="data:image/png', html)) != len(shown):
            problems.append(f"{executed.stem}.html does not embed its {len(shown)} images")
        shown_anywhere += shown
    saved = sorted(p.stem for p in (report / "figures").glob("*.png"))
    problems += [f"saved but never shown: {name}" for name in saved if name not in shown_anywhere]
    problems += [f"shown but not saved: {name}" for name in shown_anywhere if name not in saved]
    problems += [
        f"shown twice: {n}" for n in sorted(set(shown_anywhere)) if shown_anywhere.count(n) > 1
    ]
    return problems


@pytest.mark.slow
def test_every_notebook_executes_and_is_written_as_html(quick_report):
    assert NOTEBOOKS, "no notebooks found"
    for nb in NOTEBOOKS:
        assert (quick_report / "notebooks" / nb.name).is_file()
        html = (quick_report / f"{nb.stem}.html").read_text()
        assert "Traceback" not in html


@pytest.mark.slow
def test_every_figure_a_notebook_makes_is_shown_as_an_image(quick_report):
    assert figure_problems(quick_report) == []
    for executed in (quick_report / "notebooks").glob("*.ipynb"):
        shown, _ = shown_figures(json.loads(executed.read_text()))
        assert shown, f"{executed.name} shows no figure"


def test_the_figure_check_catches_a_figure_printed_as_text(tmp_path):
    """The failure mode it guards: a Figure displayed where no inline hook renders it."""
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "part9_curve.png").write_bytes(b"png")
    text = {
        "output_type": "display_data",
        "metadata": {},
        "data": {"text/plain": "<Figure size 640x480 with 1 Axes>"},
    }
    notebook = {"cells": [{"cell_type": "code", "outputs": [text]}]}
    (tmp_path / "notebooks" / "09_x.ipynb").write_text(json.dumps(notebook))
    (tmp_path / "09_x.html").write_text("<style>url(data:image/png;base64,AAAA)</style>")
    problems = figure_problems(tmp_path)
    assert any("printed as text" in p for p in problems)
    assert "saved but never shown: part9_curve" in problems


@pytest.mark.slow
def test_quick_report_records_the_required_metrics(quick_report):
    metrics = json.loads((quick_report / "metrics.json").read_text())
    assert metrics["quick"] is True
    assert metrics["params"]["total"] == 799_078
    c = metrics["classification"]
    assert set(c["best"]) >= {"run", "variant", "epochs", "test_accuracy"}
    # Parts 2 and 3 use the final run, the study's better variant trained longer.
    assert c["best"]["run"] == c["final"]["run"]
    assert c["final"]["config"]["epochs"] > c["config"]["epochs"]
    assert c["final"]["config"]["variant"] == max(
        ("plain", "bn"), key=lambda v: (c["final"]["study_mean_val_accuracy"][v], v == "plain")
    )
    assert len(c["plain"]["test_accuracy"]) == len(c["bn"]["test_accuracy"]) == len(c["seeds"])
    assert 0 < c["first_epoch_test_accuracy"] <= 1
    assert metrics["timing"]["report_seconds"] > 0
    assert list((quick_report / "figures").glob("part1_*.png"))
    assert (quick_report / "README.md").is_file()


REQUIRED_KEYS = [
    "params.total",
    "params.conv",
    "params.fc",
    "params_bn.total",
    "neurons.convention",
    "classification.plain.test_accuracy",
    "classification.bn.test_accuracy",
    "classification.plain.seconds_per_epoch",
    "classification.bn.seconds_per_epoch",
    "classification.best.variant",
    "classification.best.test_accuracy",
    "classification.final.test_accuracy",
    "classification.first_epoch_test_accuracy",
    "timing.report_seconds",
    "visualization.occlusion.patch",
    "visualization.occlusion.stride",
    "visualization.occlusion.images",
    "visualization.occlusion.classes",
    "visualization.occlusion.drop_on_digit",
    "visualization.occlusion.drop_on_background",
    "visualization.activations.zero_fraction",
    "adversarial.nontargeted.confidence",
    "adversarial.nontargeted.success",
    "adversarial.targeted.beta_sweep",
    "adversarial.targeted.beta",
    "adversarial.noise.success",
    "adversarial.noise.l2",
    "adversarial.noise.linf",
    "adversarial.noise.transfer.target_rate",
    "adversarial.noise.transfer.changed_rate",
    "optional.class_model.agreement",
    "defenses",
    "defenses.pgd_trained.headline.accuracy",
    "defenses.pgd_trained.headline.stderr",
    "defenses.pgd_trained.headline.n",
    "defenses.pgd_trained.headline.autoattack.fooled_by",
    "defenses.binarised.headline.accuracy",
]


@pytest.mark.slow
def test_every_metric_the_issues_name_is_recorded(quick_report):
    metrics = json.loads((quick_report / "metrics.json").read_text())
    missing = []
    for key in REQUIRED_KEYS:
        node = metrics
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                missing.append(key)
                break
            node = node[part]
    assert not missing, f"metrics.json lacks {missing}"


def test_source_notebooks_are_committed_without_outputs():
    for nb in NOTEBOOKS:
        cells = json.loads(nb.read_text())["cells"]
        code = [c for c in cells if c["cell_type"] == "code"]
        assert not any(c.get("outputs") or c.get("execution_count") for c in code), nb.name
        tags = [c.get("metadata", {}).get("tags", []) for c in code]
        assert ["parameters"] in tags, f"{nb.name} has no papermill 'parameters' cell"
