"""The training run behind `train.py`: data, model, pretrained weights, the epoch loop, outputs.

Each part is a module of its own: `run_folder` (what a run writes, and when it may write over
an earlier run), `batches`, `resume` (where the run starts), `loop` (one epoch); `train` puts
them together.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path
from typing import Any

import jax
import optax
from jax.experimental import multihost_utils

from resnet_jax.models.factory import create_model
from resnet_jax.models.resnet import ResNet
from resnet_jax.runtime.cache import enable_compilation_cache
from resnet_jax.training.batches import TrainValBatches
from resnet_jax.training.checkpoint import Checkpoints
from resnet_jax.training.config import DTYPES, TrainConfig, resolve
from resnet_jax.training.loop import EpochLoop
from resnet_jax.training.optim import frozen_stages
from resnet_jax.training.parallel import DataParallel, init_distributed
from resnet_jax.training.reporting import (
    draw_confusion,
    epoch_line,
    print_once,
    write_confusion_matrix,
)
from resnet_jax.training.resume import start
from resnet_jax.training.run_folder import (
    improved,
    outputs_to_replace,
    prepare_folder,
    save_epoch,
    write_start,
)
from resnet_jax.training.run_setup import (
    Length,
    make_run_optimizer,
    run_length,
    run_schedule,
    step_options,
)
from resnet_jax.training.steps import TrainState, create_state
from resnet_jax.training.tensorboard import TensorBoard

__all__ = ["TrainResult", "train"]


@dataclasses.dataclass
class TrainResult:
    """What `train` returns: the final state (replicated on the mesh) and one record per epoch."""

    state: TrainState
    history: list[dict[str, Any]]
    output_dir: Path


def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) a training run described by `config`; `run_folder` lists its outputs."""
    init_distributed(config.coordinator_address, config.num_processes, config.process_id)
    enable_compilation_cache()
    config = resolve(config)
    dp = DataParallel()
    dp.check_batch_size(config.batch_size, config.accumulate_steps)
    out = Path(config.output_dir)
    replaced = outputs_to_replace(out, config)
    if jax.process_count() > 1:
        # Every process looks at the folder before process 0 writes into it.
        multihost_utils.sync_global_devices("resnet_jax: output folder checked")
    data = TrainValBatches(config, dp)
    length = run_length(config, data.steps)
    model, tx, schedule = _model_and_optimizer(config, data, length)
    make_state = jax.jit(
        partial(create_state, model.apply, tx, with_ema=config.model_ema),
        out_shardings=dp.replicated,
    )
    if jax.process_index() == 0:
        prepare_folder(out, replaced)
    ckpts = None if config.synthetic else Checkpoints(out / "checkpoints")
    events = None if config.no_tensorboard or jax.process_index() else out / "tensorboard"
    tb = TensorBoard(events, config.log_every, schedule)
    try:  # from here on, close the checkpoint manager and the event file whatever happens
        begin = start(config, model, make_state, ckpts, dp)
        write_start(out, begin, data.classes, config.arch)
        state, history, best_confusion = begin
        if len(history) >= length.epochs:
            done = len(history)
            print_once(f"{out} is already trained for {done} epochs; raise --epochs to go on.")
        loop = EpochLoop(config, data, dp, tb, length, step_options(config, length))
        for epoch in range(len(history) + 1, length.epochs + 1):
            state, record, confusion = loop.run(state, epoch)
            png = draw_confusion(confusion, data.classes, config.arch) if confusion else None
            # On disk before the checkpoint: a checkpoint never holds epochs the events lack.
            tb.epoch(min(epoch * data.steps, length.total_steps), record, png)
            history.append(record)
            if confusion and improved(history):
                best_confusion = confusion
                write_confusion_matrix(out, png)  # before the checkpoint, like best.msgpack
            save_epoch(
                out, config, state, history, ckpts, data.classes, data.metadata(), best_confusion
            )
            print_once(epoch_line(record))
    finally:
        data.close()
        tb.close()
        if ckpts is not None:
            ckpts.close()  # waits for the last (asynchronous) checkpoint write
    return TrainResult(state, history, out)


def _model_and_optimizer(
    config: TrainConfig, data: TrainValBatches, length: Length
) -> tuple[ResNet, optax.GradientTransformation, optax.Schedule]:
    """The model for the data's classes, and its optimizer with the learning-rate schedule."""
    frozen = frozen_stages(config.freeze, config.head)
    model = create_model(
        config.arch,
        num_classes=data.num_classes,
        dtype=DTYPES[config.dtype],
        frozen_stages=frozen,
        head=config.head,
        remat=config.remat,
    )
    schedule = run_schedule(config, length)
    return model, make_run_optimizer(config, schedule, frozen), schedule
