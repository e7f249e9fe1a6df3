"""Every option of a training run, declared once: type, default, help and allowed values.

`TrainConfig` is what `trainer.train` takes; `cli.parser_for(TrainConfig)` turns the same
fields into `train.py`'s flags, so a new option is one field here.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp

from resnet_jax.data.train_transform import AUTO_AUGMENTS, CROPS
from resnet_jax.data.transforms import eval_size
from resnet_jax.models.factory import ARCHS, create_model
from resnet_jax.models.registry import get_architecture
from resnet_jax.models.resnet import HEADS
from resnet_jax.runtime.errors import UserError, check_choice
from resnet_jax.training.ema import EMA_WARMUPS
from resnet_jax.training.optim import FREEZE, OPTIMIZERS, SCHEDULES, WARMUPS
from resnet_jax.training.recipes import RECIPES

__all__ = [
    "DTYPES", "RUN_KEYS", "TrainConfig", "check_options", "option", "recipe_config", "resolve",
]  # fmt: skip

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def option(
    default: Any,
    help: str,
    *,
    choices: Mapping[str, Any] | Sequence[str] | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    defines_run: bool = False,
    aliases: tuple[str, ...] = (),
    **argparse: Any,
) -> Any:
    """A config field with its flag's help text. `choices` is the registry the value is a key
    of; `minimum` and `maximum` bound a number (each number of a tuple); `defines_run`:
    `--resume` must keep the value; `aliases`: other spellings of the flag; `argparse`: extra
    add_argument settings (metavar, nargs, const)."""
    metadata = {"help": help, "choices": choices, "minimum": minimum, "maximum": maximum,
                "defines_run": defines_run, "aliases": aliases}  # fmt: skip
    return dataclasses.field(default=default, metadata={**metadata, "argparse": argparse})


def _described(registry: Mapping[str, str]) -> str:
    """`name: what it is; ...` for a flag's help."""
    return "; ".join(f"{name}: {text}" for name, text in registry.items())


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
        "init), a .pth/.th/.safetensors/.msgpack file, or hf:ORG/NAME[@REVISION] on the Hugging "
        "Face hub (e.g. hf:timm/resnet50.tv2_in1k); a head of another size is replaced by a new "
        "one for the classes of the data (default: imagenet; none with --synthetic or for an "
        "architecture without published weights, such as the CIFAR ResNets)",
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
    recipe: str | None = option(
        None,
        "a published recipe's values for the flags below (flags given explicitly win): "
        + _described({name: r.title for name, r in RECIPES.items()}),
        choices=RECIPES,
    )
    optimizer: str = option(
        "adam",
        "adam (weight decay added to the gradient, as torch.optim.Adam), adamw (decoupled "
        "decay), sgd (momentum 0.9) or sgd-nesterov (torch's SGD with nesterov=True)",
        choices=OPTIMIZERS,
        defines_run=True,
    )
    lr: float = option(1e-4, "peak learning rate", minimum=0, defines_run=True)
    weight_decay: float | None = option(
        None, "weight decay (default: torch's: 0, or 0.01 for adamw)", minimum=0, defines_run=True
    )
    norm_weight_decay: float | None = option(
        None,
        "weight decay of the BatchNorm weights and biases (torchvision's recipes: 0; default: "
        "--weight-decay)",
        minimum=0,
        defines_run=True,
    )
    bias_weight_decay: float | None = option(
        None,
        "weight decay of every bias, BatchNorm's included (default: as the other parameters)",
        minimum=0,
        defines_run=True,
    )
    schedule: str = option(
        "constant",
        "learning rate after the warm-up: " + _described(SCHEDULES),
        choices=SCHEDULES,
        defines_run=True,
    )
    lr_step_size: int | None = option(
        None, "--schedule step: decay every N (--lr-step-unit)", minimum=1, defines_run=True,
        metavar="N",
    )  # fmt: skip
    lr_milestones: tuple[int, ...] = option(
        (), "--schedule multistep: decay at these (--lr-step-unit)", minimum=1,
        defines_run=True, nargs="+", metavar="M",
    )  # fmt: skip
    lr_gamma: float = option(0.1, "factor of each decay", minimum=0, defines_run=True)
    lr_step_unit: str = option(
        "epochs", "unit of --lr-step-size and --lr-milestones: epochs or optimizer steps",
        choices=("epochs", "steps"), defines_run=True,
    )  # fmt: skip
    warmup_epochs: float = option(
        0.0, "learning-rate warm-up over this many (possibly fractional) epochs", minimum=0,
        defines_run=True,
    )  # fmt: skip
    warmup_steps: int = option(
        0, "warm-up over this many optimizer steps instead", minimum=0, defines_run=True
    )
    warmup_method: str = option(
        "linear", _described(WARMUPS), choices=WARMUPS,
        defines_run=True,
    )  # fmt: skip
    warmup_factor: float = option(
        0.0, "the warm-up's factor (torch's start_factor / factor)", minimum=0, maximum=1,
        defines_run=True,
    )  # fmt: skip
    label_smoothing: float = option(
        0.0, "label smoothing of the training loss", minimum=0, maximum=1, defines_run=True
    )
    mixup_alpha: float = option(
        0.0, "Mixup of each batch with lambda ~ Beta(alpha, alpha); 0: off", minimum=0,
        defines_run=True,
    )  # fmt: skip
    cutmix_alpha: float = option(
        0.0, "CutMix of each batch with lambda ~ Beta(alpha, alpha); 0: off", minimum=0,
        defines_run=True,
    )  # fmt: skip
    mixup_switch_prob: float = option(
        0.5, "with both on, the chance that a batch gets CutMix rather than Mixup", minimum=0,
        maximum=1, defines_run=True,
    )  # fmt: skip
    random_erase: float = option(
        0.0, "torchvision's RandomErasing probability per training image (after Normalize)",
        minimum=0, maximum=1, defines_run=True,
    )  # fmt: skip
    auto_augment: str = option(
        "none", "per-image augmentation after the crop: TrivialAugmentWide, RandAugment or "
        "AutoAugment (ImageNet policy), as torchvision's", choices=AUTO_AUGMENTS, defines_run=True,
    )  # fmt: skip
    train_crop_mode: str = option(
        "random_resized", "random_resized: RandomResizedCrop (ImageNet); pad_crop: zero padding "
        "by --crop-padding, then a random crop (CIFAR); both then flip", choices=CROPS,
        defines_run=True,
    )  # fmt: skip
    crop_padding: int = option(4, "pixels of zero padding of pad_crop", minimum=0, defines_run=True)
    ra_reps: int = option(
        1, "repeated augmentation: each image K times per epoch, differently augmented, on "
        "different processes (torchvision's --ra-reps)", minimum=1, defines_run=True,
        metavar="K",
    )  # fmt: skip
    model_ema: bool = option(
        False, "keep an EMA of the weights (and BatchNorm statistics), validated and "
        "checkpointed beside them; best.msgpack holds whichever validates better",
        defines_run=True,
    )  # fmt: skip
    model_ema_steps: int = option(
        1, "update the EMA every N optimizer steps", minimum=1, defines_run=True, metavar="N"
    )
    model_ema_decay: float = option(
        0.9998, "decay of each EMA update", minimum=0, maximum=1, defines_run=True
    )
    model_ema_adjust: bool = option(
        False, "torchvision's adjustment: 1 - decay times batch size x --model-ema-steps / "
        "epochs (its recipes give 0.99998 this way)", defines_run=True,
    )  # fmt: skip
    model_ema_warmup: str = option(
        "none", _described(EMA_WARMUPS), choices=EMA_WARMUPS,
        defines_run=True,
    )  # fmt: skip
    batch_size: int = option(
        16, "global batch size, split over all devices and processes", minimum=1, defines_run=True
    )
    accumulate_steps: int = option(
        1, "run each batch as K micro-batches and add their gradients (BatchNorm normalises and "
        "updates per micro-batch, as a torch accumulation loop)", minimum=1, defines_run=True,
        metavar="K",
    )  # fmt: skip
    epochs: int = option(3, "epochs to train", minimum=1)
    max_steps: int | None = option(
        None, "stop after this many optimizer steps, the last epoch cut short (--epochs then "
        "follows from it)", minimum=1, defines_run=True,
    )  # fmt: skip
    image_size: int = option(
        224, "training crop size in pixels", minimum=1, defines_run=True, aliases=("--train-crop",)
    )
    eval_crop: int | None = option(
        None, "validation centre crop (default: --image-size)", minimum=1, defines_run=True
    )
    eval_resize: int | None = option(
        None, "validation resize of the shorter side before the crop (default: 256/224 of "
        "--eval-crop)", minimum=1, defines_run=True,
    )  # fmt: skip
    dtype: str = option(
        "float32",
        "compute dtype; parameters and BatchNorm statistics stay float32",
        choices=DTYPES,
        defines_run=True,
    )
    remat: bool = option(
        False,
        "keep only each block's input for the backward pass and recompute the rest there: the "
        "same gradients in a fraction of the memory, for about a third more compute",
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
    """UserError if `value` is not a choice of `field`, or a number (each number of a tuple)
    outside its bounds or NaN."""
    flag = field.name.replace("_", "-")
    if value is None:
        return
    if field.metadata["choices"] is not None:
        check_choice(flag, value, field.metadata["choices"])
    low, high = field.metadata["minimum"], field.metadata.get("maximum")
    for number in value if isinstance(value, tuple | list) else (value,):
        if low is not None and not (math.isfinite(number) and number >= low):
            raise UserError(f"--{flag} {number} is not allowed; give a number of at least {low}.")
        if high is not None and not number <= high:
            raise UserError(f"--{flag} {number} is not allowed; give a number of at most {high}.")


def check_options(config: Any) -> None:
    """UserError for the first field of the dataclass `config` (made with `option`) whose value
    is not one of its choices, or a number below its minimum."""
    for field in dataclasses.fields(config):
        _check(field, getattr(config, field.name))


def recipe_config(name: str, **fields: Any) -> TrainConfig:
    """`--recipe NAME` for code: the recipe's values (for `fields`' --arch) under `fields`."""
    check_choice("recipe", name, RECIPES)
    arch = fields.get("arch", TrainConfig.arch)
    return TrainConfig(**{**RECIPES[name].values(arch), **fields, "recipe": name})


def _check_schedule(config: TrainConfig) -> None:
    """UserError for a schedule without what it needs, or with two warm-ups."""
    if config.schedule == "step" and config.lr_step_size is None:
        raise UserError("--schedule step needs --lr-step-size N; add it.")
    milestones = list(config.lr_milestones)
    if config.schedule == "multistep" and (not milestones or milestones != sorted(set(milestones))):
        raise UserError(
            f"--schedule multistep needs increasing --lr-milestones (got {milestones or 'none'}); "
            "give them in order."
        )
    if config.warmup_epochs and config.warmup_steps:
        raise UserError("Give --warmup-epochs or --warmup-steps, not both.")
    if config.schedule == "cosine" and config.warmup_epochs >= config.epochs:
        raise UserError(
            f"--warmup-epochs {config.warmup_epochs} leaves no epoch for the cosine decay; "
            f"use fewer than --epochs {config.epochs}."
        )


def resolve(config: TrainConfig) -> TrainConfig:
    """Check every option that needs no data; fill in the defaults that depend on others."""
    create_model(config.arch)  # UserError for an unknown name
    published = get_architecture(config.arch).weights is not None
    check_options(config)
    _check_schedule(config)
    default_wd = 0.01 if config.optimizer == "adamw" else 0.0
    eval_crop = config.eval_crop or config.image_size
    return dataclasses.replace(
        config,
        weights=config.weights or ("imagenet" if published and not config.synthetic else "none"),
        weight_decay=default_wd if config.weight_decay is None else config.weight_decay,
        lr_milestones=tuple(config.lr_milestones),
        eval_crop=eval_crop,
        eval_resize=config.eval_resize or eval_size(eval_crop),
        data_dir=None if config.data_dir is None else os.path.abspath(config.data_dir),
        output_dir=config.output_dir or os.path.join("runs", config.arch),
    )
