"""The Linen ResNets as Flax NNX modules: one architecture (`resnet.py`), two APIs.

`create_nnx_model` wraps a Linen `resnet.ResNet` and its variables in `NnxResNet`, an
`nnx.Module` whose `nnx.Param` and `nnx.BatchStat` variables carry the Linen names
(`layer1_0/conv1/kernel`), so converted torchvision weights load as they are and
`to_linen_variables` gives them back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.traverse_util import flatten_dict, unflatten_dict

from resnet_jax.models import factory, resnet
from resnet_jax.models.scan import stack_blocks, unstack_blocks
from resnet_jax.models.variables import check_fits, expected_variables
from resnet_jax.runtime.errors import UserError

__all__ = ["COLLECTIONS", "NnxResNet", "create_nnx_model", "to_linen_variables"]

# Linen collection -> the NNX variable type that holds its arrays.
COLLECTIONS: dict[str, type[nnx.Variable]] = {"params": nnx.Param, "batch_stats": nnx.BatchStat}


class NnxResNet(nnx.Module):
    """A Linen ResNet and its variables as one stateful NNX module: NHWC images -> logits.

    Like a torch module and `nnx.BatchNorm`, it starts in train mode (batch statistics, the
    running ones updated as torch does); `eval()` switches to the running statistics.
    `create_nnx_model` checks the variables against the architecture; this constructor does not.
    """

    def __init__(self, linen: resnet.ResNet, variables: Mapping[str, Any]):
        self.linen = linen  # static: the architecture that __call__ applies
        self.use_running_average = False  # the attribute nnx.Module.eval() / train() set
        layers = {
            path: kind(jnp.asarray(value))
            for collection, kind in COLLECTIONS.items()
            for path, value in flatten_dict(variables[collection]).items()
        }
        for name, tree in unflatten_dict(layers).items():  # conv1, bn1, layer1_0, ..., fc
            setattr(self, name, nnx.data(tree))

    def __call__(self, x: jax.Array) -> jax.Array:
        variables = to_linen_variables(self)
        if self.use_running_average:
            return self.linen.apply(variables, x, train=False)
        logits, updates = self.linen.apply(variables, x, train=True, mutable=["batch_stats"])
        nnx.update(self, updates["batch_stats"])  # the running statistics, by their Linen paths
        return logits


def to_linen_variables(model: NnxResNet) -> dict[str, Any]:
    """The model's {'params', 'batch_stats'} as Linen holds them (for `save_variables`)."""
    return {c: nnx.to_pure_dict(nnx.state(model, kind)) for c, kind in COLLECTIONS.items()}


def create_nnx_model(
    arch: str,
    *,
    num_classes: int | None = None,
    rngs: nnx.Rngs | None = None,
    variables: Mapping[str, Any] | None = None,
    **fields: Any,
) -> NnxResNet:
    """The `NnxResNet` of `factory.create_model(arch, num_classes=..., **fields)` (default: the
    architecture's number of classes), holding `variables` ({'params', 'batch_stats'}, e.g.
    from `load_variables`) or fresh ones from `rngs` (default `nnx.Rngs(0)`)."""
    if num_classes is not None:
        fields["num_classes"] = num_classes
    linen = factory.create_model(arch, **fields)
    if variables is None:
        key = (rngs if rngs is not None else nnx.Rngs(0)).params()
        return NnxResNet(linen, factory.init_variables(linen, key))
    return NnxResNet(linen, _fitted(linen, arch, variables))


def _fitted(linen: resnet.ResNet, arch: str, variables: Any) -> dict[str, Any]:
    """`variables` in the model's dtypes, or a UserError naming what does not fit."""
    model = f"{arch} (num_classes={linen.num_classes}, head={linen.head!r})"
    if not isinstance(variables, Mapping) or not set(COLLECTIONS) <= set(variables):
        raise UserError(
            f"variables= must be a dict with 'params' and 'batch_stats' for {model}, "
            "as resnet_jax.load_variables returns."
        )
    # Compared in torchvision's layout, one entry per block, whichever the model and file use.
    have = flatten_dict(unstack_blocks({c: dict(variables[c]) for c in COLLECTIONS}))
    want = expected_variables(linen)
    check_fits(
        unflatten_dict(have), want, f"These variables do not fit {model}",
        advice="pass the arch, num_classes and head they were made with",
    )  # fmt: skip
    fitted = unflatten_dict({p: np.asarray(have[p], want[p].dtype) for p in want})
    return jax.tree.map(jnp.asarray, stack_blocks(fitted, linen))
