"""What a model sees: uint8 images normalised on the device, and the eval logits that validation,
prediction, evaluation and Grad-CAM all compute the same way.

JAX is imported only for JAX input, so that data-loading processes can normalise on the host
without it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from resnet_jax.models.registry import IMAGENET_EVAL, EvalTransform

if TYPE_CHECKING:
    import jax

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "eval_logits", "normalize"]

IMAGENET_MEAN = IMAGENET_EVAL.mean
IMAGENET_STD = IMAGENET_EVAL.std


# uint8 has only 256 values, so normalising is a lookup. Unlike `x / 255` this stays exact inside
# jax.jit, where XLA rewrites division by a constant as a multiplication by its reciprocal.
@functools.cache
def _normalize_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """torchvision's float32 ToTensor + Normalize result for every uint8 value: shape (256, 3)."""
    mean_ = np.asarray(mean, dtype=np.float32)  # Normalize casts to the tensor's dtype
    std_ = np.asarray(std, dtype=np.float32)
    table = (np.arange(256, dtype=np.float32)[:, None] / 255 - mean_) / std_
    table.flags.writeable = False  # shared by every call
    return table


_CHANNELS = np.arange(3)


def normalize(
    x: Any,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> Any:
    """uint8 HWC/NHWC (NumPy or JAX, also inside jit) -> float32, bit-equal to ToTensor +
    Normalize(mean, std)."""
    if x.dtype != np.uint8 or x.shape[-1] != 3:
        raise TypeError(
            f"normalize expects uint8 images with 3 channels last, got {x.dtype} "
            f"with shape {tuple(x.shape)}."
        )
    table = _normalize_table(tuple(map(float, mean)), tuple(map(float, std)))
    if isinstance(x, np.ndarray):
        return table[x, _CHANNELS]
    import jax.numpy as jnp  # only for JAX input, so data-loading processes never import JAX

    # A fresh jnp index, not _CHANNELS: JAX caches a NumPy constant's conversion, and an int32
    # copy made before `jax.enable_x64` breaks indexing inside it (TypeError int32 vs int64).
    return jnp.asarray(table)[x, jnp.arange(3)]


def eval_logits(
    apply_fn: Callable, variables: Any, images: jax.Array, transform: EvalTransform = IMAGENET_EVAL
) -> jax.Array:
    """Logits of eval-transformed uint8 images (`data.loader.Loader(train=False)`'s batches),
    normalised here with the transform's mean and std. Validation (`eval_step`) and prediction
    (`inference.predictor.Predictor`) both call this, so they cannot drift apart."""
    return apply_fn(variables, normalize(images, transform.mean, transform.std), train=False)
