"""Checkpoints round-trip exactly and refuse corrupt, foreign or mismatched files with a clear error."""

from __future__ import annotations

import pytest
import torch

from mnistlab.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from mnistlab.model import MnistCNN
from mnistlab.pipeline import BEST_NAME, select_best


def test_round_trip_is_exact_and_keeps_metadata(tmp_path):
    torch.manual_seed(0)
    model = MnistCNN("bn")
    model.layers.bn1.running_mean.add_(0.5)  # buffers travel too
    path = save_checkpoint(tmp_path / "m.pt", model, config={"epochs": 3}, metrics={"val": 0.99})
    loaded, meta = load_checkpoint(path)
    assert (
        meta["variant"] == "bn"
        and meta["config"] == {"epochs": 3}
        and meta["metrics"] == {"val": 0.99}
    )
    assert "torch" in meta["versions"]
    original = model.state_dict()
    assert all(torch.equal(original[k], v) for k, v in loaded.state_dict().items())
    assert not loaded.training
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temporary file left behind


def test_save_replaces_an_existing_file(tmp_path):
    path = tmp_path / "m.pt"
    save_checkpoint(path, MnistCNN("plain"), tag="old")
    save_checkpoint(path, MnistCNN("plain"), tag="new")
    assert load_checkpoint(path)[1]["tag"] == "new"


def test_mismatched_weights_are_refused(tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", MnistCNN("bn"))
    payload = torch.load(path, weights_only=True)
    payload["variant"] = "plain"  # BN weights under a plain tag
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="do not fit the 'plain' network"):
        load_checkpoint(path)


def test_corrupt_file_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", MnistCNN("plain"))
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(path)


def test_foreign_file_is_refused(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(MnistCNN("plain").state_dict(), path)  # a bare state dict, no metadata
    with pytest.raises(CheckpointError, match="not an mnistlab checkpoint"):
        load_checkpoint(path)


class Payload:  # an arbitrary object: weights_only loading must refuse to unpickle it
    pass


def test_arbitrary_pickles_are_not_executed(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "mnistlab.checkpoint", "object": Payload()}, path)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "nothing.pt")


def test_best_is_chosen_by_validation_not_test_accuracy(tmp_path):
    for name, val, test in (("plain-seed0", 0.990, 0.999), ("bn-seed0", 0.995, 0.980)):
        save_checkpoint(
            tmp_path / f"{name}.pt",
            MnistCNN(name.split("-")[0]),
            metrics={"best_val_accuracy": val, "test_accuracy": test},
            config={},
        )
    select_best(tmp_path)
    _, meta = load_checkpoint(tmp_path / BEST_NAME)
    assert meta["selected_from"] == "bn-seed0.pt" and meta["variant"] == "bn"


def test_best_can_be_chosen_among_the_runs_of_one_recipe(tmp_path):
    runs = (("bn-seed0", 0.999), ("plain-8ep-seed0", 0.991), ("plain-8ep-seed1", 0.993))
    for name, val in runs:
        save_checkpoint(
            tmp_path / f"{name}.pt",
            MnistCNN(name.split("-")[0]),
            metrics={"best_val_accuracy": val},
            config={},
        )
    select_best(tmp_path, "*-8ep-seed*.pt")
    _, meta = load_checkpoint(tmp_path / BEST_NAME)
    assert meta["selected_from"] == "plain-8ep-seed1.pt"
    with pytest.raises(FileNotFoundError, match="12ep"):
        select_best(tmp_path, "*-12ep-seed*.pt")


def test_checkpoints_written_before_the_momentum_fix_still_load(tmp_path):
    # Older checkpoints record `momentum` (never applied: the one-cycle schedule overrode it),
    # the old speed knobs and the recipe search's affine knobs. The rule: a checkpoint's config
    # is kept as it was written; loading reads only the variant and the weights, and the
    # notebooks' helpers read variant, seed and epochs, which every version records.
    from mnistlab.pipeline import load_best_model, load_independent_model

    old_config = {
        "variant": "plain",
        "epochs": 8,
        "batch_size": 128,
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "warmup_fraction": 0.15,
        "label_smoothing": 0.0,
        "max_shift": 1,
        "max_rotation": 0.0,
        "max_scale": 0.0,
        "ema_decay": 0.0,
        "seed": 0,
        "evals_per_epoch": 4,
        "eval_batch_size": 256,
        "mixed_precision": "auto",
        "channels_last": True,
        "fold_bn1": "auto",
        "cuda_graphs": True,
        "limit_train_batches": 0,
    }
    metrics = {"best_val_accuracy": 0.99, "test_accuracy": 0.99}
    save_checkpoint(tmp_path / BEST_NAME, MnistCNN("plain"), config=old_config, metrics=metrics)
    other = dict(old_config, variant="bn", seed=1)
    save_checkpoint(tmp_path / "bn-seed1.pt", MnistCNN("bn"), config=other, metrics=metrics)
    model, meta = load_best_model(tmp_path)
    assert model.variant == "plain" and meta["config"]["momentum"] == 0.9
    independent, independent_meta = load_independent_model(tmp_path)
    assert independent.variant == "bn" and independent_meta["config"]["seed"] == 1
