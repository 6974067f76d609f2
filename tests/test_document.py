"""The submission document (report.pdf, report.html), built from the committed report's
metrics.json and figures into a temporary folder: no training, CPU only, seconds."""

from __future__ import annotations

import base64
import copy
import json
import re
import shutil
import unicodedata
import zipfile
from html import unescape
from pathlib import Path

import pytest
from pypdf import PdfReader

from mnistlab.tools import document, submission
from mnistlab.tools.document import (
    DocumentError,
    build_document,
    compile_pdf,
    count,
    mean_sd,
    pct,
    typst_escape,
)
from mnistlab.tools.report import main as make_report
from mnistlab.tools.report import write_summary

REPORT = Path(__file__).parents[1] / "report"

# The assignment's questions in its order (shared/assignment.md): Part 1's six submission bullets,
# Part 2's four, Part 3 (a), (b), (c), optional 1 and its feature question, optional 2. Each is
# words of the assignment that the question's heading must quote.
QUESTIONS = [
    "training error, validation error and prediction accuracy as the training progresses",
    "randomly selected test images showing the true class label as well as predicted class label",
    "write down the dimensions of the input and output at each layer",
    "exactly how many parameters does your network have?",
    'exactly how many "neurons" does your network have?',
    "use batch-normalization. does it improve the test accuracy? does it affect training time?",
    "plot the conv1 layer filters. do you observe interesting patterns?",
    "plot filters of a higher layer. compare it with conv1 layer filters",
    "visualize the activations of the convolutional layers. what do you observe as you go deeper?",
    "occluding parts of the image",
    "non-targeted attack",
    "do the generated images now look like a number?",
    "show the generated adversarial image, and the noise for each of the classes of mnist",
    "show 10 images for each of the 10 classes",
    "maximize some intermediate conv layer features or neurons. what do you observe?",
    "can you think of some ways to prevent the adversarial attacks described above?",
]


def normalise(text: str) -> str:
    """Lower case, NFKC (ligatures), straight quotes, single spaces: text compared as a reader would."""
    text = unicodedata.normalize("NFKC", text).translate(str.maketrans("“”‘’", "\"\"''"))
    return " ".join(text.split()).lower()


