"""Shared fixtures: the real MNIST folder (from $MNIST_DIR) and small synthetic IDX folders."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import pytest
import torch

from mnistlab.data import IMAGE_MAGIC, LABEL_MAGIC, load_folder


def idx_bytes(magic: int, tensor: torch.Tensor) -> bytes:
    """Encode a uint8 tensor as an IDX file (big-endian header, then the raw bytes)."""
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in tensor.shape)
    return header + tensor.to(torch.uint8).numpy().tobytes()


def write_fake_mnist(folder: Path, n_train: int = 20, n_test: int = 10, gz: bool = False) -> Path:
    """Write the four IDX files of a tiny random MNIST into `folder` (torchvision's names)."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = torch.randint(0, 256, (n, 28, 28), generator=gen, dtype=torch.uint8)
        labels = torch.arange(n, dtype=torch.uint8) % 10
        for name, magic, tensor in (
            (f"{split}-images-idx3-ubyte", IMAGE_MAGIC, images),
            (f"{split}-labels-idx1-ubyte", LABEL_MAGIC, labels),
        ):
            raw = idx_bytes(magic, tensor)
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
            else:
                (folder / name).write_bytes(raw)
    return folder


@pytest.fixture(scope="session", autouse=True)
def speed_cache(tmp_path_factory):
    """An empty speed-calibration cache (speed.py) for the whole session, also for notebook
    kernels started from it: tests run the default paths, not what this machine measured."""
    from mnistlab import speed

    old = os.environ.get(speed.CACHE_ENV)
    os.environ[speed.CACHE_ENV] = str(tmp_path_factory.mktemp("speed-cache"))
    yield
    if old is None:
        os.environ.pop(speed.CACHE_ENV)
    else:
        os.environ[speed.CACHE_ENV] = old


@pytest.fixture(autouse=True)
def no_calibration(monkeypatch):
    """Tests must not pay for a speed calibration: a run that would calibrate fails instead."""
    from mnistlab import speed

    def refuse(*args, **kwargs):
        raise AssertionError("a test calibrated the speed path: pass limit_train_batches or a path")

    monkeypatch.setattr(speed, "calibrate", refuse)


@pytest.fixture
def fake_mnist():
    """The writer of tiny random IDX folders, for tests of the loader's error handling."""
    return write_fake_mnist


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The real MNIST folder named by $MNIST_DIR (CI points it at ../shared/data/MNIST/raw)."""
    folder = os.environ.get("MNIST_DIR")
    if not folder:
        pytest.fail("MNIST_DIR is not set: point it at a folder of the four MNIST IDX files")
    return Path(folder)


@pytest.fixture(scope="session")
def mnist(mnist_dir):
    """The real MNIST, loaded once per test session."""
    return load_folder(mnist_dir)


@pytest.fixture(scope="session")
def trained_model(mnist):
    """A real model, trained briefly on the real data (about 97% accuracy), in eval mode, CPU."""
    from mnistlab.data import validation_split
    from mnistlab.train import TrainConfig, train

    # Pinned settings (not the defaults): a model that is good but not saturated, so that
    # occluding a patch still moves its probabilities measurably.
    config = TrainConfig(epochs=1, lr=0.05, limit_train_batches=150, evals_per_epoch=1, seed=0)
    return train(config, validation_split(mnist), "cpu", progress=False).model
