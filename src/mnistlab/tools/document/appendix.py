"""The title block's facts and the appendix: timings, benchmarks, the recipe search."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from ...speed import REDUCED_PRECISION_MARGIN
from .helpers import (
    Section,
    count,
    fixed,
    kernel_side,
    need,
    pct,
    shape,
    variant,
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
    lines.extend(speed_lines(m.get("classification", {})))
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


def speed_lines(classification: dict[str, Any]) -> list[str]:
    """The speed path each variant trained on and, under "auto", the timings it was chosen by."""
    paths = classification.get("speed")
    if not paths:
        return []
    line = (
        "Part 1's training steps ran on the speed path "
        + " and ".join(f"{path} ({variant(v)})" for v, path in paths.items())
        + " (TrainConfig.speed, speed.py: the network's function computed faster; a bf16 path"
        " also rounds its products to bf16)."
    )
    timed = {v: c for v, c in (classification.get("speed_calibration") or {}).items() if c}
    if timed:
        line += (
            ' "auto" timed a few training steps of each candidate path on this machine and kept'
            f" the fastest (bf16 only if at least {REDUCED_PRECISION_MARGIN:.0%} faster than fp32),"
            " in ms per step: "
            + "; ".join(
                f"{variant(v)}: "
                + ", ".join(f"{p} {1000 * s:.0f}" for p, s in c["seconds_per_step"].items())
                for v, c in timed.items()
            )
            + "."
        )
    return [line]


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
