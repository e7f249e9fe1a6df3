"""A run's training recipe from its `TrainConfig` and the steps per epoch: how long it runs,
the learning-rate schedule, the optimizer, what each step does, and the per-image transform."""

from __future__ import annotations

import dataclasses
import math

import optax

from resnet_jax.data.train_transform import TrainTransform
from resnet_jax.runtime.errors import UserError
from resnet_jax.training.batch_augment import BatchAugment
from resnet_jax.training.config import TrainConfig
from resnet_jax.training.ema import EmaSchedule, adjusted_decay
from resnet_jax.training.optim import make_optimizer, make_schedule
from resnet_jax.training.steps import StepOptions

__all__ = ["Length", "make_run_optimizer", "run_length", "run_schedule", "step_options",
           "train_transform"]  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Length:
    """How long a run trains: `epochs` epochs of `steps_per_epoch` steps, the last one cut to
    `last_epoch_steps` by `--max-steps`."""

    epochs: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int

    def steps_in(self, epoch: int) -> int:
        """The optimizer steps of epoch `epoch` (1-based)."""
        return min(self.steps_per_epoch, self.total_steps - (epoch - 1) * self.steps_per_epoch)


def run_length(config: TrainConfig, steps_per_epoch: int) -> Length:
    """--epochs, or with --max-steps the epochs it needs; the warm-up in steps. UserError when
    a cosine schedule would have no step after its warm-up."""
    if config.max_steps is not None:
        epochs, total = math.ceil(config.max_steps / steps_per_epoch), config.max_steps
    else:
        epochs, total = config.epochs, config.epochs * steps_per_epoch
    warmup = config.warmup_steps or round(config.warmup_epochs * steps_per_epoch)
    if config.schedule == "cosine" and warmup >= total > 0:
        raise UserError(
            f"The warm-up ({warmup} steps) leaves none of the {total} steps for the cosine "
            "decay; shorten it or train longer."
        )
    return Length(epochs, steps_per_epoch, total, warmup)


def _in_steps(value: int | None, config: TrainConfig, steps_per_epoch: int) -> int:
    if value is None:
        return 0
    return value if config.lr_step_unit == "steps" else value * steps_per_epoch


def run_schedule(config: TrainConfig, length: Length) -> optax.Schedule:
    """The learning rate of each step, as --schedule, --lr-*, and --warmup-* say."""
    spe = length.steps_per_epoch
    return make_schedule(
        config.lr, config.schedule, length.warmup_steps, length.total_steps,
        step_size=_in_steps(config.lr_step_size, config, spe),
        milestones=tuple(_in_steps(m, config, spe) for m in config.lr_milestones),
        gamma=config.lr_gamma, warmup_method=config.warmup_method,
        warmup_factor=config.warmup_factor,
    )  # fmt: skip


def make_run_optimizer(
    config: TrainConfig, schedule: optax.Schedule, frozen_stages: int
) -> optax.GradientTransformation:
    """--optimizer with the schedule and the weight decay of each parameter group."""
    return make_optimizer(
        config.optimizer, schedule, config.weight_decay, frozen_stages,
        norm_weight_decay=config.norm_weight_decay, bias_weight_decay=config.bias_weight_decay,
    )  # fmt: skip


def step_options(config: TrainConfig, length: Length) -> StepOptions:
    """What each train step does besides the loss: smoothing, batch augmentation, micro-batches
    and the EMA."""
    augment = BatchAugment(
        config.mixup_alpha, config.cutmix_alpha, config.mixup_switch_prob, config.random_erase
    )
    ema = None
    if config.model_ema:
        decay = config.model_ema_decay
        if config.model_ema_adjust:
            decay = adjusted_decay(decay, config.batch_size, config.model_ema_steps, length.epochs)
        ema = EmaSchedule(
            decay, config.model_ema_steps, config.model_ema_warmup, length.warmup_steps,
            length.steps_per_epoch,
        )  # fmt: skip
    return StepOptions(
        config.label_smoothing, augment, config.seed % 2**32, config.accumulate_steps, ema
    )


def train_transform(config: TrainConfig) -> TrainTransform:
    """The per-image training transform: the crop, the flip, the auto-augmentation."""
    return TrainTransform(
        crop=config.train_crop_mode, padding=config.crop_padding, auto_augment=config.auto_augment
    )
