"""Defences against adversarial examples (optional question 2); `robustness` measures them.

Two defences:
- adversarial training (Madry et al. 2018, arXiv:1706.06083): minimise the loss on PGD
  adversarial examples of the current weights instead of on the clean images;
- an input transformation, bit-depth reduction (Xu et al. 2018, "Feature Squeezing",
  arXiv:1704.01155; 1 bit is binarisation at 0.5) in front of an unchanged model. Its rounding has
  zero gradient almost everywhere, so gradient attacks see nothing and PGD "fails": gradient
  masking, not robustness (Athalye et al. 2018, arXiv:1802.00420). It is therefore also attacked
  with BPDA: the same forward pass, with the rounding treated as the identity in the backward
  pass (straight-through), and only that number is reported as its robustness.
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import load_checkpoint, save_checkpoint
from .data import Split
from .model import MnistCNN
from .pgd import pgd
from .robustness import robust_accuracy
from .train import autocast_dtype, evaluate

# ---------------------------------------------------------------------------------------------
# Input transformation: bit-depth reduction, with the true (zero) or a straight-through gradient


class _RoundToLevels(torch.autograd.Function):
    """round(x * levels) / levels; backward: zero (the true derivative) or identity (BPDA)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, levels: int, straight_through: bool) -> torch.Tensor:
        ctx.straight_through = straight_through
        return torch.round(x * levels) / levels

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return (grad if ctx.straight_through else torch.zeros_like(grad)), None, None


class BitDepthReduction(nn.Module):
    """Round [0, 1] pixels to 2**bits evenly spaced levels; bits=1 binarises at 0.5.

    The forward pass is the same either way. `straight_through=False` gives the true derivative
    of rounding (zero almost everywhere); `straight_through=True` passes the gradient through
    unchanged, the BPDA approximation of Athalye et al. (2018) for a transformation g(x) ~ x.
    """

    def __init__(self, bits: int = 1, straight_through: bool = False) -> None:
        super().__init__()
        if not 1 <= bits <= 8:
            raise ValueError(f"bits must be between 1 and 8, got {bits}")
        self.bits = bits
        self.straight_through = straight_through

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Quantised images, same shape and dtype."""
        return _RoundToLevels.apply(x, 2**self.bits - 1, self.straight_through)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, straight_through={self.straight_through}"


class TransformedModel(nn.Module):
    """`model(transform(x))`: an input-transformation defence in front of an unchanged model."""

    def __init__(self, transform: nn.Module, model: nn.Module) -> None:
        super().__init__()
        self.transform = transform
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the transformed images."""
        return self.model(self.transform(x))


def bit_depth_defense(model: nn.Module, bits: int = 1) -> TransformedModel:
    """The model behind bit-depth reduction (shares the model's weights; nothing is trained)."""
    return TransformedModel(BitDepthReduction(bits), model)


def bpda_surrogate(defended: TransformedModel) -> TransformedModel:
    """The same defended model with a straight-through gradient: what a BPDA attack differentiates.

    Its forward pass is bit for bit the defended model's, so an attack that fools the surrogate
    fools the defence; the weights are shared, not copied.
    """
    transform = defended.transform
    if not isinstance(transform, BitDepthReduction):
        raise TypeError(f"no straight-through version of {type(transform).__name__}")
    return TransformedModel(
        BitDepthReduction(transform.bits, straight_through=True), defended.model
    )


# ---------------------------------------------------------------------------------------------
# Adversarial training


@dataclass
class AdvTrainConfig:
    """Every knob of an adversarial-training run; stored in its checkpoint."""

    # Defaults: the settings chosen on the validation split for fine-tuning the Part 1 model.
    eps: float = 0.35  # training L-infinity radius on the [0, 1] scale (evaluated at 0.3)
    steps: int = 3  # PGD steps of the inner maximisation
    step_size: float = 0.12  # on the [0, 1] scale; scaled by eps_t / eps during the eps ramp
    epochs: int = 6
    eps_ramp_epochs: float = 0.5  # eps grows linearly from 0 over this many epochs
    batch_size: int = 128
    lr: float = 0.05  # peak of the one-cycle schedule (SGD + Nesterov momentum)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_fraction: float = 0.15
    seed: int = 0
    mixed_precision: str = "auto"  # the weight update only; the inner PGD always runs in fp32
    val_images: int = 1_000  # validation images attacked at the end of each epoch
    val_steps: int = 10  # PGD steps of that check (random start)
    val_eps: float | None = 0.3  # eps of that check; None: eps
    limit_train_batches: int = 0  # > 0: stop each epoch after this many batches (quick mode)


