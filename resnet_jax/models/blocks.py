"""Residual blocks: the shortcut's projection, BasicBlock (ResNet-18/34) and Bottleneck
(ResNet-50 and deeper, ResNeXt, Wide ResNet), named as torchvision names their layers."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, ClassVar

import flax.linen as nn
import jax

__all__ = ["BLOCKS", "BasicBlock", "Bottleneck", "Downsample", "ModuleDef", "ResidualBlock"]

ModuleDef = Any  # a layer constructor: a partial of Conv or BatchNorm


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


class ResidualBlock(nn.Module):
    """What every residual block is given: its width, stride, shortcut and layer constructors.

    The block's output has `planes * expansion` channels.
    """

    expansion: ClassVar[int] = 1

    planes: int
    strides: int
    downsample: bool
    conv: ModuleDef
    norm: ModuleDef
    groups: int = 1
    width_per_group: int = 64
    zero_init_residual: bool = False

    @property
    def last_scale_init(self) -> Callable:
        """The init of the block's last BatchNorm scale: 0 with `zero_init_residual`."""
        return nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones


class BasicBlock(ResidualBlock):
    """Two 3x3 convs and a shortcut: the block of ResNet-18 and ResNet-34."""

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
        if self.downsample:
            x = Downsample(self.planes, self.strides, self.conv, self.norm, name="downsample")(x)
        return nn.relu(out + x)


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
        if self.downsample:
            features = self.planes * self.expansion
            x = Downsample(features, self.strides, self.conv, self.norm, name="downsample")(x)
        return nn.relu(out + x)


BLOCKS: dict[str, type[ResidualBlock]] = {"basic": BasicBlock, "bottleneck": Bottleneck}
