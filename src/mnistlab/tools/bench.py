"""`make bench`: training throughput of three pipelines side by side, in one process, same model.

    python -m mnistlab.tools.bench [--out report/bench.json] [--windows 5] [--steps 20]

- project: the loop of mnistlab.train (in-memory tensors, permutation batches, batched random
  translation, batch 128) on the speed path "auto" takes on this machine (speed.py: max-pool
  before ReLU, fused SGD, channels_last, the precision, on a GPU CUDA graphs);
- naive_fp32: the same in-memory tensors and model in plain fp32 eager mode, NCHW, batch 64 (the
  pytorch/examples default), no augmentation;
- dataloader: pytorch/examples style, a Dataset that turns each uint8 image into a PIL image and
  applies ToTensor + Normalize per sample, a shuffling DataLoader, batch 64.

Each figure is the median images/s over several timed windows after a warm-up, the windows of
the three pipelines interleaved. The benchmark also measures the wall time to 99.0% test
accuracy of the project's one-epoch run, and the seconds per epoch (evaluations included) of
whole default training runs of both variants.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..data import MNIST, load_mnist, validation_split
from ..model import MnistCNN
from ..pipeline import SPLIT_SEED, VAL_SIZE
from ..speed import candidates, default_path, training_forward
from ..train import (
    TrainConfig,
    default_device,
    evaluate,
    make_optimizer,
    one_epoch_config,
    random_translate,
    train,
)
from . import cli
from .allocator import keep_freed_memory
from .machine import fp32_gemm_gflops, sync


def measure(
    steps: dict[str, Callable[[], int]], device: torch.device, warmup: int, windows: int, n: int
) -> dict[str, float]:
    """Median images/s of each step function over `windows` timed windows of `n` steps each.

    The windows of the pipelines are interleaved (A, B, C, A, B, C, ...), so a slow spell of a
    shared or throttled machine hits every pipeline alike instead of one of them.
    """
    for step in steps.values():
        for _ in range(warmup):
            step()
    rates: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(windows):
        for name, step in steps.items():
            sync(device)
            start, images = time.perf_counter(), 0
            for _ in range(n):
                images += step()
            sync(device)
            rates[name].append(images / (time.perf_counter() - start))
    return {name: statistics.median(r) for name, r in rates.items()}


def project_step(data: MNIST, device: torch.device, config: TrainConfig) -> Callable[[], int]:
    """One optimisation step exactly as mnistlab.train takes it; `step.path` is its speed path."""
    model = MnistCNN(config.variant).to(device)
    images, labels = data.train_images.to(device), data.train_labels.to(device)
    generator = torch.Generator(device=device).manual_seed(0)
    first = (images[: config.batch_size], labels[: config.batch_size])
    forward = training_forward(model, config.speed, first)
    # A small constant learning rate (the schedule is never stepped): the peak could diverge.
    optimizer, _ = make_optimizer(model, replace(config, lr=0.01), 1, forward.fused_optimizer)
    order = iter(())

    def step() -> int:
        nonlocal order
        batch = next(order, None)
        if batch is None:
            order = iter(
                torch.randperm(len(images), device=device, generator=generator).split(
                    config.batch_size
                )
            )
            batch = next(order)
        x = random_translate(images[batch], config.max_shift, generator)
        loss = F.cross_entropy(forward(x), labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return len(batch)

    step.path = forward.path  # type: ignore[attr-defined]
    return step


def naive_step(data: MNIST, device: torch.device, batch_size: int = 64) -> Callable[[], int]:
    """Plain fp32 eager training over the same in-memory tensors."""
    model = MnistCNN("plain").to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images, labels = data.train_images.to(device), data.train_labels.to(device)
    batches: Iterator[torch.Tensor] = iter(())

    def step() -> int:
        nonlocal batches
        batch = next(batches, None)
        if batch is None:
            batches = iter(torch.randperm(len(images), device=device).split(batch_size))
            batch = next(batches)
        loss = F.cross_entropy(model(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return len(batch)

    return step


class PerSampleMNIST(torch.utils.data.Dataset):
    """torchvision.datasets.MNIST's per-sample path: uint8 array -> PIL image -> transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        from torchvision import transforms

        self.images = (images[:, 0] * 255).round().to(torch.uint8).numpy()
        self.labels = labels.tolist()
        self.transform = transforms.Compose(
            [transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))]
        )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i], mode="L")), self.labels[i]


def dataloader_step(data: MNIST, device: torch.device, batch_size: int = 64) -> Callable[[], int]:
    """pytorch/examples style: per-sample ToTensor + Normalize through a shuffling DataLoader."""
    loader = torch.utils.data.DataLoader(
        PerSampleMNIST(data.train_images, data.train_labels),
        batch_size=batch_size,
        shuffle=True,
        num_workers=1 if device.type == "cuda" else 0,
        pin_memory=device.type == "cuda",
    )
    model = MnistCNN("plain").to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batches = iter(loader)

    def step() -> int:
        nonlocal batches
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(loader)
            x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        # The model normalises inside; the transform's Normalize is kept only because it is part
        # of the per-sample cost being measured.
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return len(y)

    return step


