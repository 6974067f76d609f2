"""Checkpoints: a plain dict of state dict and metadata, written atomically, read with weights_only."""

from __future__ import annotations

import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import torch

from .model import VARIANTS, MnistCNN

FORMAT = "mnistlab.checkpoint"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, corrupt, or does not match the model it claims to hold."""


def library_versions() -> dict[str, str]:
    """Versions of the libraries that produced a checkpoint or a report."""
    import torchvision

    return {
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "python": platform.python_version(),
    }


def save_checkpoint(path: str | Path, model: MnistCNN, **metadata: Any) -> Path:
    """Write the model's weights and `metadata` (plain Python values) atomically to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "variant": model.variant,
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        "versions": library_versions(),
        **metadata,
    }
    # Write beside the target and rename: a crash leaves either the old file or the new one whole.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(
    path: str | Path, device: torch.device | str = "cpu"
) -> tuple[MnistCNN, dict[str, Any]]:
    """Rebuild the model stored at `path` (in eval mode) and return it with the checkpoint's metadata."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and unpickler errors all mean the same to the caller
        raise CheckpointError(
            f"{path}: not a readable checkpoint ({type(err).__name__}: {err})"
        ) from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an mnistlab checkpoint (no '{FORMAT}' format tag)")
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {payload.get('format_version')}, "
            f"this code reads version {FORMAT_VERSION}"
        )
    variant = payload.get("variant")
    if variant not in VARIANTS:
        raise CheckpointError(f"{path}: unknown model variant {variant!r}")
    model = MnistCNN(variant)
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except (RuntimeError, KeyError) as err:
        raise CheckpointError(f"{path}: weights do not fit the '{variant}' network: {err}") from err
    model.to(device).eval()
    metadata = {k: v for k, v in payload.items() if k != "state_dict"}
    return model, metadata
