"""The steps the notebooks share: train-and-save a run, pick the best model, load it (or train it)."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .checkpoint import load_checkpoint, save_checkpoint
from .data import MNIST, load_mnist, validation_split
from .model import MnistCNN
from .speed import cached_calibration
from .train import (
    TrainConfig,
    TrainResult,
    config_dict,
    default_device,
    evaluate,
    final_config,
    train,
)

CHECKPOINT_DIR_ENV = "MNISTLAB_CHECKPOINTS"
BEST_NAME = "best.pt"
VAL_SIZE, SPLIT_SEED = 5_000, 0  # the validation split every notebook uses


def checkpoint_dir(path: str | Path | None = None, default: str | Path = "checkpoints") -> Path:
    """The checkpoint folder: `path`, else $MNISTLAB_CHECKPOINTS, else `default` (./checkpoints)."""
    return Path(path or os.environ.get(CHECKPOINT_DIR_ENV) or default)


def run_name(config: TrainConfig, tag: str = "") -> str:
    """File stem of a run's checkpoint, e.g. 'plain-seed0', or 'plain-8ep-seed0' tagged '8ep'."""
    return f"{config.variant}-{tag + '-' if tag else ''}seed{config.seed}"


def train_and_save(
    config: TrainConfig,
    data: MNIST,
    folder: str | Path | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    tag: str = "",
) -> tuple[TrainResult, dict[str, Any]]:
    """Train one run on the standard split, measure it on the test set, save its checkpoint.

    The checkpoint is `run_name(config, tag)`.pt; a tag keeps runs of another recipe (Part 1's
    longer final run) apart from the study's runs of the same variant and seed.
    """
    split = validation_split(data, VAL_SIZE, SPLIT_SEED)
    result = train(config, split, device, progress)
    dev = torch.device(result.device)
    test = evaluate(result.model, data.test_images.to(dev), data.test_labels.to(dev))
    metrics = {
        "best_val_accuracy": result.best_val_accuracy,
        "best_step": result.best_step,
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "seconds_per_epoch": result.seconds_per_epoch,
        "device": result.device,
        "speed": result.speed,
        "autocast_dtype": result.autocast_dtype,
        # What "auto" measured when it chose the path (None for an explicit path or a quick run).
        "speed_calibration": (
            cached_calibration(dev, config.variant, config.batch_size)
            if config.speed == "auto"
            else None
        ),
    }
    path = checkpoint_dir(folder) / f"{run_name(config, tag)}.pt"
    save_checkpoint(
        path, result.model, config=config_dict(config), metrics=metrics, history=result.history
    )
    return result, metrics


def select_best(folder: str | Path | None = None, pattern: str = "*-seed*.pt") -> Path:
    """Copy the run with the highest validation accuracy (never test accuracy) to best.pt.

    The candidates are the checkpoints matching `pattern`, e.g. the runs of one recipe.
    """
    folder = checkpoint_dir(folder)
    runs = sorted(p for p in folder.glob(pattern))
    if not runs:
        raise FileNotFoundError(f"{folder}: no run checkpoints ({pattern}) to choose from")
    loaded = [(load_checkpoint(p), p) for p in runs]
    (model, meta), path = max(loaded, key=lambda item: item[0][1]["metrics"]["best_val_accuracy"])
    extra = {
        k: v
        for k, v in meta.items()
        if k not in ("format", "format_version", "variant", "versions")
    }
    return save_checkpoint(folder / BEST_NAME, model, selected_from=path.name, **extra)


def load_best_model(
    folder: str | Path | None = None,
    data: MNIST | None = None,
    device: torch.device | str = "cpu",
    config: TrainConfig | None = None,
    progress: bool = True,
) -> tuple[MnistCNN, dict[str, Any]]:
    """Load best.pt; when it is missing (a fresh Colab runtime), train Part 1's final run and save it."""
    path = checkpoint_dir(folder) / BEST_NAME
    if not path.is_file():
        final = final_config(config or TrainConfig())
        print(f"{path} not found: training Part 1's final model ({final.epochs} epochs).")
        tag = final_tag(final)
        train_and_save(final, data or load_mnist(), folder, default_device(), progress, tag)
        select_best(folder, f"*-{tag}-seed*.pt")
    return load_checkpoint(path, device)


def final_tag(config: TrainConfig) -> str:
    """The checkpoint tag of Part 1's final run, e.g. '8ep'."""
    return f"{config.epochs}ep"


def load_independent_model(
    folder: str | Path | None = None,
    data: MNIST | None = None,
    device: torch.device | str = "cpu",
    config: TrainConfig | None = None,
    progress: bool = True,
) -> tuple[MnistCNN, dict[str, Any]]:
    """A model trained apart from best.pt: the other variant (another seed where one exists).

    Used as a second opinion on generated images: if a picture fools only the model it was made
    for, it is an adversarial pattern, not a digit.
    """
    folder = checkpoint_dir(folder)
    _, best_meta = load_best_model(folder, data, "cpu", config, progress)
    best_config = best_meta["config"]
    other_variant = "bn" if best_config["variant"] == "plain" else "plain"
    same_seed = f"{other_variant}-seed{best_config['seed']}"
    # Another seed as well as another variant where the folder has one (Part 1 trains three).
    candidates = sorted(
        folder.glob(f"{other_variant}-seed*.pt"), key=lambda p: (p.stem == same_seed, p.stem)
    )
    if not candidates:
        base = config or TrainConfig()
        independent = replace(base, variant=other_variant, seed=best_config["seed"] + 1)
        print(f"no independent checkpoint in {folder}: training {run_name(independent)}.")
        train_and_save(independent, data or load_mnist(), folder, default_device(), progress)
        candidates = [folder / f"{run_name(independent)}.pt"]
    return load_checkpoint(candidates[0], device)


def run_study(
    base: TrainConfig,
    variants: list[str],
    seeds: list[int],
    data: MNIST,
    folder: str | Path | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> dict[str, dict[int, dict[str, Any]]]:
    """Train every (variant, seed) pair with otherwise identical settings; metrics and histories."""
    runs: dict[str, dict[int, dict[str, Any]]] = {v: {} for v in variants}
    for variant in variants:
        for seed in seeds:
            result, metrics = train_and_save(
                replace(base, variant=variant, seed=seed), data, folder, device, progress
            )
            runs[variant][seed] = {**metrics, "history": result.history}
    return runs


def summarize(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for a single value), min and max."""
    t = torch.tensor(values, dtype=torch.float64)
    std = t.std().item() if len(values) > 1 else 0.0
    return {"mean": t.mean().item(), "std": std, "min": t.min().item(), "max": t.max().item()}
