"""Training loop, evaluation and history for the MNIST CNN.

The loop is written out in one place (nanoGPT / pytorch-examples style): tensors already on the
device, a seeded permutation per epoch, optional random-translation augmentation done on the whole
batch at once, a one-cycle learning-rate schedule, and a history recorded several times per epoch.
"""

from __future__ import annotations

import copy
import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data import Split
from .model import MnistCNN


@dataclass
class TrainConfig:
    """Every knob of a training run; stored in the checkpoint so the run can be rebuilt.

    The defaults are Part 1's recipe, chosen on the validation split by `python -m
    mnistlab.tools.recipes` (report/recipe_search*.jsonl): among the 27 candidates trained for 4
    epochs in rounds 1 and 2, raising the peak learning rate from the first default, 0.05, to 0.1
    gained 0.15 points of mean validation accuracy (99.18 -> 99.33%), on every one of the 6 seeds
    (the few candidates above it, lr 0.2 or lr 0.1 with weight averaging or weight decay 2e-4,
    were less than 0.01 points higher); a 5th epoch, affordable once fp32 proved faster than
    bf16 here, added 0.06 to 0.10 points of validation accuracy on each of 3 seeds.
    """

    variant: str = "plain"  # "plain" or "bn"
    epochs: int = 5
    batch_size: int = 128
    lr: float = 0.1  # peak learning rate of the one-cycle schedule (SGD + Nesterov momentum)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_fraction: float = 0.15  # share of the steps spent warming the learning rate up
    label_smoothing: float = 0.0
    max_shift: int = 1  # random translation of up to this many pixels; 0 disables augmentation
    max_rotation: float = 0.0  # degrees; > 0 (or max_scale > 0) warps each image by a random affine
    max_scale: float = 0.0  # relative zoom in [1 - max_scale, 1 + max_scale]
    ema_decay: float = 0.0  # > 0: evaluate and keep an exponential moving average of the weights
    seed: int = 0
    evals_per_epoch: int = 4
    # Evaluation runs in fp32; on a CPU, batches of 256 stay in cache and are fastest (a GPU
    # evaluates 5,000 images at a time).
    eval_batch_size: int = 256
    # "auto" (fp32, the fastest here: see autocast_dtype), "bf16", "fp16" (autocast), "off" (fp32)
    mixed_precision: str = "auto"
    channels_last: bool = True
    # BN variant: "auto" (on a CPU only: see fold_bn1_enabled), "on" or "off": train with bn1's batch
    # statistics folded into conv1 (MnistCNN.forward_pool_first), the same function.
    fold_bn1: str = "auto"
    # On a GPU, in fp32: replay the forward and backward pass of a full batch as one CUDA graph
    # (cuda_graph_forward). This small net is bound by kernel launches there; ignored on a CPU.
    cuda_graphs: bool = True
    limit_train_batches: int = 0  # > 0: stop each epoch after this many batches (smoke tests)


def one_epoch_config(base: TrainConfig) -> TrainConfig:
    """The recipe for a single epoch, chosen on the validation split (mnistlab.tools.recipes).

    Batch norm starts faster (98.98% validation accuracy after one epoch against at most 98.81%
    for the plain network, 4 seeds each); with one pass over the data, more updates beat bigger
    batches (batch 32: 1,719 steps), and augmentation has no time to pay off, so it is off.
    """
    return replace(
        base, variant="bn", epochs=1, batch_size=32, lr=0.04, max_shift=0, warmup_fraction=0.2
    )


def final_config(base: TrainConfig) -> TrainConfig:
    """Part 1's final model: the study's recipe trained for 8 epochs, a length chosen on validation.

    Round 4 of the recipe search (H100, 6 seeds each): 8 epochs reached 99.44% mean validation
    accuracy against 99.34% for 5; 10 or 12 epochs, and 2-pixel shifts or rotations over 10,
    gave 99.41 to 99.45%. 8 epochs is within 0.02 points of the best of these means, less than
    their standard errors (0.02 to 0.04 points), at two thirds of the 12-epoch time.
    """
    return replace(base, epochs=8)


