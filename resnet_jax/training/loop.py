"""One epoch of a run: the training steps, then an evaluation (of the weights, and of their EMA
when the run keeps one), summed up in one record (the line of metrics.jsonl)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from resnet_jax.runtime.errors import UserError
from resnet_jax.training.batches import TrainValBatches
from resnet_jax.training.config import TrainConfig
from resnet_jax.training.confusion import class_accuracy
from resnet_jax.training.parallel import DataParallel
from resnet_jax.training.reporting import progress_bar
from resnet_jax.training.run_folder import best_weights
from resnet_jax.training.run_setup import Length
from resnet_jax.training.steps import (
    Batch,
    StepOptions,
    Totals,
    TrainState,
    ema_state,
    zero_totals,
)
from resnet_jax.training.tensorboard import TensorBoard

__all__ = ["EpochLoop", "evaluate", "mean_metrics", "train_epoch"]


class EpochLoop:
    """The compiled steps of a run, and what an epoch does with them."""

    def __init__(
        self,
        config: TrainConfig,
        data: TrainValBatches,
        dp: DataParallel,
        tb: TensorBoard,
        length: Length,
        options: StepOptions,
    ) -> None:
        self.config, self.data, self.dp, self.tb, self.length = config, data, dp, tb, length
        self.with_ema = options.ema is not None
        self.train_step = dp.jit_train_step(options)
        self.eval_step = dp.jit_eval_step()
        self.compiled = False  # the first step of a process compiles: it is timed apart

    def run(self, state: TrainState, epoch: int) -> tuple[TrainState, dict[str, Any], dict | None]:
        """Train and evaluate epoch `epoch`: the new state, the epoch's record, and the validation
        confusion matrix (`{"epoch", "matrix", "weights"}`) of the weights or their EMA,
        whichever validated better (None without validation)."""
        data, t0, steps = self.data, time.perf_counter(), self.length.steps_in(epoch)
        self.tb.start_epoch((epoch - 1) * data.steps)
        desc = f"epoch[{epoch}/{self.length.epochs}]"
        state, train, compile_s, train_s = train_epoch(
            self.train_step, state, data.train(epoch, steps), steps, self.dp, f"train {desc}",
            skip_first=not self.compiled, log=self.tb.train_totals,
        )  # fmt: skip
        self.compiled = True
        if not math.isfinite(train["loss"]):
            raise UserError(self._nan_message(train["loss"], epoch))
        evaluated = {}
        if data.val_steps:
            evaluated["raw"] = self._evaluate(state, epoch, f"val {desc}")
            if self.with_ema:
                evaluated["ema"] = self._evaluate(ema_state(state), epoch, f"val EMA {desc}")
        trained = (steps - (1 if compile_s else 0)) * self.config.batch_size
        val = evaluated.get("raw", {})
        record = {
            "epoch": epoch,
            "train_loss": train["loss"],
            "train_accuracy": train["accuracy"],
            "val_loss": val.get("loss"),
            "val_accuracy": val.get("accuracy"),
            "images_per_second": trained / train_s if train_s > 0 else None,
            "seconds": time.perf_counter() - t0,
        }
        if self.with_ema:
            ema = evaluated.get("ema", {})
            record |= {"ema_val_loss": ema.get("loss"), "ema_val_accuracy": ema.get("accuracy")}
        if compile_s:
            record["first_step_seconds"] = compile_s
        if not evaluated:
            return state, record, None
        record["val_class_accuracy"] = class_accuracy(val["confusion"], data.classes)
        kind = best_weights(record)
        matrix = evaluated[kind]["confusion"].tolist()
        return state, record, {"epoch": epoch, "matrix": matrix, "weights": kind}

    def _evaluate(self, state: TrainState, epoch: int, desc: str) -> dict[str, Any]:
        data = self.data
        return evaluate(
            self.eval_step, state, data.val(epoch), data.val_steps, data.num_classes, self.dp, desc
        )

    def _nan_message(self, loss: float, epoch: int) -> str:
        # A run with checkpoints has one for every epoch before this one.
        checkpointed = not self.config.synthetic and epoch > 1
        kept = (
            f"the checkpoint of epoch {epoch - 1} is kept"
            if checkpointed
            else "no checkpoint was written"
        )
        return (
            f"The training loss became {loss} in epoch {epoch}, so training stopped; {kept}. "
            "Lower --lr (or use --warmup-epochs) and try again."
        )


def mean_metrics(totals: Totals) -> dict[str, float]:
    """The mean loss and accuracy of an epoch's running sums (`steps.zero_totals`)."""
    count = max(float(totals["count"]), 1.0)
    return {"loss": float(totals["loss"]) / count, "accuracy": float(totals["correct"]) / count}


def train_epoch(
    step_fn: Callable,
    state: TrainState,
    batches: Iterator[Batch],
    steps: int,
    dp: DataParallel,
    desc: str,
    skip_first: bool,
    log: Callable[[int, Totals], None],
) -> tuple[TrainState, dict[str, float], float, float]:
    """Run one epoch; returns the state, mean metrics, first-step seconds (if timed) and time.
    `log(steps_done, totals)` sees the running totals after every step (it reads few of them).

    The host never waits for the step it just dispatched: the bar shows the loss of the step
    before (already finished or nearly), so an accelerator always has work queued. (On the CPU
    the command lines dispatch synchronously, so that steps reuse one step's memory:
    `runtime/memory.py`.)
    """
    totals = dp.replicate(zero_totals())
    compile_s, refreshed = 0.0, 0.0
    t0 = time.perf_counter()
    with progress_bar(steps, desc) as bar:
        for i, batch in enumerate(batches):
            state, new_totals = step_fn(state, batch, totals)
            if skip_first and i == 0 and steps > 1:
                # The first step of a process includes compilation: time it apart.
                jax.block_until_ready(new_totals)
                compile_s, t0 = time.perf_counter() - t0, time.perf_counter()
            elif i > 0 and time.perf_counter() - refreshed > 0.5:
                loss = mean_metrics(totals)["loss"]
                if not math.isfinite(loss):
                    return state, {"loss": loss, "accuracy": 0.0}, compile_s, 0.0
                bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
                refreshed = time.perf_counter()
            log(i, totals)
            totals = new_totals
            bar.update()
        log(steps, totals)
        metrics = mean_metrics(totals)
    return state, metrics, compile_s, time.perf_counter() - t0


def evaluate(
    step_fn: Callable,
    state: TrainState,
    batches: Iterator[Batch],
    steps: int,
    num_classes: int,
    dp: DataParallel,
    desc: str,
) -> dict[str, Any]:
    """Mean loss and accuracy over the real (mask True) rows, and the `confusion` matrix."""
    totals = dp.replicate(zero_totals(num_classes))
    with progress_bar(steps, desc) as bar:
        for i, batch in enumerate(batches):
            new_totals = step_fn(state, batch, totals)
            if i > 0 and bar.n % 10 == 0:
                bar.set_postfix(loss=f"{mean_metrics(totals)['loss']:.3f}", refresh=False)
            totals = new_totals
            bar.update()
    return {**mean_metrics(totals), "confusion": np.asarray(totals["confusion"])}
