"""resnet_jax.training.confusion: per-class accuracy and the confusion matrix PNG."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from resnet_jax.training.confusion import class_accuracy, confusion_png

MATRIX = np.array([[3, 1, 0], [0, 0, 0], [2, 0, 2]])  # rows: true class; columns: predicted


def test_class_accuracy_is_the_diagonal_over_the_row_sums():
    assert class_accuracy(MATRIX, ["daisy", "roses", "tulips"]) == {
        "daisy": 0.75,
        "roses": None,  # no validation example of the class
        "tulips": 0.5,
    }


def test_confusion_png_is_an_image():
    png = confusion_png(MATRIX, ["daisy", "roses", "tulips"], "resnet18, epoch 1")
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and min(image.size) > 200


def test_many_classes_are_drawn_without_labels():
    n = 100
    matrix = np.diag(np.arange(1, n + 1))
    png = confusion_png(matrix, [f"class{i}" for i in range(n)], "resnet50, epoch 3")
    assert Image.open(io.BytesIO(png)).size[0] <= 1400
