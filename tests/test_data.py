"""Loading MNIST: the real files, both naming styles, .gz, and a clear error for every bad input."""

from __future__ import annotations

import shutil

import pytest
import torch

from mnistlab.data import (
    MNISTDataError,
    load_folder,
    load_mnist,
    one_per_class,
    validation_split,
)


def test_real_mnist_shapes_range_and_labels(mnist):
    assert mnist.train_images.shape == (60_000, 1, 28, 28)
    assert mnist.test_images.shape == (10_000, 1, 28, 28)
    assert mnist.train_images.dtype == torch.float32
    assert mnist.train_images.min() == 0.0 and mnist.train_images.max() == 1.0
    assert torch.bincount(mnist.test_labels).tolist() == [
        980,
        1135,
        1032,
        1010,
        982,
        892,
        958,
        1028,
        974,
        1009,
    ]


def test_gz_and_original_naming_read_the_same(tmp_path, fake_mnist):
    raw = load_folder(fake_mnist(tmp_path / "raw"))
    gz = load_folder(fake_mnist(tmp_path / "gz", gz=True))
    dotted = tmp_path / "dotted"
    shutil.copytree(tmp_path / "raw", dotted)
    for f in dotted.iterdir():  # train-images-idx3-ubyte -> train-images.idx3-ubyte
        f.rename(dotted / f.name.replace("s-idx", "s.idx"))
    other = load_folder(dotted)
    for a, b in ((raw, gz), (raw, other)):
        assert torch.equal(a.train_images, b.train_images) and torch.equal(
            a.test_labels, b.test_labels
        )
    assert raw.train_images.shape == (20, 1, 28, 28)


def test_mnist_dir_environment_variable(tmp_path, monkeypatch, fake_mnist):
    monkeypatch.setenv("MNIST_DIR", str(fake_mnist(tmp_path)))
    assert len(load_mnist().test_labels) == 10
    assert len(load_mnist("").test_labels) == 10  # an empty folder name means "not given"


def test_missing_folder(tmp_path):
    with pytest.raises(MNISTDataError, match="does not exist"):
        load_folder(tmp_path / "nowhere")


def test_missing_file_lists_the_four_expected_names(tmp_path, fake_mnist):
    folder = fake_mnist(tmp_path)
    (folder / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(MNISTDataError) as err:
        load_folder(folder)
    message = str(err.value)
    assert "t10k labels" in message
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte"):
        assert name in message


def test_truncated_file(tmp_path, fake_mnist):
    folder = fake_mnist(tmp_path)
    path = folder / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(MNISTDataError, match=r"train-images-idx3-ubyte: truncated"):
        load_folder(folder)


def test_truncated_header(tmp_path, fake_mnist):
    folder = fake_mnist(tmp_path)
    path = folder / "train-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes()[:6])
    with pytest.raises(MNISTDataError, match="too short"):
        load_folder(folder)


def test_wrong_magic_number(tmp_path, fake_mnist):
    folder = fake_mnist(tmp_path)
    images, labels = folder / "t10k-images-idx3-ubyte", folder / "t10k-labels-idx1-ubyte"
    images.write_bytes(labels.read_bytes())  # a labels file where the images should be
    with pytest.raises(MNISTDataError, match="t10k-images-idx3-ubyte: magic number 0x00000801"):
        load_folder(folder)


def test_corrupt_gzip(tmp_path, fake_mnist):
    folder = fake_mnist(tmp_path, gz=True)
    path = folder / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(MNISTDataError, match="train-images-idx3-ubyte.gz: cannot read"):
        load_folder(folder)


def test_images_and_labels_of_different_counts(tmp_path, fake_mnist):
    folder = fake_mnist(tmp_path)
    other = fake_mnist(tmp_path / "other", n_train=7)
    shutil.copy(other / "train-labels-idx1-ubyte", folder / "train-labels-idx1-ubyte")
    with pytest.raises(MNISTDataError, match="20 images but .* 7 labels"):
        load_folder(folder)


def offline_download(*args, **kwargs):
    raise RuntimeError(
        "Error downloading train-images-idx3-ubyte.gz"
    )  # what torchvision says offline


def test_offline_without_data_says_how_to_set_mnist_dir(tmp_path, monkeypatch):
    import torchvision.datasets.mnist as tv_mnist

    monkeypatch.delenv("MNIST_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tv_mnist.MNIST, "download", offline_download)
    with pytest.raises(MNISTDataError, match="download failed.*MNIST_DIR"):
        load_mnist()
    with pytest.raises(MNISTDataError, match="MNIST_DIR is not set"):
        load_mnist(allow_download=False)


def test_mnist_is_downloaded_once_per_runtime(tmp_path, monkeypatch, fake_mnist):
    import mnistlab.data

    downloads = []

    def fake_download(root):  # what torchvision leaves behind: root/MNIST/raw
        downloads.append(root)
        return fake_mnist(root / "MNIST" / "raw")

    monkeypatch.delenv("MNIST_DIR", raising=False)
    monkeypatch.chdir(tmp_path)  # Colab's working folder: ./data outlives a notebook, not a runtime
    monkeypatch.setattr(mnistlab.data, "download", fake_download)
    first, second = load_mnist(), load_mnist()
    assert len(downloads) == 1
    assert first.source == second.source == str(tmp_path / "data" / "MNIST" / "raw")
    assert torch.equal(first.train_images, second.train_images)


def test_validation_split_is_fixed_disjoint_and_complete(mnist):
    a, b = validation_split(mnist), validation_split(mnist)
    assert torch.equal(a.val_indices, b.val_indices)
    assert len(a.val_images) == 5_000 and len(a.train_images) == 55_000
    train_idx = set(range(60_000)) - set(a.val_indices.tolist())
    assert len(train_idx) == 55_000
    assert torch.equal(a.val_labels, mnist.train_labels[a.val_indices])
    assert set(validation_split(mnist, seed=1).val_indices.tolist()) != set(a.val_indices.tolist())
    with pytest.raises(ValueError):
        validation_split(mnist, val_size=0)


def test_shared_files_match_their_checksums(mnist_dir):
    """The real files are the canonical MNIST (SHA256SUMS beside them, when present)."""
    import hashlib

    sums = mnist_dir / "SHA256SUMS"
    if not sums.is_file():
        pytest.skip(f"no SHA256SUMS in {mnist_dir}")
    for line in sums.read_text().splitlines():
        digest, name = line.split()
        assert hashlib.sha256((mnist_dir / name.lstrip("*")).read_bytes()).hexdigest() == digest


def test_one_per_class_is_seeded():
    labels = torch.arange(100) % 10
    first = one_per_class(labels, seed=0)
    assert torch.equal(labels[first], torch.arange(10))
    assert torch.equal(first, one_per_class(labels, seed=0))
    assert not torch.equal(first, one_per_class(labels, seed=1))
    with pytest.raises(ValueError):
        one_per_class(labels[labels != 3], seed=0)
