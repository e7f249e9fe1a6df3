"""resnet_jax.reporting: the epoch line, metrics.jsonl and the training curve."""

from __future__ import annotations

import json

from resnet_jax.reporting import epoch_line, write_metrics

RECORD = {"epoch": 1, "train_loss": 0.4123, "train_accuracy": 0.8, "val_loss": 0.351,
          "val_accuracy": 0.8741, "images_per_second": 45.62, "seconds": 12.34}  # fmt: skip


def test_epoch_line_has_the_original_form():
    assert epoch_line(RECORD) == (
        "[epoch 1] train_loss: 0.412 val_accuracy: 0.874 val_loss: 0.351 (12.3 s, 45.6 images/s)"
    )


def test_epoch_line_without_validation():
    record = {**RECORD, "val_loss": None, "val_accuracy": None}
    assert epoch_line(record) == "[epoch 1] train_loss: 0.412 (12.3 s, 45.6 images/s)"


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
