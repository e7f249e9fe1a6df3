"""Optimizers, learning-rate schedules, weight-decay groups and frozen stages, with torch's
semantics.

Each registry below is what a `train.py` flag chooses from (`--optimizer`, `--schedule`,
`--warmup-method`, `--freeze`); the flag's choices are read from it, so adding an entry adds
the choice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from resnet_jax.models.resnet import FC_STAGE
from resnet_jax.runtime.errors import check_choice
from resnet_jax.training import fused_adam

__all__ = [
    "FREEZE", "OPTIMIZERS", "SCHEDULES", "WARMUPS", "frozen_stages", "make_optimizer",
    "make_schedule", "param_labels", "stage_of",
]  # fmt: skip

# --freeze -> ResNet.frozen_stages: "layerK" freezes the stem and layer1..layerK.
FREEZE = {"none": -1, "layer1": 1, "layer2": 2, "layer3": 3, "backbone": 4}

MOMENTUM = 0.9  # torch.optim.SGD's momentum in torchvision's recipes and the ResNet paper

# name -> (learning rate, weight decay) -> transformation. Adam and SGD add the decay to the
# gradient (L2, as torch.optim.Adam and SGD do); AdamW decouples it. Adam and AdamW are optax's,
# with their update in one call of the CPU extension where it is built (`fused_adam`).
OPTIMIZERS: dict[str, Callable[[optax.ScalarOrSchedule, float], optax.GradientTransformation]] = {
    "adam": fused_adam.adam,
    "adamw": fused_adam.adamw,
    "sgd": lambda lr, wd: optax.chain(
        optax.add_decayed_weights(wd), optax.sgd(lr, momentum=MOMENTUM)
    ),
    "sgd-nesterov": lambda lr, wd: optax.chain(
        optax.add_decayed_weights(wd), optax.sgd(lr, momentum=MOMENTUM, nesterov=True)
    ),
}

# --schedule: the learning rate after the warm-up, as a function of the optimizer step.
SCHEDULES = {
    "constant": "the peak learning rate throughout",
    "cosine": "a cosine decay from the peak to 0 at the last step, starting after the warm-up "
    "(torch's CosineAnnealingLR after the warm-up, as torchvision's recipes chain them)",
    "step": "multiplied by --lr-gamma every --lr-step-size (torch's StepLR)",
    "multistep": "multiplied by --lr-gamma at each of --lr-milestones (torch's MultiStepLR)",
}

# --warmup-method: the factor on the learning rate during the warm-up (torch's LinearLR and
# ConstantLR with start_factor / factor = --warmup-factor).
WARMUPS = {
    "linear": "from --warmup-factor times the peak up to the peak, linearly",
    "constant": "--warmup-factor times the peak, then the schedule",
}


def frozen_stages(freeze: str, head: str = "replace") -> int:
    """`ResNet.frozen_stages` for `--freeze`; with `--head append`, "backbone" freezes the
    pretrained fc too, so that only the appended layer trains."""
    check_choice("freeze", freeze, FREEZE)
    return FC_STAGE if (freeze, head) == ("backbone", "append") else FREEZE[freeze]


def stage_of(module: str) -> int:
    """The stage a top-level module belongs to: 0 stem, 1-4 layer1-layer4, 5 fc, 6 an
    appended head."""
    if module in ("conv1", "bn1"):
        return 0
    if module.startswith("layer"):
        return int(module[len("layer")])
    return FC_STAGE if module == "fc" else FC_STAGE + 1


def _names(path: tuple) -> tuple[str, ...]:
    # Linen's dicts give DictKeys only; an nnx.State adds a trailing GetAttrKey('value').
    return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def param_labels(
    params: Any, frozen_stages: int, *, split_norm: bool = False, split_bias: bool = False
) -> Any:
    """A tree like `params` (Linen's dicts, or the nnx.State that nnx.Optimizer passes) with
    the group of each leaf: 'frozen', 'norm' (BatchNorm scale and bias, with `split_norm`),
    'bias' (every bias, with `split_bias`; it wins over 'norm' as in torchvision's
    `set_weight_decay`) or 'trained'."""
    leaves = [_names(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
    norm_modules = {names[:-1] for names in leaves if names[-1] == "scale"}  # only BatchNorm

    def label(path: tuple, _: Any) -> str:
        names = _names(path)
        if stage_of(names[0]) <= frozen_stages:
            return "frozen"
        if split_bias and names[-1] == "bias":
            return "bias"
        if split_norm and names[:-1] in norm_modules:
            return "norm"
        return "trained"

    return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(
    name: str,
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: float,
    frozen_stages: int = -1,
    *,
    norm_weight_decay: float | None = None,
    bias_weight_decay: float | None = None,
) -> optax.GradientTransformation:
    """One of `OPTIMIZERS`, with torch's parameter groups: BatchNorm parameters decay by
    `norm_weight_decay` and biases by `bias_weight_decay` where given (else `weight_decay`);
    parameters of frozen stages go through `optax.set_to_zero`: no update, no weight decay and
    no optimizer state."""
    check_choice("optimizer", name, OPTIMIZERS)
    groups = {"trained": weight_decay, "norm": norm_weight_decay, "bias": bias_weight_decay}
    if frozen_stages < 0 and norm_weight_decay is None and bias_weight_decay is None:
        return OPTIMIZERS[name](learning_rate, weight_decay)
    transforms = {g: OPTIMIZERS[name](learning_rate, d) for g, d in groups.items() if d is not None}
    labels = {
        "frozen_stages": frozen_stages,
        "split_norm": norm_weight_decay is not None,
        "split_bias": bias_weight_decay is not None,
    }
    return optax.multi_transform(
        {**transforms, "frozen": optax.set_to_zero()},
        lambda params: param_labels(params, **labels),
    )


def _decay_factor(
    schedule: str, step: jax.Array, step_size: int, milestones: Sequence[int], gamma: float
) -> jax.Array:
    """gamma ** (how many decays `step` has passed): every `step_size` steps for "step", at
    each of `milestones` for "multistep", never otherwise."""
    if schedule == "step":
        passed = step // step_size
    elif schedule == "multistep":
        passed = sum((step >= m).astype(jnp.int32) for m in milestones)
    else:
        return jnp.ones((), jnp.float32)
    return jnp.asarray(gamma, jnp.float32) ** passed


def make_schedule(
    lr: float,
    schedule: str,
    warmup_steps: int,
    total_steps: int,
    *,
    step_size: int = 0,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    warmup_method: str = "linear",
    warmup_factor: float = 0.0,
) -> optax.Schedule:
    """The learning rate of optimizer step 0, 1, ... (`SCHEDULES`, `WARMUPS`).

    The warm-up multiplies the schedule by its factor over the first `warmup_steps` steps.
    "step" and "multistep" count their decays from step 0 (torch's ChainedScheduler of the
    warm-up and MultiStepLR, as the ResNet paper's 400-step warm-up at lr/10 sits inside its
    first 32k steps); "cosine" starts after the warm-up and reaches 0 at `total_steps`.
    """
    check_choice("schedule", schedule, SCHEDULES)
    check_choice("warmup-method", warmup_method, WARMUPS)
    cosine_steps = max(total_steps - warmup_steps, 1)

    def learning_rate(count: jax.Array) -> jax.Array:
        step = jnp.asarray(count, jnp.int32)
        if not warmup_steps:
            warm = 1.0
        elif warmup_method == "linear":
            progress = jnp.minimum(step, warmup_steps) / warmup_steps
            warm = warmup_factor + (1.0 - warmup_factor) * progress
        else:
            warm = jnp.where(step < warmup_steps, warmup_factor, 1.0)
        value = lr * _decay_factor(schedule, step, step_size, milestones, gamma)
        if schedule == "cosine":
            t = jnp.clip(step - warmup_steps, 0, cosine_steps) / cosine_steps
            value = lr * 0.5 * (1.0 + jnp.cos(jnp.pi * t))
        return (value * warm).astype(jnp.float32)

    return learning_rate
