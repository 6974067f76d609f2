"""metrics.json merging, the README results block, the submission zip, and the benchmark's steps."""

from __future__ import annotations

import json
import math
import zipfile

import pytest
import torch

from mnistlab.results import markdown_table, mean_sd, read_metrics, update_metrics
from mnistlab.tools import bench
from mnistlab.tools.report import README_END, README_START, refresh_readme
from mnistlab.tools.submission import write_zip


def test_update_metrics_merges_nested_sections_and_converts_values(tmp_path):
    update_metrics({"a": {"x": 1, "y": torch.tensor([1.5, 2.5])}}, tmp_path)
    update_metrics({"a": {"z": math.nan}, "b": (1, 2)}, tmp_path)
    assert read_metrics(tmp_path) == {"a": {"x": 1, "y": [1.5, 2.5], "z": None}, "b": [1, 2]}
    assert json.loads((tmp_path / "metrics.json").read_text())["a"]["x"] == 1


def test_readme_block_is_replaced_and_the_rest_kept(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_START}\nold\n{README_END}\noutro\n")
    refresh_readme(readme, {"params": {"conv": 9568, "fc": 789510, "total": 799078}})
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old" not in text
    assert "9,568 + 789,510 = 799,078" in text


def test_zip_holds_report_and_code_without_caches(tmp_path, monkeypatch):
    for name in (
        "report/metrics.json",
        "src/pkg/a.py",
        "src/pkg/__pycache__/a.pyc",
        "notebooks/n.ipynb",
        "report/report.pdf",
    ):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}")
    (tmp_path / "README.md").write_text("r")
    n = write_zip(tmp_path / "PA2_7.zip", tmp_path)
    names = zipfile.ZipFile(tmp_path / "PA2_7.zip").namelist()
    assert n == len(names) == 6  # report.pdf also at the top level
    assert "PA2_7/report/metrics.json" in names and not any("__pycache__" in x for x in names)


def test_zip_refuses_without_a_report(tmp_path):
    with pytest.raises(SystemExit, match="make report"):
        write_zip(tmp_path / "PA2_7.zip", tmp_path)


def test_benchmark_steps_train_on_the_same_data(mnist):
    device = torch.device("cpu")
    small = type(mnist)(
        mnist.train_images[:512],
        mnist.train_labels[:512],
        mnist.test_images[:10],
        mnist.test_labels[:10],
        "subset",
    )
    for step in (
        bench.project_step(small, device, bench.TrainConfig(speed="fp32")),
        bench.naive_step(small, device),
        bench.dataloader_step(small, device),
    ):
        assert step() in (64, 128)
    rates = bench.measure(
        {"naive": bench.naive_step(small, device)}, device, warmup=1, windows=2, n=2
    )
    assert rates["naive"] > 0


def test_markdown_table_aligns_columns_and_refuses_a_bad_alignment():
    table = markdown_table(["a", "b"], [(1, "x"), (22, "y")], "rl")
    assert table.splitlines() == ["| a | b |", "|---:|---|", "| 1 | x |", "| 22 | y |"]
    assert markdown_table(["a", "b"], []).splitlines()[1] == "|---|---|"
    for bad in ("r", "rx"):
        with pytest.raises(ValueError, match="one of l, r, c per column"):
            markdown_table(["a", "b"], [], bad)


def test_mean_sd_is_the_mean_and_sample_sd_of_the_values():
    # mean 0.9941, sample sd sqrt(((4e-4)^2 + (5e-4)^2 + (1e-4)^2) / 2) = 4.58e-4 by hand.
    assert mean_sd([0.9945, 0.9936, 0.9942]) == "99.41 ± 0.05%"
    assert mean_sd([10.0, 12.0], 1, " s", 1) == "11.0 ± 1.4 s"  # sd = sqrt(2)
    assert mean_sd([0.5]) == "50.00 ± 0.00%"
    assert mean_sd([]) == mean_sd(None) == mean_sd([None]) == "n/a"
