"""The training run behind `train.py`: data, model, pretrained weights, the epoch loop, outputs.

OUTPUT_DIR (default `runs/<arch>`) receives `checkpoints/` (orbax; latest and best epoch),
`best.msgpack` (the variables with the best validation accuracy, with the metadata `predict.py`
needs to preprocess as validation did: `metadata.ModelMetadata`), `class_indices.json`,
`metrics.jsonl` (one line per epoch, with the per-class validation accuracy), `tensorboard/`
(event files: `resnet_jax.training.tensorboard`), and with matplotlib `training_curve.png` and
`confusion_matrix.png` (the best epoch's validation confusion matrix).
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from resnet_jax.data.loader import Loader, open_datasets
from resnet_jax.data.sources import write_class_indices
from resnet_jax.data.synthetic import synthetic_batches
from resnet_jax.models.factory import create_model, init_variables
from resnet_jax.models.resnet import ResNet
from resnet_jax.runtime.cache import enable_compilation_cache
from resnet_jax.runtime.errors import UserError
from resnet_jax.runtime.files import make_folder, remove_stale_temporaries
from resnet_jax.training.checkpoint import Checkpoints
from resnet_jax.training.config import DTYPES, RUN_KEYS, TrainConfig, resolve
from resnet_jax.training.confusion import class_accuracy, confusion_png
from resnet_jax.training.optim import frozen_stages, make_optimizer, make_schedule
from resnet_jax.training.parallel import DataParallel, init_distributed
from resnet_jax.training.reporting import (
    epoch_line,
    print_once,
    progress_bar,
    write_confusion_matrix,
    write_metrics,
)
from resnet_jax.training.steps import TrainState, create_state, zero_totals
from resnet_jax.training.tensorboard import TensorBoard
from resnet_jax.training.transfer import initial_variables
from resnet_jax.weights.io import save_variables
from resnet_jax.weights.metadata import ModelMetadata

__all__ = ["TrainResult", "train"]

SYNTHETIC_CLASSES = 1000  # an ImageNet-sized head, so throughput matches the usual benchmarks


@dataclasses.dataclass
class TrainResult:
    """What `train` returns: the final state (replicated on the mesh) and one record per epoch."""

    state: TrainState
    history: list[dict[str, Any]]
    output_dir: Path


def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) a training run described by `config`; see the module docstring."""
    init_distributed(config.coordinator_address, config.num_processes, config.process_id)
    enable_compilation_cache()
    config = resolve(config)
    dp = DataParallel()
    dp.check_batch_size(config.batch_size)
    out = Path(config.output_dir)
    replaced = _check_output_dir(out, config)
    if jax.process_count() > 1:
        # Every process looks at the folder before process 0 writes into it.
        multihost_utils.sync_global_devices("resnet_jax: output folder checked")
    data = _TrainValBatches(config, dp)
    frozen = frozen_stages(config.freeze, config.head)
    model = create_model(
        config.arch,
        num_classes=data.num_classes,
        dtype=DTYPES[config.dtype],
        frozen_stages=frozen,
        head=config.head,
    )
    total_steps = config.epochs * data.steps
    warmup_steps = round(config.warmup_epochs * data.steps)
    schedule = make_schedule(config.lr, config.schedule, warmup_steps, total_steps)

    tx = make_optimizer(config.optimizer, schedule, config.weight_decay, frozen)
    make_state = jax.jit(partial(create_state, model.apply, tx), out_shardings=dp.replicated)
    if jax.process_index() == 0:
        _make_output_dir(out, replaced)
    ckpts = None if config.synthetic else Checkpoints(out / "checkpoints")
    events = None if config.no_tensorboard or jax.process_index() else out / "tensorboard"
    tb = TensorBoard(events, config.log_every, schedule)
    try:  # from here on, close the checkpoint manager and the event file whatever happens
        state, history, best_confusion = _start(config, model, make_state, ckpts, dp)
        if jax.process_index() == 0 and data.classes is not None:
            write_class_indices(out / "class_indices.json", data.classes)
        if history:  # a kill may have come between a checkpoint and the metrics it records
            write_metrics(out, history)
        if best_confusion:
            write_confusion_matrix(out, _draw(best_confusion, data.classes, config.arch))

        if len(history) >= config.epochs:
            done = len(history)
            print_once(f"{out} is already trained for {done} epochs; raise --epochs to go on.")
        train_step, eval_step = dp.jit_train_step(config.label_smoothing), dp.jit_eval_step()
        compiled = False
        for epoch in range(len(history) + 1, config.epochs + 1):
            t0 = time.perf_counter()
            tb.start_epoch((epoch - 1) * data.steps)
            state, train_metrics, compile_s, train_s = _train_epoch(
                train_step,
                state,
                data.train(epoch),
                data.steps,
                dp,
                f"train epoch[{epoch}/{config.epochs}]",
                skip_first=not compiled,
                log=tb.train_totals,
            )
            compiled = True
            if not math.isfinite(train_metrics["loss"]):
                raise UserError(_nan_message(train_metrics["loss"], epoch, ckpts))
            val = _evaluate(eval_step, state, data, dp, epoch) if data.val_steps else {}
            trained = (data.steps - (1 if compile_s else 0)) * config.batch_size
            record = {
                "epoch": epoch,
                "train_loss": train_metrics["loss"],
                "train_accuracy": train_metrics["accuracy"],
                "val_loss": val.get("loss"),
                "val_accuracy": val.get("accuracy"),
                "images_per_second": trained / train_s if train_s > 0 else None,
                "seconds": time.perf_counter() - t0,
            }
            if compile_s:
                record["first_step_seconds"] = compile_s
            confusion, png = None, None
            if "confusion" in val:
                record["val_class_accuracy"] = class_accuracy(val["confusion"], data.classes)
                confusion = {"epoch": epoch, "matrix": val["confusion"].tolist()}
                png = _draw(confusion, data.classes, config.arch)
            # On disk before the checkpoint: a checkpoint never holds epochs the events lack.
            tb.epoch(epoch * data.steps, record, png)
            history.append(record)
            if confusion and _improved(history):
                best_confusion = confusion
                write_confusion_matrix(out, png)  # before the checkpoint, like best.msgpack
            _save_epoch(
                out, config, state, history, ckpts, data.classes, data.metadata(), best_confusion
            )
            print_once(epoch_line(record))
    finally:
        data.close()
        tb.close()
        if ckpts is not None:
            ckpts.close()  # waits for the last (asynchronous) checkpoint write
    return TrainResult(state, history, out)


