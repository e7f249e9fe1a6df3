"""TensorBoard event files of a training run, in OUTPUT_DIR/tensorboard/ (written by `events`).

Every point sits at an optimizer step: `step/train_loss` (the mean loss since the previous
point) and `step/learning_rate` every `every` steps, and at each epoch's last step every number
of its metrics.jsonl record as `epoch/<key>` plus the validation confusion matrix as an image.
Writes are synchronous and flushed to disk before the epoch's checkpoint is written, so a
checkpoint never holds points the event files lack. Each session opens a new event file that
starts with a restart marker: TensorBoard then drops the points a stopped run wrote after the
checkpoint it resumes from, and the resumed run writes them again at the same steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from resnet_jax.runtime.files import write_error
from resnet_jax.training.events import (
    EventFile,
    image_value,
    scalar_value,
    session_start,
    summary,
)
from resnet_jax.training.steps import Totals

__all__ = ["TensorBoard"]


class TensorBoard:
    """The event writer of one session of a run; every method does nothing when `directory`
    is None (TensorBoard turned off, or a process other than 0)."""

    def __init__(
        self, directory: Path | None, every: int, learning_rate: Callable[[int], Any]
    ) -> None:
        """`learning_rate(count)`: the schedule, the rate of step `count + 1`."""
        self.directory, self.every, self.learning_rate = directory, every, learning_rate
        self._writer: EventFile | None = None  # opened at the session's first point
        self._epoch_start, self._window = 0, (0.0, 0.0)

    def start_epoch(self, step: int) -> None:
        """The optimizer step an epoch starts after; the epoch's running totals start at zero."""
        self._epoch_start, self._window = step, (0.0, 0.0)

    def train_totals(self, done: int, totals: Totals) -> None:
        """After `done` steps of the epoch, with `totals` its sums so far: a point if one is due."""
        step = self._epoch_start + done
        if self.directory is None or step % self.every or done == 0:
            return
        loss, count = float(totals["loss"]), float(totals["count"])
        previous_loss, previous_count = self._window
        self._window = (loss, count)
        self._write(
            step,
            {
                "step/train_loss": (loss - previous_loss) / max(count - previous_count, 1.0),
                "step/learning_rate": float(self.learning_rate(step - 1)),
            },
        )

    def epoch(self, step: int, record: dict[str, Any], confusion: bytes | None = None) -> None:
        """The epoch's record (numbers only; per-class accuracies as `epoch/<key>/<class>`) and
        the confusion matrix PNG, all at `step`; then everything is on disk."""
        if self.directory is None:
            return
        scalars = {}
        for key, value in record.items():
            if isinstance(value, dict):
                scalars |= {f"epoch/{key}/{k}": v for k, v in value.items() if v is not None}
            elif isinstance(value, int | float) and key != "epoch":
                scalars[f"epoch/{key}"] = value
        self._write(step, scalars, {"epoch/val_confusion_matrix": confusion} if confusion else {})

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _write(
        self, step: int, scalars: dict[str, float], images: dict[str, bytes] | None = None
    ) -> None:
        values = [scalar_value(tag, float(v)) for tag, v in scalars.items()]
        values += [image_value(tag, png) for tag, png in (images or {}).items()]
        try:
            self._open().write(summary(values), step)  # flushed and fsynced
        except OSError as e:
            raise write_error(self.directory, e) from None

    def _open(self) -> EventFile:
        if self._writer is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            # The name has the second it was opened in; nanoseconds order two in the same second.
            self._writer = EventFile(self.directory, f".{time.time_ns()}")
            # TensorBoard drops the points of earlier files at or after a restart's step: what
            # a stopped run wrote after the checkpoint this session's first epoch starts from
            # (or anything, when it starts again from scratch).
            self._writer.write(session_start(), self._epoch_start + 1)
        return self._writer
