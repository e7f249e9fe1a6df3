"""Optimizers, learning-rate schedules and frozen stages, with torch's semantics.

Each registry below is what a `train.py` flag chooses from (`--optimizer`, `--schedule`,
`--freeze`); the flag's choices are read from it, so adding an entry adds the choice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from resnet_jax.models.resnet import FC_STAGE
from resnet_jax.runtime.errors import check_choice

__all__ = [
    "FREEZE", "OPTIMIZERS", "SCHEDULES", "frozen_stages", "make_optimizer", "make_schedule",
    "param_labels", "stage_of",
]  # fmt: skip

# --freeze -> ResNet.frozen_stages: "layerK" freezes the stem and layer1..layerK.
FREEZE = {"none": -1, "layer1": 1, "layer2": 2, "layer3": 3, "backbone": 4}

# name -> (learning rate, weight decay) -> transformation. Adam and SGD add the decay to the
# gradient (L2, as torch.optim.Adam and SGD do); AdamW decouples it.
OPTIMIZERS: dict[str, Callable[[optax.ScalarOrSchedule, float], optax.GradientTransformation]] = {
    "adam": lambda lr, wd: optax.chain(optax.add_decayed_weights(wd), optax.adam(lr)),
    "adamw": lambda lr, wd: optax.adamw(lr, weight_decay=wd),
    "sgd": lambda lr, wd: optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr, momentum=0.9)),
}

# name -> (peak lr, warmup steps, total steps) -> schedule after a linear warmup from 0.
SCHEDULES: dict[str, Callable[[float, int, int], optax.Schedule]] = {
    "constant": lambda lr, warmup, total: (
        optax.warmup_constant_schedule(0.0, lr, warmup) if warmup else optax.constant_schedule(lr)
    ),
    "cosine": lambda lr, warmup, total: optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup, max(total, 1)
    ),
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


def param_labels(params: Any, frozen_stages: int) -> Any:
    """A tree like `params` (Linen's dicts, or the nnx.State that nnx.Optimizer passes) with
    'frozen' or 'trained' at each leaf."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "frozen" if stage_of(path[0].key) <= frozen_stages else "trained", params
    )


def make_schedule(lr: float, schedule: str, warmup_steps: int, total_steps: int) -> optax.Schedule:
    """Constant or cosine-to-zero learning rate (`SCHEDULES`), after a linear warmup from 0."""
    check_choice("schedule", schedule, SCHEDULES)
    return SCHEDULES[schedule](lr, warmup_steps, total_steps)


def make_optimizer(
    name: str, learning_rate: optax.ScalarOrSchedule, weight_decay: float, frozen_stages: int = -1
) -> optax.GradientTransformation:
    """One of `OPTIMIZERS`; parameters of frozen stages go through `optax.set_to_zero`: no
    update, no weight decay and no optimizer state."""
    check_choice("optimizer", name, OPTIMIZERS)
    tx = OPTIMIZERS[name](learning_rate, weight_decay)
    if frozen_stages < 0:
        return tx
    return optax.multi_transform(
        {"trained": tx, "frozen": optax.set_to_zero()},
        lambda params: param_labels(params, frozen_stages),
    )