# ---------------------------------------------------------------------------------------------
# Setup

# What a run writes into its output folder (see the module docstring).
OUTPUTS = ("checkpoints", "best.msgpack", "metrics.jsonl", "class_indices.json",
           "training_curve.png", "confusion_matrix.png", "tensorboard")  # fmt: skip


def _check_output_dir(out: Path, config: TrainConfig) -> list[str]:
    """The earlier outputs that --overwrite will delete; UserError if a new run would write
    over an earlier one's outputs without --overwrite (or --resume, where it has checkpoints)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--output-dir {out} is a file; choose a folder for the run's outputs.")
    found = [name for name in OUTPUTS if (out / name).exists()]
    has_checkpoint = (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir())
    if found and not config.overwrite and not (config.resume and has_checkpoint):
        advice = "--resume to continue it, " if has_checkpoint else ""
        raise UserError(
            f"{out} already holds a run ({', '.join(found)}); pass {advice}--overwrite to "
            "replace it, or choose another --output-dir."
        )
    return found if config.overwrite else []


def _make_output_dir(out: Path, replaced: list[str]) -> None:
    """Create `out`; delete the outputs --overwrite replaces and what a write killed midway
    left behind."""
    make_folder(out)
    for name in replaced:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    remove_stale_temporaries(out)


class _TrainValBatches:
    """Training and validation batches, already on the devices, plus the class names."""

    def __init__(self, config: TrainConfig, dp: DataParallel) -> None:
        self.config, self.dp = config, dp
        if config.synthetic:
            self.classes, self.num_classes = None, SYNTHETIC_CLASSES
            self.steps, self.val_steps = config.synthetic, 0
            return
        train, val, self.classes = open_datasets(
            config.data_dir, config.dataset, val_fraction=config.val_fraction
        )
        self.num_classes = len(self.classes)
        common = {
            "batch_size": config.batch_size,
            "image_size": config.image_size,
            "seed": config.seed,
            "workers": config.workers,
            "process_index": jax.process_index(),
            "process_count": jax.process_count(),
            "processes": not config.worker_threads,
        }
        self.train_loader = Loader(
            train, train=True, reduced_decode=not config.full_decode, **common
        )
        self.val_loader = Loader(val, train=False, **common)
        self.steps, self.val_steps = len(self.train_loader), len(self.val_loader)

    def close(self) -> None:
        """End the loaders' worker processes."""
        if not self.config.synthetic:
            self.train_loader.close()
            self.val_loader.close()

    def metadata(self) -> ModelMetadata | None:
        """What best.msgpack records: the classes, and the eval transform of `val`."""
        if self.config.synthetic:
            return None
        c, loader = self.config, self.val_loader
        return ModelMetadata(
            c.arch, self.num_classes, tuple(self.classes), image_size=c.image_size,
            resize_size=loader.resize_size, crop_size=loader.image_size, head=c.head,
        )  # fmt: skip

    def train(self, epoch: int) -> Iterator:
        c = self.config
        if c.synthetic:
            key = jax.random.fold_in(jax.random.key(c.seed), epoch)
            return synthetic_batches(
                self.dp.batch, key, self.steps, c.batch_size, c.image_size, self.num_classes
            )
        return self.dp.prefetch(self.train_loader.epoch(epoch))

    def val(self, epoch: int) -> Iterator:
        return self.dp.prefetch(self.val_loader.epoch(epoch))


