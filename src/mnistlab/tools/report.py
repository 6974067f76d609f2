"""`make report`: execute every notebook headlessly with papermill, then write report/.

    python -m mnistlab.tools.report [--quick] [--out report] [--only 01 03]

Writes report/notebooks/*.ipynb (executed), report/*.html (self-contained, images embedded),
report/figures/*.png (saved by the notebooks), report/metrics.json (merged from the notebooks plus
timings), report/README.md + report/index.html (a summary that links everything) and the
submission document report/report.pdf + report/report.html (`mnistlab.tools.document`: the assignment's
questions answered in order), and refreshes the results table in the project README between its
`results:start` / `results:end` markers. `--summary-only` rewrites the summary and the document
from an existing report folder without running anything.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any
from unittest import mock

from papermill.exceptions import PapermillExecutionError

from ..checkpoint import library_versions
from ..pipeline import CHECKPOINT_DIR_ENV, VAL_SIZE, checkpoint_dir
from ..results import markdown_table, mean_sd, read_metrics, report_dir, update_metrics
from . import cli
from .allocator import MALLOC_ENV
from .document import HTML_NAME, PDF_NAME, pct, write_document
from .machine import device_name, fp32_gemm_gflops

README_START, README_END = "<!-- results:start -->", "<!-- results:end -->"
# Written by other commands (make bench, the recipe search, a GPU run) and read by the summary:
# a full run carries them over into the report it builds.
CARRIED = ("bench*.json", "recipe_search*.jsonl", "metrics_*.json")


def run_notebook(source: Path, executed: Path, parameters: dict[str, Any]) -> float:
    """Execute one notebook with papermill, from the working directory; return its wall time."""
    import papermill

    start = time.perf_counter()
    papermill.execute_notebook(
        str(source),
        str(executed),
        parameters=parameters,
        kernel_name="python3",
        progress_bar=False,
        cwd=os.getcwd(),
    )
    return time.perf_counter() - start


def relative_to_cwd(path: Path) -> str:
    """`path` relative to the working directory when it lies inside it, else absolute."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path.resolve())


def to_html(executed: Path, target: Path) -> None:
    """Convert an executed notebook to one self-contained HTML file (figures embedded)."""
    import nbformat
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter(embed_images=True).from_notebook_node(
        nbformat.read(executed, as_version=4)
    )
    target.write_text(body, encoding="utf-8")


def results_table(m: dict[str, Any]) -> str:
    """The headline results as a Markdown table, read from metrics.json."""
    c = m.get("classification", {})
    best = c.get("best", {})
    v = m.get("visualization", {}).get("occlusion", {})
    a = m.get("adversarial", {})
    d = m.get("defenses", {})
    rows = [
        (
            "Parameters (conv + FC = total)",
            f"{m.get('params', {}).get('conv', 0):,} + {m.get('params', {}).get('fc', 0):,} = "
            f"{m.get('params', {}).get('total', 0):,}",
        ),
        (
            "Neurons (conv + FC, conv/FC outputs)",
            f"{m.get('neurons', {}).get('conv', 0):,} + {m.get('neurons', {}).get('fc', 0):,} = "
            f"{m.get('neurons', {}).get('total', 0):,}",
        ),
        (
            "Final model, used by Parts 2 and 3 (recipe chosen on validation)",
            f"{best.get('variant', 'n/a')}, {best.get('epochs', '?')} epochs: "
            f"test accuracy {pct(best.get('test_accuracy'))}",
        ),
        (
            f"Plain CNN test accuracy ({c.get('config', {}).get('epochs', '?')}-epoch study, "
            f"mean ± sd over {len(c.get('seeds', []))} seeds)",
            mean_sd(c.get("plain", {}).get("test_accuracy")),
        ),
        (
            "With batch norm test accuracy (same study)",
            mean_sd(c.get("bn", {}).get("test_accuracy")),
        ),
        (
            "Seconds per epoch, plain / BN",
            f"{mean_sd(c.get('plain', {}).get('seconds_per_epoch'), 1, ' s')} / "
            f"{mean_sd(c.get('bn', {}).get('seconds_per_epoch'), 1, ' s')}",
        ),
        (
            "Test accuracy after one epoch" + one_epoch_recipe(c.get("first_epoch_config")),
            pct(c.get("first_epoch_test_accuracy")),
        ),
    ]
    if v:
        rows.append(
            (
                "Occlusion: mean probability drop, patch on digit / background",
                f"{v.get('drop_on_digit', 0):.3f} / {v.get('drop_on_background', 0):.3f}",
            )
        )
    if a:
        noise = a.get("noise", {}).get("success", [])
        reached = sum(map(bool, noise)) if isinstance(noise, list) else noise
        rows.append(
            (
                "Adversarial: classes reached at >= 0.99, (a) generate / (c) noise",
                f"{a.get('nontargeted', {}).get('success', 'n/a')}/10 / {reached}/10",
            )
        )
    for name, rec in d.items() if isinstance(d, dict) else []:
        if not isinstance(rec, dict) or "pgd_accuracy" not in rec:
            continue
        label = "No defence (Part 1 model)" if name == "plain" else f"Defence '{name}'"
        bpda = " (BPDA attack)" if name.startswith("binar") else ""
        if h := rec.get("headline"):  # a defended model's headline is its worst case
            rows.append(
                (
                    f"{label}: clean / worst case per image over AutoAttack and PGD-40, "
                    f"eps={h['eps']:g}{bpda}",
                    f"{pct(h['clean_accuracy'])} / {pct(h['accuracy'])} ± "
                    f"{100 * h['stderr']:.1f} points ({h['n']:,} test images)",
                )
            )
        else:
            rows.append(
                (
                    f"{label}: clean / PGD-40 eps=0.3{bpda}",
                    f"{pct(rec.get('clean_accuracy'))} / {pct(rec['pgd_accuracy'].get('0.3'))}",
                )
            )
    timing = m.get("timing", {})
    if "report_seconds" in timing:
        rows.append(
            (
                "`make report` wall time",
                f"{timing['report_seconds'] / 60:.1f} min on {m.get('environment', {}).get('device', '?')}"
                + (f"; {note}" if (note := gemm_note(timing.get("fp32_gemm_gflops"))) else ""),
            )
        )
    return markdown_table(["result", "value"], rows)


