"""resnet_jax.training.tensorboard: the points written, read back with TensorBoard's own reader; resume."""

from __future__ import annotations

import pytest

from resnet_jax.training.confusion import confusion_png
from resnet_jax.training.tensorboard import TensorBoard
from tests.helpers import tensorboard_series

STEPS = 4  # per epoch


def run_epochs(tb: TensorBoard, epochs: range, offset: float = 0.0) -> None:
    """Epochs of STEPS steps whose step k has loss k + offset; an image after each epoch."""
    png = confusion_png([[1, 0], [1, 2]], ["a", "b"], "test")
    for epoch in epochs:
        first = (epoch - 1) * STEPS
        tb.start_epoch(first)
        for done in range(STEPS + 1):  # as trainer._train_epoch calls it
            losses = [first + k + 1 + offset for k in range(done)]
            tb.train_totals(done, {"loss": sum(losses), "count": float(done)})
        record = {"epoch": epoch, "train_loss": epoch + offset, "val_accuracy": None,
                  "val_class_accuracy": {"a": 0.5, "b": None}}  # fmt: skip
        tb.epoch(epoch * STEPS, record, png)


def test_points_of_the_steps_and_epochs(tmp_path):
    tb = TensorBoard(tmp_path, every=2, learning_rate=lambda count: 0.1 * count)
    run_epochs(tb, range(1, 3))
    tb.close()
    series = tensorboard_series(tmp_path)
    # The mean loss since the previous point (losses 1, 2 -> 1.5), the rate of that step.
    assert series["step/train_loss"] == [(2, 1.5), (4, 3.5), (6, 5.5), (8, 7.5)]
    assert series["step/learning_rate"] == [(s, pytest.approx(0.1 * (s - 1))) for s in (2, 4, 6, 8)]
    assert series["epoch/train_loss"] == [(4, 1.0), (8, 2.0)]
    assert series["epoch/val_class_accuracy/a"] == [(4, 0.5), (8, 0.5)]
    assert "epoch/val_accuracy" not in series and "epoch/epoch" not in series
    assert [step for step, _ in series["epoch/val_confusion_matrix"]] == [4, 8]


def test_resume_replaces_the_points_after_the_checkpoint(tmp_path):
    # A run killed in epoch 3, after its checkpoint of epoch 2 and points up to step 10 ...
    stopped = TensorBoard(tmp_path, every=2, learning_rate=lambda count: 0.1)
    run_epochs(stopped, range(1, 3), offset=100.0)
    stopped.start_epoch(8)
    stopped.train_totals(2, {"loss": 209.0 + 210.0, "count": 2.0})
    # ... is resumed after step 8 (the restart marker is in a file of its own).
    resumed = TensorBoard(tmp_path, every=2, learning_rate=lambda count: 0.1)
    run_epochs(resumed, range(3, 4))
    resumed.close()
    stopped.close()
    assert len(list(tmp_path.iterdir())) == 2
    series = tensorboard_series(tmp_path)
    assert series["step/train_loss"] == [(2, 101.5), (4, 103.5), (6, 105.5), (8, 107.5),
                                         (10, 9.5), (12, 11.5)]  # fmt: skip
    assert series["epoch/train_loss"] == [(4, 101.0), (8, 102.0), (12, 3.0)]
    assert [step for step, _ in series["epoch/val_confusion_matrix"]] == [4, 8, 12]


def test_a_run_started_again_without_a_checkpoint_replaces_every_point(tmp_path):
    stopped = TensorBoard(tmp_path, every=2, learning_rate=lambda count: 0.1)
    run_epochs(stopped, range(1, 2), offset=100.0)
    stopped.close()
    again = TensorBoard(tmp_path, every=2, learning_rate=lambda count: 0.1)
    run_epochs(again, range(1, 2))
    again.close()
    assert len(list(tmp_path.iterdir())) == 2
    series = tensorboard_series(tmp_path)
    assert series["step/train_loss"] == [(2, 1.5), (4, 3.5)]
    assert series["epoch/train_loss"] == [(4, 1.0)]


def test_a_writer_without_a_folder_writes_nothing(tmp_path):
    tb = TensorBoard(None, every=1, learning_rate=lambda count: 0.1)
    run_epochs(tb, range(1, 2))
    tb.close()
    assert not list(tmp_path.iterdir())
