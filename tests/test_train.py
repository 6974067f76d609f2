"""The training loop learns, the augmentation is an exact shift, evaluation leaves the model alone."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from mnistlab import train as mnistlab_train
from mnistlab.data import validation_split
from mnistlab.model import MnistCNN
from mnistlab.train import (
    TrainConfig,
    autocast_dtype,
    confusion_matrix,
    cuda_graph_forward,
    evaluate,
    fold_bn1_enabled,
    make_optimizer,
    predict,
    random_affine,
    random_translate,
    train,
    training_forward,
)


def test_short_real_training_run_learns(mnist):
    split = validation_split(mnist)
    config = TrainConfig(epochs=1, limit_train_batches=60, evals_per_epoch=3, seed=0)
    result = train(config, split, "cpu", progress=False)
    history = result.history
    assert len(history) == 3
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    assert result.best_val_accuracy > 0.90  # chance is 0.10; 60 batches of 128 already give ~0.95
    assert not result.model.training  # returned ready for inference
    accuracy = evaluate(result.model, split.val_images, split.val_labels)["accuracy"]
    assert abs(accuracy - result.best_val_accuracy) < 0.01  # fp32 re-evaluation of the kept weights


def test_training_is_reproducible_for_a_seed(mnist):
    split = validation_split(mnist)
    config = TrainConfig(epochs=1, limit_train_batches=5, evals_per_epoch=1, mixed_precision="off")
    a = train(config, split, "cpu", progress=False).model.state_dict()
    b = train(config, split, "cpu", progress=False).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_random_translate_is_an_exact_integer_shift():
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(64, 1, 28, 28)
    shifted = random_translate(images, 2, gen)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for k in range(64):
        windows = [padded[k, :, r : r + 28, c : c + 28] for r in range(5) for c in range(5)]
        assert any(torch.equal(shifted[k], w) for w in windows)
    assert not torch.equal(shifted, images)  # 64 draws of 25 offsets: some image moved
    assert random_translate(images, 0, gen) is images


def test_random_translate_moves_a_single_pixel_by_its_offset():
    gen = torch.Generator().manual_seed(3)
    image = torch.zeros(200, 1, 28, 28)
    image[:, 0, 10, 12] = 1.0
    out = random_translate(image, 2, gen)
    rows, cols = (out[:, 0] == 1).nonzero()[:, 1], (out[:, 0] == 1).nonzero()[:, 2]
    assert len(rows) == 200  # the pixel never falls off: it is 10 px from the border
    assert set((rows - 10).tolist()) == {-2, -1, 0, 1, 2} and set((cols - 12).tolist()) == {
        -2,
        -1,
        0,
        1,
        2,
    }


def test_evaluate_and_predict_restore_training_mode():
    model = MnistCNN("bn").train()
    images, labels = torch.rand(10, 1, 28, 28), torch.arange(10)
    evaluate(model, images, labels)
    probabilities = predict(model, images)
    assert model.training
    assert torch.allclose(probabilities.sum(1), torch.ones(10))


def test_autocast_choice():
    assert autocast_dtype(torch.device("cpu"), "off") is None
    assert autocast_dtype(torch.device("cpu"), "bf16") is torch.bfloat16
    assert autocast_dtype(torch.device("cuda"), "fp16") is torch.float16
    # fp32 unless asked: measured faster for this net than autocast, on the CPU and on an H100
    assert autocast_dtype(torch.device("cuda"), "auto") is None
    assert autocast_dtype(torch.device("cpu"), "auto") is None


def test_bn1_fold_choice():
    # on a CPU only, where it was measured faster; on a GPU it adds kernel launches
    assert fold_bn1_enabled(torch.device("cpu"), "auto")
    assert not fold_bn1_enabled(torch.device("cuda"), "auto")
    assert fold_bn1_enabled(torch.device("cuda"), "on")
    assert not fold_bn1_enabled(torch.device("cpu"), "off")
    with pytest.raises(ValueError, match="fold_bn1"):
        fold_bn1_enabled(torch.device("cpu"), "yes")


def test_confusion_matrix_hand_case():
    labels = torch.tensor([0, 0, 1, 2, 2, 2])
    predictions = torch.tensor([0, 1, 1, 2, 0, 2])
    m = confusion_matrix(labels, predictions, classes=3)
    assert m.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


def test_random_affine_without_rotation_zoom_or_shift_is_the_identity():
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(8, 1, 28, 28)
    assert torch.allclose(random_affine(images, 0.0, 0.0, 0.0, gen), images, atol=1e-5)


def test_random_affine_warps_each_image_within_the_pixel_range():
    gen = torch.Generator().manual_seed(0)
    images = torch.zeros(32, 1, 28, 28)
    images[:, :, 10:18, 12:16] = 1.0  # a bar in the middle, away from the border
    warped = random_affine(images, 15.0, 0.1, 2.0, gen)
    assert warped.shape == images.shape
    assert warped.min() >= 0.0 and warped.max() <= 1.0
    changed = (warped - images).abs().flatten(1).amax(1) > 0.1
    assert changed.all()  # every image got its own non-trivial warp
    ink = warped.flatten(1).sum(1) / images.flatten(1).sum(1)
    assert ((ink > 0.7) & (ink < 1.3)).all()  # zoom <= 10%: the bar keeps about its area


def test_moving_average_with_no_memory_keeps_the_trained_weights(mnist):
    split = validation_split(mnist)
    base = TrainConfig(epochs=1, limit_train_batches=5, evals_per_epoch=1, mixed_precision="off")
    plain = train(base, split, "cpu", progress=False).model.state_dict()
    # decay ~0: the average is the current weights, so it must equal the run without averaging
    forgetful = train(replace(base, ema_decay=1e-12), split, "cpu", progress=False).model
    # decay 0.9: the kept weights are an average of the trajectory, not the last weights
    averaged = train(replace(base, ema_decay=0.9), split, "cpu", progress=False).model
    for key, value in plain.items():
        if value.is_floating_point():
            assert torch.allclose(forgetful.state_dict()[key], value, atol=1e-6), key
    assert not torch.allclose(
        averaged.state_dict()["layers.fc1.weight"], plain["layers.fc1.weight"]
    )


def test_fused_optimizer_takes_the_same_step_as_the_reference_sgd():
    torch.manual_seed(0)
    config = TrainConfig()
    a, b = MnistCNN(), MnistCNN()
    b.load_state_dict(a.state_dict())
    fused = make_optimizer(a, config, torch.device("cpu"))
    reference = torch.optim.SGD(
        b.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        nesterov=True,
        weight_decay=config.weight_decay,
        foreach=False,
    )
    for _ in range(3):
        x, y = torch.rand(8, 1, 28, 28), torch.arange(8)
        for model, optimizer in ((a, fused), (b, reference)):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6)


def test_training_forward_on_a_cpu_is_the_eager_pool_first_forward():
    torch.manual_seed(0)
    model = MnistCNN("bn").train()
    twin = copy.deepcopy(model)
    x = torch.rand(8, 1, 28, 28)
    forward = training_forward(model, TrainConfig(variant="bn"), torch.device("cpu"), x)
    assert torch.equal(forward(x), twin.forward_pool_first(x))  # cuda_graphs is ignored here


def test_failed_graph_capture_falls_back_to_eager_and_restores_the_model(monkeypatch):
    # A capture that raises (as one did in a fresh notebook kernel on an H200) must not stop
    # training: a warning, the BN statistics the warm-up passes touched put back, None returned.
    def failing_capture(module, sample_args):
        module(*sample_args)  # a warm-up pass in training mode moves the BN running statistics
        raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

    monkeypatch.setattr(mnistlab_train, "_warm_capture_stream", lambda module, sample: None)
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", failing_capture)
    model = MnistCNN("bn").train()
    before = copy.deepcopy(model.state_dict())
    with pytest.warns(UserWarning, match="capture failed, training eagerly"):
        assert cuda_graph_forward(model, False, torch.rand(4, 1, 28, 28)) is None
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_training_forward_without_graphs_is_the_eager_forward(monkeypatch):
    monkeypatch.setattr(mnistlab_train, "cuda_graph_forward", lambda *args: None)
    model = MnistCNN("plain").train()
    x = torch.rand(4, 1, 28, 28)
    forward = training_forward(model, TrainConfig(fold_bn1="off"), torch.device("cuda"), x)
    assert torch.equal(forward(x), model.forward_pool_first(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("variant", ["plain", "bn"])
def test_cuda_graph_step_equals_the_eager_step(variant):
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = MnistCNN(variant).to(device).train()
    twin = copy.deepcopy(model)
    x, y = torch.rand(32, 1, 28, 28, device=device), torch.arange(32, device=device) % 10
    eager = training_forward(model, TrainConfig(variant=variant, cuda_graphs=False), device, x)
    graphed = training_forward(twin, TrainConfig(variant=variant), device, x)
    # The capture's warm-up passes left the weights and the BN statistics as they were.
    for a, b in zip(model.state_dict().values(), twin.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    F.cross_entropy(eager(x), y).backward()
    F.cross_entropy(graphed(x), y).backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
