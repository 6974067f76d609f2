"""The submission document: report/report.pdf and report/report.html, built from one run's results.

Written by `make report` (and `python -m mnistlab.tools.report --summary-only`) from the report folder's
metrics.json and figures/*.png. The assignment's questions come in its own order, each as a heading
that quotes it, answered in a few sentences with its numbers and its figures directly beneath;
engineering material (timings, benchmarks, the recipe search) is a short appendix at the end.

One content model, two renderers:

- `build_document` (build.py) makes a `Document` (helpers.py): a list of `Section`s, one builder
  function per question (part1.py, part2.py, part3.py, optional.py, appendix.py), each reading
  metrics.json only (no number is typed in here; prose may depend on the numbers);
- `render_html` (render.py) writes one self-contained HTML file (figures as base64 data URIs);
- `render_typst` (render.py) writes Typst markup, compiled to PDF by the `typst` package (PyPI; no
  TeX, no browser) with its bundled fonts only and no date, so the same inputs give the same PDF bytes.

Where a notebook answers yes or no, the section reads the recorded numbers through the same rule
(`mnistlab.verdicts`). Tooling: the teaching modules never import this package.
"""

from ...results import mean_sd
from .build import BUILDERS, FIGURES, HTML_NAME, PDF_NAME, build_document, write_document
from .helpers import (
    Document,
    DocumentError,
    Section,
    Table,
    count,
    fixed,
    need,
    of_ten,
    pct,
    shape,
    variant,
)
from .render import caption, compile_pdf, render_html, render_typst, typst_escape

__all__ = [
    "BUILDERS",
    "FIGURES",
    "HTML_NAME",
    "PDF_NAME",
    "Document",
    "DocumentError",
    "Section",
    "Table",
    "build_document",
    "caption",
    "compile_pdf",
    "count",
    "fixed",
    "mean_sd",
    "need",
    "of_ten",
    "pct",
    "render_html",
    "render_typst",
    "shape",
    "typst_escape",
    "variant",
    "write_document",
]
