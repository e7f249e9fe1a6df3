"""Residual blocks: the shortcut's projection, BasicBlock (ResNet-18/34 and the CIFAR ResNets)
and Bottleneck (ResNet-50 and deeper, ResNeXt, Wide ResNet), named as torchvision names their
layers."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = [
    "BLOCKS", "SHORTCUTS", "BasicBlock", "Bottleneck", "Downsample", "ModuleDef", "ResidualBlock",
    "pad_shortcut",
]  # fmt: skip

ModuleDef = Any  # a layer constructor: a partial of Conv or BatchNorm

# What a block adds to its last BatchNorm's output before the final ReLU (`ResidualBlock.shortcut`).
SHORTCUTS = {
    "identity": "x itself",
    "projection": "a 1x1 conv + BatchNorm of x (`downsample`): the paper's option B",
    "pad": "x subsampled by the stride, zero channels added: the paper's option A, no parameters",
    "none": "nothing: a block of the paper's plain networks",
}


class Downsample(nn.Module):
    """The shortcut's 1x1 conv + BatchNorm (torchvision's `downsample.0` / `downsample.1`)."""

    features: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv(self.features, 1, self.strides, name="conv")(x)
        return self.norm(name="bn")(x)


def pad_shortcut(x: jax.Array, features: int, strides: int) -> jax.Array:
    """Option A: every `strides`-th pixel, the new channels zeros, half before the old ones and
    half after (where the public CIFAR checkpoints, Idelbayev's, put them)."""
    x = x[:, ::strides, ::strides, :]
    extra = features - x.shape[-1]
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))


class ResidualBlock(nn.Module):
    """What every residual block is given: its width, stride, shortcut (`SHORTCUTS`) and layer
    constructors. The block's output has `planes * expansion` channels."""

    expansion: ClassVar[int] = 1

    planes: int
    strides: int
    shortcut: str
    conv: ModuleDef
    norm: ModuleDef
    groups: int = 1
    width_per_group: int = 64
    zero_init_residual: bool = False

    @property
    def last_scale_init(self) -> Callable:
        """The init of the block's last BatchNorm scale: 0 with `zero_init_residual`."""
        return nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones

    def add_shortcut(self, out: jax.Array, x: jax.Array) -> jax.Array:
        """ReLU(out + the shortcut of the block's input x)."""
        features = self.planes * self.expansion
        if self.shortcut == "none":
            return nn.relu(out)
        if self.shortcut == "projection":
            x = Downsample(features, self.strides, self.conv, self.norm, name="downsample")(x)
        elif self.shortcut == "pad":
            x = pad_shortcut(x, features, self.strides)
        elif self.shortcut != "identity":
            raise ValueError(
                f"shortcut must be one of {', '.join(SHORTCUTS)}, not {self.shortcut!r}."
            )
        return nn.relu(out + x)


class BasicBlock(ResidualBlock):
    """Two 3x3 convs and a shortcut: the block of ResNet-18, ResNet-34 and the CIFAR ResNets."""

    expansion: ClassVar[int] = 1
    # XLA:CPU fuses back-to-back 3x3 convs on small maps into one slow subgraph; patch products
    # avoid it. Bottleneck's 3x3 convs sit between matmuls, where the rule would slow them.
    patch_pixels: ClassVar[int] = 1024

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.groups != 1 or self.width_per_group != 64:
            raise ValueError("BasicBlock supports only groups=1 and width_per_group=64.")
        conv = partial(self.conv, patch_pixels=self.patch_pixels)
        out = conv(self.planes, 3, self.strides, padding=1, name="conv1")(x)
        out = nn.relu(self.norm(name="bn1")(out))
        out = conv(self.planes, 3, padding=1, name="conv2")(out)
        out = self.norm(scale_init=self.last_scale_init, name="bn2")(out)
        return self.add_shortcut(out, x)


class Bottleneck(ResidualBlock):
    """1x1 reduce, 3x3 (strided, grouped for ResNeXt), 1x1 expand x4: ResNet-50 and deeper."""

    expansion: ClassVar[int] = 4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = int(self.planes * (self.width_per_group / 64.0)) * self.groups
        out = self.conv(width, 1, name="conv1")(x)
        out = nn.relu(self.norm(name="bn1")(out))
        out = self.conv(width, 3, self.strides, padding=1, groups=self.groups, name="conv2")(out)
        out = nn.relu(self.norm(name="bn2")(out))
        out = self.conv(self.planes * self.expansion, 1, name="conv3")(out)
        out = self.norm(scale_init=self.last_scale_init, name="bn3")(out)
        return self.add_shortcut(out, x)


BLOCKS: dict[str, type[ResidualBlock]] = {"basic": BasicBlock, "bottleneck": Bottleneck}
