"""The recipe search: candidates are valid configs, ranking is by mean validation accuracy."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from mnistlab.tools.recipes import CANDIDATES, candidate_run, main, random_affine, rank


def test_every_candidate_is_a_valid_config():
    for name, overrides in CANDIDATES.items():
        config, warp = candidate_run(overrides, seed=0)  # a typo in a field name raises here
        assert config.epochs >= 1, name
        if overrides.get("max_rotation") or overrides.get("max_scale"):
            # the warp shifts the images itself, with the shift the candidate asks for
            assert warp is not None and config.max_shift == 0, name
            images = torch.rand(4, 1, 28, 28)
            assert warp(None, images, None, 0).shape == images.shape
        else:
            assert warp is None and config == replace(config, **overrides), name


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


def test_random_affine_without_rotation_zoom_or_shift_is_the_identity():
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(8, 1, 28, 28)
    assert torch.allclose(random_affine(images, 0.0, 0.0, 0.0, gen), images, atol=1e-5)


def test_random_affine_warps_each_image_within_the_pixel_range():
    gen = torch.Generator().manual_seed(0)
    images = torch.zeros(32, 1, 28, 28)
    images[:, :, 10:18, 12:16] = 1.0  # a bar in the middle, away from the border
    warped = random_affine(images, 15.0, 0.1, 2.0, gen)
    assert warped.shape == images.shape
    assert warped.min() >= 0.0 and warped.max() <= 1.0
    changed = (warped - images).abs().flatten(1).amax(1) > 0.1
    assert changed.all()  # every image got its own non-trivial warp
    ink = warped.flatten(1).sum(1) / images.flatten(1).sum(1)
    assert ((ink > 0.7) & (ink < 1.3)).all()  # zoom <= 10%: the bar keeps about its area