@dataclass
class TrainResult:
    """A trained model plus what the run measured."""

    model: MnistCNN
    config: TrainConfig
    history: list[dict[str, float]] = field(default_factory=list)
    best_val_accuracy: float = 0.0
    best_step: int = 0
    seconds_per_epoch: list[float] = field(default_factory=list)
    device: str = "cpu"
    autocast_dtype: str = "float32"


def cpu_supports_bf16() -> bool:
    """True where oneDNN has native bf16 kernels (AVX512-BF16 or AMX); elsewhere bf16 is emulated."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast_dtype(device: torch.device, mode: str = "auto") -> torch.dtype | None:
    """The reduced precision to train in on `device`, or None for plain fp32."""
    if mode not in ("auto", "bf16", "fp16", "off"):
        raise ValueError(f"mixed_precision must be auto, bf16, fp16 or off, got {mode!r}")
    if mode == "off":
        return None
    if mode == "bf16":
        return torch.bfloat16
    if mode == "fp16":
        return torch.float16
    # "auto" is fp32, measured (make bench, report/bench*.json). This CPU has AVX512-BF16 but
    # no AMX exposed, and the bf16 kernels are the slower ones here: fp32 took 7.6 s
    # per plain epoch against 10.2 s under bf16 autocast (BN: 9.1 against 11.8 s). On a GPU
    # fp32 lets the step replay as CUDA graphs (training_forward), which autocast here does not:
    # H100, 0.46 s per plain epoch against 0.81 s with bf16. "bf16" / "fp16" select autocast.
    return None


def fold_bn1_enabled(device: torch.device, mode: str = "auto") -> bool:
    """Whether training folds bn1 into conv1 (MnistCNN.forward_pool_first) on `device`."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"fold_bn1 must be auto, on or off, got {mode!r}")
    # Measured (make bench, report/bench*.json): on this CPU the fold skips BN's memory-bound
    # passes over conv1's 32 x 28 x 28 maps (a BN epoch 11.1 -> 9.1 s). On an H100, where this net
    # is bound by kernel launches, it gains nothing that stands out of the run-to-run noise
    # (bench_cuda.json: 0.52 s per BN epoch without, 0.49 s with), so a GPU keeps cuDNN's BN.
    return mode == "on" or (mode == "auto" and device.type == "cpu")


class _PoolFirst(nn.Module):
    """model.forward_pool_first as a module of its own, for make_graphed_callables."""

    def __init__(self, model: MnistCNN, fold_bn1: bool) -> None:
        super().__init__()
        self.model, self.fold_bn1 = model, fold_bn1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_pool_first(x, self.fold_bn1)


def cuda_graph_forward(
    model: MnistCNN, fold_bn1: bool, sample: torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor]:
    """model.forward_pool_first for batches shaped like `sample`, forward and backward captured
    as CUDA graphs: one launch each instead of dozens of small kernels per step.

    The graphs compute what the eager calls compute: checked step by step on an H200, the
    weights of a graphed and an eager copy differ no more than those of two eager copies do
    (cuDNN's run-to-run rounding); tests/test_train.py repeats the check where CUDA exists.
    Capturing runs a few warm-up passes in training mode; the BN running statistics they
    touch are put back, so the capture changes nothing in the model. Returns None, with a
    warning, where the capture fails: the caller then trains eagerly.
    """
    saved = {name: b.clone() for name, b in model.named_buffers()}
    module = _PoolFirst(model, fold_bn1)
    try:
        _warm_capture_stream(module, sample)
        graphed = torch.cuda.make_graphed_callables(module, (sample,))
    except RuntimeError as error:  # torch.AcceleratorError is a RuntimeError
        warnings.warn(f"CUDA graph capture failed, training eagerly instead: {error}", stacklevel=2)
        graphed = None
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(saved[name])
    return graphed


