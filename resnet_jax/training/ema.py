"""An exponential moving average (EMA) of the weights: parameters and BatchNorm statistics.

Both references average the BatchNorm running statistics too: torchvision's reference
`ExponentialMovingAverage` (an `AveragedModel` with `use_buffers=True`) and timm's
`ModelEmaV3`. The average is updated every `every` optimizer steps; an update with decay d moves each array a fraction (1 - d) of the way to the weights (`update`), and the first
update copies them, as `AveragedModel` does when it has averaged nothing yet.

Warm-up (`EMA_WARMUPS`), i.e. the decay of the k-th update:
- "none": d (the first update copies).
- "lr" (torchvision's reference): each update during the learning-rate warm-up copies the
  weights, and so does the first one after it; then d.
- "timm" (timm's `ModelEmaV3(use_warmup=True)` with its defaults gamma 1, power 2/3, counted
  in EMA updates): min(d, 1 - k ** (-2/3)), which is 0 for k = 1.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from resnet_jax.runtime.errors import check_choice

__all__ = ["EMA_WARMUPS", "EmaSchedule", "adjusted_decay", "maybe_update", "update"]

EMA_WARMUPS = {
    "none": "the first update copies the weights, the others use the decay",
    "lr": "copy the weights until the learning-rate warm-up ends (torchvision's reference)",
    "timm": "decay min(d, 1 - k^(-2/3)) at the k-th update (timm's ModelEmaV3 warm-up)",
}

TIMM_WARMUP_POWER = 2 / 3  # ModelEmaV3's default warmup_power (warmup_gamma 1)


def adjusted_decay(decay: float, batch_size: int, every: int, epochs: int) -> float:
    """torchvision's reference adjustment of `--model-ema-decay` (from pycls): 1 - decay is
    scaled by batch size x update interval / epochs and capped at 1, so that a decay chosen
    for one setup averages over a similar share of training in another."""
    alpha = min(1.0, (1.0 - decay) * batch_size * every / epochs)
    return 1.0 - alpha


@dataclasses.dataclass(frozen=True)
class EmaSchedule:
    """When the EMA is updated and with which decay (see the module docstring).

    As in torchvision's reference, the updates follow the steps of each epoch: after its
    steps 1, 1 + every, 1 + 2 every, ... (1-based); `steps_per_epoch` None: one long epoch.
    """

    decay: float
    every: int = 1
    warmup: str = "none"  # a key of EMA_WARMUPS
    lr_warmup_steps: int = 0  # the learning-rate warm-up, for warmup="lr"
    steps_per_epoch: int | None = None

    def __post_init__(self) -> None:
        check_choice("model-ema-warmup", self.warmup, EMA_WARMUPS)

    def _in_epoch(self, step: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(full epochs, steps into the current epoch) after `step` optimizer steps."""
        if self.steps_per_epoch is None:
            return jnp.zeros_like(step), step
        return step // self.steps_per_epoch, step % self.steps_per_epoch

    def is_update(self, step: jax.Array) -> jax.Array:
        """Whether the EMA is updated after optimizer step `step` (1, 2, ...)."""
        _, into = self._in_epoch(jnp.asarray(step, jnp.int32) - 1)
        return into % self.every == 0

    def updates(self, step: jax.Array) -> jax.Array:
        """How many updates the first `step` optimizer steps make."""
        epochs, into = self._in_epoch(jnp.asarray(step, jnp.int32))
        per_epoch = 0 if self.steps_per_epoch is None else -(-self.steps_per_epoch // self.every)
        return epochs * per_epoch + (into + self.every - 1) // self.every

    def decay_at(self, step: jax.Array) -> jax.Array:
        """The decay of the update made after optimizer step `step` (an update step)."""
        decay = jnp.asarray(self.decay, float)  # float64 under jax_enable_x64
        if self.warmup == "timm":
            k = self.updates(step).astype(decay.dtype)
            return jnp.minimum(decay, 1.0 - k ** (-TIMM_WARMUP_POWER))
        # A copy when the updates before this one all came in the warm-up (or there were none).
        copying = self.lr_warmup_steps if self.warmup == "lr" else 0
        return jnp.where(self.updates(step - 1) <= self.updates(copying), 0.0, decay)


def update(ema: Any, weights: Any, decay: jax.Array | float) -> Any:
    """`ema` moved (1 - decay) of the way to `weights` (trees alike); decay 1 keeps it and
    decay 0 copies `weights` exactly."""

    def lerp(average: jax.Array, value: jax.Array) -> jax.Array:
        d = jnp.asarray(decay, average.dtype)
        return jnp.where(d == 0, value, average + (1 - d) * (value - average))

    return jax.tree.map(lerp, ema, weights)


def maybe_update(ema: Any, weights: Any, step: jax.Array, schedule: EmaSchedule) -> Any:
    """`ema` after optimizer step `step` (1, 2, ...): updated where `schedule` says, unchanged
    otherwise."""
    return jax.lax.cond(
        schedule.is_update(step),
        lambda: update(ema, weights, schedule.decay_at(step)),
        lambda: ema,
    )