def one_epoch_recipe(config: dict[str, Any] | None) -> str:
    """' (bn, batch 32, peak lr 0.04, one-cycle)': which run the one-epoch row measured."""
    if not config:
        return ""
    shifts = f"{config['max_shift']}-px shifts" if config["max_shift"] else "no augmentation"
    return (
        f" ({config['variant']}, batch {config['batch_size']}, peak lr {config['lr']:g}, "
        f"one-cycle, {shifts})"
    )


def gemm_note(gemm: dict[str, float] | None) -> str:
    """'fp32 matrix products ran at A / B GFLOP/s (before / after)', or '' without a probe."""
    if not gemm or "before" not in gemm:
        return ""
    after = f" / {gemm['after']:.0f}" if "after" in gemm else ""
    return f"fp32 matrix products ran at {gemm['before']:.0f}{after} GFLOP/s (before / after)"


def bench_table(b: dict[str, Any]) -> str:
    """The throughput benchmark (`make bench`) as a Markdown section."""
    t, r = b["throughput"], b["ratio"]
    to_99 = b.get("seconds_to_99")
    dtype = b["autocast_dtype"]
    precision = "fp32, no autocast" if dtype == "float32" else f"{dtype} autocast"
    return "\n".join(
        [
            f"## Training throughput (`make bench`, {b['device']}, torch {b['torch']})",
            "",
            markdown_table(
                ["pipeline", "images/s"],
                [
                    (
                        f"project (in-memory tensors, {precision}, "
                        f"channels_last={b['channels_last']})",
                        f"{t['project']:,.0f}",
                    ),
                    ("naive fp32 eager, same tensors", f"{t['naive_fp32']:,.0f}"),
                    ("DataLoader + per-sample ToTensor/Normalize", f"{t['dataloader']:,.0f}"),
                ],
                "lr",
            ),
            "",
            f"Project vs naive: {r['vs_naive']:.2f}x; vs DataLoader: {r['vs_dataloader']:.2f}x. "
            + (
                f"Time to 99.0% test accuracy: {to_99:.1f} s."
                if to_99
                else "99.0% was not reached in one epoch."
            )
            + (
                f" Machine-speed probe: {note}."
                if (note := gemm_note(b.get("fp32_gemm_gflops")))
                else ""
            ),
            *epoch_lines(b.get("epochs", {})),
        ]
    )


def epoch_lines(epochs: dict[str, Any]) -> list[str]:
    """Whole default training runs of the benchmark: seconds per epoch and test accuracy."""
    if not epochs:
        return []
    names = {
        "plain": "plain",
        "bn": "batch norm",
        "bn_fold_off": "batch norm, bn1 not folded into conv1",
        "bn_fold_on": "batch norm, bn1 folded into conv1",
        "plain_fp32": "plain, fp32 (no autocast)",
        "plain_bf16": "plain, bf16 autocast",
        "bn_bf16": "batch norm, bf16 autocast",
        "plain_fp16": "plain, fp16 autocast + GradScaler",
        "plain_no_graphs": "plain, no CUDA graphs (a launch per kernel)",
    }
    n = len(next(iter(epochs.values()))["seconds_per_epoch"])
    rows = [
        (
            names.get(k, k) + (f" (`{e['speed']}`)" if "speed" in e else ""),
            f"{e['median_seconds_per_epoch']:.2f}",
            pct(e["test_accuracy"]),
        )
        for k, e in epochs.items()
    ]
    header = [f"default run ({n} epochs)", "median s/epoch", "test accuracy"]
    return ["", markdown_table(header, rows, "lrr")]


