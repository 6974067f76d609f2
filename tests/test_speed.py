"""The speed path: every fast path computes model(x), and "auto" picks and caches the fastest."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mnistlab import speed
from mnistlab.data import validation_split
from mnistlab.model import VARIANTS, MnistCNN
from mnistlab.speed import (
    TrainingForward,
    _swap_relu_pool,
    calibrate,
    choose,
    conv_patches,
    cuda_graph_forward,
    default_path,
    parse_path,
    pool_first_forward,
    resolve,
    training_forward,
)
from mnistlab.train import TrainConfig, train

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_pool_first_forward_equals_forward_in_logits_and_gradients(variant, channels_last):
    torch.manual_seed(0)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = MnistCNN(variant).to(memory_format=memory_format).train()
    twin = copy.deepcopy(model)
    x = torch.rand(16, 1, 28, 28)
    x[:4] = 0.0  # blank images: every pooling window holds tied conv outputs (the bias)
    x = x.contiguous(memory_format=memory_format)
    y = torch.arange(16) % 10
    logits, fast = model(x), pool_first_forward(twin, x, fold_bn1=False)
    assert torch.equal(logits, fast)  # exactly, not approximately: max and ReLU commute
    F.cross_entropy(logits, y).backward()
    F.cross_entropy(fast, y).backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name
    if variant == "bn":  # batch statistics were updated identically
        assert torch.equal(model.layers.bn1.running_var, twin.layers.bn1.running_var)


def test_pool_first_order_reuses_the_layers_and_registers_nothing_new():
    model = MnistCNN("bn")
    order = _swap_relu_pool(list(model.layers))
    assert sorted(map(id, order)) == sorted(map(id, model.layers))  # the same modules, moved
    kinds = [type(m).__name__ for m in order]
    assert kinds[:5] == ["Conv2d", "BatchNorm2d", "MaxPool2d", "ReLU", "Conv2d"]
    assert all(key.startswith("layers.") for key in model.state_dict())
    assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == 3


def test_folded_bn1_matches_the_batch_norm_modules_in_training():
    torch.manual_seed(0)
    model = MnistCNN("bn").train()
    twin = copy.deepcopy(model)
    x = torch.rand(32, 1, 28, 28)
    x[:4] = 0.0
    y = torch.arange(32) % 10
    reference, folded = pool_first_forward(model, x, fold_bn1=False), pool_first_forward(twin, x)
    torch.testing.assert_close(folded, reference, rtol=1e-4, atol=1e-4)
    F.cross_entropy(reference, y).backward()
    F.cross_entropy(folded, y).backward()
    params = dict(model.named_parameters())
    for (name, p), q in zip(params.items(), twin.parameters(), strict=True):
        # Biases in front of a BN have no effect, so their true gradient is 0: compare on the
        # scale of the layer's weight gradient, not of the (rounding-sized) bias gradient.
        scale = params[name.rsplit(".", 1)[0] + ".weight"].grad.abs().max().item()
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=1e-4 * scale, msg=name)
    for (name, a), b in zip(model.named_buffers(), twin.buffers(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    ("channels", "kernel", "stride", "padding", "dilation"),
    [(1, 3, 1, 1, 1), (3, 3, 2, 1, 1), (2, (3, 2), (1, 2), (0, 1), 1), (2, 3, 1, 2, 2)],
)
def test_conv_patches_equal_unfold(channels, kernel, stride, padding, dilation):
    conv = nn.Conv2d(channels, 4, kernel, stride=stride, padding=padding, dilation=dilation)
    z = torch.randn(5, channels, 11, 9)
    expected = F.unfold(z, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    assert torch.equal(conv_patches(conv, z), expected.transpose(0, 1).flatten(1))


def test_eval_mode_folds_the_conv_bns_into_the_same_function():
    torch.manual_seed(0)
    model = MnistCNN("bn")
    for _ in range(3):  # running statistics and affine parameters away from their defaults
        model.train()(torch.rand(64, 1, 28, 28))
    with torch.no_grad():
        for bn in (model.layers.bn1, model.layers.bn2):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    model.eval()
    x = torch.rand(64, 1, 28, 28)
    state = copy.deepcopy(model.state_dict())
    reference, folded = model(x), pool_first_forward(model, x)
    torch.testing.assert_close(folded, reference, rtol=1e-5, atol=1e-5)
    assert torch.equal(folded.argmax(1), reference.argmax(1))
    for key, value in model.state_dict().items():  # folding changed no weight or statistic
        assert torch.equal(value, state[key]), key


def test_path_names():
    assert parse_path("off") == speed.SpeedPath("off", False, None, False, False)
    assert parse_path("fp32").dtype is None and parse_path("fp32").fast
    assert parse_path("bf16").dtype is torch.bfloat16
    assert parse_path("fp32+graphs+fold", CUDA).name == "fp32+fold+graphs"  # one spelling
    for bad in ("fp16", "fp32+fold+fold", "fast", "auto", "bf16+graphs"):
        with pytest.raises(ValueError, match="speed"):
            parse_path(bad, CUDA)
    with pytest.raises(ValueError, match="CUDA graphs"):
        parse_path("fp32+graphs", CPU)


def test_default_paths_are_fp32_with_the_fold_on_a_cpu_and_graphs_on_a_gpu():
    # what "auto" runs without a calibration: the paths measured fastest where this was written
    assert parse_path(default_path(CPU, "plain")).dtype is None
    assert parse_path(default_path(CUDA, "plain"), CUDA).dtype is None
    assert parse_path(default_path(CPU, "bn")).fold_bn1
    assert not parse_path(default_path(CUDA, "bn"), CUDA).fold_bn1
    assert parse_path(default_path(CUDA, "bn"), CUDA).cuda_graphs
    assert parse_path("fp32+fold", CUDA).fold_bn1 and not parse_path("fp32", CPU).fold_bn1


def test_choose_takes_the_fastest_and_bf16_only_with_a_clear_margin():
    assert choose({"fp32": 1.0, "off": 1.2}) == "fp32"
    assert choose({"fp32": 1.0, "off": 0.9}) == "off"
    assert choose({"fp32": 1.0, "off": 0.97}) == "fp32"  # the default, unless clearly beaten
    assert choose({"fp32": 1.0, "fp32+fold": 1.0}) == "fp32"  # a tie goes to the first
    assert choose({"fp32": 1.0, "off": 1.3, "bf16": 0.95}) == "fp32"  # 5% faster: not enough
    assert choose({"fp32": 1.0, "off": 1.3, "bf16": 0.9}) == "bf16"  # 10% faster
    assert choose({"fp32+fold": 1.0, "bf16": 0.85, "bf16+fold": 0.8}) == "bf16+fold"
    assert choose({"fp32": 1.0, "bf16": 0.95}, margin=0.0) == "bf16"


def fake_measure(seconds, calls):
    def measure(paths):
        calls.append(list(paths))
        return {p: seconds.get(p, 1.0) for p in paths}

    return measure


def test_auto_calibrates_once_per_machine_and_reads_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(speed.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(
        speed, "candidates", lambda device, variant: ["fp32+fold", "fp32", "off", "bf16"]
    )
    model, batch = MnistCNN("bn"), (torch.rand(8, 1, 28, 28), torch.arange(8))
    calls = []
    fast = fake_measure({"fp32+fold": 2.0, "fp32": 1.5, "off": 3.0, "bf16": 1.0}, calls)
    assert resolve("auto", model, batch, measure=fast) == "bf16"  # 1.0 <= 0.9 * 1.5
    assert calls == [["fp32+fold", "fp32", "off", "bf16"]]
    cache = json.loads((tmp_path / "speed.json").read_text())
    (entry,) = cache.values()
    assert entry["path"] == "bf16" and entry["seconds_per_step"]["fp32"] == 1.5
    # The cache answers from now on: other timings are never taken.
    slow = fake_measure({"bf16": 9.0}, calls)
    assert resolve("auto", model, batch, measure=slow) == "bf16"
    assert len(calls) == 1
    # Another batch size (or variant, thread count, torch, device) is another calibration.
    assert resolve("auto", model, (batch[0][:4], batch[1][:4]), measure=slow) == "fp32+fold"
    assert len(calls) == 2
    # What a run records of the choice: the cached path and timings of its key, nothing else.
    recorded = speed.cached_calibration(torch.device("cpu"), "bn", 8)
    assert recorded == {"path": "bf16", "seconds_per_step": entry["seconds_per_step"]}
    assert speed.cached_calibration(torch.device("cpu"), "plain", 8) is None


def test_explicit_paths_and_quick_runs_never_calibrate(tmp_path, monkeypatch):
    monkeypatch.setenv(speed.CACHE_ENV, str(tmp_path))
    model, batch = MnistCNN("bn"), (torch.rand(8, 1, 28, 28), torch.arange(8))

    def refuse(paths):
        raise AssertionError("calibrated")

    assert resolve("fp32+fold", model, batch, measure=refuse) == "fp32+fold"
    assert resolve("auto", model, batch, calibrate_now=False, measure=refuse) == "fp32+fold"
    assert not (tmp_path / "speed.json").exists()  # a default is not a measurement


def test_calibration_times_every_path_and_changes_nothing(tmp_path):
    torch.manual_seed(0)
    model = MnistCNN("bn").train()
    state = copy.deepcopy(model.state_dict())
    x, y = torch.rand(8, 1, 28, 28), torch.arange(8)
    rng = torch.get_rng_state()
    ticks = iter(range(1000))
    seconds = calibrate(
        model, (x, y), ["fp32+fold", "off"], steps=1, rounds=3, timer=lambda: next(ticks)
    )
    assert seconds == {"fp32+fold": 1.0, "off": 1.0}  # each timed window spans one tick
    assert torch.equal(torch.get_rng_state(), rng)  # the run's random numbers are untouched
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert model.layers.conv1.weight.is_contiguous()  # the copies got the layouts, not the model


def test_a_run_records_the_path_it_took(mnist):
    split = validation_split(mnist)
    config = TrainConfig(epochs=1, limit_train_batches=3, evals_per_epoch=1)
    assert train(config, split, "cpu", progress=False).speed == "fp32"  # auto, quick: the default
    off = train(replace(config, speed="off"), split, "cpu", progress=False)
    assert off.speed == "off" and off.autocast_dtype == "float32"
    assert off.model.layers.conv1.weight.is_contiguous()
    bf16 = train(replace(config, variant="bn", speed="bf16+fold"), split, "cpu", progress=False)
    assert bf16.speed == "bf16+fold" and bf16.autocast_dtype == "torch.bfloat16"


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_off_path_is_plain_model_forward(variant):
    torch.manual_seed(0)
    model = MnistCNN(variant).train()
    twin = copy.deepcopy(model)
    x = torch.rand(8, 1, 28, 28)
    forward = training_forward(model, "off", (x, torch.arange(8)))
    assert torch.equal(forward(x), twin(x))
    assert not forward.fused_optimizer


def test_training_forward_on_a_cpu_is_the_eager_pool_first_forward():
    torch.manual_seed(0)
    model = MnistCNN("bn").train()
    twin = copy.deepcopy(model)
    x = torch.rand(8, 1, 28, 28)
    forward = training_forward(model, "fp32+fold", (x, torch.arange(8)))
    layout = torch.channels_last  # the path's layout: the same weights, another memory order
    twin, x_last = twin.to(memory_format=layout), x.contiguous(memory_format=layout)
    assert torch.equal(forward(x), pool_first_forward(twin, x_last))
    assert forward.fused_optimizer


def test_failed_graph_capture_falls_back_to_eager_and_restores_the_model(monkeypatch):
    # A capture that raises (as one did in a fresh notebook kernel on an H200) must not stop
    # training: a warning, the BN statistics the warm-up passes touched put back, None returned.
    def failing_capture(module, sample_args):
        module(*sample_args)  # a warm-up pass in training mode moves the BN running statistics
        raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

    monkeypatch.setattr(speed, "_warm_capture_stream", lambda module, sample: None)
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", failing_capture)
    model = MnistCNN("bn").train()
    before = copy.deepcopy(model.state_dict())
    with pytest.warns(UserWarning, match="capture failed, training eagerly"):
        assert cuda_graph_forward(model, False, torch.rand(4, 1, 28, 28)) is None
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_training_forward_without_graphs_is_the_eager_forward(monkeypatch):
    monkeypatch.setattr(speed, "cuda_graph_forward", lambda *args: None)
    model = MnistCNN("plain").train()
    x = torch.rand(4, 1, 28, 28)
    forward = TrainingForward(model, speed.SpeedPath("fp32+graphs", True, None, False, True), x)
    assert torch.equal(forward(x), pool_first_forward(model, x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("variant", ["plain", "bn"])
def test_cuda_graph_step_equals_the_eager_step(variant):
    torch.manual_seed(0)
    model = MnistCNN(variant).to(CUDA).train()
    twin = copy.deepcopy(model)
    x, y = torch.rand(32, 1, 28, 28, device=CUDA), torch.arange(32, device=CUDA) % 10
    eager = training_forward(model, "fp32", (x, y))
    graphed = training_forward(twin, "fp32+graphs", (x, y))
    # The capture's warm-up passes left the weights and the BN statistics as they were.
    for a, b in zip(model.state_dict().values(), twin.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    F.cross_entropy(eager(x), y).backward()
    F.cross_entropy(graphed(x), y).backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