def _warm_capture_stream(module: nn.Module, sample: torch.Tensor) -> None:
    """One forward and backward pass of `module` on the stream torch.cuda.graph captures on.

    Before torch 2.12, make_graphed_callables warms up on one stream and captures on another
    (torch.cuda.graph's default capture stream), so the capture is the first work on that
    stream. With torch 2.11 on an H200 such a capture failed in fc1, the first cuBLAS call,
    in a fresh notebook kernel (it did not recur in a plain process). The likely cause is the
    lazy per-stream setup of the BLAS handle, which is not allowed during a capture (torch 2.12
    warms up on the capture stream for that reason on ROCm). This pass does any such setup
    outside the capture; with it the notebooks ran through on the H200.
    """
    torch.cuda.graph(torch.cuda.CUDAGraph())  # creates the default capture stream if missing
    stream = getattr(torch.cuda.graph, "default_capture_stream", None)
    if stream is None:
        return
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        params = [p for p in module.parameters() if p.requires_grad]
        torch.autograd.grad(module(sample).sum(), params)
    torch.cuda.current_stream().wait_stream(stream)


def training_forward(
    model: MnistCNN, config: TrainConfig, device: torch.device, sample: torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The forward a training step calls: model.forward_pool_first (with the bn1 fold where it
    pays), and on a GPU in fp32 its CUDA-graph replay for batches shaped like `sample`."""
    fold_bn1 = fold_bn1_enabled(device, config.fold_bn1)
    eager = partial(model.forward_pool_first, fold_bn1=fold_bn1)
    use_graphs = config.cuda_graphs and device.type == "cuda"
    if not use_graphs or autocast_dtype(device, config.mixed_precision) is not None:
        return eager
    graphed = cuda_graph_forward(model, fold_bn1, sample)
    if graphed is None:
        return eager
    return lambda x: graphed(x) if x.shape == sample.shape else eager(x)


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def describe_device() -> str:
    """One line for the top of a notebook: the GPU that trains, or a warning and Colab's fix."""
    if torch.cuda.is_available():
        return f"GPU: {torch.cuda.get_device_name()}"
    # A Colab runtime starts on a CPU unless a GPU is asked for; elsewhere the menu does not exist.
    fix = "; Runtime > Change runtime type > GPU" if "google.colab" in sys.modules else ""
    return f"CPU: this will be slow{fix}"


def random_affine(
    images: torch.Tensor,
    max_rotation: float,
    max_scale: float,
    max_shift: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """Rotate, zoom and shift each image by its own random amounts (bilinear, zero-filled).

    Rotation is uniform in [-max_rotation, max_rotation] degrees, zoom in [1 - max_scale,
    1 + max_scale], shift in [-max_shift, max_shift] pixels, about the image centre.
    """
    n, _, h, w = images.shape
    u = torch.rand(4, n, generator=generator, device=generator.device).to(images.device) * 2 - 1
    angle = u[0] * math.radians(max_rotation)
    scale = 1 + u[1] * max_scale
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    # affine_grid maps output to input coordinates in [-1, 1]; one pixel is 2 / size there.
    theta = torch.stack(
        [
            torch.stack([cos, -sin, u[2] * max_shift * 2 / w], 1),
            torch.stack([sin, cos, u[3] * max_shift * 2 / h], 1),
        ],
        1,
    )
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, padding_mode="zeros", align_corners=False)


def augment(images: torch.Tensor, config: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """The training augmentation `config` asks for: an affine warp, integer shifts, or nothing."""
    if config.max_rotation > 0 or config.max_scale > 0:
        return random_affine(
            images, config.max_rotation, config.max_scale, config.max_shift, generator
        )
    return random_translate(images, config.max_shift, generator)


def random_translate(
    images: torch.Tensor, max_shift: int, generator: torch.Generator
) -> torch.Tensor:
    """Shift each image by its own random integer offset in [-max_shift, max_shift], zero-filled.

    Done for the whole batch with one pad and one gather, so it costs a few microseconds per image.
    """
    if max_shift <= 0:
        return images
    n, c, h, w = images.shape
    s = max_shift
    padded = F.pad(images, (s, s, s, s))
    offsets = torch.randint(0, 2 * s + 1, (2, n), generator=generator, device=generator.device)
    offsets = offsets.to(images.device)
    rows = torch.arange(h, device=images.device).view(1, h, 1) + offsets[0].view(n, 1, 1)
    cols = torch.arange(w, device=images.device).view(1, 1, w) + offsets[1].view(n, 1, 1)
    flat_index = (rows * (w + 2 * s) + cols).view(n, 1, h * w).expand(n, c, h * w)
    return padded.flatten(2).gather(2, flat_index).view(n, c, h, w)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 256,
    dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Mean cross-entropy, accuracy and error of `model` on a labelled set, in eval mode."""
    # The prescribed network's cheaper, equal forward (MnistCNN.forward_pool_first) where it has one.
    forward = getattr(model, "forward_pool_first", model)
    was_training = model.training
    model.eval()
    total_loss = torch.zeros((), device=images.device)
    correct = torch.zeros((), device=images.device, dtype=torch.long)
    try:
        for start in range(0, len(images), batch_size):
            x, y = images[start : start + batch_size], labels[start : start + batch_size]
            with torch.autocast(
                images.device.type, dtype=dtype or torch.float32, enabled=bool(dtype)
            ):
                logits = forward(x)
            total_loss += F.cross_entropy(logits.float(), y, reduction="sum")
            correct += (logits.argmax(1) == y).sum()
    finally:
        model.train(was_training)
    n = len(images)
    accuracy = correct.item() / n
    return {"loss": total_loss.item() / n, "accuracy": accuracy, "error": 1.0 - accuracy}


@torch.no_grad()
def predict(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 2_000) -> torch.Tensor:
    """Class probabilities (fp32, softmax of the logits) for `images`, computed in eval mode."""
    was_training = model.training
    model.eval()
    try:
        chunks = [
            model(images[i : i + batch_size]).softmax(1) for i in range(0, len(images), batch_size)
        ]
    finally:
        model.train(was_training)
    return torch.cat(chunks)


def confusion_matrix(
    labels: torch.Tensor, predictions: torch.Tensor, classes: int = 10
) -> torch.Tensor:
    """Counts of (true class, predicted class) pairs: rows are true classes."""
    flat = labels.long().cpu() * classes + predictions.long().cpu()
    return torch.bincount(flat, minlength=classes * classes).view(classes, classes)


def make_optimizer(
    model: torch.nn.Module, config: TrainConfig, device: torch.device
) -> torch.optim.SGD:
    """SGD with Nesterov momentum and weight decay, as the recipe says."""
    return torch.optim.SGD(
        model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        nesterov=True,
        weight_decay=config.weight_decay,
        # One kernel for the whole update instead of a few per tensor: the same update up to
        # float rounding, a few percent faster on a CPU and fewer kernel launches on a GPU.
        fused=device.type in ("cpu", "cuda"),
    )


def train(
    config: TrainConfig,
    split: Split,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train one model on `split`, keeping the weights with the best validation accuracy."""
    device = torch.device(device) if device is not None else default_device()
    torch.manual_seed(config.seed)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    amp_dtype = autocast_dtype(device, config.mixed_precision)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format

    train_x, train_y = split.train_images.to(device), split.train_labels.to(device)
    val_x, val_y = split.val_images.to(device), split.val_labels.to(device)
    model = MnistCNN(config.variant).to(device, memory_format=memory_format)
    sample = train_x[: config.batch_size].contiguous(memory_format=memory_format)
    forward = training_forward(model, config, device, sample)
    # A CPU evaluates fastest in cache-sized batches; a GPU in few large ones (fewer launches).
    eval_batch = config.eval_batch_size if device.type == "cpu" else 5_000

    steps_per_epoch = math.ceil(len(train_x) / config.batch_size)
    if config.limit_train_batches > 0:
        steps_per_epoch = min(steps_per_epoch, config.limit_train_batches)
    total_steps = config.epochs * steps_per_epoch
    optimizer = make_optimizer(model, config, device)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=total_steps, pct_start=config.warmup_fraction
    )
    # fp16 gradients can underflow; bf16 has fp32's exponent range and needs no scaling.
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    # Recording points: evals_per_epoch evenly spaced steps in each epoch, the last one at its end.
    evals = max(1, min(config.evals_per_epoch, steps_per_epoch))
    record_at = {round(k * steps_per_epoch / evals) for k in range(1, evals + 1)}
    result = TrainResult(
        model, config, device=str(device), autocast_dtype=str(amp_dtype or "float32")
    )
    # With ema_decay > 0 the evaluated (and kept) weights are a moving average of the trained ones.
    averaged = copy.deepcopy(model) if config.ema_decay > 0 else model
    pairs = zip(averaged.state_dict().values(), model.state_dict().values(), strict=True)
    pairs = [(a, t) for a, t in pairs if a.is_floating_point()]  # not BN's batch counter
    average_tensors, trained_tensors = [a for a, _ in pairs], [t for _, t in pairs]
    best_state = copy.deepcopy(averaged.state_dict())

    run_loss = torch.zeros((), device=device)
    run_wrong = torch.zeros((), device=device, dtype=torch.long)
    run_seen = 0
    step = 0
    bar = tqdm(total=total_steps, desc=f"{config.variant} seed {config.seed}", disable=not progress)
    run_start = time.perf_counter()
    for epoch in range(config.epochs):
        epoch_start = time.perf_counter()
        permutation = torch.randperm(len(train_x), device=device, generator=generator)
        for i in range(steps_per_epoch):
            batch = permutation[i * config.batch_size : (i + 1) * config.batch_size]
            x = augment(train_x[batch], config, generator)
            x = x.contiguous(memory_format=memory_format)
            y = train_y[batch]
            with torch.autocast(
                device.type, dtype=amp_dtype or torch.float32, enabled=bool(amp_dtype)
            ):
                logits = forward(x)  # = model(x), but faster (see training_forward)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            bar.update()
            if averaged is not model:
                # Warm-up (as in TensorFlow's ExponentialMovingAverage): early on, the average
                # follows the weights closely instead of remembering the random start.
                keep = min(config.ema_decay, (1 + step) / (10 + step))
                torch._foreach_lerp_(average_tensors, trained_tensors, 1 - keep)

            # Running training loss/error over the images seen since the last record; kept on the
            # device so the loop never waits for a host sync between records.
            run_loss += loss.detach() * len(y)
            run_wrong += (logits.argmax(1) != y).sum()
            run_seen += len(y)
            if i + 1 in record_at:
                val = evaluate(averaged, val_x, val_y, eval_batch)
                record = {
                    "step": step,
                    "epoch": epoch + (i + 1) / steps_per_epoch,
                    "train_loss": run_loss.item() / run_seen,
                    "train_error": run_wrong.item() / run_seen,
                    "val_loss": val["loss"],
                    "val_error": val["error"],
                    "val_accuracy": val["accuracy"],
                    "lr": scheduler.get_last_lr()[0],
                    "seconds": time.perf_counter() - run_start,  # wall time, evaluations included
                }
                result.history.append(record)
                if val["accuracy"] >= result.best_val_accuracy:
                    result.best_val_accuracy, result.best_step = val["accuracy"], step
                    best_state = copy.deepcopy(averaged.state_dict())
                bar.set_postfix(
                    val_acc=f"{val['accuracy']:.4f}", loss=f"{record['train_loss']:.3f}"
                )
                run_loss.zero_()
                run_wrong.zero_()
                run_seen = 0
        result.seconds_per_epoch.append(time.perf_counter() - epoch_start)
    bar.close()
    model.load_state_dict(best_state)
    model.eval()
    return result


def config_dict(config: TrainConfig) -> dict[str, object]:
    """The config as a plain dict (JSON- and weights_only-safe)."""
    return asdict(config)