def recipe_table(path: Path) -> str:
    """The recipe search (`python -m mnistlab.tools.recipes`) ranked by mean validation accuracy."""
    from .recipes import rank

    runs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    devices = sorted({r.get("gpu") or r.get("device_name") or r["device"] for r in runs})
    lines = [
        f"## How the training recipe was chosen (`python -m mnistlab.tools.recipes`, {', '.join(devices)})",
        "",
        f"Mean best validation accuracy over seeds ({VAL_SIZE:,} held-out training images; the test set",
        "is never evaluated in the search). Overrides are relative to `TrainConfig`'s fields.",
        "",
    ]
    overrides = {r["candidate"]: r["overrides"] for r in runs}
    rows = [
        (
            row["candidate"],
            ", ".join(f"{k}={v}" for k, v in overrides[row["candidate"]].items()),
            f"{100 * row['mean_val_accuracy']:.2f} ± {100 * row['std_val_accuracy']:.2f}%",
            row["runs"],
        )
        for row in rank(runs)
    ]
    header = ["candidate", "overrides", "validation accuracy", "runs"]
    return "\n".join([*lines, markdown_table(header, rows, "llrr")])


def write_summary(out: Path, notebooks: list[Path], metrics: dict[str, Any]) -> None:
    """report/README.md: the results table and links to every notebook and figure."""
    lines = [
        "# mnistlab report",
        "",
        "Generated by `make report`; every number comes from that run.",
        "",
        f"**The submission document: [{PDF_NAME}]({PDF_NAME})** (the same in one web page: "
        f"[{HTML_NAME}]({HTML_NAME})): every question of the assignment, in its order, answered "
        "with its numbers and figures.",
        "",
    ]
    lines += [results_table(metrics), ""]
    for bench in sorted(out.glob("bench*.json")):  # bench.json (this CPU), bench_cuda.json
        lines += [bench_table(json.loads(bench.read_text())), ""]
    for search in sorted(out.glob("recipe_search*.jsonl")):
        lines += [recipe_table(search), ""]
    lines += ["## Notebooks", ""]
    lines += [
        f"- [{nb.stem}]({nb.stem}.html) (executed notebook: [notebooks/{nb.name}](notebooks/{nb.name}))"
        for nb in notebooks
    ]
    lines += ["", "## Figures", ""]
    lines += [f"- [{p.stem}](figures/{p.name})" for p in sorted((out / "figures").glob("*.png"))]
    markdown = "\n".join(lines) + "\n"
    (out / "README.md").write_text(markdown, encoding="utf-8")
    import mistune  # nbconvert's Markdown renderer

    html = mistune.html(markdown)
    style = "body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3em .6em}"
    (out / "index.html").write_text(
        f"<!doctype html><meta charset='utf-8'><title>mnistlab report</title><style>{style}</style>{html}",
        encoding="utf-8",
    )


