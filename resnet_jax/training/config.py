"""Every option of a training run, declared once: type, default, help and allowed values.

`TrainConfig` is what `trainer.train` takes; `cli.parser_for(TrainConfig)` turns the same
fields into `train.py`'s flags, so a new option is one field here.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from resnet_jax.models.factory import ARCHS, create_model
from resnet_jax.models.resnet import HEADS
from resnet_jax.runtime.errors import UserError, check_choice
from resnet_jax.training.optim import FREEZE, OPTIMIZERS, SCHEDULES

__all__ = ["DTYPES", "RUN_KEYS", "TrainConfig", "option", "resolve"]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def option(
    default: Any,
    help: str,
    *,
    choices: Mapping[str, Any] | None = None,
    minimum: float | None = None,
    defines_run: bool = False,
    **argparse: Any,
) -> Any:
    """A config field with its flag's help text. `choices` is the registry the value is a key
    of; `minimum` the smallest allowed number; `defines_run`: `--resume` must keep the value;
    `argparse`: extra add_argument settings (metavar, nargs, const)."""
    metadata = {"help": help, "choices": choices, "minimum": minimum, "defines_run": defines_run}
    return dataclasses.field(default=default, metadata={**metadata, "argparse": argparse})


@dataclasses.dataclass
class TrainConfig:
    """Every option of a training run; `train.py`'s flags map one to one onto these fields."""

    arch: str = option("resnet34", f"one of: {', '.join(ARCHS)}", defines_run=True, metavar="ARCH")
    data_dir: str | None = option(
        None,
        "an image folder: ROOT/train/<class>/*.jpg with ROOT/val/<class>/*.jpg, or "
        "ROOT/<class>/*.jpg split by --val-fraction (default: --dataset from tfds)",
        defines_run=True,
        metavar="ROOT",
    )
    dataset: str = option(
        "tf_flowers", "tensorflow-datasets name used without --data-dir", defines_run=True
    )
    val_fraction: float = option(
        0.1,
        "share of each class held out for validation when there is no val split",
        defines_run=True,
    )
    weights: str | None = option(
        None,
        "torchvision's ImageNet weights (downloaded once, sha256-checked), none (random "
        "init), a .pth/.safetensors/.msgpack file, or hf:ORG/NAME[@REVISION] on the Hugging Face "
        "hub (e.g. hf:timm/resnet50.tv2_in1k); a head of another size is replaced by a new "
        "one for the classes of the data (default: imagenet; none with --synthetic)",
        metavar="imagenet|none|PATH|hf:ORG/NAME",
    )
    head: str = option(
        "replace",
        "replace: a new fc for the classes of the data replaces the pretrained one; append: the "
        "pretrained 1000-class fc stays whole and a new layer on its logits (torch name "
        "head.weight/head.bias) gives the classes of the data",
        choices=HEADS,
        defines_run=True,
    )
    freeze: str = option(
        "none",
        "none: train everything; backbone: train only the new layer (fc, or with --head append "
        "the appended one: the pretrained fc stays frozen too); layerK: freeze the stem and "
        "layer1..layerK, train layer(K+1) on. Frozen parts get no update and no weight decay, "
        "and their BatchNorm uses its running statistics",
        choices=FREEZE,
        defines_run=True,
    )
    optimizer: str = option(
        "adam",
        "adam (weight decay added to the gradient, as torch.optim.Adam), adamw "
        "(decoupled decay) or sgd (momentum 0.9)",
        choices=OPTIMIZERS,
        defines_run=True,
    )
    lr: float = option(1e-4, "peak learning rate", minimum=0, defines_run=True)
    weight_decay: float | None = option(
        None, "weight decay (default: torch's: 0, or 0.01 for adamw)", minimum=0, defines_run=True
    )
    schedule: str = option(
        "constant",
        "learning rate after the warmup: constant, or a cosine decay to 0 at the last step",
        choices=SCHEDULES,
        defines_run=True,
    )
    warmup_epochs: float = option(
        0.0,
        "linear warmup from 0 over this many (possibly fractional) epochs",
        minimum=0,
        defines_run=True,
    )
    label_smoothing: float = option(
        0.0, "label smoothing of the training loss", minimum=0, defines_run=True
    )
    batch_size: int = option(
        16, "global batch size, split over all devices and processes", minimum=1, defines_run=True
    )
    epochs: int = option(3, "epochs to train", minimum=1)
    image_size: int = option(224, "training crop size in pixels", minimum=1, defines_run=True)
    dtype: str = option(
        "float32",
        "compute dtype; parameters and BatchNorm statistics stay float32",
        choices=DTYPES,
        defines_run=True,
    )
    workers: int = option(
        0, "image decoding worker processes (threads with --worker-threads); 0: one per CPU core",
        minimum=0,
    )  # fmt: skip
    worker_threads: bool = option(
        False,
        "decode images in threads of the training process instead of worker processes: no "
        "start-up, but Python's GIL holds them to a few cores' worth",
    )
    full_decode: bool = option(
        False,
        "decode training JPEGs in full, as torchvision does (bit-identical crops), instead of at "
        "1/2, 1/4 or 1/8 size where the random crop stays at least --image-size pixels there",
        defines_run=True,
    )
    seed: int = option(
        0, "seeds the new head, the data order and the augmentation", defines_run=True
    )
    output_dir: str | None = option(
        None, "where the outputs go (default: runs/ARCH)", metavar="DIR"
    )
    resume: bool = option(
        False,
        "continue the run in --output-dir from its latest checkpoint; pass the same "
        "flags (--epochs may grow): the result equals an uninterrupted run",
    )
    overwrite: bool = option(
        False,
        "start a new run in an --output-dir that holds an earlier run's outputs, "
        "deleting them first",
    )
    no_tensorboard: bool = option(
        False, "write no TensorBoard event files (OUTPUT_DIR/tensorboard/)"
    )
    log_every: int = option(
        50,
        "write the mean training loss and the learning rate to TensorBoard every N steps",
        minimum=1,
        metavar="N",
    )
    synthetic: int = option(
        0,
        "measure throughput: random images made on the device, STEPS steps per epoch (50 if "
        "omitted), 1000 classes, no data loading, no validation, no checkpoints",
        minimum=0,
        nargs="?",
        const=50,
        metavar="STEPS",
    )
    coordinator_address: str | None = option(
        None,
        "multi-host: process 0's address (also $JAX_COORDINATOR_ADDRESS; SLURM and Open "
        "MPI jobs are detected by JAX)",
        metavar="HOST:PORT",
    )
    num_processes: int | None = option(None, "multi-host: the number of processes", minimum=1)
    process_id: int | None = option(None, "multi-host: this process's index, 0..N-1", minimum=0)


