"""What a training run shows and records: progress bars, epoch lines, metrics.jsonl, curves,
the confusion matrix PNG.

Only process 0 prints or writes, so a multi-host run reports once.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from resnet_jax.runtime.files import atomic_write
from resnet_jax.runtime.plotting import matplotlib_figure
from resnet_jax.training.confusion import confusion_png

__all__ = [
    "draw_confusion", "epoch_line", "print_once", "progress_bar", "write_confusion_matrix",
    "write_curves", "write_metrics",
]  # fmt: skip


def print_once(message: str) -> None:
    """Print a line on stdout (process 0 only) without breaking the progress bars."""
    if jax.process_index() == 0:
        tqdm.write(message, file=sys.stdout)


def progress_bar(steps: int, desc: str) -> tqdm:
    """A tqdm bar on stderr for process 0, silent elsewhere."""
    return tqdm(
        total=steps, desc=desc, leave=False, disable=jax.process_index() != 0, file=sys.stderr
    )


def epoch_line(record: dict[str, Any]) -> str:
    """`[epoch 1] train_loss: 0.412 val_accuracy: 0.874 val_loss: 0.351 (12.3 s, 45.6 images/s)`,
    with the EMA's `ema_val_accuracy` and `ema_val_loss` after the validation when the run keeps
    one, then the per-class validation accuracy when the record has it."""
    line = f"[epoch {record['epoch']}] train_loss: {record['train_loss']:.3f}"
    for prefix in ("", "ema_"):
        if record.get(f"{prefix}val_accuracy") is not None:
            accuracy, loss = record[f"{prefix}val_accuracy"], record[f"{prefix}val_loss"]
            line += f" {prefix}val_accuracy: {accuracy:.3f} {prefix}val_loss: {loss:.3f}"
    speed = record["images_per_second"]
    line += f" ({record['seconds']:.1f} s" + (f", {speed:.1f} images/s)" if speed else ")")
    return line + _class_accuracy_part(record.get("val_class_accuracy"))


SHOWN_CLASSES = 10  # with more classes the epoch line shows the lowest accuracies only


def _class_accuracy_part(accuracy: dict[str, float | None] | None) -> str:
    """`; per class: daisy 0.81, roses 0.62`, or the SHOWN_CLASSES // 2 lowest of many."""
    if not accuracy:
        return ""
    known = [(name, a) for name, a in accuracy.items() if a is not None]
    label = "per class"
    if len(accuracy) > SHOWN_CLASSES:
        known, label = sorted(known, key=lambda item: item[1])[: SHOWN_CLASSES // 2], "lowest"
    return f"; {label}: " + ", ".join(f"{name} {a:.2f}" for name, a in known)


def write_metrics(output_dir: Path, history: list[dict[str, Any]]) -> None:
    """Rewrite metrics.jsonl (one JSON object per epoch) and training_curve.png atomically."""
    if jax.process_index() != 0:
        return
    with atomic_write(output_dir / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in history)
    write_curves(output_dir / "training_curve.png", history)


def write_curves(path: Path, history: list[dict[str, Any]]) -> None:
    """Loss and accuracy per epoch as a PNG; does nothing when matplotlib is not installed."""
    Figure = matplotlib_figure()
    if Figure is None:
        return
    from matplotlib.ticker import MaxNLocator

    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(9, 3.5), layout="tight")
    loss_ax, acc_ax = fig.subplots(1, 2)
    for split in ("train", "val", "ema_val"):
        if history[-1].get(f"{split}_loss") is not None:
            loss_ax.plot(epochs, [h[f"{split}_loss"] for h in history], "o-", label=split)
            acc_ax.plot(epochs, [h[f"{split}_accuracy"] for h in history], "o-", label=split)
    for ax, name in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(name)
        ax.legend()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png")


def draw_confusion(confusion: dict, classes: list[str], arch: str) -> bytes | None:
    """An epoch's confusion matrix (`{"epoch", "matrix"}`, and "weights": "ema" for the EMA's)
    as PNG bytes on process 0, the one that writes it; None elsewhere, or without matplotlib."""
    if jax.process_index() != 0:
        return None
    ema = " (EMA weights)" if confusion.get("weights") == "ema" else ""
    title = f"{arch}, epoch {confusion['epoch']}, validation{ema}"
    return confusion_png(np.asarray(confusion["matrix"]), classes, title)


def write_confusion_matrix(output_dir: Path, png: bytes | None) -> None:
    """Replace confusion_matrix.png (`confusion.confusion_png`; None: matplotlib is missing)."""
    if png is not None and jax.process_index() == 0:
        with atomic_write(output_dir / "confusion_matrix.png", "wb") as f:
            f.write(png)