def seconds_to_accuracy(data: MNIST, device: torch.device, target: float = 0.99) -> dict[str, Any]:
    """Wall time until the project's one-epoch run first measures `target` test accuracy.

    The test set only stands in as the tracked set of this timing run (no choice is made on it);
    the wall time includes the periodic test evaluations.
    """
    split = validation_split(data)
    split.val_images, split.val_labels = data.test_images, data.test_labels
    config = replace(one_epoch_config(TrainConfig()), evals_per_epoch=8)
    start = time.perf_counter()
    result = train(config, split, device, progress=False)
    total = time.perf_counter() - start
    reached = [h for h in result.history if h["val_accuracy"] >= target]
    return {
        "seconds": reached[0]["seconds"] if reached else None,
        "epoch": reached[0]["epoch"] if reached else None,
        "final_test_accuracy": result.history[-1]["val_accuracy"],
        "run_seconds": total,
    }


def epoch_timing(data: MNIST, device: torch.device) -> dict[str, Any]:
    """Seconds per epoch and test accuracy of one default training run of each variant.

    The BN variant also runs with the other setting of the bn1 fold (off on a CPU, on on a GPU),
    to show what the default saves.

    The default trains in fp32; the runs repeated under autocast (bf16 on a CPU with native
    bf16, AMP on a GPU; same seed) are the check that reduced precision leaves test accuracy
    unchanged within seed noise, and show its speed.
    """
    split = validation_split(data, VAL_SIZE, SPLIT_SEED)
    test_x, test_y = data.test_images.to(device), data.test_labels.to(device)
    # The other side of the bn1 fold from the default path (speed.default_path) on this device.
    bn_default = default_path(device, "bn")
    folded = "+fold" in bn_default
    other = bn_default.replace("+fold", "") if folded else bn_default.replace("fp32", "fp32+fold")
    runs = {
        "plain": TrainConfig(),
        "bn": TrainConfig(variant="bn"),
        f"bn_fold_{'off' if folded else 'on'}": TrainConfig(variant="bn", speed=other),
    }
    if device.type == "cuda":  # what AMP and eager launches would give
        if torch.cuda.is_bf16_supported():
            runs["plain_bf16"] = TrainConfig(speed="bf16")
        runs["plain_no_graphs"] = TrainConfig(speed="fp32")
    elif "bf16" in candidates(device, "plain"):  # CPUs with native bf16 kernels, for comparison
        runs["plain_bf16"] = TrainConfig(speed="bf16")
        runs["bn_bf16"] = TrainConfig(variant="bn", speed="bf16+fold")
    out = {}
    for name, config in runs.items():
        result = train(config, split, device, progress=False)
        out[name] = {
            "seconds_per_epoch": result.seconds_per_epoch,
            "median_seconds_per_epoch": statistics.median(result.seconds_per_epoch),
            "best_val_accuracy": result.best_val_accuracy,
            "test_accuracy": evaluate(result.model, test_x, test_y)["accuracy"],
        }
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write the JSON (and a Markdown table beside it)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="report/bench.json")
    parser.add_argument("--windows", type=int, default=9)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--skip-accuracy", action="store_true", help="throughput only")
    parser.add_argument("--skip-epochs", action="store_true", help="no whole training runs")
    args = parser.parse_args(argv)

    keep_freed_memory()  # the pipelines share this process: reuse buffers, don't page-fault them
    device = default_device()
    data = load_mnist()
    gemm_before = fp32_gemm_gflops(device)
    torch.manual_seed(0)
    config = TrainConfig()
    pipelines = {
        "project": project_step(data, device, config),
        "naive_fp32": naive_step(data, device),
        "dataloader": dataloader_step(data, device),
    }
    path = pipelines["project"].path
    throughput = measure(pipelines, device, args.warmup, args.windows, args.steps)
    out = Path(args.out)
    report_metrics = out.parent / "metrics.json"
    timing = (
        json.loads(report_metrics.read_text()).get("timing", {}) if report_metrics.is_file() else {}
    )
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "torch": str(torch.__version__),
        "speed": path.name,
        "autocast_dtype": str(path.dtype or "float32"),
        "channels_last": path.fast,
        "batch_size": {"project": config.batch_size, "naive_fp32": 64, "dataloader": 64},
        "throughput": throughput,
        "ratio": {
            "vs_naive": throughput["project"] / throughput["naive_fp32"],
            "vs_dataloader": throughput["project"] / throughput["dataloader"],
        },
        "seconds_per_epoch_at_project_rate": 55_000 / throughput["project"],
        "fp32_gemm_gflops": {"before": gemm_before},
        "report_timing": timing,
    }
    if not args.skip_accuracy:
        to_99 = seconds_to_accuracy(data, device)
        result["seconds_to_99"] = to_99["seconds"]
        result["to_99"] = to_99
    if not args.skip_epochs:
        result["epochs"] = epoch_timing(data, device)
    result["fp32_gemm_gflops"]["after"] = fp32_gemm_gflops(device)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if report_metrics.is_file():  # put the table into the report's summary page
        from ..results import read_metrics
        from .report import write_summary

        notebooks = sorted(Path("notebooks").glob("[0-9][0-9]_*.ipynb"))
        write_summary(out.parent, notebooks, read_metrics(out.parent))
    return 0


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