@dataclass
class AdvTrainResult:
    """An adversarially trained model plus what the run measured."""

    model: MnistCNN
    config: AdvTrainConfig
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    train_seconds: float = 0.0  # the training loop alone, validation checks excluded
    validation_seconds: float = 0.0
    initialised_from: str = "scratch"


def ramped_eps(step: int, ramp_steps: int, eps: float) -> float:
    """eps * min(1, (step + 1) / ramp_steps): a linear ramp, full eps from step ramp_steps - 1 on."""
    return eps if ramp_steps <= 0 else eps * min(1.0, (step + 1) / ramp_steps)


def _sgd(model: nn.Module, config: AdvTrainConfig) -> torch.optim.SGD:
    return torch.optim.SGD(
        model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        nesterov=True,
        weight_decay=config.weight_decay,
    )


def _train_batch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    config: AdvTrainConfig,
    amp_dtype: torch.dtype | None,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One weight update on PGD examples of the batch (on the clean batch when eps is 0)."""
    if eps > 0:
        step_size = config.step_size * eps / config.eps  # the ramp scales the step with eps
        x = pgd(model, x, y, eps, config.steps, step_size, early_stop=False, seed=seed)
    model.train()
    with torch.autocast(x.device.type, dtype=amp_dtype or torch.float32, enabled=bool(amp_dtype)):
        logits = model(x)
    loss = F.cross_entropy(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), logits.detach()


def training_step_seconds(
    config: AdvTrainConfig,
    split: Split,
    init: MnistCNN,
    batches: int = 20,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Seconds per batch of standard training and of PGD training, measured back to back.

    Both update copies of `init` on the same `batches` training batches (after one untimed
    warm-up batch), on the same machine at the same moment, so their ratio is the price of the
    inner attack without the noise of runs made at other times.
    """
    device = torch.device(device)
    amp_dtype = autocast_dtype(device, config.mixed_precision)
    n = (batches + 1) * config.batch_size
    xs, ys = split.train_images[:n].to(device), split.train_labels[:n].to(device)
    out = {}
    for name, eps in (("standard", 0.0), ("pgd", config.eps)):
        model = copy.deepcopy(init).to(device, memory_format=torch.channels_last)
        optimizer = _sgd(model, config)
        for i in range(batches + 1):
            if i == 1:  # the first batch warms up the kernels and is not timed
                start = time.perf_counter()
            x = xs[i * config.batch_size : (i + 1) * config.batch_size]
            y = ys[i * config.batch_size : (i + 1) * config.batch_size]
            _train_batch(model, optimizer, x, y, eps, config, amp_dtype, seed=i)
        out[f"{name}_seconds_per_batch"] = (time.perf_counter() - start) / batches
    out["ratio"] = out["pgd_seconds_per_batch"] / out["standard_seconds_per_batch"]
    return out


