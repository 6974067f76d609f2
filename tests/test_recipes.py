"""The recipe search: candidates are valid configs, ranking is by mean validation accuracy."""

from __future__ import annotations

from dataclasses import replace

import pytest

from mnistlab.tools.recipes import CANDIDATES, main, rank
from mnistlab.train import TrainConfig


def test_every_candidate_is_a_valid_config():
    for name, overrides in CANDIDATES.items():
        config = replace(TrainConfig(), **overrides)  # a typo in a field name raises here
        assert config.epochs >= 1, name


def test_rank_orders_by_mean_validation_accuracy_hand_case():
    runs = [
        {"candidate": "a", "best_val_accuracy": 0.990, "seconds": 1.0},
        {"candidate": "a", "best_val_accuracy": 0.994, "seconds": 3.0},
        {"candidate": "b", "best_val_accuracy": 0.993, "seconds": 2.0},
    ]
    table = rank(runs)
    assert [row["candidate"] for row in table] == ["b", "a"]  # 0.993 > mean(0.990, 0.994)
    a = table[1]
    assert a["runs"] == 2 and a["mean_val_accuracy"] == pytest.approx(0.992)
    assert a["std_val_accuracy"] == pytest.approx(0.004 / 2**0.5)
    assert a["mean_seconds"] == pytest.approx(2.0)


def test_unknown_candidate_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["--only", "no-such-recipe"])
    assert "unknown candidates" in capsys.readouterr().err
