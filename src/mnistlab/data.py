"""MNIST as in-memory tensors: a local IDX folder or torchvision's download, plus a validation split.

Images are float32 in [0, 1], shape (N, 1, 28, 28); labels are int64, shape (N,). The whole data set
is 220 MB as float32, so it is held in memory (on the GPU when training there) and batches are
indexed from a permutation: no DataLoader, no per-sample transforms.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import torch

MNIST_DIR_ENV = "MNIST_DIR"
DEFAULT_DOWNLOAD_ROOT = Path("data")
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049  # IDX: 0x0000 0803 (uint8, 3 dims) and 0x0000 0801 (1 dim)
SPLITS = {"train": 60_000, "t10k": 10_000}


class MNISTDataError(RuntimeError):
    """The MNIST files are missing, unreadable or malformed; the message names the file."""


@dataclass
class MNIST:
    """The 60,000 training and 10,000 test images with labels, as tensors."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    source: str

    def to(self, device: torch.device | str) -> MNIST:
        """Return a copy with every tensor on `device`."""
        return MNIST(
            *(t.to(device) for t in (self.train_images, self.train_labels)),
            *(t.to(device) for t in (self.test_images, self.test_labels)),
            source=self.source,
        )


@dataclass
class Split:
    """Training and validation tensors carved from the 60,000 training images."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    val_indices: torch.Tensor  # positions in the original training set, for reproducibility


def candidate_names(split: str, kind: str) -> list[str]:
    """File names accepted for one IDX file: torchvision's style and the original site's, raw or .gz."""
    bases = [f"{split}-{kind}-idx{3 if kind == 'images' else 1}-ubyte"]
    bases.append(bases[0].replace(f"{kind}-idx", f"{kind}.idx"))  # train-images.idx3-ubyte style
    return [b + ext for b in bases for ext in ("", ".gz")]


def find_idx_file(folder: Path, split: str, kind: str) -> Path:
    """Return the path of one of the four MNIST files in `folder`, or raise naming what is missing."""
    for name in candidate_names(split, kind):
        if (folder / name).is_file():
            return folder / name
    expected = ", ".join(candidate_names(s, k)[0] for s in SPLITS for k in ("images", "labels"))
    raise MNISTDataError(
        f"{folder}: no {split} {kind} file (looked for {', '.join(candidate_names(split, kind))}). "
        f"The folder must hold the four MNIST IDX files: {expected} (raw or .gz, "
        "'train-images.idx3-ubyte' naming also accepted)."
    )


def read_idx(path: Path, expected_magic: int) -> torch.Tensor:
    """Read one uint8 IDX file, checking magic number, dimensions and length.

    torchvision's reader (`read_sn3_pascalvincent_tensor`) trusts the header and reads no .gz, so a
    truncated download surfaces as an opaque reshape error; here every check names the file.
    """
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise MNISTDataError(f"{path}: cannot read ({err})") from err
    if len(raw) < 8:
        raise MNISTDataError(f"{path}: {len(raw)} bytes, too short to hold an IDX header")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise MNISTDataError(
            f"{path}: magic number {magic:#010x}, expected {expected_magic:#010x} "
            f"({'images' if expected_magic == IMAGE_MAGIC else 'labels'} file); wrong or corrupt file"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise MNISTDataError(f"{path}: truncated inside the header ({len(raw)} bytes)")
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected_len = header + int(torch.tensor(shape).prod())
    if len(raw) != expected_len:
        what = "truncated" if len(raw) < expected_len else "longer than its header says"
        raise MNISTDataError(
            f"{path}: {what}: header says shape {shape} ({expected_len} bytes), file has {len(raw)}"
        )
    if ndim == 3 and shape[1:] != [28, 28]:
        raise MNISTDataError(f"{path}: images are {shape[1]}x{shape[2]}, expected 28x28")
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).reshape(shape)


def load_split(folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one split's images (float [0, 1], N x 1 x 28 x 28) and labels (int64) from `folder`."""
    images_path = find_idx_file(folder, split, "images")
    labels_path = find_idx_file(folder, split, "labels")
    images = read_idx(images_path, IMAGE_MAGIC)
    labels = read_idx(labels_path, LABEL_MAGIC)
    if len(images) != len(labels):
        raise MNISTDataError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels"
        )
    if int(labels.max()) > 9:
        raise MNISTDataError(f"{labels_path}: label {int(labels.max())} outside 0..9")
    return images.unsqueeze(1).float().div_(255.0), labels.long()


def load_folder(folder: str | Path) -> MNIST:
    """Load MNIST from a folder of the four IDX files."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise MNISTDataError(f"{folder}: MNIST folder does not exist")
    train = load_split(folder, "train")
    test = load_split(folder, "t10k")
    return MNIST(*train, *test, source=str(folder.resolve()))


def download(root: Path = DEFAULT_DOWNLOAD_ROOT) -> Path:
    """Download MNIST with torchvision into `root` and return the folder of raw IDX files."""
    from torchvision.datasets import MNIST as TorchvisionMNIST

    try:
        for train in (True, False):
            TorchvisionMNIST(root=str(root), train=train, download=True)
    except (
        Exception
    ) as err:  # torchvision raises RuntimeError/URLError/OSError depending on the mirror
        raise MNISTDataError(
            f"MNIST is not available locally and the download failed ({err}). Point "
            f"{MNIST_DIR_ENV} at a folder holding the four IDX files, e.g. "
            f"`export {MNIST_DIR_ENV}=/path/to/MNIST/raw`, or pass the folder to load_mnist()."
        ) from err
    return root / "MNIST" / "raw"


def load_mnist(folder: str | Path | None = None, *, allow_download: bool = True) -> MNIST:
    """Load MNIST from `folder`, else $MNIST_DIR, else ./data (downloading it there if allowed)."""
    if not folder:  # None or "" (make exports an unset MNIST_DIR as the empty string)
        folder = os.environ.get(MNIST_DIR_ENV) or None
    if folder is not None:
        return load_folder(folder)
    local = DEFAULT_DOWNLOAD_ROOT / "MNIST" / "raw"
    try:
        return load_folder(local)
    except MNISTDataError:
        if not allow_download:
            raise MNISTDataError(
                f"no MNIST data: {MNIST_DIR_ENV} is not set and {local} is incomplete. "
                f"Set {MNIST_DIR_ENV} to a folder holding the four IDX files."
            ) from None
    return load_folder(download(DEFAULT_DOWNLOAD_ROOT))


def validation_split(data: MNIST, val_size: int = 5_000, seed: int = 0) -> Split:
    """Carve a fixed, seeded validation set from the training images (the test set stays unseen)."""
    n = len(data.train_images)
    if not 0 < val_size < n:
        raise ValueError(f"val_size must be between 1 and {n - 1}, got {val_size}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = order[:val_size].sort().values, order[val_size:].sort().values
    val_idx = val_idx.to(data.train_images.device)
    train_idx = train_idx.to(data.train_images.device)
    return Split(
        data.train_images[train_idx],
        data.train_labels[train_idx],
        data.train_images[val_idx],
        data.train_labels[val_idx],
        val_idx.cpu(),
    )


def one_per_class(labels: torch.Tensor, seed: int) -> torch.Tensor:
    """Index of one image of each class 0..9, the first of its class in a seeded permutation."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    labels = labels.cpu()[order]
    picked = []
    for c in range(10):
        hits = order[labels == c]
        if len(hits) == 0:
            raise ValueError(f"no image of class {c} to choose from")
        picked.append(hits[0])
    return torch.stack(picked)
