"""`make report` loses nothing: a failed run leaves the old report whole, user files stay."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
import torch
from papermill.exceptions import PapermillExecutionError

from mnistlab.data import MNISTDataError
from mnistlab.results import read_metrics, update_metrics
from mnistlab.tools import cli, report
from mnistlab.tools.allocator import MALLOC_ENV
from mnistlab.tools.document import DocumentError
from mnistlab.tools.machine import cpu_name, device_name

REPO = Path(__file__).parents[1]


@pytest.fixture
def fake_pipeline(tmp_path, monkeypatch):
    """report.main with the notebooks, HTML, document and speed probe replaced by quick fakes.

    Each fake notebook writes what a real one writes (its executed copy, a figure, a metrics
    entry); `fail_on` names the notebook that is interrupted, as by Ctrl-C.
    """
    monkeypatch.chdir(tmp_path)
    sources = tmp_path / "notebooks"
    sources.mkdir()
    for name in ("01_first.ipynb", "02_second.ipynb"):
        nbformat.write(nbformat.v4.new_notebook(), sources / name)
    state = {"fail_on": None, "runs": 0}

    def run_notebook(source, executed, parameters):
        if state["fail_on"] and source.name.startswith(state["fail_on"]):
            raise KeyboardInterrupt
        state["kernel_env"] = {k: os.environ.get(k) for k in MALLOC_ENV}
        folder = Path(parameters["report_dir"])
        nbformat.write(nbformat.v4.new_notebook(), executed)
        (folder / "figures" / f"{source.stem}.png").write_bytes(f"run {state['runs']}".encode())
        update_metrics({"ran": {source.stem: state["runs"]}}, folder)
        return 0.0

    monkeypatch.setattr(report, "run_notebook", run_notebook)
    monkeypatch.setattr(report, "to_html", lambda executed, target: target.write_text("html"))
    monkeypatch.setattr(report, "write_document", lambda out, metrics: None)
    monkeypatch.setattr(report, "fp32_gemm_gflops", lambda device: 1.0)

    def run(*extra: str, fail_on: str | None = None) -> int:
        state["fail_on"] = fail_on
        state["runs"] += 1
        return report.main(["--notebooks", str(sources), "--no-readme", *extra])

    run.state = state
    return run


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_an_interrupted_run_leaves_the_previous_report_whole(fake_pipeline, tmp_path):
    assert fake_pipeline() == 0
    before = snapshot(tmp_path / "report")
    assert "figures/02_second.png" in before and "metrics.json" in before
    with pytest.raises(KeyboardInterrupt):
        fake_pipeline(fail_on="02")
    assert snapshot(tmp_path / "report") == before
    # The next run starts its new report from scratch and swaps it in whole.
    assert fake_pipeline() == 0
    after = snapshot(tmp_path / "report")
    assert after["figures/01_first.png"] == b"run 3" and after.keys() == before.keys()
    assert not (tmp_path / "report.new").exists()


def test_a_full_run_keeps_files_it_did_not_write(fake_pipeline, tmp_path):
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "notes.txt").write_text("mine")
    bench = (REPO / "report" / "bench.json").read_text()  # written by make bench
    (tmp_path / "report" / "bench.json").write_text(bench)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "best.pt").write_bytes(b"trained by hand")
    own = tmp_path / "build" / "report-checkpoints"
    own.mkdir(parents=True)
    (own / "old.pt").write_bytes(b"from the last report")
    assert fake_pipeline() == 0
    assert (tmp_path / "report" / "notes.txt").read_text() == "mine"
    assert (tmp_path / "report" / "bench.json").read_text() == bench
    assert (tmp_path / "checkpoints" / "best.pt").read_bytes() == b"trained by hand"
    assert not (own / "old.pt").exists()  # the report's own folder starts empty


def test_a_named_checkpoint_folder_is_never_cleared(fake_pipeline, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "best.pt").write_bytes(b"keep")
    assert fake_pipeline("--checkpoints", str(mine)) == 2
    assert (mine / "best.pt").read_bytes() == b"keep"
    assert not (tmp_path / "report").exists()
    assert fake_pipeline("--checkpoints", str(mine), "--keep-checkpoints") == 0
    assert (mine / "best.pt").read_bytes() == b"keep"


def test_the_kernels_start_with_the_malloc_settings_and_the_process_keeps_its_own(
    fake_pipeline, monkeypatch
):
    for name in MALLOC_ENV:
        monkeypatch.delenv(name, raising=False)
    assert fake_pipeline() == 0
    assert fake_pipeline.state["kernel_env"] == MALLOC_ENV
    assert not any(name in os.environ for name in MALLOC_ENV)


def test_a_failing_notebook_ends_the_run_with_its_error_not_a_traceback(
    fake_pipeline, monkeypatch, capsys
):
    def failing(source, executed, parameters):
        raise PapermillExecutionError(3, 1, "load_mnist()", "MNISTDataError", "set MNIST_DIR", [])

    monkeypatch.setattr(report, "run_notebook", failing)
    assert fake_pipeline() == 1
    err = capsys.readouterr().err
    assert "01_first.ipynb failed: MNISTDataError: set MNIST_DIR" in err


def test_the_entry_points_end_a_known_error_with_its_message(capsys):
    def no_data(argv):
        raise MNISTDataError("/nowhere: no MNIST files; set MNIST_DIR")

    assert cli.run(no_data) == 2
    assert capsys.readouterr().err == "error: /nowhere: no MNIST files; set MNIST_DIR\n"

    def no_metric(argv):
        raise DocumentError("metrics.json has no 'classification', which the report document needs")

    assert cli.run(no_metric) == 2
    assert "which the report document needs" in capsys.readouterr().err

    def bug(argv):
        raise KeyError("not a known error")

    with pytest.raises(KeyError):  # anything else keeps its traceback: it is a bug to see
        cli.run(bug)


def test_a_rerun_of_one_notebook_keeps_the_full_runs_timing(fake_pipeline, tmp_path, monkeypatch):
    probes = iter(range(1, 100))
    monkeypatch.setattr(report, "fp32_gemm_gflops", lambda device: float(next(probes)))
    assert fake_pipeline() == 0
    full = read_metrics(tmp_path / "report")["timing"]
    assert fake_pipeline("--only", "02") == 0
    timing = read_metrics(tmp_path / "report")["timing"]
    assert timing["report_seconds"] == full["report_seconds"]
    assert timing["fp32_gemm_gflops"] == full["fp32_gemm_gflops"] == {"before": 1.0, "after": 2.0}
    assert timing["reruns"] == {"02_second": {"fp32_gemm_gflops": {"before": 3.0, "after": 4.0}}}


def test_the_device_is_named_one_way_in_what_the_tools_record():
    assert device_name("cpu") == device_name(torch.device("cpu"))
    assert device_name("cpu") == (
        f"CPU ({cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    )


def test_a_defended_models_summary_row_is_its_worst_case_not_pgd_40():
    from mnistlab.tools.report import results_table

    headline = {"eps": 0.3, "clean_accuracy": 0.987, "accuracy": 0.88, "stderr": 0.0098, "n": 1100}
    defenses = {
        "plain": {"clean_accuracy": 0.995, "pgd_accuracy": {"0.3": 0.0}},
        "pgd_trained": {
            "clean_accuracy": 0.989,
            "pgd_accuracy": {"0.3": 0.926},
            "headline": headline,
        },
    }
    table = results_table({"defenses": defenses})
    (row,) = [line for line in table.splitlines() if "pgd_trained" in line]
    assert "worst case per image over AutoAttack and PGD-40" in row
    assert "88.00% ± 1.0 points (1,100 test images)" in row and "92.60" not in row
    assert "No defence (Part 1 model): clean / PGD-40 eps=0.3 | 99.50% / 0.00%" in table