def _start(
    config: TrainConfig,
    model: ResNet,
    make_state: Callable,
    ckpts: Checkpoints | None,
    dp: DataParallel,
) -> tuple[TrainState, list[dict], dict | None]:
    """A fresh state; with `--resume`, the latest checkpoint's state, history, best confusion."""
    latest = ckpts.latest_epoch() if ckpts else None
    if latest is None:
        if config.resume and ckpts:
            print_once(f"No checkpoint in {ckpts.directory} to resume from; starting a new run.")
        variables, message = initial_variables(model, config.arch, config.weights, config.seed)
        print_once(message)
        return make_state(dp.replicate(variables)), [], None
    abstract = jax.eval_shape(lambda: make_state(init_variables(model)))
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dp.replicated), abstract
    )
    meta = ckpts.meta(latest)
    # A run saved before an option existed ran with that option's default.
    saved = {**{k: getattr(TrainConfig(), k) for k in RUN_KEYS}, **meta["config"]}
    changed = [
        f"--{k.replace('_', '-')} {saved[k]} (now {getattr(config, k)})"
        for k in RUN_KEYS
        if saved[k] != getattr(config, k)
    ]
    if config.schedule == "cosine" and meta["config"].get("epochs") != config.epochs:
        was = meta["config"].get("epochs")
        changed.append(f"--epochs {was} (now {config.epochs}; it sets the cosine schedule)")
    if changed:
        raise UserError(
            f"Cannot resume {config.output_dir}: it was trained with "
            + ", ".join(changed)
            + "; pass the same values, or choose another --output-dir for a new run."
        )
    state = ckpts.restore(abstract, latest)
    print_once(f"Resuming {config.output_dir} after epoch {latest}.")
    return state, meta["history"], meta.get("best_confusion")


# ---------------------------------------------------------------------------------------------
# The loop


def _mean(totals: dict[str, jax.Array]) -> dict[str, float]:
    count = max(float(totals["count"]), 1.0)
    return {"loss": float(totals["loss"]) / count, "accuracy": float(totals["correct"]) / count}


