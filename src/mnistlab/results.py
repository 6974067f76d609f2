"""Where a run's results go: figures as PNG files and numbers merged into metrics.json."""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.figure

REPORT_DIR_ENV = "MNISTLAB_REPORT_DIR"
FIGURE_KEY = "mnistlab_figure"  # output metadata naming the figure file an image shows


def report_dir(path: str | Path | None = None) -> Path:
    """The report folder: `path`, else $MNISTLAB_REPORT_DIR, else ./report; created if missing."""
    folder = Path(path or os.environ.get(REPORT_DIR_ENV) or "report")
    (folder / "figures").mkdir(parents=True, exist_ok=True)
    return folder


def show_figure(fig: matplotlib.figure.Figure, name: str, folder: str | Path | None = None) -> Path:
    """Save `fig` as report/figures/<name>.png (150 dpi) and show that PNG in the notebook.

    The one way every notebook shows a figure. It displays the saved PNG itself, not the Figure
    object: a Figure built without pyplot prints as text ("<Figure size ...>") in a kernel where
    matplotlib's inline display hooks are not installed, as under papermill, while a PNG shows in
    Jupyter, Colab and the HTML report alike, and is exactly the file the report links.
    """
    path = report_dir(folder) / "figures" / f"{name}.png"
    fig.savefig(path, dpi=150, bbox_inches="tight")
    from IPython.display import Image, display

    # The name travels in the output's metadata, so a test can match shown images to saved files.
    display(Image(data=path.read_bytes(), format="png"), metadata={FIGURE_KEY: name})
    return path


def _merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _jsonable(value: Any) -> Any:
    """Turn tensors, numpy values and tuples into JSON types; NaN/inf become None."""
    if hasattr(value, "tolist"):  # torch.Tensor, numpy arrays and scalars
        value = value.tolist()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_metrics(folder: str | Path | None = None) -> dict[str, Any]:
    """The metrics recorded so far in report/metrics.json ({} when there are none)."""
    path = report_dir(folder) / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def update_metrics(section: dict[str, Any], folder: str | Path | None = None) -> Path:
    """Merge `section` (nested dicts) into report/metrics.json, atomically."""
    path = report_dir(folder) / "metrics.json"
    metrics = read_metrics(folder)
    _merge(metrics, _jsonable(section))
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(metrics, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    return path


MARKDOWN_ALIGN = {"l": "---", "r": "---:", "c": ":---:"}


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]], align: str = "") -> str:
    """A Markdown table from a header and rows of cells; `align`: one letter (l/r/c) per column."""
    align = align or "l" * len(header)
    if len(align) != len(header) or set(align) - set(MARKDOWN_ALIGN):
        raise ValueError(f"align {align!r}: one of l, r, c per column ({len(header)} columns)")
    rule = "|" + "".join(f"{MARKDOWN_ALIGN[a]}|" for a in align)
    lines = ["| " + " | ".join(header) + " |", rule]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def mean_sd(
    values: list[float | None], scale: float = 100.0, unit: str = "%", digits: int = 2
) -> str:
    """'mean ± sample sd' of a list: [0.9945, 0.9936, 0.9942] -> '99.41 ± 0.05%'; 'n/a' if empty."""
    values = [v for v in values or [] if v is not None]
    if not values:
        return "n/a"
    mean = statistics.fmean(values) * scale
    sd = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {sd:.{digits}f}{unit}"
