"""Fresh variables without compiling the model: shapes from `jax.eval_shape`, values drawn on the
host with torchvision's initialisers.

`jax.jit(model.init)` compiles a graph as large as the model (with a random generator per
variable), which takes far longer than the draws themselves; NumPy needs no compilation.
"""

from __future__ import annotations

import zlib
from functools import partial
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from resnet_jax.models.layers import conv_std, linear_bound
from resnet_jax.models.scan import stack_blocks

if TYPE_CHECKING:
    from resnet_jax.models.resnet import ResNet

__all__ = ["init_variables", "variable_shapes"]


def variable_shapes(model: ResNet, image_size: int = 32) -> dict:
    """{'params', 'batch_stats'} of `model` as `jax.ShapeDtypeStruct`s, traced, not compiled
    (the shapes do not depend on the image size)."""
    return stack_blocks(_block_shapes(model, image_size), model)


def _block_shapes(model: ResNet, image_size: int) -> dict:
    """`variable_shapes` with one entry per block (torchvision's layout). A stage's blocks after
    its first all have the shapes of its second, so only the first two of each are traced."""
    short = model.clone(layers=tuple(min(depth, 2) for depth in model.layers), scan=False)
    image = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    shapes = jax.eval_shape(partial(short.init, train=False), jax.random.key(0), image)
    out = {}
    for collection, tree in shapes.items():
        out[collection] = dict(tree)
        for stage, depth in enumerate(model.layers, start=1):
            for i in range(2, depth):
                out[collection][f"layer{stage}_{i}"] = tree[f"layer{stage}_1"]
    return out


def init_variables(model: ResNet, key: jax.Array | None = None, image_size: int = 32) -> dict:
    """Fresh {'params', 'batch_stats'} in `model`'s layout (NumPy arrays), as torchvision
    initialises them: convs kaiming normal (fan_out), BatchNorm scale 1 and bias 0 (scale 0
    for a block's last with `zero_init_residual`), fc and head torch's Linear init, running
    mean 0 and variance 1. Each variable's values are seeded by `key` and its torchvision
    name, so a scanned and an unscanned model start alike. Call it outside `jax.jit`."""
    key = jax.random.key(0) if key is None else key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    seed = [int(word) for word in np.asarray(key, np.uint32).ravel()]
    shapes = flatten_dict(_block_shapes(model, image_size))
    last_norms = _last_norms(shapes) if model.zero_init_residual else set()
    values = {}
    for path, shape in shapes.items():
        rng = np.random.default_rng([*seed, zlib.crc32("/".join(path).encode())])
        values[path] = _initial_value(rng, path, shape, shapes, path[1:-1] in last_norms)
    return stack_blocks(unflatten_dict(values), model)


def _last_norms(shapes: dict) -> set[tuple[str, ...]]:
    """(block, 'bnN') of each block's last BatchNorm, the one `zero_init_residual` zeroes."""
    norms: dict[str, str] = {}
    for _, block, name, *_ in (p for p in shapes if p[0] == "params" and len(p) == 4):
        if block.startswith("layer") and name.startswith("bn"):
            norms[block] = max(norms.get(block, name), name, key=lambda n: int(n[2:]))
    return {(block, name) for block, name in norms.items()}


def _initial_value(
    rng: np.random.Generator, path: tuple, shape: jax.ShapeDtypeStruct, shapes: dict, zero: bool
) -> np.ndarray:
    """The initial value of the variable at `path` (`shapes`: all of them, for a Dense layer's
    fan-in); the initialisers are those of `layers.py` and `resnet.py`."""
    dtype, leaf = np.dtype(shape.dtype), path[-1]
    kernel = shapes.get((*path[:-1], "kernel"))
    if kernel is not None and len(kernel.shape) == 2:  # fc or head: torch.nn.Linear
        bound = linear_bound(kernel.shape[0])
        return (rng.random(shape.shape, dtype) * 2 - 1) * dtype.type(bound)
    if leaf == "kernel":
        return rng.standard_normal(shape.shape, dtype) * dtype.type(conv_std(shape.shape))
    ones = leaf == "var" or (leaf == "scale" and not zero)
    return (np.ones if ones else np.zeros)(shape.shape, dtype)
