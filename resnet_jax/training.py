"""The train state, its starting variables, the optimizer, and the train and eval steps.

The steps are plain functions of (state, batch, totals); `parallel.DataParallel` compiles them
for a device mesh. Metrics are summed on the device and read back only when shown.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from flax.training import train_state

from resnet_jax.convert import check_variables, num_classes_of
from resnet_jax.errors import UserError
from resnet_jax.models import ResNet
from resnet_jax.transforms import normalize

Batch = dict[str, jax.Array]
Totals = dict[str, jax.Array]

# --freeze -> ResNet.frozen_stages: "layerK" freezes the stem and layer1..layerK.
FREEZE = {"none": -1, "layer1": 1, "layer2": 2, "layer3": 3, "backbone": 4}


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


# ---------------------------------------------------------------------------------------------
# Optimizer


def stage_of(module: str) -> int:
    """The stage a top-level module belongs to: 0 stem, 1-4 layer1-layer4, 5 the head."""
    if module in ("conv1", "bn1"):
        return 0
    if module.startswith("layer"):
        return int(module[len("layer")])
    return 5


def param_labels(params: Any, frozen_stages: int) -> Any:
    """A tree like `params` with 'frozen' or 'trained' at each leaf."""
    return traverse_util.path_aware_map(
        lambda path, _: "frozen" if stage_of(path[0]) <= frozen_stages else "trained", params
    )


def make_schedule(lr: float, schedule: str, warmup_steps: int, total_steps: int) -> optax.Schedule:
    """Constant or cosine-to-zero learning rate, after a linear warmup from 0."""
    if schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps, max(total_steps, 1))
    if schedule == "constant":
        return (
            optax.warmup_constant_schedule(0.0, lr, warmup_steps)
            if warmup_steps
            else optax.constant_schedule(lr)
        )
    raise UserError(f"Unknown schedule '{schedule}'; choose constant or cosine.")


def make_optimizer(
    name: str, learning_rate: optax.ScalarOrSchedule, weight_decay: float, frozen_stages: int = -1
) -> optax.GradientTransformation:
    """torch's Adam (L2 added to the gradient), AdamW (decoupled decay) or SGD with momentum 0.9.

    Parameters of frozen stages go through `optax.set_to_zero`: no update, no weight decay and
    no optimizer state.
    """
    if name == "adam":
        tx = optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(learning_rate))
    elif name == "adamw":
        tx = optax.adamw(learning_rate, weight_decay=weight_decay)
    elif name == "sgd":
        tx = optax.chain(
            optax.add_decayed_weights(weight_decay), optax.sgd(learning_rate, momentum=0.9)
        )
    else:
        raise UserError(f"Unknown optimizer '{name}'; choose adam, adamw or sgd.")
    if frozen_stages < 0:
        return tx
    return optax.multi_transform(
        {"trained": tx, "frozen": optax.set_to_zero()},
        lambda params: param_labels(params, frozen_stages),
    )


# ---------------------------------------------------------------------------------------------
# Steps


def zero_totals() -> Totals:
    """Running sums of one epoch, kept on the device: summed loss, correct predictions, examples."""
    return {
        "loss": jnp.zeros((), jnp.float32),
        "correct": jnp.zeros((), jnp.float32),
        "count": jnp.zeros((), jnp.float32),
    }


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


def eval_step(state: TrainState, batch: Batch, totals: Totals) -> Totals:
    """Add a batch's plain cross-entropy and correct predictions to the running totals."""
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    logits = state.apply_fn(variables, normalize(batch["image"]), train=False)
    return _accumulate(totals, cross_entropy(logits, batch["label"]), logits, batch)


# ---------------------------------------------------------------------------------------------
# Starting point


def initial_variables(model: ResNet, arch: str, weights: str, seed: int) -> tuple[dict, str]:
    """Random variables, or pretrained ones ('imagenet' or a file) with a new head if needed.

    Returns the variables (NumPy float32) and a sentence saying what was loaded.
    """
    loaded = None
    if weights != "none":
        from resnet_jax.weights import load_variables, pretrained_path

        imagenet = weights == "imagenet"
        path = (
            pretrained_path(arch, progress=jax.process_index() == 0) if imagenet else Path(weights)
        )
        loaded = load_variables(path)
        check_variables(loaded, arch)  # a UserError naming what does not fit
        if num_classes_of(loaded) == model.num_classes:
            return jax.tree.map(lambda x: np.asarray(x, np.float32), loaded), f"Loaded {path.name}."
    fresh = jax.jit(model.init, static_argnames="train")(
        jax.random.key(seed), jnp.zeros((1, 32, 32, 3)), train=False
    )
    fresh = jax.tree.map(np.asarray, fresh)
    if loaded is None:
        return fresh, f"{arch} initialised at random (seed {seed})."
    # The seed's head swap: keep the backbone, start a new classifier for our classes.
    head = num_classes_of(loaded)
    old = "no head" if head is None else f"its {head}-class head"
    variables = {
        "params": {**loaded["params"], "fc": fresh["params"]["fc"]},
        "batch_stats": loaded["batch_stats"],
    }
    message = f"Loaded {path.name}; {old} replaced by a new {model.num_classes}-class head."
    return jax.tree.map(lambda x: np.asarray(x, np.float32), variables), message
