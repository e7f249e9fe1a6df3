"""The train state and the train and eval steps: pure functions of (state, batch, totals).

`parallel.DataParallel` compiles them for a device mesh. Metrics are summed on the device and
read back only when shown; validation also counts a confusion matrix there.

With `StepOptions.accumulate_steps` K > 1 a step runs the batch as K micro-batches one after
another (micro-batch j holds rows j, j + K, j + 2K, ...) and adds their gradients, as a torch
loop calling backward() K times before optimizer.step() does: each micro-batch is normalised
by BatchNorm with its own statistics, and updates the running statistics once. So the gradient
equals one big batch's only where BatchNorm uses running statistics (frozen stages); elsewhere
it is the gradient of K smaller BatchNorm batches, which is what the memory saving costs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from resnet_jax.models.preprocess import eval_logits, normalize
from resnet_jax.models.registry import IMAGENET_EVAL, EvalTransform
from resnet_jax.training.batch_augment import BatchAugment, augment_batch, mixed_targets
from resnet_jax.training.ema import EmaSchedule, maybe_update
from resnet_jax.training.fused_adam import apply_update

__all__ = [
    "Batch", "StepOptions", "Totals", "TrainState", "confusion_counts", "create_state",
    "cross_entropy", "ema_state", "eval_step", "mean_softmax_log", "soft_cross_entropy",
    "top_k_correct", "train_step", "zero_totals",
]  # fmt: skip

Batch = dict[str, jax.Array]
Totals = dict[str, jax.Array]


class TrainState(train_state.TrainState):
    """Flax's TrainState (step, params, optimizer state) plus the BatchNorm running statistics
    and, with an EMA, its {'params', 'batch_stats'} (`training.ema`)."""

    batch_stats: Any
    ema: Any = None

    def apply_gradients(self, *, grads: Any, **kwargs: Any) -> TrainState:
        """One optimizer step (the parameters in the same call where the optimizer can:
        `fused_adam.apply_update`); `kwargs` replace other fields."""
        params, opt_state = apply_update(self.tx, grads, self.opt_state, self.params)
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state, **kwargs)


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """What a train step does besides the plain loss (hashable: compiled into the step)."""

    label_smoothing: float = 0.0
    augment: BatchAugment = dataclasses.field(default_factory=BatchAugment)  # erasing, mixing
    seed: int = 0  # the augmentation of step s draws from (seed, s)
    accumulate_steps: int = 1  # micro-batches per step (see the module docstring)
    ema: EmaSchedule | None = None


def create_state(
    apply_fn: Callable, tx: optax.GradientTransformation, variables: Any, with_ema: bool = False
) -> TrainState:
    """Step 0 of training from {'params', 'batch_stats'}: the optimizer state is initialised,
    and with `with_ema` the average starts as a copy of the variables."""
    weights = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
    average = jax.tree.map(jnp.copy, weights) if with_ema else None
    return TrainState.create(apply_fn=apply_fn, tx=tx, ema=average, **weights)


def ema_state(state: TrainState) -> TrainState:
    """`state` with the EMA's parameters and statistics in place of the trained ones (for
    `eval_step`)."""
    return state.replace(params=state.ema["params"], batch_stats=state.ema["batch_stats"])


def zero_totals(num_classes: int | None = None, top5: bool = False) -> Totals:
    """Running sums of one epoch, kept on the device: summed loss, correct predictions, examples;
    with `num_classes`, also a confusion matrix, and with `top5` the top-5 hits (`eval_step`
    fills both)."""
    totals = {
        "loss": jnp.zeros((), jnp.float32),
        "correct": jnp.zeros((), jnp.float32),
        "count": jnp.zeros((), jnp.float32),
    }
    if num_classes is not None:
        totals["confusion"] = jnp.zeros((num_classes, num_classes), jnp.int32)
    if top5:
        totals["top5"] = jnp.zeros((), jnp.float32)
    return totals


def _accumulate(totals: Totals, losses: jax.Array, logits: jax.Array, batch: Batch) -> Totals:
    """`totals` plus the batch's summed loss, correct predictions and count (mask True rows)."""
    mask = batch["mask"]
    correct = (jnp.argmax(logits, -1) == batch["label"]) & mask
    return {
        "loss": totals["loss"] + jnp.sum(jnp.where(mask, losses, 0.0)),
        "correct": totals["correct"] + jnp.sum(correct, dtype=jnp.float32),
        "count": totals["count"] + jnp.sum(mask, dtype=jnp.float32),
    }


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example cross-entropy against (optionally smoothed) one-hot labels."""
    return soft_cross_entropy(logits, jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)


def soft_cross_entropy(
    logits: jax.Array, targets: jax.Array, label_smoothing: float = 0.0
) -> jax.Array:
    """Per-example cross-entropy against probabilities (mixed labels), smoothed as torch's
    `cross_entropy(label_smoothing=...)` smooths probability targets."""
    return optax.softmax_cross_entropy(logits, optax.smooth_labels(targets, label_smoothing))


def _micro_batches(rows: Batch, k: int) -> Batch:
    """(B, ...) -> (k, B / k, ...), micro-batch j holding rows j, j + k, ...: each device keeps
    its own rows, as a sharded batch's reshape then needs no communication."""
    return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(-1, k, *x.shape[1:]), 0, 1), rows)


