"""What `inference.evaluate` measured, and how `evaluate.py` shows it: one line, a JSON document,
per-class CSV rows, the confusion matrix as a PNG."""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from resnet_jax.inference.output import check_output_path
from resnet_jax.models.registry import EvalTransform
from resnet_jax.runtime.errors import UserError
from resnet_jax.runtime.files import atomic_write
from resnet_jax.training.confusion import class_accuracy, confusion_png

__all__ = ["CSV_COLUMNS", "OTHER", "EvalResult", "write_confusion_png", "write_result"]

OTHER = "(other)"  # the matrix's row and column for the model's classes without data
CSV_COLUMNS = ("class", "folder", "index", "images", "correct", "accuracy")


@dataclass(frozen=True)
class EvalResult:
    """Scores of one weights file on one labelled image set, over the images that could be read."""

    weights: str
    data: str  # the folder, or `tfds NAME SPLIT`
    arch: str
    classes: tuple[str, ...]  # the model's class names, by output index
    folders: tuple[str, ...]  # the data set's classes (folders or tfds labels), sorted
    labels: tuple[int, ...]  # the model's output index of each of `folders`
    confusion: np.ndarray  # (model classes, model classes): counts[true, predicted]
    loss: float  # mean cross-entropy
    top1: float
    top5: float  # with fewer than 5 classes: top-(number of classes), i.e. 1
    images: int
    skipped: int  # unreadable images, left out of every number
    transform: EvalTransform
    tta: str  # a key of `evaluate.TTA`

    def matrix(self) -> tuple[np.ndarray, list[str]]:
        """The confusion matrix over the data set's classes (in their order) and their model
        names; predictions of the model's other classes sum into a last OTHER column (and an
        empty OTHER row keeps it square), when there are any."""
        labels = list(self.labels)
        rows = self.confusion[labels]
        inside = rows[:, labels]
        outside = rows.sum(axis=1) - inside.sum(axis=1)
        names = [self.classes[i] for i in labels]
        if not outside.any():
            return inside, names
        square = np.zeros((len(labels) + 1,) * 2, dtype=inside.dtype)
        square[:-1, :-1], square[:-1, -1] = inside, outside
        return square, [*names, OTHER]

    def class_rows(self) -> list[dict[str, Any]]:
        """One row per data set class: its model class and index, images, correct, accuracy
        (None when none of its images could be read)."""
        matrix, _ = self.matrix()
        # Keyed by folder: folder names are unique, model names need not be.
        accuracy = class_accuracy(matrix, [*self.folders, OTHER][: len(matrix)])
        return [
            {
                "class": self.classes[label],
                "folder": folder,
                "index": label,
                "images": int(matrix[row].sum()),
                "correct": int(matrix[row, row]),
                "accuracy": accuracy[folder],
            }
            for row, (folder, label) in enumerate(zip(self.folders, self.labels))
        ]

    def summary(self) -> str:
        """`resnet18 on flowers/val: top1 87.363% top5 99.451% loss 0.3512 (364 images, ...)`."""
        notes = [f"{self.images} images", f"{len(self.folders)} classes"]
        if len(self.folders) < len(self.classes):
            notes[-1] += f" of the model's {len(self.classes)}"
        if self.tta != "none":
            notes.append(f"tta {self.tta}")
        if self.skipped:
            notes.append(f"{self.skipped} unreadable skipped")
        return (
            f"{self.arch} on {self.data}: top1 {self.top1:.3%} top5 {self.top5:.3%} "
            f"loss {self.loss:.4f} ({', '.join(notes)})"
        )

    def to_dict(self) -> dict[str, Any]:
        """The --json document: the scores, the transform, per-class rows, the matrix."""
        matrix, names = self.matrix()
        t = self.transform
        return {
            "weights": self.weights, "data": self.data, "arch": self.arch,
            "top1": self.top1, "top5": self.top5, "loss": self.loss,
            "images": self.images, "skipped": self.skipped, "tta": self.tta,
            "transform": {"resize_size": t.resize_size, "crop_size": t.crop_size,
                          "mean": list(t.mean), "std": list(t.std)},
            "model_classes": len(self.classes),
            "classes": self.class_rows(),
            "confusion": {"classes": names, "matrix": matrix.tolist()},
        }  # fmt: skip


def write_result(path: str | os.PathLike, result: EvalResult) -> None:
    """--output: `.json` the --json document, `.csv` one row per class (CSV_COLUMNS); atomic."""
    if check_output_path(path) == "json":
        text = json.dumps(result.to_dict()) + "\n"
    else:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(result.class_rows())
        text = buffer.getvalue()
    with atomic_write(path, "w") as f:
        f.write(text)


def write_confusion_png(path: str | os.PathLike, result: EvalResult) -> None:
    """--confusion-png: the matrix of `EvalResult.matrix` drawn by `confusion.confusion_png`."""
    matrix, names = result.matrix()
    data = result.data
    if not data.startswith("tfds "):
        data = "/".join(Path(data).parts[-2:])  # the end of the path: a title has little room
    png = confusion_png(matrix, names, f"{result.arch} on {data}")
    if png is None:
        raise UserError("--confusion-png needs matplotlib; install it: pip install matplotlib.")
    with atomic_write(path, "wb") as f:
        f.write(png)
