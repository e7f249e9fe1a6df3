"""The ResNet/ResNeXt trunk as a Flax Linen module, numerically equal to torchvision's models and
to the paper's CIFAR-10 networks.

Layout is torchvision's (ResNet v1.5: the stride of a bottleneck sits on its 3x3 conv), images
are NHWC, and parameter names follow torchvision (`layer1_0/conv1` is `layer1.0.conv1`) so
that converting weights is a plain name table (see `weights/torch_names.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from resnet_jax.models.blocks import ModuleDef, ResidualBlock
from resnet_jax.models.layers import BatchNorm, Conv, Dtype, storage_dtype, torch_linear_init
from resnet_jax.models.scan import scan_name, scanned_stages
from resnet_jax.ops import extension
from resnet_jax.ops.xla import max_pool

__all__ = [
    "APPENDED_FC_CLASSES", "FC_STAGE", "HEADS", "SHORTCUT_OPTIONS", "STEMS", "ResNet", "Stage",
    "pooled_features",
]  # fmt: skip

# How the classifier sits on the pooled features (`ResNet.head`), the two transfer modes.
HEADS = {
    "replace": "fc maps the pooled features to num_classes",
    "append": "the pretrained 1000-class fc stays whole; a new Dense `head` maps its logits to "
    "num_classes",
}
APPENDED_FC_CLASSES = 1000  # with head="append", fc is the ImageNet classifier
FC_STAGE = 5  # `frozen_stages=FC_STAGE` also freezes fc (only an appended head then trains)
# What comes before layer1 (`ResNet.stem`); its conv has planes[0] channels.
STEMS = {
    "imagenet": "7x7 conv stride 2, BatchNorm, ReLU, 3x3 max pool stride 2 (torchvision)",
    "cifar": "3x3 conv stride 1, BatchNorm, ReLU (the paper's CIFAR-10 networks)",
}
# The paper's shortcut options (`ResNet.shortcut`) -> the `blocks.SHORTCUTS` entry of a block
# that changes the shape; the other blocks add the identity.
SHORTCUT_OPTIONS = {"A": "pad", "B": "projection"}


class Stage(nn.Module):
    """One stage (torchvision's `layerK`): `depth` blocks, the first with the stage's stride and
    shortcut. It shares the trunk's variables, so its blocks are `layerK_0`, `layerK_1`, ...
    (with `scanned`, the blocks after the first are one under `lax.scan`: `layerK_scan`, see
    `scan.py`). Grad-CAM hooks its output."""

    block: ModuleDef  # the block with everything but `strides`, `shortcut` and `name`
    depth: int
    strides: int
    shortcut: str  # the first block's (`blocks.SHORTCUTS`); the others keep the shape
    repeated_shortcut: str  # "identity", or "none" in a plain network
    stage: int  # 1 for layer1
    scanned: bool = False
    unroll: bool = False  # the scanned blocks as straight-line code (the same variables)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        prefix = f"layer{self.stage}"
        x = self.block(strides=self.strides, shortcut=self.shortcut, name=f"{prefix}_0")(x)
        repeated = partial(self.block, strides=1, shortcut=self.repeated_shortcut)
        if not self.scanned:
            for i in range(1, self.depth):
                x = repeated(name=f"{prefix}_{i}")(x)
            return x
        scan = nn.scan(
            lambda block, x, _: (block(x), None),
            variable_axes={True: 0},  # every collection stacked, one entry per block
            split_rngs={"params": True},
            length=self.depth - 1,
            unroll=self.depth - 1 if self.unroll else 1,
        )
        return scan(repeated(name=scan_name(self.stage)), x, None)[0]


class ResNet(nn.Module):
    """The ResNet/ResNeXt trunk: stem, stages (`layer1`, `layer2`, ...), pooling and `fc`.

    `planes` are the stages' widths and `layers` their depths; `stem` is one of `STEMS`;
    `shortcut` the paper's option where a block changes the shape (`SHORTCUT_OPTIONS`: "B"
    projection, torchvision's, or "A" zero-padding); `residual=False` drops every shortcut (the
    paper's plain networks). `head` (see `HEADS`): "replace", `fc` has `num_classes` outputs;
    "append", `fc` keeps `APPENDED_FC_CLASSES` and a Dense `head` on its logits has `num_classes`.
    `frozen_stages` (-1: none, 0: the stem, k: the stem and layer1..layerk, `FC_STAGE`: fc too)
    makes those parts use their running BatchNorm statistics even when `train=True` and stops
    gradients at their output, as transfer learning with a frozen backbone wants.
    `scan` runs the repeated blocks of deep stages under `lax.scan` (`scan.py`): the same
    results from a graph that does not grow with depth, their variables stacked. `remat` keeps
    only each block's input for the backward pass and recomputes the rest there (`nn.remat`):
    the same gradients, a fraction of the memory, about a third more compute.
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
    planes: Sequence[int] = (64, 128, 256, 512)
    stem: str = "imagenet"
    shortcut: str = "B"
    residual: bool = True
    scan: bool = True
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """NHWC images -> logits (float32; float64 for float64 compute), or the last stage's
        feature map if `include_top=False`."""
        if self.zero_init_residual and not self.residual:
            raise ValueError(
                "zero_init_residual starts each block as its shortcut, and a plain network "
                "(residual=False) has none: it would zero every block's output; leave it False."
            )
        conv = partial(Conv, dtype=self.dtype)

        def norm(stage: int) -> ModuleDef:
            frozen = stage <= self.frozen_stages
            return partial(BatchNorm, use_running_average=frozen or not train, dtype=self.dtype)

        def end_of_stage(x: jax.Array, stage: int) -> jax.Array:
            return lax.stop_gradient(x) if train and stage == self.frozen_stages else x

        x = end_of_stage(self._stem(x, conv, norm(0)), 0)
        scanned = scanned_stages(self.layers, self.scan)
        self._check_layout(scanned)
        # XLA:CPU differentiates its own convolutions inside a loop through a path tens of
        # times slower than the same convolutions unrolled: there, scanned stages are unrolled.
        unroll = extension.convs_on_xla_cpu(self.dtype)
        block_type = nn.remat(self.block) if self.remat else self.block
        in_features = self.planes[0]
        for stage, (planes, depth) in enumerate(zip(self.planes, self.layers), start=1):
            strides = 1 if stage == 1 else 2
            out_features = planes * self.block.expansion
            block = partial(block_type, planes, conv=conv, norm=norm(stage), groups=self.groups,
                            width_per_group=self.width_per_group,
                            zero_init_residual=self.zero_init_residual)  # fmt: skip
            changes_shape = strides != 1 or in_features != out_features
            layer = Stage(
                block, depth, strides, shortcut=self._shortcut(changes_shape),
                repeated_shortcut=self._shortcut(False), stage=stage, scanned=stage in scanned,
                unroll=unroll, name=f"layer{stage}",
            )  # fmt: skip
            nn.share_scope(self, layer)  # its blocks are `layer1_0`, not `layer1/layer1_0`
            x = end_of_stage(layer(x), stage)
            in_features = out_features
        if not self.include_top:
            return x
        return self._head(jnp.mean(x, axis=(1, 2)), end_of_stage)

    def _check_layout(self, scanned: dict[int, int]) -> None:
        """A ValueError for variables with one entry per block (a file's layout) given to a
        model that scans the blocks, in place of Flax's missing-collection error."""
        for collection, tree in self.variables.items():
            for stage in scanned:
                if scan_name(stage) not in tree and f"layer{stage}_1" in tree:
                    raise ValueError(
                        f"This model runs layer{stage}'s repeated blocks scanned, with their "
                        f"variables stacked under {collection}/{scan_name(stage)}, but these "
                        f"have one entry per block (layer{stage}_1, ...): pass them through "
                        "resnet_jax.stack_blocks(variables, model), or build the model with "
                        "scan=False."
                    )

    def _stem(self, x: jax.Array, conv: ModuleDef, norm: ModuleDef) -> jax.Array:
        if self.stem == "cifar":
            return nn.relu(norm(name="bn1")(conv(self.planes[0], 3, padding=1, name="conv1")(x)))
        if self.stem != "imagenet":
            raise ValueError(f"stem must be one of {', '.join(STEMS)}, not {self.stem!r}.")
        x = conv(self.planes[0], 7, 2, padding=3, name="conv1")(x)
        return max_pool(nn.relu(norm(name="bn1")(x)), 3, 2, 1)

    def _shortcut(self, changes_shape: bool) -> str:
        """A block's `shortcut` (`blocks.SHORTCUTS`)."""
        if self.shortcut not in SHORTCUT_OPTIONS:
            options = ", ".join(SHORTCUT_OPTIONS)
            raise ValueError(f"shortcut must be one of {options}, not {self.shortcut!r}.")
        if not self.residual:
            return "none"
        return SHORTCUT_OPTIONS[self.shortcut] if changes_shape else "identity"

    def _head(self, x: jax.Array, end_of_stage: Callable) -> jax.Array:
        """Pooled features -> logits through `fc` (and an appended `head`)."""
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, not {self.head!r}.")

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
    """Global-average-pooled features of the last stage, the input of `fc`: (N, 512) for
    resnet18, (N, 2048) for resnet50, (N, 64) for the CIFAR ResNets."""
    trunk = model.clone(include_top=False)
    features = jnp.mean(trunk.apply(variables, x, train=False), axis=(1, 2))
    return features.astype(storage_dtype(model.dtype))
