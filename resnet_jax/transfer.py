"""Where training starts: random variables, or pretrained ones with a new head for our classes.

The original tutorial's transfer learning: load torchvision's ImageNet weights (or any weights
file), keep the backbone, and replace the 1000-class `fc` by a fresh one of the data's size.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from resnet_jax.convert import check_variables, num_classes_of
from resnet_jax.models import ResNet, init_variables
from resnet_jax.weights import load_variables, pretrained_path

__all__ = ["initial_variables"]


def initial_variables(model: ResNet, arch: str, weights: str, seed: int) -> tuple[dict, str]:
    """Random variables, or pretrained ones ('imagenet' or a file) with a new head if needed.

    Returns the variables (NumPy float32) and a sentence saying what was loaded.
    """
    loaded = None
    if weights != "none":
        imagenet = weights == "imagenet"
        path = (
            pretrained_path(arch, progress=jax.process_index() == 0) if imagenet else Path(weights)
        )
        loaded = load_variables(path)
        check_variables(loaded, arch)  # a UserError naming what does not fit
        if num_classes_of(loaded) == model.num_classes:
            return jax.tree.map(lambda x: np.asarray(x, np.float32), loaded), f"Loaded {path.name}."
    fresh = jax.jit(lambda key: init_variables(model, key))(jax.random.key(seed))
    fresh = jax.tree.map(np.asarray, fresh)
    if loaded is None:
        return fresh, f"{arch} initialised at random (seed {seed})."
    # The original's head swap: keep the backbone, start a new classifier for our classes.
    head = num_classes_of(loaded)
    old = "no head" if head is None else f"its {head}-class head"
    variables = {
        "params": {**loaded["params"], "fc": fresh["params"]["fc"]},
        "batch_stats": loaded["batch_stats"],
    }
    message = f"Loaded {path.name}; {old} replaced by a new {model.num_classes}-class head."
    return jax.tree.map(lambda x: np.asarray(x, np.float32), variables), message
