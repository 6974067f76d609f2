"""The training loop learns, the augmentation is an exact shift, evaluation leaves the model alone."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from mnistlab import train as mnistlab_train
from mnistlab.checkpoint import load_checkpoint, save_checkpoint
from mnistlab.data import validation_split
from mnistlab.model import MnistCNN
from mnistlab.train import (
    TrainConfig,
    config_dict,
    confusion_matrix,
    evaluate,
    make_optimizer,
    predict,
    random_translate,
    train,
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
    config = TrainConfig(epochs=1, limit_train_batches=5, evals_per_epoch=1, speed="fp32")
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


def test_confusion_matrix_hand_case():
    labels = torch.tensor([0, 0, 1, 2, 2, 2])
    predictions = torch.tensor([0, 1, 1, 2, 0, 2])
    m = confusion_matrix(labels, predictions, classes=3)
    assert m.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


def test_moving_average_with_no_memory_keeps_the_trained_weights(mnist):
    split = validation_split(mnist)
    base = TrainConfig(epochs=1, limit_train_batches=5, evals_per_epoch=1, speed="fp32")
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
    fused, fused_schedule = make_optimizer(a, config, total_steps=3, fused=True)
    reference, schedule = make_optimizer(b, config, total_steps=3)  # torch's for-loop SGD on a CPU
    assert fused.param_groups[0]["fused"] and not reference.param_groups[0]["fused"]
    for _ in range(3):
        x, y = torch.rand(8, 1, 28, 28), torch.arange(8)
        for model, optimizer, scheduler in ((a, fused, fused_schedule), (b, reference, schedule)):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            scheduler.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6)


def test_the_optimizer_runs_the_momentum_and_learning_rate_the_checkpoint_records(
    mnist, tmp_path, monkeypatch
):
    # Read the real optimizer inside a real run, step by step, through the perturb hook.
    optimizers = []

    def spy(*args, **kwargs):
        optimizer, scheduler = make_optimizer(*args, **kwargs)
        optimizers.append(optimizer)
        return optimizer, scheduler

    seen = {}

    def record(model, x, y, step):
        group = optimizers[0].param_groups[0]
        seen[step] = (group["lr"], group["momentum"])
        return x

    monkeypatch.setattr(mnistlab_train, "make_optimizer", spy)
    config = TrainConfig(epochs=1, limit_train_batches=20, evals_per_epoch=1, warmup_fraction=0.25)
    config = replace(config, max_momentum=0.9, base_momentum=0.8)  # not torch's defaults
    result = train(config, validation_split(mnist), "cpu", progress=False, perturb=record)
    _, meta = load_checkpoint(
        save_checkpoint(tmp_path / "run.pt", result.model, config=config_dict(config))
    )
    recorded = TrainConfig(**meta["config"])  # rebuilt from the checkpoint
    assert recorded == config and "momentum" not in meta["config"]
    lr, top, bottom = recorded.lr, recorded.max_momentum, recorded.base_momentum
    # One-cycle: lr / 25 and the top momentum at the first step, the peak rate and the bottom
    # momentum at the end of the warm-up (step 4 of 20), lr / 25e4 and the top momentum last.
    assert seen[0] == pytest.approx((lr / 25, top))
    assert seen[4] == pytest.approx((lr, bottom))
    assert seen[19] == pytest.approx((lr / 25e4, top))
    momenta = [m for _, m in seen.values()]
    assert min(momenta) == pytest.approx(bottom) and max(momenta) == pytest.approx(top)
    assert len(seen) == 20