def _train_epoch(
    step_fn: Callable,
    state: TrainState,
    batches: Iterator,
    steps: int,
    dp: DataParallel,
    desc: str,
    skip_first: bool,
    log: Callable[[int, dict], None],
) -> tuple[TrainState, dict, float, float]:
    """Run one epoch; returns the state, mean metrics, first-step seconds (if timed) and time.
    `log(steps_done, totals)` sees the running totals after every step (it reads few of them).

    The host never waits for the step it just dispatched: the bar shows the loss of the step
    before (already finished or nearly), so the device always has work queued.
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
                loss = _mean(totals)["loss"]
                if not math.isfinite(loss):
                    return state, {"loss": loss, "accuracy": 0.0}, compile_s, 0.0
                bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
                refreshed = time.perf_counter()
            log(i, totals)
            totals = new_totals
            bar.update()
        log(steps, totals)
        metrics = _mean(totals)
    return state, metrics, compile_s, time.perf_counter() - t0


def _evaluate(
    step_fn: Callable, state: TrainState, data: _TrainValBatches, dp: DataParallel, epoch: int
) -> dict:
    """Mean loss and accuracy over the real (mask True) rows, and the `confusion` matrix."""
    totals = dp.replicate(zero_totals(data.num_classes))
    with progress_bar(data.val_steps, f"val epoch[{epoch}/{data.config.epochs}]") as bar:
        for i, batch in enumerate(data.val(epoch)):
            new_totals = step_fn(state, batch, totals)
            if i > 0 and bar.n % 10 == 0:
                bar.set_postfix(loss=f"{_mean(totals)['loss']:.3f}", refresh=False)
            totals = new_totals
            bar.update()
    return {**_mean(totals), "confusion": np.asarray(totals["confusion"])}


def _nan_message(loss: float, epoch: int, ckpts: Checkpoints | None) -> str:
    latest = ckpts.latest_epoch() if ckpts else None
    kept = f"the checkpoint of epoch {latest} is kept" if latest else "no checkpoint was written"
    return (
        f"The training loss became {loss} in epoch {epoch}, so training stopped; {kept}. "
        "Lower --lr (or use --warmup-epochs) and try again."
    )


# ---------------------------------------------------------------------------------------------
# Outputs


def _save_epoch(
    out: Path,
    config: TrainConfig,
    state: TrainState,
    history: list[dict],
    ckpts: Checkpoints | None,
    classes: list[str] | None,
    metadata: ModelMetadata | None = None,
    best_confusion: dict | None = None,
) -> None:
    """best.msgpack (if improved), the orbax checkpoint, metrics.jsonl and the curves."""
    record = history[-1]
    if ckpts is not None:
        ckpts.wait()  # the previous epoch's checkpoint: if its write failed, stop before more
        if _improved(history) and jax.process_index() == 0:
            # Before the checkpoint: a kill in between redoes this epoch and rewrites the file.
            best = {"params": state.params, "batch_stats": state.batch_stats}
            save_variables(out / "best.msgpack", best, metadata)
        meta = {
            "config": {k: getattr(config, k) for k in (*RUN_KEYS, "epochs")},
            "history": history,
            "classes": classes,
            "best_confusion": best_confusion,
        }
        ckpts.save(record["epoch"], state, meta, record["val_accuracy"])
    write_metrics(out, history)


def _improved(history: list[dict]) -> bool:
    """Whether the last epoch has the best validation accuracy so far (the first best on ties)."""
    previous = [h["val_accuracy"] for h in history[:-1] if h["val_accuracy"] is not None]
    accuracy = history[-1]["val_accuracy"]
    return accuracy is not None and accuracy > max(previous, default=-1.0)


def _draw(confusion: dict, classes: list[str], arch: str) -> bytes | None:
    """The confusion matrix PNG on process 0, the one that writes it; None elsewhere."""
    if jax.process_index() != 0:
        return None
    title = f"{arch}, epoch {confusion['epoch']}, validation"
    return confusion_png(np.asarray(confusion["matrix"]), classes, title)