# Options that define a run: `--resume` refuses to continue a run with different values.
RUN_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata["defines_run"])


def _check(field: dataclasses.Field, value: Any) -> None:
    """UserError if `value` is not a choice of `field`, or a number below its minimum or NaN."""
    flag = field.name.replace("_", "-")
    if value is None:
        return
    if field.metadata["choices"] is not None:
        check_choice(flag, value, field.metadata["choices"])
    minimum = field.metadata["minimum"]
    if minimum is not None and not (math.isfinite(value) and value >= minimum):
        raise UserError(f"--{flag} {value} is not allowed; give a number of at least {minimum}.")


def resolve(config: TrainConfig) -> TrainConfig:
    """Check every option that needs no data; fill in the defaults that depend on others."""
    create_model(config.arch)  # UserError for an unknown name
    for field in dataclasses.fields(config):
        _check(field, getattr(config, field.name))
    if config.schedule == "cosine" and config.warmup_epochs >= config.epochs:
        raise UserError(
            f"--warmup-epochs {config.warmup_epochs} leaves no epoch for the cosine decay; "
            f"use fewer than --epochs {config.epochs}."
        )
    default_wd = 0.01 if config.optimizer == "adamw" else 0.0
    return dataclasses.replace(
        config,
        weights=config.weights or ("none" if config.synthetic else "imagenet"),
        weight_decay=default_wd if config.weight_decay is None else config.weight_decay,
        data_dir=None if config.data_dir is None else os.path.abspath(config.data_dir),
        output_dir=config.output_dir or os.path.join("runs", config.arch),
    )
