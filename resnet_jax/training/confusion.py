"""The validation confusion matrix: per-class accuracy, and the matrix drawn as a PNG.

`steps.eval_step` counts the matrix on the device: `matrix[true, predicted]` examples.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

from resnet_jax.runtime.plotting import matplotlib_figure

__all__ = ["class_accuracy", "confusion_png"]

ANNOTATED_CLASSES = 30  # up to this many classes the cells show their counts
LABELLED_CLASSES = 60  # up to this many the axes name every class


def class_accuracy(matrix: np.ndarray, classes: Sequence[str]) -> dict[str, float | None]:
    """Each class's share of its validation examples predicted right (None: no examples)."""
    matrix = np.asarray(matrix)
    totals = matrix.sum(axis=1)
    return {
        name: float(matrix[i, i] / totals[i]) if totals[i] else None
        for i, name in enumerate(classes)
    }


def confusion_png(matrix: np.ndarray, classes: Sequence[str], title: str) -> bytes | None:
    """The matrix as PNG bytes, titled `title: accuracy 0.874`: colours are the share of each
    true class (rows sum to 1), cells show the counts, row labels the class's examples; None
    when matplotlib is not installed."""
    Figure = matplotlib_figure()
    if Figure is None:
        return None
    matrix = np.asarray(matrix)
    n = len(classes)
    totals = matrix.sum(axis=1, keepdims=True)
    shares = matrix / np.maximum(totals, 1)
    side = min(3.0 + 0.45 * n, 14.0)
    fig = Figure(figsize=(side + 1.2, side), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the true class")
    ax.set_title(f"{title}: accuracy {np.trace(matrix) / max(matrix.sum(), 1):.3f}")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if n <= LABELLED_CLASSES:
        ax.set_xticks(range(n), classes, rotation=45, ha="right", rotation_mode="anchor")
        ax.set_yticks(range(n), [f"{name} ({int(t)})" for name, t in zip(classes, totals[:, 0])])
    if n <= ANNOTATED_CLASSES:
        for (row, col), count in np.ndenumerate(matrix):
            colour = "white" if shares[row, col] > 0.5 else "black"
            ax.text(col, row, str(count), ha="center", va="center", color=colour, fontsize=9)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    return buffer.getvalue()