def _gradients(state: TrainState, rows: Batch, options: StepOptions) -> tuple[Any, Any, Totals]:
    """(gradients, BatchNorm statistics, this batch's totals) of the mean loss over the real
    rows, the micro-batches run one after another."""
    count = jnp.maximum(jnp.sum(rows["mask"]), 1)

    def loss_fn(params, batch_stats, rows):
        variables = {"params": params, "batch_stats": batch_stats}
        logits, updates = state.apply_fn(
            variables, rows["image"], train=True, mutable=["batch_stats"]
        )
        targets = mixed_targets(rows["mixed"], logits.shape[-1])
        losses = soft_cross_entropy(logits, targets, options.label_smoothing)
        loss = jnp.sum(jnp.where(rows["mask"], losses, 0.0)) / count
        return loss, (_accumulate(zero_totals(), losses, logits, rows), updates["batch_stats"])

    grad_fn = jax.grad(loss_fn, has_aux=True)
    if options.accumulate_steps == 1:
        grads, (totals, batch_stats) = grad_fn(state.params, state.batch_stats, rows)
        return grads, batch_stats, totals

    def micro_step(carry, micro):
        grads, batch_stats, totals = carry
        g, (t, batch_stats) = grad_fn(state.params, batch_stats, micro)
        totals = jax.tree.map(lambda a, b: a + b.astype(a.dtype), totals, t)  # float64 losses
        return (jax.tree.map(jnp.add, grads, g), batch_stats, totals), None

    start = (jax.tree.map(jnp.zeros_like, state.params), state.batch_stats, zero_totals())
    micro = _micro_batches(rows, options.accumulate_steps)
    return jax.lax.scan(micro_step, start, micro)[0]


def train_step(
    state: TrainState, batch: Batch, totals: Totals, options: StepOptions = StepOptions()
) -> tuple[TrainState, Totals]:
    """One optimizer step on a batch of uint8 images (augmented on the device as `options`
    say); rows with mask False contribute nothing. The EMA, if any, follows the step."""
    key = jax.random.fold_in(jax.random.key(options.seed), state.step)
    mixed = augment_batch(key, normalize(batch["image"]), batch["label"], batch["mask"],
                          options.augment)  # fmt: skip
    # Accuracy counts the label with the larger share of each (mixed) target.
    label = jnp.where(mixed.weight >= 0.5, mixed.label, mixed.partner)
    rows = {"image": mixed.images, "mixed": mixed._replace(images=None), "label": label,
            "mask": batch["mask"]}  # fmt: skip
    grads, batch_stats, step_totals = _gradients(state, rows, options)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    if options.ema is not None:
        weights = {"params": state.params, "batch_stats": state.batch_stats}
        state = state.replace(ema=maybe_update(state.ema, weights, state.step, options.ema))
    return state, {k: totals[k] + v for k, v in step_totals.items()}


def confusion_counts(
    labels: jax.Array, predictions: jax.Array, mask: jax.Array, n: int
) -> jax.Array:
    """counts[true, predicted] over the rows with mask True, as an (n, n) int32 matrix."""
    # A product of one-hot matrices contracts the batch axis, so on a sharded batch each device
    # counts its rows and XLA adds the partial matrices (an all-reduce), like the other sums.
    rows = jax.nn.one_hot(labels, n, dtype=jnp.int32) * mask[:, None].astype(jnp.int32)
    return rows.T @ jax.nn.one_hot(predictions, n, dtype=jnp.int32)


def top_k_correct(logits: jax.Array, labels: jax.Array, mask: jax.Array, k: int) -> jax.Array:
    """How many rows with mask True have their label among the k highest logits (all of them
    when there are fewer than k classes), as a float32 count."""
    _, top = jax.lax.top_k(logits, min(k, logits.shape[-1]))
    hit = jnp.any(top == labels[:, None], axis=-1) & mask
    return jnp.sum(hit, dtype=jnp.float32)


def mean_softmax_log(a: jax.Array, b: jax.Array) -> jax.Array:
    """log((softmax(a) + softmax(b)) / 2): the log-probabilities of two views averaged, finite
    even where a probability underflows; they stand in for logits (softmax gives the mean back)."""
    both = jnp.stack([jax.nn.log_softmax(a), jax.nn.log_softmax(b)])
    return jax.nn.logsumexp(both, axis=0) - jnp.log(2.0)


def eval_step(
    state: TrainState,
    batch: Batch,
    totals: Totals,
    transform: EvalTransform = IMAGENET_EVAL,
    flip: bool = False,
) -> Totals:
    """Add a batch's plain cross-entropy and correct predictions to the running totals (and its
    counts to the confusion matrix and top-5 hits, when `totals` has them). `transform` gives the
    normalisation; `flip`: score the mean softmax of each image and its mirror image."""
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    logits = eval_logits(state.apply_fn, variables, batch["image"], transform)
    if flip:
        mirrored = eval_logits(state.apply_fn, variables, batch["image"][:, :, ::-1], transform)
        logits = mean_softmax_log(logits, mirrored)
    new = _accumulate(totals, cross_entropy(logits, batch["label"]), logits, batch)
    if "top5" in totals:
        new["top5"] = totals["top5"] + top_k_correct(logits, batch["label"], batch["mask"], 5)
    if "confusion" in totals:
        n = totals["confusion"].shape[0]
        counts = confusion_counts(batch["label"], jnp.argmax(logits, -1), batch["mask"], n)
        new["confusion"] = totals["confusion"] + counts
    return new
