"""What every section builder uses: the content model (Document, Section, Table), reading
metrics.json with a clear error for a missing key, and the number formats of the text."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


def shape(dims: list[int]) -> str:
    """A tensor shape per image: [32, 28, 28] -> '32 × 28 × 28'."""
    return " × ".join(str(d) for d in dims)


def of_ten(reached: int | list[bool], total: int | None = None) -> str:
    """'7 of 10' from a count (with its total) or a list of booleans."""
    if isinstance(reached, list):
        return f"{sum(map(bool, reached))} of {len(reached)}"
    return f"{reached} of {total}"


def kernel_side(conv: dict[str, Any]) -> int:
    """A square conv kernel's side, from its parameter count: out * in * k * k + out biases."""
    out_dim, in_dim = conv["output_shape"][0], conv["input_shape"][0]
    return round(((conv["params"] - out_dim) / (out_dim * in_dim)) ** 0.5)


def product(dims: list[int]) -> int:
    """The number of elements of a shape: [32, 28, 28] -> 25088."""
    out = 1
    for d in dims:
        out *= d
    return out
