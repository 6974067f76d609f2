"""The training loop learns, the augmentation is an exact shift, evaluation leaves the model alone."""

from __future__ import annotations

import torch

from mnistlab.data import validation_split
from mnistlab.model import MnistCNN
from mnistlab.train import (
    TrainConfig,
    autocast_dtype,
    confusion_matrix,
    evaluate,
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


def test_confusion_matrix_hand_case():
    labels = torch.tensor([0, 0, 1, 2, 2, 2])
    predictions = torch.tensor([0, 1, 1, 2, 0, 2])
    m = confusion_matrix(labels, predictions, classes=3)
    assert m.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