def refresh_readme(readme: Path, metrics: dict[str, Any]) -> None:
    """Replace the block between the results markers of the project README with the new table."""
    if not readme.is_file():
        return
    text = readme.read_text(encoding="utf-8")
    if README_START not in text or README_END not in text:
        return
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(
        f"{head}{README_START}\n{results_table(metrics)}\n{README_END}{tail}", encoding="utf-8"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the notebooks and build the report; returns a process exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="report", help="report folder (default: report)")
    parser.add_argument("--notebooks", default="notebooks", help="folder of source notebooks")
    parser.add_argument(
        "--checkpoints",
        default=None,
        help=f"checkpoint folder (default: ${CHECKPOINT_DIR_ENV}, else the report's own "
        "build/<out>-checkpoints, never the notebooks' ./checkpoints)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke mode: tiny settings, seconds per notebook"
    )
    parser.add_argument(
        "--only", nargs="*", default=None, help="notebook name prefixes to run (default: all)"
    )
    parser.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="reuse existing checkpoints (default: start from none, so every model is trained in this run)",
    )
    parser.add_argument(
        "--no-readme", action="store_true", help="do not refresh the project README"
    )
    parser.add_argument(
        "--summary-only",
        action="store_true",
        help="rewrite report/README.md, index.html, report.pdf, report.html and the README table "
        "from metrics.json and figures/; run nothing",
    )
    args = parser.parse_args(argv)

    out = Path(args.out).resolve()
    if args.summary_only:
        metrics = read_metrics(out)
        write_summary(out, sorted(Path(args.notebooks).glob("[0-9][0-9]_*.ipynb")), metrics)
        write_document(out, metrics)
        if not args.no_readme and out == Path("report").resolve():
            refresh_readme(Path("README.md"), metrics)
        return 0
    sources = sorted(Path(args.notebooks).glob("[0-9][0-9]_*.ipynb"))
    if args.only:
        sources = [s for s in sources if any(s.name.startswith(p) for p in args.only)]
    if not sources:
        print(f"no notebooks found in {args.notebooks}", file=sys.stderr)
        return 2
    # The report trains into a folder of its own, so a full run, which starts from no model,
    # clears only checkpoints it wrote itself; a folder the user names is never cleared.
    own = (Path("build") / f"{out.name}-checkpoints").resolve()
    checkpoints = checkpoint_dir(args.checkpoints, default=own).resolve()
    named = checkpoints != own
    if not args.keep_checkpoints and not args.only:
        found = sorted(checkpoints.glob("*.pt"))
        if found and named:
            print(
                f"{checkpoints} holds {len(found)} checkpoint(s), and a full run trains every "
                "model itself: pass --keep-checkpoints to reuse them, or name an empty folder",
                file=sys.stderr,
            )
            return 2
        for old in found:
            old.unlink()
    final = out
    if not args.only:
        # A full run builds a new report beside the old one and swaps it in only when every
        # notebook has run, so a failed or interrupted run leaves the previous report whole.
        out = final.with_name(f"{final.name}.new")
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        for pattern in CARRIED:
            for kept in final.glob(pattern):
                shutil.copy2(kept, out / kept.name)
    report_dir(out)
    (out / "notebooks").mkdir(parents=True, exist_ok=True)

    # The notebooks run from the repository root, so folders inside it are recorded relative
    # to it (the executed notebooks name no machine's paths); MNIST_DIR reaches them through the
    # environment, which their `mnist_dir = None` default reads.
    parameters = {
        "quick": args.quick,
        "report_dir": relative_to_cwd(out),
        "checkpoint_dir": relative_to_cwd(checkpoints),
        "progress": False,
    }

    from ..train import default_device

    probe_device = default_device()
    gemm = {"before": fp32_gemm_gflops(probe_device)}
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    # The kernels start with glibc keeping freed tensor memory for reuse (allocator.py), set in
    # their environment for this loop only: the package itself changes no process setting.
    with mock.patch.dict(os.environ, MALLOC_ENV):
        for source in sources:
            executed = out / "notebooks" / source.name
            print(f"running {source.name} ...", flush=True)
            try:
                seconds[source.stem] = run_notebook(source.resolve(), executed, parameters)
            except PapermillExecutionError as err:
                print(
                    f"error: {source.name} failed: {err.ename}: {err.evalue}\n"
                    f"(the executed notebook, up to the failing cell: {executed})",
                    file=sys.stderr,
                )
                return 1
            to_html(executed, out / f"{source.stem}.html")
            print(f"  done in {seconds[source.stem]:.0f} s", flush=True)
    total = time.perf_counter() - start
    gemm["after"] = fp32_gemm_gflops(probe_device)

    # The machine-speed probe before and after: the wall times hold for a machine this fast.
    timing: dict[str, Any] = {"notebook_seconds": seconds}
    if args.only:  # the full run's wall time and probe stay; this rerun is recorded beside them
        timing["reruns"] = {stem: {"fp32_gemm_gflops": gemm} for stem in seconds}
    else:
        timing |= {"report_seconds": total, "fp32_gemm_gflops": gemm}
    update_metrics(
        {
            "timing": timing,
            "quick": args.quick,
            "environment": {
                **library_versions(),
                "device": device_name(probe_device),
                "platform": platform.platform(),
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            },
        },
        out,
    )
    metrics = read_metrics(out)
    write_summary(out, sorted(Path(args.notebooks).glob("[0-9][0-9]_*.ipynb")), metrics)
    write_document(out, metrics)
    if out != final:
        swap_in(out, final)
    if not args.quick and not args.no_readme and final == Path("report").resolve():
        refresh_readme(Path("README.md"), metrics)
    print(f"report written to {final} in {total:.0f} s")
    return 0


def swap_in(new: Path, report: Path) -> None:
    """Move everything `new` holds into `report`, replacing what has the same name; drop `new`.

    Files of `report` that the run does not write (a user's notes, say) stay where they are.
    """
    report.mkdir(parents=True, exist_ok=True)
    for entry in sorted(new.iterdir()):
        target = report / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        os.replace(entry, target)
    new.rmdir()


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
