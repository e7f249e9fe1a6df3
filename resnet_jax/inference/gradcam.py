"""Grad-CAM: where in an image a ResNet finds its top class (Selvaraju et al., 2017).

For each image, with A the feature map of the last stage (layer4; layer3 in the CIFAR ResNets),
(h, w, C), and y the logit of the top class: the channel weights are the gradients dy/dA
averaged over the positions, and the map is ReLU(sum_c w_c A_c), scaled to a maximum of 1. The
gradient comes from `jax.grad` with respect to a zero array added to that stage's output
(through `flax.linen.intercept_methods`), so the model runs unchanged, as in prediction, and
only the part after it (pooling, fc, an appended head) is differentiated.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnet_jax.models.preprocess import eval_logits
from resnet_jax.models.registry import IMAGENET_EVAL, EvalTransform
from resnet_jax.models.resnet import ResNet

__all__ = ["gradcam", "last_stage_name", "upsample"]


def last_stage_name(model: ResNet) -> str:
    """The name of the last stage (`resnet.Stage`), whose output is the feature map: `layer4`,
    or `layer3` in the CIFAR ResNets."""
    return f"layer{len(model.layers)}"


def _shift_output(name: str, shift: jax.Array, seen: list[jax.Array]) -> Callable:
    """A method interceptor that adds `shift` to the output of the submodule `name` and keeps
    that output (before the shift) in `seen`."""

    def interceptor(call: Callable, args: Any, kwargs: Any, context: Any) -> Any:
        out = call(*args, **kwargs)
        if context.module.name != name or context.method_name != "__call__":
            return out
        seen.append(out)
        return out + shift.astype(out.dtype)

    return interceptor


def gradcam(
    model: ResNet, variables: dict, images: jax.Array, transform: EvalTransform = IMAGENET_EVAL
) -> tuple[jax.Array, jax.Array]:
    """Eval-transformed uint8 NHWC images (as `data.Loader(train=False)` makes them) ->
    (probabilities (N, classes), the top class's Grad-CAM maps (N, h, w) in [0, 1]). Jit it."""
    name = last_stage_name(model)
    trunk = model.clone(include_top=False)
    feature_map = jax.eval_shape(
        partial(eval_logits, trunk.apply, transform=transform), variables, images
    )

    def top_logits(shift: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        seen: list[jax.Array] = []
        with nn.intercept_methods(_shift_output(name, shift, seen)):
            logits = eval_logits(model.apply, variables, images, transform)
        top = jnp.argmax(logits, axis=-1)
        # Images are independent in eval mode: the gradient of the sum is each image's own.
        total = jnp.sum(jnp.take_along_axis(logits, top[:, None], axis=-1))
        return total, (logits, seen[0])

    zero = jnp.zeros(feature_map.shape, jnp.float32)
    grads, (logits, features) = jax.grad(top_logits, has_aux=True)(zero)
    weights = jnp.mean(grads, axis=(1, 2))  # (N, C)
    maps = jax.nn.relu(jnp.einsum("nhwc,nc->nhw", features.astype(jnp.float32), weights))
    peak = jnp.max(maps, axis=(1, 2), keepdims=True)
    maps = maps / jnp.where(peak > 0, peak, 1.0)  # an all-zero map stays zero
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1), maps


def upsample(cam: jax.Array, size: int) -> jax.Array:
    """An (h, w) map bilinearly resized to (size, size), the eval crop the model saw."""
    return jax.image.resize(jnp.asarray(cam, jnp.float32), (size, size), method="bilinear")