def adversarial_train(
    config: AdvTrainConfig,
    split: Split,
    init: MnistCNN | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> AdvTrainResult:
    """PGD adversarial training (Madry et al. 2018) on `split`, from `init`'s weights or scratch.

    Each batch is replaced by PGD examples (random start, `steps` signed steps, fp32, eval mode,
    gradients w.r.t. the input only) made against the current weights; the weight update may
    run under autocast. At the end of each epoch the model is attacked by PGD-`val_steps` on
    `val_images` validation images at `val_eps` (default: eps), and the epoch with the best
    robust validation accuracy (once the training eps is at full size) is kept.
    """
    device = torch.device(device)
    torch.manual_seed(config.seed)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    amp_dtype = autocast_dtype(device, config.mixed_precision)
    train_x, train_y = split.train_images.to(device), split.train_labels.to(device)
    val_x, val_y = split.val_images.to(device), split.val_labels.to(device)
    check = torch.randperm(len(val_x), generator=torch.Generator().manual_seed(config.seed))
    check = check[: config.val_images].to(device)
    model = copy.deepcopy(init) if init is not None else MnistCNN()
    # channels_last: the same weights in the memory format the CPU convolutions run fastest in
    # (as in Part 1's training, attack steps included).
    model = model.to(device, memory_format=torch.channels_last)

    steps_per_epoch = math.ceil(len(train_x) / config.batch_size)
    if config.limit_train_batches > 0:
        steps_per_epoch = min(steps_per_epoch, config.limit_train_batches)
    total_steps = config.epochs * steps_per_epoch
    ramp_steps = round(config.eps_ramp_epochs * steps_per_epoch)
    val_eps = config.eps if config.val_eps is None else config.val_eps
    optimizer = _sgd(model, config)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=total_steps, pct_start=config.warmup_fraction
    )
    result = AdvTrainResult(model, config, initialised_from="scratch" if init is None else "init")
    best_state, best_robust = copy.deepcopy(model.state_dict()), -1.0
    step = 0
    bar = tqdm(total=total_steps, desc="PGD training", disable=not progress)
    for epoch in range(config.epochs):
        start = time.perf_counter()
        permutation = torch.randperm(len(train_x), device=device, generator=generator)
        run_loss, run_wrong, run_seen = 0.0, 0, 0
        for i in range(steps_per_epoch):
            batch = permutation[i * config.batch_size : (i + 1) * config.batch_size]
            x, y = train_x[batch], train_y[batch]
            eps = ramped_eps(step, ramp_steps, config.eps)
            seed = config.seed * 1_000_003 + step
            loss, logits = _train_batch(model, optimizer, x, y, eps, config, amp_dtype, seed)
            scheduler.step()
            step += 1
            bar.update()
            run_loss += loss.item() * len(y)
            run_wrong += int((logits.argmax(1) != y).sum())
            run_seen += len(y)
        result.train_seconds += time.perf_counter() - start

        start = time.perf_counter()
        clean = evaluate(model, val_x, val_y)["accuracy"]
        robust = robust_accuracy(
            model, val_x[check], val_y[check], val_eps, steps=config.val_steps, seed=config.seed
        )["accuracy"]
        result.validation_seconds += time.perf_counter() - start
        result.history.append(
            {
                "epoch": epoch + 1,
                "eps": eps,
                "train_adv_loss": run_loss / run_seen,
                "train_adv_error": run_wrong / run_seen,
                "val_accuracy": clean,
                "val_pgd_accuracy": robust,
                "lr": scheduler.get_last_lr()[0],
            }
        )
        bar.set_postfix(val_acc=f"{clean:.4f}", val_pgd=f"{robust:.4f}")
        if eps >= config.eps and robust >= best_robust:
            best_state, best_robust, result.best_epoch = (
                copy.deepcopy(model.state_dict()),
                robust,
                epoch + 1,
            )
    bar.close()
    model.load_state_dict(best_state)
    model.eval()
    return result


def adv_train_metadata(result: AdvTrainResult) -> dict[str, Any]:
    """What the checkpoint of an adversarially trained model records (plain Python values)."""
    return {
        "config": asdict(result.config),
        "kind": "pgd_adversarial_training",
        "train_seconds": result.train_seconds,
        "validation_seconds": result.validation_seconds,
        "history": result.history,
        "metrics": {
            "best_epoch": result.best_epoch,
            "best_val_pgd_accuracy": max(
                (h["val_pgd_accuracy"] for h in result.history if h["epoch"] == result.best_epoch),
                default=float("nan"),
            ),
        },
        "initialised_from": result.initialised_from,
        "torch_threads": torch.get_num_threads(),
    }


def weights_fingerprint(model: nn.Module) -> str:
    """A short hash of the model's weights: says which plain model a fine-tuned one started from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def load_or_train_adversarial(
    path: str | Path,
    config: AdvTrainConfig,
    split: Split,
    init: MnistCNN | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    retrain: bool = False,
) -> tuple[MnistCNN, dict[str, Any], bool]:
    """Load the PGD-trained model at `path`, or train and save it when it is missing or stale.

    A checkpoint is reused only when its config and the fingerprint of the model it started from
    match the ones asked for; otherwise (or with `retrain`) the model is trained again and saved.
    Returns the model, its checkpoint metadata, and whether it was trained in this call.
    """
    path = Path(path)
    wanted_init = weights_fingerprint(init) if init is not None else "scratch"
    if path.is_file() and not retrain:
        model, meta = load_checkpoint(path, device)
        if meta.get("config") == asdict(config) and meta.get("init_fingerprint") == wanted_init:
            return model, meta, False
        print(f"{path} was trained with other settings or from another model: training again.")
    result = adversarial_train(config, split, init, device, progress)
    meta = adv_train_metadata(result) | {"init_fingerprint": wanted_init}
    save_checkpoint(path, result.model, **meta)
    return (*load_checkpoint(path, device), True)
