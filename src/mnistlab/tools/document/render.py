"""The two renderers of a Document: one self-contained HTML page, and Typst markup compiled to PDF."""

from __future__ import annotations

import base64
import html
import struct
from pathlib import Path

from .helpers import Document, DocumentError, Section

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