def outline_titles(reader: PdfReader) -> list[str]:
    def flat(items):
        for item in items:
            yield from flat(item) if isinstance(item, list) else [item.title]

    return list(flat(reader.outline))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The committed report's metrics.json and figures in a tmp folder, the document made by the
    report's own entry point (`--summary-only`, what regenerates it without running notebooks)."""
    out = tmp_path_factory.mktemp("report")
    shutil.copy(REPORT / "metrics.json", out / "metrics.json")
    shutil.copytree(REPORT / "figures", out / "figures")
    assert make_report(["--summary-only", "--out", str(out), "--no-readme"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    reader = PdfReader(out / "report.pdf")
    return {
        "out": out,
        "metrics": metrics,
        "doc": build_document(out, metrics),
        "reader": reader,
        "pdf_text": normalise("\n".join(page.extract_text() for page in reader.pages)),
        "html": (out / "report.html").read_text(encoding="utf-8"),
    }


def test_pdf_opens_with_text_and_a_heading_per_question_in_order(built):
    reader = built["reader"]
    assert 1 <= len(reader.pages) <= 20
    assert "convolutional neural networks" in built["pdf_text"]
    titles = [normalise(t) for t in outline_titles(reader)]
    positions = []
    for question in QUESTIONS:
        hits = [i for i, title in enumerate(titles) if question in title]
        assert len(hits) == 1, f"no single PDF heading quotes {question!r}: {titles}"
        positions.append(hits[0])
    assert positions == sorted(positions), "questions out of the assignment's order"
    # Engineering material comes after every answer.
    assert titles.index("appendix") > positions[-1]


def test_html_has_the_same_headings(built):
    headings = [normalise(h) for h in re.findall(r"<h3[^>]*>(.*?)</h3>", built["html"])]
    for question in QUESTIONS:
        assert sum(question in normalise(unescape(h)) for h in headings) == 1, question


def test_every_listed_figure_is_embedded_in_both(built):
    listed = [stem for section in built["doc"].sections for stem in section.figures]
    assert len(listed) == len(set(listed)) > 0
    assert sum(len(page.images) for page in built["reader"].pages) == len(listed)
    html = built["html"]
    pairs = re.findall(r"<img src='data:image/png;base64,([^']+)' alt='([^']+)'", html)
    assert sorted(stem for _, stem in pairs) == sorted(listed)
    for data, stem in pairs:
        assert base64.b64decode(data) == (built["out"] / "figures" / f"{stem}.png").read_bytes()
    # Self-contained: every image is one of these data URIs, none is fetched from a path or URL.
    assert len(re.findall(r"<img ", html)) == len(listed)


def section_text(text: str, heading: str, next_heading: str) -> str:
    """The body of one section: from the heading's last occurrence (the first is the table of
    contents) to the next heading's, or to the end."""
    start = text.rindex(normalise(heading))
    end = text.find(normalise(next_heading), start + 1) if next_heading else -1
    return text[start : end if end >= 0 else None]


def test_numbers_agree_with_metrics(built):
    m, text = built["metrics"], built["pdf_text"]
    html = normalise(unescape(re.sub(r"<[^>]+>", "", built["html"])))  # its text, as shown
    c = m["classification"]
    headings = [s.heading for s in built["doc"].sections]
    sections = {
        s.key: section_text(text, s.heading, nxt)
        for s, nxt in zip(built["doc"].sections, [*headings[1:], ""], strict=True)
    }
    d = m["defenses"]
    # Values in the sentences that answer (a table elsewhere in the section may repeat them).
    expected = {
        "1.1": [
            f"test set of 10,000 images: {pct(c['best']['test_accuracy'])}",
            f"reaches {pct(c['first_epoch_test_accuracy'])} after that single epoch",
            f"{mean_sd(c['plain']['test_accuracy'])} for the plain network",
            f"{mean_sd(c['bn']['test_accuracy'])} with batch norm",
        ],
        # The architecture's counts are also written out: they do not depend on a run.
        "1.4": [
            "799,078 parameters",
            "789,510 in the fully connected layers",
            "9,568 in the convolutional layers",
            f"{count(m['params']['total'])} parameters",
        ],
        "1.5": [
            f"{count(m['neurons']['total'])} neurons",
            f"{count(m['neurons']['fc'])} in the fully connected layers",
            f"{count(m['neurons']['conv'])} in the convolutional layers",
        ],
        "1.6": [
            mean_sd(c["plain"]["test_accuracy"]),
            mean_sd(c["bn"]["test_accuracy"]),
            f"welch t = {c['bn_effect']['welch_t_accuracy']:.2f}",
        ],
        "3b": [f"β = {m['adversarial']['targeted']['beta']:g}"],
        "O2": [
            f"the undefended network keeps {pct(d['plain']['pgd_accuracy']['0.3'], 1)}",
            f"the pgd-trained one {pct(d['pgd_trained']['pgd_accuracy']['0.3'], 1)}",
            f"(bpda) brings it to {pct(d['binarised']['pgd_accuracy']['0.3'], 1)}",
        ],
    }
    for key, values in expected.items():
        for value in values:
            assert normalise(value) in sections[key], f"{value!r} not in section {key}"
            assert normalise(value) in html, f"{value!r} not in the HTML"
    header = text[: text.index("contents")]
    assert pct(c["best"]["test_accuracy"]) in header
    assert normalise(m["environment"]["device"]) in header


def test_a_missing_figure_is_an_error_that_names_it(built, tmp_path):
    shutil.copy(built["out"] / "metrics.json", tmp_path / "metrics.json")
    shutil.copytree(built["out"] / "figures", tmp_path / "figures")
    (tmp_path / "figures" / "part2_occlusion.png").unlink()
    with pytest.raises(DocumentError, match="part2_occlusion"):
        build_document(tmp_path)


@pytest.mark.parametrize(
    ("path", "named"),
    [
        (("params", "total"), "params.total"),
        (("classification", "best", "test_accuracy"), "classification.best.test_accuracy"),
        (("defenses", "pgd_trained"), "defenses.pgd_trained"),
    ],
)
def test_a_missing_metric_is_an_error_that_names_it(built, path, named):
    metrics = copy.deepcopy(built["metrics"])
    node = metrics
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    with pytest.raises(DocumentError, match=re.escape(f"'{named}'")):
        build_document(built["out"], metrics)


def test_quick_mode_metrics_still_make_a_document(built):
    # A quick run can have one seed: no Welch t (NaN, stored as null).
    metrics = copy.deepcopy(built["metrics"])
    metrics["quick"] = True
    metrics["classification"]["bn_effect"]["welch_t_accuracy"] = None
    doc = build_document(built["out"], metrics)
    assert any("not meaningful" in value for _, value in doc.facts)
    bn = next(s for s in doc.sections if s.key == "1.6")
    assert "Too few seeds to judge" in " ".join(bn.paragraphs)


def test_typst_escape_shows_any_text_literally(tmp_path):
    nasty = [
        "#let x = 1 and #x",
        "$E = m c^2$ costs $5",
        "*not bold* _not emph_ `not raw`",
        "@ref <label> [block] ~tilde",
        "= not a heading",
        "- not a list",
        "+ not an enum",
        "1. not numbered",
        "/ Term: not a term",
        "// not a comment /* nor this */ http://example.org",
        "back\\slash \\# -- --- ... -? 'single' \"double\"",
        "{braces} (parens) a: b; 50% & more",
    ]
    source = "\n\n".join(typst_escape(line) for line in nasty)
    reader = PdfReader(_write(tmp_path / "escape.pdf", compile_pdf(source, tmp_path)))
    lines = [" ".join(line.split()) for line in reader.pages[0].extract_text().splitlines()]
    assert [line for line in lines if line] == nasty
    assert typst_escape("two\nlines") == "two lines"


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_zip_puts_the_report_pdf_at_the_top_level(tmp_path):
    assert submission.PDF_NAME == document.PDF_NAME
    for name in ("report/metrics.json", "src/pkg/a.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}")
    (tmp_path / "report" / "report.pdf").write_bytes(b"%PDF-1.7 the document")
    submission.write_zip(tmp_path / "PA2_7.zip", tmp_path)
    archive = zipfile.ZipFile(tmp_path / "PA2_7.zip")
    assert archive.read("PA2_7/report.pdf") == b"%PDF-1.7 the document"
    assert "PA2_7/report/metrics.json" in archive.namelist()

    (tmp_path / "report" / "report.pdf").unlink()
    with pytest.raises(SystemExit, match="report.pdf"):
        submission.write_zip(tmp_path / "PA2_8.zip", tmp_path)


def test_report_readme_links_the_document_first(built, tmp_path):
    (tmp_path / "figures").mkdir()
    write_summary(tmp_path, [], built["metrics"])
    links = re.findall(r"\]\(([^)]+)\)", (tmp_path / "README.md").read_text())
    assert links[:2] == ["report.pdf", "report.html"]


def test_the_appendix_names_the_speed_path_and_the_timings_auto_chose_it_by():
    from mnistlab.tools.document.appendix import speed_lines

    classification = {
        "speed": {"plain": "bf16", "bn": "fp32+fold"},
        "speed_calibration": {
            "plain": {"path": "bf16", "seconds_per_step": {"fp32": 0.05, "bf16": 0.035}},
            "bn": None,  # an explicit path: nothing was timed
        },
    }
    (line,) = speed_lines(classification)
    assert "bf16 (plain)" in line and "fp32+fold (batch-norm)" in line
    assert "plain: fp32 50, bf16 35" in line and "batch-norm:" not in line
    assert speed_lines({}) == []
