"""The train state and the train and eval steps: pure functions of (state, batch, totals).

`parallel.DataParallel` compiles them for a device mesh. Metrics are summed on the device and
read back only when shown; validation also counts a confusion matrix there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from resnet_jax.models.preprocess import eval_logits, normalize
from resnet_jax.models.registry import IMAGENET_EVAL, EvalTransform

__all__ = [
    "Batch", "Totals", "TrainState", "confusion_counts", "create_state", "cross_entropy",
    "eval_step", "mean_softmax_log", "top_k_correct", "train_step", "zero_totals",
]  # fmt: skip

Batch = dict[str, jax.Array]
Totals = dict[str, jax.Array]


class TrainState(train_state.TrainState):
    """Flax's TrainState (step, params, optimizer state) plus the BatchNorm running statistics."""

    batch_stats: Any


def create_state(
    apply_fn: Callable, tx: optax.GradientTransformation, variables: Any
) -> TrainState:
    """Step 0 of training from {'params', 'batch_stats'}: the optimizer state is initialised."""
    return TrainState.create(
        apply_fn=apply_fn, params=variables["params"], tx=tx, batch_stats=variables["batch_stats"]
    )


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
    mask = batch["mask"]
    correct = (jnp.argmax(logits, -1) == batch["label"]) & mask
    return {
        "loss": totals["loss"] + jnp.sum(jnp.where(mask, losses, 0.0)),
        "correct": totals["correct"] + jnp.sum(correct, dtype=jnp.float32),
        "count": totals["count"] + jnp.sum(mask, dtype=jnp.float32),
    }


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example cross-entropy against (optionally smoothed) one-hot labels."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def train_step(
    state: TrainState, batch: Batch, totals: Totals, label_smoothing: float = 0.0
) -> tuple[TrainState, Totals]:
    """One optimizer step on a batch of uint8 images; rows with mask False contribute nothing."""
    images = normalize(batch["image"])
    mask = batch["mask"]

    def loss_fn(params):
        variables = {"params": params, "batch_stats": state.batch_stats}
        logits, updates = state.apply_fn(variables, images, train=True, mutable=["batch_stats"])
        losses = cross_entropy(logits, batch["label"], label_smoothing)
        loss = jnp.sum(jnp.where(mask, losses, 0.0)) / jnp.maximum(jnp.sum(mask), 1)
        return loss, (losses, logits, updates["batch_stats"])

    grads, (losses, logits, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    return state, _accumulate(totals, losses, logits, batch)


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
