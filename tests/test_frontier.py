"""Issue 21's GPU studies, run tiny on a CPU: well-formed files, choices made on validation only,
the time-to-99 clock without the setup, clear errors."""

from __future__ import annotations

import json
import time

import pytest
import torch

from mnistlab import speed
from mnistlab.data import MNIST, Split
from mnistlab.tools import frontier
from mnistlab.tools.bench import TO_99_CANDIDATES, choose_fastest, time_to_99, timed_run
from mnistlab.tools.frontier import BEST_CANDIDATES, best_accuracy_study, main, merge_json
from mnistlab.tools.recipes import candidate_run
from mnistlab.train import TrainConfig

TINY = {"limit_train_batches": 2, "batch_size": 16, "evals_per_epoch": 1, "epochs": 1}


def toy_images(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Faint noise with a bright bar whose height gives the label: learnable in a few steps."""
    labels = torch.randint(0, 10, (n,), generator=generator)
    rows = torch.arange(28)
    bar = (rows >= 2 * labels[:, None] + 2) & (rows < 2 * labels[:, None] + 6)
    images = 0.1 * torch.rand(n, 1, 28, 28, generator=generator)
    images[:, 0, :, 4:24] += 0.9 * bar[:, :, None]
    return images.clamp(0, 1), labels


def toy_mnist(permute_test: bool = False) -> MNIST:
    generator = torch.Generator().manual_seed(0)
    train_x, train_y = toy_images(240, generator)
    test_x, test_y = toy_images(80, generator)
    if permute_test:  # a different test set: nothing chosen may change
        test_y = test_y[torch.randperm(len(test_y), generator=generator)]
    return MNIST(train_x, train_y, test_x, test_y, source="toy")


def toy_split() -> Split:
    data = toy_mnist()
    return Split(data.train_images, data.train_labels, data.test_images, data.test_labels, None)


def test_every_candidate_is_a_valid_config():
    for overrides in BEST_CANDIDATES.values():
        candidate_run(overrides, seed=0)  # a typo in a field name raises here
    for overrides in TO_99_CANDIDATES.values():
        TrainConfig(**overrides)


def test_choose_fastest_hand_case():
    table = [
        {"candidate": "slow", "mean_val_accuracy": 0.995, "mean_seconds": 2.0},
        {"candidate": "fast", "mean_val_accuracy": 0.990, "mean_seconds": 0.5},
        {"candidate": "faster", "mean_val_accuracy": 0.989, "mean_seconds": 0.2},
    ]
    assert choose_fastest(table, 0.99)["candidate"] == "fast"  # the fastest that reaches it
    assert choose_fastest(table, 0.999)["candidate"] == "slow"  # none reaches: the most accurate
    with pytest.raises(ValueError, match="no candidates"):
        choose_fastest([], 0.99)


def test_timed_run_leaves_graph_capture_out_of_the_clock(monkeypatch):
    # A capture that takes a second: the timed seconds must not contain it, the setup must.
    timed_run(TrainConfig(**TINY), toy_split(), torch.device("cpu"))  # first-call costs out
    real = speed.training_forward

    def slow_capture(*args, **kwargs):
        time.sleep(1.0)
        return real(*args, **kwargs)

    monkeypatch.setattr(speed, "training_forward", slow_capture)
    run = timed_run(TrainConfig(**TINY), toy_split(), torch.device("cpu"))
    assert run["setup_seconds"] >= 1.0 > run["seconds"] > 0
    assert run["steps"] == 2 and 0 <= run["accuracy"] <= 1


def test_timed_run_refuses_runs_with_more_than_one_evaluation():
    with pytest.raises(ValueError, match="one epoch and one evaluation"):
        timed_run(TrainConfig(**{**TINY, "epochs": 2}), toy_split(), torch.device("cpu"))
    with pytest.raises(ValueError, match="one epoch and one evaluation"):
        timed_run(TrainConfig(**{**TINY, "evals_per_epoch": 2}), toy_split(), torch.device("cpu"))


def test_time_to_99_choice_never_sees_the_test_set():
    candidates = {"lr0.01": {"lr": 0.01}, "lr0.3": {"lr": 0.3}}
    runs = [
        # target above 100%: the choice is the highest mean validation accuracy, not a timing
        time_to_99(
            toy_mnist(permute),
            torch.device("cpu"),
            candidates,
            [0],
            [0, 1],
            target=1.01,
            overrides=TINY,
            val_size=40,
        )
        for permute in (False, True)
    ]
    assert runs[0]["search"] == [
        {**row, "mean_seconds": runs[0]["search"][i]["mean_seconds"]}
        for i, row in enumerate(runs[1]["search"])
    ]
    assert runs[0]["chosen"] == runs[1]["chosen"]
    assert runs[0]["test_accuracy"] != runs[1]["test_accuracy"]  # the test set did change
    assert len(runs[0]["runs"]) == 2 and runs[0]["meets_target"] is False


def test_best_study_choice_never_sees_the_test_set():
    candidates = {"lr0.01": {"lr": 0.01}, "lr0.3": {"lr": 0.3}}
    studies = [
        best_accuracy_study(
            toy_mnist(permute),
            torch.device("cpu"),
            candidates,
            [0, 1],
            [2],
            overrides=TINY,
            val_size=40,
        )
        for permute in (False, True)
    ]
    drop_time = [
        [{k: v for k, v in row.items() if k != "mean_seconds"} for row in s["ranking"]]
        for s in studies
    ]
    assert drop_time[0] == drop_time[1]
    assert studies[0]["chosen"] == studies[1]["chosen"] == studies[0]["ranking"][0]["candidate"]
    final = studies[0]["final"]
    assert final["seeds"] == [0, 1, 2] and len(final["test_accuracy"]) == 3
    assert final["test_accuracy"] != studies[1]["final"]["test_accuracy"]
    # The runs hold validation figures only; test numbers exist for the chosen recipe alone.
    assert not any("test" in key for run in studies[0]["runs"] for key in run)


def test_best_study_stops_at_its_deadline():
    clock = iter(range(0, 10_000, 10)).__next__  # each reading 10 s after the last
    study = best_accuracy_study(
        toy_mnist(),
        torch.device("cpu"),
        {"only": {}},
        [0, 1, 2],
        [3],
        overrides=TINY,
        val_size=40,
        deadline=35,
        clock=clock,
    )
    assert study["complete_seeds"] == [0] and study["final"]["seeds"] == [0]
    assert {(s["candidate"], s["seed"]) for s in study["skipped"]} == {
        ("only", 1),
        ("only", 2),
        ("only", 3),
    }
    with pytest.raises(RuntimeError, match="raise --budget-s"):
        best_accuracy_study(
            toy_mnist(),
            torch.device("cpu"),
            {"a": {}, "b": {}},
            [0],
            [],
            overrides=TINY,
            val_size=40,
            deadline=0,
            clock=clock,
        )


def test_merge_json_keeps_what_the_file_holds(tmp_path):
    path = tmp_path / "bench_cuda.json"
    path.write_text(json.dumps({"throughput": {"project": 1.0}}))
    merge_json(path, "time_to_99", {"seconds": 0.2})
    assert json.loads(path.read_text()) == {
        "throughput": {"project": 1.0},
        "time_to_99": {"seconds": 0.2},
    }


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--only", "speed"], "--only takes parts from"),
        (["--only", ","], "--only takes parts from"),
        (["--seeds", "0"], "--seeds must be at least 1"),
        (["--to99-seeds", "0"], "--to99-seeds must be at least 1"),
        (["--budget-s", "0"], "--budget-s > 0"),
    ],
)
def test_bad_arguments_are_refused_clearly(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_asking_for_cuda_without_it_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        main(["--device", "cuda"])
    assert "no CUDA device is available" in capsys.readouterr().err


@pytest.mark.slow
def test_smoke_run_writes_both_files(mnist_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("MNIST_DIR", str(mnist_dir))
    (tmp_path / "bench.json").write_text(json.dumps({"device": "kept"}))
    small = ["--seeds", "2", "--extra-seeds", "1", "--to99-seeds", "3", "--to99-search-seeds", "1"]
    assert main(["--smoke", "--device", "cpu", "--out-dir", str(tmp_path), *small]) == 0
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert bench["device"] == "kept"  # merged, not overwritten
    to99 = bench["time_to_99"]
    assert to99["smoke"] is True and to99["chosen"] in TO_99_CANDIDATES
    assert len(to99["runs"]) == 3 and to99["torch"] == torch.__version__
    for run in to99["runs"]:
        assert run["seconds"] > 0 and run["setup_seconds"] >= 0 and 0 <= run["accuracy"] <= 1
    best = json.loads((tmp_path / "frontier_cpu.json").read_text())
    assert best["smoke"] is True and best["chosen"] in BEST_CANDIDATES
    assert best["final"]["seeds"] == [0, 1, 2]
    assert best["final"]["test_summary"]["mean"] == pytest.approx(
        sum(best["final"]["test_accuracy"]) / 3
    )
    assert best["split"]["val"] == frontier.SMOKE_VAL
