"""resnet_jax.training.reporting: the epoch line, metrics.jsonl, the training curve, the confusion PNG."""

from __future__ import annotations

import json

from resnet_jax.training.reporting import epoch_line, write_confusion_matrix, write_metrics

RECORD = {"epoch": 1, "train_loss": 0.4123, "train_accuracy": 0.8, "val_loss": 0.351,
          "val_accuracy": 0.8741, "images_per_second": 45.62, "seconds": 12.34}  # fmt: skip


def test_epoch_line_has_the_original_form():
    assert epoch_line(RECORD) == (
        "[epoch 1] train_loss: 0.412 val_accuracy: 0.874 val_loss: 0.351 (12.3 s, 45.6 images/s)"
    )


def test_epoch_line_without_validation():
    record = {**RECORD, "val_loss": None, "val_accuracy": None}
    assert epoch_line(record) == "[epoch 1] train_loss: 0.412 (12.3 s, 45.6 images/s)"


def test_epoch_line_with_the_ema():
    record = {**RECORD, "ema_val_loss": 0.3333, "ema_val_accuracy": 0.9}
    assert epoch_line(record) == (
        "[epoch 1] train_loss: 0.412 val_accuracy: 0.874 val_loss: 0.351 ema_val_accuracy: 0.900 "
        "ema_val_loss: 0.333 (12.3 s, 45.6 images/s)"
    )


def test_write_metrics_rewrites_the_whole_history(tmp_path):
    write_metrics(tmp_path, [RECORD, {**RECORD, "epoch": 2}, {**RECORD, "epoch": 3}])
    # A resumed run rewrites the file from its checkpoint's history, dropping lost epochs.
    write_metrics(tmp_path, [RECORD, {**RECORD, "epoch": 2, "train_loss": 0.3}])
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        RECORD,
        {**RECORD, "epoch": 2, "train_loss": 0.3},
    ]
    assert (tmp_path / "training_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "training_curve.png"]


def test_epoch_line_with_the_accuracy_of_each_class():
    record = {**RECORD, "val_class_accuracy": {"daisy": 0.8125, "roses": None, "tulips": 0.5}}
    assert epoch_line(record).endswith("images/s); per class: daisy 0.81, tulips 0.50")


def test_epoch_line_of_many_classes_shows_the_lowest():
    accuracy = {f"class{i}": i / 20 for i in range(20)}
    assert epoch_line({**RECORD, "val_class_accuracy": accuracy}).endswith(
        "; lowest: class0 0.00, class1 0.05, class2 0.10, class3 0.15, class4 0.20"
    )


def test_write_confusion_matrix_writes_the_png_it_is_given(tmp_path):
    write_confusion_matrix(tmp_path, None)  # no matplotlib: nothing to write
    assert not list(tmp_path.iterdir())
    write_confusion_matrix(tmp_path, b"\x89PNG...")
    assert (tmp_path / "confusion_matrix.png").read_bytes() == b"\x89PNG..."
