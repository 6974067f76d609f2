"""Training loop, evaluation and history for the MNIST CNN.

The loop is written out in one place (nanoGPT / pytorch-examples style): tensors already on the
device, a seeded permutation per epoch, random-translation augmentation done on the whole batch
at once, SGD under a one-cycle schedule, and a history recorded several times per epoch. A step
computes model(x) through the speed path that `TrainConfig.speed` names (speed.py: the same
function, faster); "off" is the plain model(x), and the loop reads the same either way.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import speed
from .data import Split
from .model import MnistCNN

# perturb(model, x, y, step) -> the batch a step trains on (e.g. adversarial examples of x).
Perturb = Callable[[nn.Module, torch.Tensor, torch.Tensor, int], torch.Tensor]
# validate(model, step) -> (score that picks the kept weights, metrics to record).
Validate = Callable[[nn.Module, int], tuple[float, dict[str, float]]]


@dataclass
class TrainConfig:
    """Every knob of a training run; stored in the checkpoint so the run can be rebuilt.

    The defaults are Part 1's recipe, chosen on the validation split by the recipe search
    (`python -m mnistlab.tools.recipes`; its runs are in report/recipe_search*.jsonl).
    """

    variant: str = "plain"  # "plain" or "bn"
    epochs: int = 5
    batch_size: int = 128
    lr: float = 0.1  # peak learning rate of the one-cycle schedule (SGD + Nesterov momentum)
    # The schedule moves the momentum against the learning rate: max_momentum where the rate is
    # lowest (first and last step), base_momentum at its peak (see make_optimizer).
    max_momentum: float = 0.95
    base_momentum: float = 0.85
    weight_decay: float = 5e-4
    warmup_fraction: float = 0.15  # share of the steps spent warming the learning rate up
    label_smoothing: float = 0.0
    max_shift: int = 1  # random translation of up to this many pixels; 0 disables augmentation
    ema_decay: float = 0.0  # > 0: evaluate and keep an exponential moving average of the weights
    seed: int = 0
    evals_per_epoch: int = 4
    eval_batch_size: int = 256  # on a CPU, where batches that stay in cache are fastest
    # How a step computes model(x) (speed.py): "auto" (the fastest path on this CPU, measured
    # once and cached; fp32 with CUDA graphs on a GPU), "off" (plain model(x) in fp32), or a
    # path: "fp32+fold", "bf16"...
    speed: str = "auto"
    limit_train_batches: int = 0  # > 0: stop each epoch after this many batches (quick runs)


def one_epoch_config(base: TrainConfig) -> TrainConfig:
    """The recipe for a single epoch, chosen on the validation split (report/recipe_search*.jsonl).

    Batch norm starts faster; with one pass over the data, more updates beat bigger batches, and
    augmentation has no time to pay off, so it is off.
    """
    return replace(
        base, variant="bn", epochs=1, batch_size=32, lr=0.04, max_shift=0, warmup_fraction=0.2
    )


def final_config(base: TrainConfig) -> TrainConfig:
    """Part 1's final model: the study's recipe trained for 8 epochs, a length chosen on validation.

    Longer runs, and stronger augmentation over them, gained no more than the seed-to-seed noise
    over 8 epochs (the recipe search's last round, report/recipe_search*.jsonl).
    """
    return replace(base, epochs=8)


@dataclass
class TrainResult:
    """A trained model plus what the run measured."""

    model: MnistCNN
    config: TrainConfig
    history: list[dict[str, float]] = field(default_factory=list)
    best_val_accuracy: float = 0.0  # or the best score of train's `validate`
    best_step: int = 0
    seconds_per_epoch: list[float] = field(default_factory=list)  # evaluations included
    eval_seconds: float = 0.0  # of them, in evaluations (and `validate`)
    device: str = "cpu"
    speed: str = "off"  # the speed path that ran (speed.py)
    autocast_dtype: str = "float32"


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
    model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256
) -> dict[str, float]:
    """Mean cross-entropy, accuracy and error of `model` on a labelled set, in eval mode, fp32."""
    forward = speed.inference_forward(model)  # model(x), or its cheaper equal (speed.py)
    was_training = model.training
    model.eval()
    total_loss = torch.zeros((), device=images.device)
    correct = torch.zeros((), device=images.device, dtype=torch.long)
    try:
        for start in range(0, len(images), batch_size):
            x, y = images[start : start + batch_size], labels[start : start + batch_size]
            with torch.autocast(images.device.type, enabled=False):
                logits = forward(x)
            total_loss += F.cross_entropy(logits, y, reduction="sum")
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
    model: torch.nn.Module, config: TrainConfig, total_steps: int, fused: bool = False
) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.OneCycleLR]:
    """SGD with Nesterov momentum and weight decay, under the one-cycle schedule of `config`.

    The schedule sets the learning rate and the momentum of every step: the rate warms up from
    lr / 25 to lr over warmup_fraction of the steps, then anneals (cosine) to lr / 25e4 (torch's
    defaults); the momentum moves the other way, from max_momentum to base_momentum and back.
    `fused`: one kernel for the whole update (the speed path's; the same update up to rounding).
    """
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=config.lr,
        momentum=config.max_momentum,
        nesterov=True,
        weight_decay=config.weight_decay,
        fused=True if fused else None,  # None: torch's default implementation
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=config.lr,
        total_steps=total_steps,
        pct_start=config.warmup_fraction,
        base_momentum=config.base_momentum,
        max_momentum=config.max_momentum,
    )
    return optimizer, scheduler


def steps_per_epoch(config: TrainConfig, n_train: int) -> int:
    """Optimisation steps per epoch: one per batch, or the first limit_train_batches."""
    steps = math.ceil(n_train / config.batch_size)
    return min(steps, config.limit_train_batches) if config.limit_train_batches > 0 else steps


def train(
    config: TrainConfig,
    split: Split,
    device: torch.device | str | None = None,
    progress: bool = True,
    init: MnistCNN | None = None,
    perturb: Perturb | None = None,
    validate: Validate | None = None,
) -> TrainResult:
    """Train one model on `split`, keeping the weights with the best validation accuracy.

    `init`: start from a copy of these weights instead of a fresh network. `perturb(model, x, y,
    step)` replaces each training batch, e.g. by adversarial examples (defenses.py).
    `validate(model, step)`, at each validation check, returns a score and metrics to record;
    the weights kept are then those with the best score instead of the best accuracy.
    """
    device = torch.device(device) if device is not None else default_device()
    torch.manual_seed(config.seed)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    train_x, train_y = split.train_images.to(device), split.train_labels.to(device)
    val_x, val_y = split.val_images.to(device), split.val_labels.to(device)
    if init is not None and init.variant != config.variant:
        raise ValueError(f"init is a {init.variant!r} network, config.variant {config.variant!r}")
    model = MnistCNN(config.variant) if init is None else copy.deepcopy(init)
    model = model.to(device).train()
    # model(x) on the speed path; "auto" measures the paths once per machine, not in quick runs.
    first_batch = (train_x[: config.batch_size], train_y[: config.batch_size])
    quick = config.limit_train_batches > 0
    forward = speed.training_forward(model, config.speed, first_batch, calibrate_now=not quick)
    # A CPU evaluates fastest in cache-sized batches; a GPU in few large ones (fewer launches).
    eval_batch = config.eval_batch_size if device.type == "cpu" else 5_000

    steps = steps_per_epoch(config, len(train_x))
    total_steps = config.epochs * steps
    optimizer, scheduler = make_optimizer(model, config, total_steps, forward.fused_optimizer)
    # Recording points: evals_per_epoch evenly spaced steps in each epoch, the last one at its end.
    evals = max(1, min(config.evals_per_epoch, steps))
    record_at = {round(k * steps / evals) for k in range(1, evals + 1)}
    result = TrainResult(model, config, device=str(device), speed=forward.path.name)
    result.autocast_dtype = str(forward.path.dtype or "float32")
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
        for i in range(steps):
            batch = permutation[i * config.batch_size : (i + 1) * config.batch_size]
            x, y = random_translate(train_x[batch], config.max_shift, generator), train_y[batch]
            if perturb is not None:
                x = perturb(model, x, y, step)
            logits = forward(x)  # = model(x), computed on the speed path
            loss = F.cross_entropy(logits, y, label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
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
                speed.sync(device)  # the steps still queued on a GPU count as training time
                eval_start = time.perf_counter()
                val = evaluate(averaged, val_x, val_y, eval_batch)
                score, extra = (
                    (val["accuracy"], {}) if validate is None else validate(averaged, step)
                )
                result.eval_seconds += time.perf_counter() - eval_start
                record = {
                    "step": step,
                    "epoch": epoch + (i + 1) / steps,
                    "train_loss": run_loss.item() / run_seen,
                    "train_error": run_wrong.item() / run_seen,
                    "val_loss": val["loss"],
                    "val_error": val["error"],
                    "val_accuracy": val["accuracy"],
                    "lr": scheduler.get_last_lr()[0],
                    "seconds": time.perf_counter() - run_start,  # wall time, evaluations included
                    **extra,
                }
                result.history.append(record)
                if score >= result.best_val_accuracy:
                    result.best_val_accuracy, result.best_step = score, step
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
