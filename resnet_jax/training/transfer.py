"""Where training starts: random variables, or pretrained ones with a new head for our classes.

The original tutorial's transfer learning: load torchvision's ImageNet weights (or any weights
file), keep the backbone, and either replace the 1000-class `fc` by a fresh one of the data's
size (`head="replace"`), or keep the whole pretrained network, `fc` included, and append a fresh
Dense `head` on its logits (`head="append"`, the tutorial's third mode).
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from resnet_jax.models.factory import init_variables
from resnet_jax.models.resnet import APPENDED_FC_CLASSES, ResNet
from resnet_jax.models.scan import stack_blocks
from resnet_jax.runtime.errors import UserError
from resnet_jax.weights.download import pretrained_path
from resnet_jax.weights.io import load_variables
from resnet_jax.weights.torch_names import check_variables, head_of, num_classes_of

__all__ = ["initial_variables"]


def initial_variables(model: ResNet, arch: str, weights: str, seed: int) -> tuple[dict, str]:
    """Random variables, or pretrained ones ('imagenet' or a file) with a new head if needed.

    Returns the variables (NumPy float32, in the model's layout, `models/scan.py`) and a
    sentence saying what was loaded.
    """
    loaded = None
    if weights != "none":
        imagenet = weights == "imagenet"
        path = (
            pretrained_path(arch, progress=jax.process_index() == 0) if imagenet else Path(weights)
        )
        loaded = load_variables(path)
        check_variables(loaded, arch)  # a UserError naming what does not fit
        if (num_classes_of(loaded), head_of(loaded)) == (model.num_classes, model.head):
            return _float32(loaded, model), f"Loaded {path.name}."
    fresh = init_variables(model, jax.random.key(seed))  # host arrays, nothing compiled
    if loaded is None:
        return fresh, f"{arch} initialised at random (seed {seed})."
    params = {k: v for k, v in loaded["params"].items() if k not in ("fc", "head")}
    if model.head == "append":
        fc = loaded["params"].get("fc")
        if fc is None or np.shape(fc["bias"]) != (APPENDED_FC_CLASSES,):
            has = "no fc" if fc is None else f"a {np.shape(fc['bias'])[0]}-class fc"
            raise UserError(
                f"--head append keeps a pretrained {APPENDED_FC_CLASSES}-class fc, but {path} has "
                f"{has}; use --head replace, or weights with an ImageNet fc."
            )
        # The tutorial's third mode: the whole pretrained network, a new layer on its logits.
        params |= {"fc": fc, "head": fresh["params"]["head"]}
        new = f"a new {model.num_classes}-class head"
        if head_of(loaded) == "append":
            new = f"its {num_classes_of(loaded)}-class head replaced by {new}"
        else:
            new += " appended"
        message = f"Loaded {path.name}; its {APPENDED_FC_CLASSES}-class fc kept, {new}."
    else:
        # The original's head swap: keep the backbone, start a new classifier for our classes.
        params["fc"] = fresh["params"]["fc"]
        old = _describe_head(loaded)
        message = f"Loaded {path.name}; {old} replaced by a new {model.num_classes}-class head."
    return _float32({"params": params, "batch_stats": loaded["batch_stats"]}, model), message


def _describe_head(variables: dict) -> str:
    """'no head', 'its 1000-class head', or 'its 1000-class fc and 5-class head'."""
    params = variables["params"]
    if "fc" not in params:
        return "no head"
    fc = np.shape(params["fc"]["bias"])[0]
    if "head" not in params:
        return f"its {fc}-class head"
    return f"its {fc}-class fc and {num_classes_of(variables)}-class head"


def _float32(variables: dict, model: ResNet) -> dict:
    return jax.tree.map(lambda x: np.asarray(x, np.float32), stack_blocks(variables, model))
