"""The ResNet/ResNeXt trunk as a Flax Linen module, numerically equal to torchvision's models.

Layout is torchvision's (ResNet v1.5: the stride of a bottleneck sits on its 3x3 conv), images
are NHWC, and parameter names follow torchvision (`layer1_0/conv1` is `layer1.0.conv1`) so
that converting weights is a plain name table (see `weights/torch_names.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from resnet_jax.models.blocks import ModuleDef, ResidualBlock
from resnet_jax.models.layers import BatchNorm, Conv, Dtype, storage_dtype, torch_linear_init
from resnet_jax.ops.xla import max_pool

__all__ = ["APPENDED_FC_CLASSES", "FC_STAGE", "HEADS", "ResNet", "pooled_features"]

# How the classifier sits on the pooled features (`ResNet.head`), the two transfer modes.
HEADS = {
    "replace": "fc maps the pooled features to num_classes",
    "append": "the pretrained 1000-class fc stays whole; a new Dense `head` maps its logits to "
    "num_classes",
}
APPENDED_FC_CLASSES = 1000  # with head="append", fc is the ImageNet classifier
FC_STAGE = 5  # `frozen_stages=FC_STAGE` also freezes fc (only an appended head then trains)


class ResNet(nn.Module):
    """The ResNet/ResNeXt trunk: stem, four stages (`layer1`..`layer4`), pooling and `fc`.

    `head` (see `HEADS`): "replace", `fc` has `num_classes` outputs; "append", `fc` keeps
    `APPENDED_FC_CLASSES` and a Dense `head` on its logits has `num_classes`.
    `frozen_stages` (-1: none, 0: the stem, k: the stem and layer1..layerk, `FC_STAGE`: fc too)
    makes those parts use their running BatchNorm statistics even when `train=True` and stops
    gradients at their output, as transfer learning with a frozen backbone wants.
    """

    block: type[ResidualBlock]
    layers: Sequence[int]
    num_classes: int = 1000
    include_top: bool = True
    groups: int = 1
    width_per_group: int = 64
    zero_init_residual: bool = False
    frozen_stages: int = -1
    dtype: Dtype = jnp.float32
    head: str = "replace"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """NHWC images -> logits (float32; float64 for float64 compute), or the layer4 feature
        map if `include_top=False`."""
        conv = partial(Conv, dtype=self.dtype)

        def norm(stage: int) -> ModuleDef:
            frozen = stage <= self.frozen_stages
            return partial(BatchNorm, use_running_average=frozen or not train, dtype=self.dtype)

        def end_of_stage(x: jax.Array, stage: int) -> jax.Array:
            return lax.stop_gradient(x) if train and stage == self.frozen_stages else x

        x = conv(64, 7, 2, padding=3, name="conv1")(x)
        x = nn.relu(norm(0)(name="bn1")(x))
        x = max_pool(x, 3, 2, 1)
        x = end_of_stage(x, 0)

        in_features = 64
        for stage, (planes, depth) in enumerate(zip((64, 128, 256, 512), self.layers), start=1):
            for i in range(depth):
                strides = 2 if stage > 1 and i == 0 else 1
                out_features = planes * self.block.expansion
                x = self.block(
                    planes,
                    strides,
                    downsample=strides != 1 or in_features != out_features,
                    conv=conv,
                    norm=norm(stage),
                    groups=self.groups,
                    width_per_group=self.width_per_group,
                    zero_init_residual=self.zero_init_residual,
                    name=f"layer{stage}_{i}",
                )(x)
                in_features = out_features
            x = end_of_stage(x, stage)

        if not self.include_top:
            return x
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, not {self.head!r}.")
        x = jnp.mean(x, axis=(1, 2))

        def dense(x: jax.Array, features: int, name: str) -> jax.Array:
            init = torch_linear_init(x.shape[-1])
            return nn.Dense(features, dtype=self.dtype, param_dtype=storage_dtype(self.dtype),
                            kernel_init=init, bias_init=init, name=name)(x)  # fmt: skip

        if self.head == "append":
            x = end_of_stage(dense(x, APPENDED_FC_CLASSES, "fc"), FC_STAGE)
            x = dense(x, self.num_classes, "head")
        else:
            x = dense(x, self.num_classes, "fc")
        return x.astype(storage_dtype(self.dtype))


def pooled_features(model: ResNet, variables: dict, x: jax.Array) -> jax.Array:
    """Global-average-pooled layer4 features, (N, 512) or (N, 2048): the input of `fc`."""
    trunk = model.clone(include_top=False)
    features = jnp.mean(trunk.apply(variables, x, train=False), axis=(1, 2))
    return features.astype(storage_dtype(model.dtype))
