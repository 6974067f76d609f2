"""The speed path: the training step of train.py computed faster. A reader can skip this file.

Everything here computes what `model(x)` computes, exactly or up to float rounding where said,
except reduced precision (bf16 autocast), which changes the numbers. The loop asks for it through
one knob, `TrainConfig.speed`, a path name:

- "off": `model(x)` in fp32, contiguous (NCHW) tensors, the reference SGD: the plain loop;
- "fp32", "bf16": max-pooling before each ReLU (`pool_first_forward`), channels_last tensors and
  the fused SGD kernel, in fp32 or under bf16 autocast;
- "+fold" (the BN variant): bn1's batch statistics folded into conv1 while training
  (`conv_bn_batch_stats`), which skips BN's passes over the biggest feature maps;
- "+graphs" (fp32 on a GPU): forward and backward of a full batch replayed as CUDA graphs, one
  launch each, for a net this small is bound by kernel launches;
- "auto": on a CPU, the fastest of these on the machine at hand, measured by a few timed steps
  of each candidate at the start of a run and cached per machine (`resolve`); on a GPU, fp32
  with CUDA graphs. Which path wins depends on the machine: report/bench*.json holds the
  measurements that showed it.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .model import MNIST_MEAN, MNIST_STD, MnistCNN

CACHE_ENV = "MNISTLAB_CACHE"
# Reduced precision changes the numbers, so "auto" takes it only when it is clearly faster.
REDUCED_PRECISION_MARGIN = 0.10
SWITCH_MARGIN = 0.05  # and another fp32 path only when it beats the default clearly
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
FLAGS = ("fold", "graphs")


# ---------------------------------------------------------------------------------------------
# Pool-first forward and batch-norm folds: the same function as model(x), cheaper


def pool_first_forward(model: MnistCNN, x: torch.Tensor, fold_bn1: bool = True) -> torch.Tensor:
    """model(x) with max-pooling before each ReLU: the same logits and gradients, cheaper.

    ReLU is monotone, so max(relu(a), relu(b)) == relu(max(a, b)) exactly, in any precision,
    and the gradients agree too (pooling routes the gradient to the window's maximum; ReLU
    then zeroes it where that maximum is not positive, in either order). Pooling first lets
    the ReLU and its backward touch a quarter of the values (tests/test_speed.py checks that
    logits and gradients are equal).

    The BN variant also folds its 2-d BNs into the convolutions before them, which gives the
    same function up to float rounding and skips BN's passes over the conv maps: in eval mode
    both (conv_bn_eval), in training mode bn1 when `fold_bn1` (conv_bn_batch_stats).
    Forward hooks would see the swapped and folded layers, so everything that inspects
    layers (the layer table, Part 2's activations) uses model(x).
    """
    z = (x - MNIST_MEAN) / MNIST_STD
    layers = iter(_swap_relu_pool(list(model.layers)))
    for layer in layers:
        if model.variant == "bn" and isinstance(layer, nn.Conv2d):
            bn = next(layers)  # in the BN variant each conv is followed by its BN
            if not model.training:
                z = conv_bn_eval(layer, bn, z)
            elif fold_bn1 and layer is model.layers.conv1:
                z = conv_bn_batch_stats(layer, bn, z)
            else:
                z = bn(layer(z))
        else:
            z = layer(z)
    return z


def conv_bn_eval(conv: nn.Conv2d, bn: nn.BatchNorm2d, z: torch.Tensor) -> torch.Tensor:
    """bn(conv(z)) in eval mode as one convolution: BN's fixed per-channel affine map folded
    into the weights and bias (the usual inference fold; the same function up to rounding)."""
    if bn.training or bn.running_var is None:
        return bn(conv(z))  # BN normalising with batch statistics: nothing fixed to fold
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    return _scaled_conv(conv, z, scale, (conv.bias - bn.running_mean) * scale + bn.bias)


def conv_bn_batch_stats(conv: nn.Conv2d, bn: nn.BatchNorm2d, z: torch.Tensor) -> torch.Tensor:
    """bn(conv(z)) in training mode, computed as one convolution with batch-folded weights.

    conv is linear in its input patches p, so the batch mean and variance of output channel c
    follow from the patches' mean m and covariance S: mean_c = w_c.m + b_c and var_c =
    w_c' S w_c. BN's output is then the convolution with weights w_c * s_c and bias
    beta_c - (w_c.m) s_c, where s_c = gamma_c / sqrt(var_c + eps): the same function of the
    parameters (so the same gradients, up to float rounding), and the running statistics get the
    same update. It skips BN's passes over conv1's 32 x 28 x 28 maps, the biggest in the net; for
    one input channel the patches are small (9 values each), so their statistics are cheap.
    """
    if not bn.training or bn.momentum is None or not bn.track_running_stats:
        return bn(conv(z))  # eval mode, or a running-average rule this fold does not implement
    out_channels = conv.weight.shape[0]
    # The statistics in fp32 even under autocast: a variance from bf16 sums would be too coarse.
    with torch.autocast(z.device.type, enabled=False):
        patches = conv_patches(conv, z.float())  # (values per patch, patches in the batch)
        n = patches.shape[1]
        patch_mean = patches.mean(1)
        centred = patches - patch_mean[:, None]
        patch_cov = centred @ centred.T / n
        w = conv.weight.float().reshape(out_channels, -1)
        mean = w @ patch_mean + conv.bias.float()
        var = ((w @ patch_cov) * w).sum(1)  # biased, as BN normalises with
        scale = bn.weight * torch.rsqrt(var + bn.eps)
        with torch.no_grad():  # as nn.BatchNorm2d: the running variance is the unbiased one
            bn.running_mean.lerp_(mean, bn.momentum)
            bn.running_var.lerp_(var * n / (n - 1), bn.momentum)
            bn.num_batches_tracked += 1
        bias = bn.bias + (conv.bias - mean) * scale
    return _scaled_conv(conv, z, scale, bias)


def conv_patches(conv: nn.Conv2d, z: torch.Tensor) -> torch.Tensor:
    """The input patches `conv` sees in `z`, as columns: (in_channels * kh * kw, N * H_out * W_out).

    The values of F.unfold(...).transpose(0, 1).flatten(1), in its order, gathered as one shifted
    slice of the zero-padded input per kernel tap, which costs a CPU less than unfold's im2col.
    """
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    ph, pw = conv.padding
    padded = F.pad(z, (pw, pw, ph, ph))
    n, c, h, w = padded.shape
    h_out, w_out = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    taps = [
        padded[
            :,
            :,
            i * dh : i * dh + sh * (h_out - 1) + 1 : sh,
            j * dw : j * dw + sw * (w_out - 1) + 1 : sw,
        ]
        for i in range(kh)
        for j in range(kw)
    ]
    # (taps, N, C, H_out, W_out) -> (C, taps, N, H_out, W_out): unfold's (channel, tap) row order.
    return torch.stack(taps).permute(2, 0, 1, 3, 4).reshape(c * kh * kw, n * h_out * w_out)


def _scaled_conv(
    conv: nn.Conv2d, z: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """conv(z) with each output channel's weights scaled by `scale` and the given bias."""
    weight = conv.weight * scale.view(-1, 1, 1, 1)
    return F.conv2d(z, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def _swap_relu_pool(layers: list[nn.Module]) -> list[nn.Module]:
    """The layer sequence with every ReLU that is followed by a max-pool moved after it."""
    order = list(layers)
    for i in range(len(order) - 1):
        if isinstance(order[i], nn.ReLU) and isinstance(order[i + 1], nn.MaxPool2d):
            order[i], order[i + 1] = order[i + 1], order[i]
    return order


def inference_forward(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """What evaluation calls for `model`: the prescribed network's pool-first forward, in eval
    mode equal to model(x) for the plain net and its inference fold for the BN one; else model."""
    return partial(pool_first_forward, model) if isinstance(model, MnistCNN) else model


# ---------------------------------------------------------------------------------------------
# CUDA graphs


class _PoolFirst(nn.Module):
    """pool_first_forward as a module of its own, for make_graphed_callables."""

    def __init__(self, model: MnistCNN, fold_bn1: bool) -> None:
        super().__init__()
        self.model, self.fold_bn1 = model, fold_bn1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pool_first_forward(self.model, x, self.fold_bn1)


def cuda_graph_forward(
    model: MnistCNN, fold_bn1: bool, sample: torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """pool_first_forward for batches shaped like `sample`, forward and backward captured as
    CUDA graphs: one launch each instead of dozens of small kernels per step.

    The graphs compute what the eager calls compute: the weights of a graphed and an eager copy
    differ no more than those of two eager copies do (cuDNN's run-to-run rounding);
    tests/test_speed.py checks it where CUDA exists. Capturing runs a few warm-up passes in
    training mode; the BN running statistics they touch are put back, so the capture changes
    nothing in the model. Returns None, with a warning, where the capture fails: the caller
    then trains eagerly.
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
    stream. A capture then failed in fc1, the first cuBLAS call, in a fresh notebook kernel
    (not in a plain process). The likely cause is the lazy per-stream setup of the BLAS handle,
    which is not allowed during a capture (torch 2.12 warms up on the capture stream for that
    reason on ROCm). This pass does any such setup outside the capture.
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


# ---------------------------------------------------------------------------------------------
# Paths: names, and the forward a training step calls on one


@dataclass(frozen=True)
class SpeedPath:
    """One way to compute a training step; `name` is what TrainConfig.speed and results say."""

    name: str
    fast: bool  # pool-first forward, channels_last tensors, fused SGD ("off": none of them)
    dtype: torch.dtype | None  # autocast dtype, None for fp32
    fold_bn1: bool
    cuda_graphs: bool

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.fast else torch.contiguous_format


def parse_path(name: str, device: torch.device | str = "cpu") -> SpeedPath:
    """The path named `name` ("off", or "fp32" / "bf16" with "+fold", "+graphs"), for `device`."""
    device = torch.device(device)
    if name == "off":
        return SpeedPath("off", False, None, False, False)
    precision, *flags = name.split("+")
    if precision not in PRECISIONS or not set(flags) <= set(FLAGS) or len(set(flags)) < len(flags):
        raise ValueError(
            f"speed must be 'auto', 'off', or one of {', '.join(PRECISIONS)} followed by any of "
            f"{', '.join('+' + f for f in FLAGS)} (e.g. 'fp32+fold'), got {name!r}"
        )
    graphs = "graphs" in flags
    if graphs and (precision != "fp32" or device.type != "cuda"):
        raise ValueError(f"speed {name!r}: CUDA graphs need fp32 on a CUDA device, not {device}")
    canonical = "+".join([precision] + [f for f in FLAGS if f in flags])
    return SpeedPath(canonical, True, PRECISIONS[precision], "fold" in flags, graphs)


class TrainingForward:
    """model(x) as a training step computes it on `path`; logits in fp32.

    Sets the model's memory format for the path (the same weights in another layout), so build
    it before the optimizer and call it with batches of the training images.
    """

    def __init__(self, model: MnistCNN, path: SpeedPath, sample: torch.Tensor) -> None:
        self.model, self.path = model, path
        model.to(memory_format=path.memory_format)
        if not path.fast:
            self.eager: Callable[[torch.Tensor], torch.Tensor] = model
        else:
            self.eager = partial(pool_first_forward, model, fold_bn1=path.fold_bn1)
        self.graphed = None
        self.sample_shape = sample.shape
        if path.cuda_graphs:
            sample = sample.contiguous(memory_format=path.memory_format)
            self.graphed = cuda_graph_forward(model, path.fold_bn1, sample)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=self.path.memory_format)
        if self.graphed is not None and x.shape == self.sample_shape:
            return self.graphed(x)
        dtype = self.path.dtype
        with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=bool(dtype)):
            return self.eager(x).float()

    @property
    def fused_optimizer(self) -> bool:
        """Whether the SGD update runs as one fused kernel (the same update up to rounding)."""
        return self.path.fast and self.model.layers.conv1.weight.device.type in ("cpu", "cuda")


# ---------------------------------------------------------------------------------------------
# "auto": calibrate once per machine, keep the fastest path


def cpu_supports_bf16() -> bool:
    """True where oneDNN has native bf16 kernels (AVX512-BF16 or AMX); elsewhere bf16 is emulated."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def default_path(device: torch.device, variant: str) -> str:
    """The path "auto" takes on a GPU, and in quick runs and tests without a cached calibration:
    fp32 pool-first, with the bn1 fold on a CPU (where BN's passes are memory-bound) and CUDA
    graphs on a GPU."""
    if device.type == "cuda":
        return "fp32+graphs"
    return "fp32+fold" if variant == "bn" else "fp32"


def candidates(device: torch.device, variant: str) -> list[str]:
    """The paths "auto" times on `device`, the default first (it wins ties)."""
    folds = ["+fold", ""] if variant == "bn" else [""]
    graphs = ["+graphs", ""] if device.type == "cuda" else [""]
    full = [f"fp32{f}{g}" for g in graphs for f in folds]
    full.remove(default_path(device, variant))
    full = [default_path(device, variant), *full, "off"]
    # A CPU without native bf16 kernels emulates them: never the faster path, not worth timing.
    bf16 = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_supports_bf16()
    return full + ([f"bf16{f}" for f in folds] if bf16 else [])


def choose(
    seconds: dict[str, float],
    margin: float = REDUCED_PRECISION_MARGIN,
    switch: float = SWITCH_MARGIN,
) -> str:
    """The path to train on, from the seconds per step of the candidates, the default first.

    Another fp32 path replaces the default only when `switch` (5%) faster, and a bf16 path
    replaces the fastest fp32 one only when `margin` (10%) faster: a short calibration on a
    shared machine is noisy, and reduced precision changes the numbers. Ties go to the earlier.
    """
    default = next(iter(seconds))
    full = {n: s for n, s in seconds.items() if n == "off" or n.startswith("fp32")}
    reduced = {n: s for n, s in seconds.items() if n not in full}
    best = min(full, key=full.__getitem__)
    if full[best] > (1 - switch) * full[default]:
        best = default
    if reduced:
        fastest = min(reduced, key=reduced.__getitem__)
        if reduced[fastest] <= (1 - margin) * full[best]:
            return fastest
    return best


def calibrate(
    model: MnistCNN,
    batch: tuple[torch.Tensor, torch.Tensor],
    paths: list[str],
    steps: int = 2,
    rounds: int = 10,
    timer: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Seconds per training step of each path, on copies of `model` and one batch: the fastest
    of `rounds` timed windows of `steps` steps.

    The windows of the paths are interleaved (A, B, A, B, ...), and the fastest window counts:
    on a shared machine other work only ever adds time. The model and the random number
    generators are left as they were.
    """
    x, y = batch
    device = x.device
    fork = [device] if device.type == "cuda" else []
    times: dict[str, list[float]] = {name: [] for name in paths}
    with torch.random.fork_rng(devices=fork):
        runners = {name: _step_runner(copy.deepcopy(model), name, x, y) for name in paths}
        for run in runners.values():
            run(2)  # warm-up: first calls pick kernels and allocate
        for _ in range(rounds):
            for name, run in runners.items():
                sync(device)
                start = timer()
                run(steps)
                sync(device)
                times[name].append((timer() - start) / steps)
    return {name: min(t) for name, t in times.items()}


def _step_runner(
    model: MnistCNN, name: str, x: torch.Tensor, y: torch.Tensor
) -> Callable[[int], None]:
    model.train()
    forward = TrainingForward(model, parse_path(name, x.device), x)
    # A small learning rate: the timed steps should not drive the copy anywhere strange.
    optimizer = torch.optim.SGD(
        model.parameters(), lr=1e-3, momentum=0.9, nesterov=True, fused=forward.fused_optimizer
    )

    def run(n: int) -> None:
        for _ in range(n):
            loss = F.cross_entropy(forward(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return run


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall time measures it (a no-op on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_name() -> str:
    """The CPU model name (Linux), else the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device | str) -> str:
    """The device timings are taken on: the GPU's name, or
    'CPU (<model>, <n> cores, <k> threads)' with the threads torch computes on."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def machine_key(device: torch.device, variant: str, batch_size: int) -> str:
    """What a calibration depends on: the device (CPU model and threads, or GPU), torch, the
    variant and the batch size."""
    return f"{device_name(device)} | torch {torch.__version__} | {variant} | batch {batch_size}"


def cache_file() -> Path:
    """Where calibrations are kept: $MNISTLAB_CACHE/speed.json, else ~/.cache/mnistlab/."""
    folder = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mnistlab"
    return Path(folder) / "speed.json"


def _read_cache(path: Path) -> dict[str, dict]:
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def _write_cache(path: Path, cache: dict[str, dict]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(cache, f, indent=2, sort_keys=True)
        os.replace(tmp, path)
    except OSError as error:  # a read-only home: calibrate again next time, say so once
        warnings.warn(f"could not keep the speed calibration in {path}: {error}", stacklevel=3)


def resolve(
    speed: str,
    model: MnistCNN,
    batch: tuple[torch.Tensor, torch.Tensor],
    calibrate_now: bool = True,
    measure: Callable[[list[str]], dict[str, float]] | None = None,
) -> str:
    """The path name that `speed` means for training `model` on batches like `batch`.

    An explicit name is checked and returned. "auto" returns the path cached for this machine
    (machine_key); without one it times the candidates (`measure`, default `calibrate`), keeps
    the fastest (`choose`) and caches it, or, when `calibrate_now` is False (quick runs and
    tests, which must not pay for it) or on a GPU, takes `default_path` without caching anything.
    """
    device = batch[0].device
    if speed != "auto":
        return parse_path(speed, device).name
    key = machine_key(device, model.variant, len(batch[0]))
    path = cache_file()
    cache = _read_cache(path)
    cached = cache.get(key, {}).get("path")
    if cached is not None:
        try:
            return parse_path(cached, device).name
        except ValueError:
            pass  # written by another version: calibrate again
    # A GPU takes the default, measured fastest on one (report/bench_cuda.json), because timing
    # the candidates there would capture CUDA graphs for each, a path no GPU run has tested.
    if not calibrate_now or device.type != "cpu":
        return default_path(device, model.variant)
    paths = candidates(device, model.variant)
    seconds = (measure or partial(calibrate, model, batch))(paths)
    chosen = choose(seconds)
    cache[key] = {"path": chosen, "seconds_per_step": seconds, "margin": REDUCED_PRECISION_MARGIN}
    _write_cache(path, cache)
    return chosen


def cached_calibration(device: torch.device, variant: str, batch_size: int) -> dict | None:
    """The calibration "auto" chose from on this machine (path and seconds per step of each
    candidate), or None where none is cached (explicit paths, quick runs, GPUs)."""
    entry = _read_cache(cache_file()).get(machine_key(device, variant, batch_size))
    if not isinstance(entry, dict) or "seconds_per_step" not in entry:
        return None
    return {"path": entry.get("path"), "seconds_per_step": entry["seconds_per_step"]}


def training_forward(
    model: MnistCNN,
    speed: str,
    batch: tuple[torch.Tensor, torch.Tensor],
    calibrate_now: bool = True,
) -> TrainingForward:
    """The forward a training step of `model` calls for the `speed` knob (see `resolve`)."""
    name = resolve(speed, model, batch, calibrate_now)
    return TrainingForward(model, parse_path(name, batch[0].device), batch[0])
