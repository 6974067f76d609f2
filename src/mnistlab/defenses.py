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

import hashlib
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import load_checkpoint, save_checkpoint
from .data import Split
from .model import MnistCNN
from .pgd import pgd
from .robustness import robust_accuracy
from .train import Perturb, TrainConfig, steps_per_epoch, train

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


def adversarial_recipe(**changes: Any) -> TrainConfig:
    """The training settings of adversarial fine-tuning (chosen on the validation split), changed.

    Part 1's recipe for 6 epochs at a peak learning rate of 0.05, without augmentation (the
    attack perturbs every batch) and with one validation check per epoch (an attack, see
    AdvTrainConfig); `changes` are TrainConfig fields (epochs, lr, seed, variant, ...).
    """
    return replace(TrainConfig(epochs=6, lr=0.05, max_shift=0, evals_per_epoch=1), **changes)


@dataclass
class AdvTrainConfig:
    """The adversarial knobs of a PGD-training run, on top of its TrainConfig; in its checkpoint."""

    # Defaults: the settings chosen on the validation split for fine-tuning the Part 1 model.
    eps: float = 0.35  # training L-infinity radius on the [0, 1] scale (evaluated at 0.3)
    steps: int = 3  # PGD steps of the inner maximisation
    step_size: float = 0.12  # on the [0, 1] scale; scaled by eps_t / eps during the eps ramp
    eps_ramp_epochs: float = 0.5  # eps grows linearly from 0 over this many epochs
    val_images: int = 1_000  # validation images attacked at each validation check
    val_steps: int = 10  # PGD steps of that check (random start)
    val_eps: float | None = 0.3  # eps of that check; None: eps
    train: TrainConfig = field(default_factory=adversarial_recipe)  # the loop's own knobs


@dataclass
class AdvTrainResult:
    """An adversarially trained model plus what the run measured."""

    model: MnistCNN
    config: AdvTrainConfig
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: float = (
        0  # the epoch (a fraction with several checks per epoch) of the kept weights
    )
    train_seconds: float = 0.0  # the training loop alone, validation checks excluded
    validation_seconds: float = 0.0
    initialised_from: str = "scratch"
    speed: str = "off"  # the speed path the weight updates ran on (speed.py)


def ramped_eps(step: int, ramp_steps: int, eps: float) -> float:
    """eps * min(1, (step + 1) / ramp_steps): a linear ramp, full eps from step ramp_steps - 1 on."""
    return eps if ramp_steps <= 0 else eps * min(1.0, (step + 1) / ramp_steps)


def pgd_perturb(config: AdvTrainConfig, ramp_steps: int) -> Perturb:
    """train's perturb hook for PGD training: each batch replaced by PGD examples of the current
    weights at the ramped eps (the clean batch while eps is 0)."""

    def perturb(model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
        eps = ramped_eps(step, ramp_steps, config.eps)
        if eps <= 0:
            return x
        step_size = config.step_size * eps / config.eps  # the ramp scales the step with eps
        seed = config.train.seed * 1_000_003 + step
        return pgd(model, x, y, eps, config.steps, step_size, early_stop=False, seed=seed)

    return perturb


def training_step_seconds(
    config: AdvTrainConfig,
    split: Split,
    init: MnistCNN,
    batches: int = 20,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Seconds per batch of standard training and of PGD training, measured back to back.

    Both train copies of `init` with train.train on the same `batches` training batches (after
    an untimed one-batch run), on the same machine at the same moment, so their ratio is the
    price of the inner attack without the noise of runs made at other times.
    """
    n = batches * config.train.batch_size
    tiny = Split(
        split.train_images[:n],
        split.train_labels[:n],
        split.val_images[:1],
        split.val_labels[:1],
        split.val_indices[:1],
    )
    short = replace(config.train, variant=init.variant, epochs=1, evals_per_epoch=1)
    out = {}
    for name, perturb in (("standard", None), ("pgd", pgd_perturb(config, ramp_steps=0))):
        for limit in (1, batches):  # the one-batch run warms the kernels up
            run = replace(short, limit_train_batches=limit)
            result = train(run, tiny, device, progress=False, init=init, perturb=perturb)
        seconds = sum(result.seconds_per_epoch) - result.eval_seconds
        out[f"{name}_seconds_per_batch"] = seconds / batches
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

    train.train's loop with its two hooks. Each batch is replaced by PGD examples (random start,
    `steps` signed steps, fp32, eval mode, gradients w.r.t. the input only) made against the
    current weights; the weight update runs on the speed path of config.train. At each
    validation check (the end of each epoch) the model is attacked by PGD-`val_steps` on
    `val_images` validation images at `val_eps` (None: the training eps), and the epoch with the best
    robust validation accuracy (once the training eps is at full size) is kept.
    """
    device = torch.device(device)
    steps = steps_per_epoch(config.train, len(split.train_images))
    ramp_steps = round(config.eps_ramp_epochs * steps)
    val_eps = config.eps if config.val_eps is None else config.val_eps
    seed = config.train.seed
    check = torch.randperm(len(split.val_images), generator=torch.Generator().manual_seed(seed))
    check = check[: config.val_images]
    check_x, check_y = split.val_images[check].to(device), split.val_labels[check].to(device)

    def validate(model: nn.Module, step: int) -> tuple[float, dict[str, float]]:
        eps = ramped_eps(step - 1, ramp_steps, config.eps)  # of the last batch trained on
        robust = robust_accuracy(
            model, check_x, check_y, val_eps, steps=config.val_steps, seed=seed
        )
        score = robust["accuracy"] if eps >= config.eps else -math.inf
        return score, {"eps": eps, "val_pgd_accuracy": robust["accuracy"]}

    perturb = pgd_perturb(config, ramp_steps)
    result = train(config.train, split, device, progress, init, perturb, validate)
    if result.best_step == 0:  # every check scored -inf: the weights returned were never kept
        raise ValueError(
            f"the training eps never reached its full size ({config.eps}) at a validation check: "
            f"eps_ramp_epochs ({config.eps_ramp_epochs}) must end before the last check "
            f"(epochs: {config.train.epochs})"
        )
    best = next(h for h in result.history if h["step"] == result.best_step)
    history = [
        {
            "epoch": int(h["epoch"]) if float(h["epoch"]).is_integer() else h["epoch"],
            "eps": h["eps"],
            "train_adv_loss": h["train_loss"],
            "train_adv_error": h["train_error"],
            "val_accuracy": h["val_accuracy"],
            "val_pgd_accuracy": h["val_pgd_accuracy"],
            "lr": h["lr"],
        }
        for h in result.history
    ]
    return AdvTrainResult(
        result.model,
        config,
        history,
        best_epoch=int(best["epoch"]) if float(best["epoch"]).is_integer() else best["epoch"],
        train_seconds=sum(result.seconds_per_epoch) - result.eval_seconds,
        validation_seconds=result.eval_seconds,
        initialised_from="scratch" if init is None else "init",
        speed=result.speed,
    )


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
        "speed": result.speed,
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
