"""ResNet and ResNeXt as Flax Linen modules, numerically equal to torchvision's models.

Layout is torchvision's (ResNet v1.5: the stride of a bottleneck sits on its 3x3 conv), images
are NHWC, and parameter names follow torchvision (`layer1_0/conv1` is `layer1.0.conv1`) so
that converting weights is a plain name table (see `convert.py`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from resnet_jax.models.registry import ARCHITECTURES, get_architecture
from resnet_jax.ops import extension as kernels
from resnet_jax.ops.xla import conv2d, grouped_conv, max_pool, patch_conv, pointwise_conv

__all__ = [
    "APPENDED_FC_CLASSES",
    "ARCHS",
    "FC_STAGE",
    "HEADS",
    "BasicBlock",
    "BatchNorm",
    "Bottleneck",
    "Conv",
    "Downsample",
    "ResNet",
    "ResidualBlock",
    "create_model",
    "init_variables",
    "pooled_features",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
]

ModuleDef = Any
Dtype = Any

# How the classifier sits on the pooled features (`ResNet.head`), the two transfer modes.
HEADS = {
    "replace": "fc maps the pooled features to num_classes",
    "append": "the pretrained 1000-class fc stays whole; a new Dense `head` maps its logits to "
    "num_classes",
}
APPENDED_FC_CLASSES = 1000  # with head="append", fc is the ImageNet classifier
FC_STAGE = 5  # `frozen_stages=FC_STAGE` also freezes fc (only an appended head then trains)


def storage_dtype(dtype: Dtype) -> jnp.dtype:
    """Parameters, BatchNorm statistics and logits: float32 for float32 and bfloat16 compute,
    float64 for float64 compute (which needs `jax_enable_x64`)."""
    return jax.dtypes.canonicalize_dtype(jnp.promote_types(dtype, jnp.float32))


# torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu"), i.e. N(0, 2 / fan_out).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def torch_linear_init(fan_in: int) -> Callable:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): torch.nn.Linear's default for weight and bias."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(
        key, shape, dtype, -bound, bound
    )


class Conv(nn.Module):
    """Bias-free 2-D convolution with PyTorch's explicit, symmetric zero padding."""

    features: int
    kernel_size: int
    strides: int = 1
    padding: int = 0
    groups: int = 1
    dtype: Dtype = jnp.float32
    patch_pixels: int = 0  # on CPU, inputs of at most this many pixels (N*H*W): patch_conv

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, s, p = self.kernel_size, self.strides, self.padding
        shape = (k, k, x.shape[-1] // self.groups, self.features)
        kernel = self.param("kernel", conv_init, shape, storage_dtype(self.dtype))
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        if kernels.use_onednn(x.dtype):  # on CPU; elsewhere the fallback
            return kernels.conv(x, kernel, s, p, self.groups, fallback=self._xla_conv)
        return self._xla_conv(x, kernel)

    def _xla_conv(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        """XLA's own convolution, steered around XLA:CPU's slow paths (see ops.py)."""
        k, s, p = self.kernel_size, self.strides, self.padding
        if k == 1 and self.groups == 1:
            # A 1x1 convolution is a matrix product over channels. Written as one, XLA:CPU
            # computes its weight gradient as a plain matmul instead of a slow transposed
            # convolution (about 2x faster ResNet-50 training on CPU).
            return pointwise_conv(x[:, ::s, ::s, :], kernel[0, 0])
        if self.groups > 1:
            return grouped_conv(x, kernel, s, p, self.groups)
        if min(x.shape[1:3]) < k:
            # XLA:CPU runs a convolution whose input is smaller than its window (layer4 of
            # 32-64 px images) up to 80x slower than the same product over stacked patches.
            return patch_conv(x, kernel, s, p)
        if x.shape[0] * x.shape[1] * x.shape[2] <= self.patch_pixels:
            return lax.platform_dependent(
                x,
                kernel,
                cpu=lambda x, kernel: patch_conv(x, kernel, s, p),
                default=lambda x, kernel: conv2d(x, kernel, s, p),
            )
        return conv2d(x, kernel, s, p)


class BatchNorm(nn.Module):
    """BatchNorm2d with torch's semantics: eps 1e-5, momentum 0.1 in torch's convention, and
    the running variance updated with the unbiased batch variance (Flax's BatchNorm uses the
    biased one). Statistics and parameters are float32, or float64 for float64 compute
    (`storage_dtype`): float64 inputs get float64 statistics."""

    use_running_average: bool
    momentum: float = 0.1
    epsilon: float = 1e-5
    scale_init: Callable = nn.initializers.ones
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c, dtype = x.shape[-1], storage_dtype(self.dtype)
        scale = self.param("scale", self.scale_init, (c,), dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), dtype)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), dtype)
        running_var = self.variable("batch_stats", "var", jnp.ones, (c,), dtype)

        if self.use_running_average:
            return _normalize(x, running_mean.value, running_var.value, scale, bias, self.epsilon)
        if kernels.use_onednn(x.dtype) and scale.dtype == jnp.float32:
            fallback = partial(_batch_norm_xla, epsilon=self.epsilon)
            y, mean, var = kernels.batch_norm(x, scale, bias, self.epsilon, fallback)
        else:
            y, mean, var = _batch_norm_xla(x, scale, bias, self.epsilon)
        if not self.is_initializing():
            n, m = x.size // c, self.momentum
            running_mean.value = (1 - m) * running_mean.value + m * mean
            running_var.value = (1 - m) * running_var.value + m * var * (n / max(n - 1, 1))
        return y


def _normalize(x: jax.Array, mean, var, scale, bias, epsilon: float) -> jax.Array:
    """(x - mean) / sqrt(var + epsilon) * scale + bias, computed in x's dtype."""
    mul = scale * lax.rsqrt(var + epsilon)
    return x * mul.astype(x.dtype) + (bias - mean * mul).astype(x.dtype)


def _batch_norm_xla(x: jax.Array, scale, bias, epsilon: float):
    """Training-mode BatchNorm with XLA's own reductions: (y, batch mean, biased variance)."""
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    axes = tuple(range(x.ndim - 1))
    # One pass over x, shifted by one sample per channel: E[d^2] - E[d]^2 with d = x - x0.
    # Unshifted, float32 cancels when |mean| >> std (wrong variance, wrong gradients).
    shift = lax.stop_gradient(xf[(0,) * (x.ndim - 1)])
    d = xf - shift
    mean_d = jnp.mean(d, axes)
    mean = shift + mean_d
    var = jnp.maximum(jnp.mean(jnp.square(d), axes) - jnp.square(mean_d), 0.0)
    return _normalize(x, mean, var, scale, bias, epsilon), mean, var


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
    # XLA:CPU (YNNPACK) runs back-to-back 3x3 convs on small maps as one fused subgraph, much
    # slower than patch products: ResNet-34 batch-1 latency 60 -> 35 ms, train step 1.64 ->
    # 1.53 s at batch 16. Bottleneck's 3x3 convs sit between matmuls; this rule slows them.
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


def init_variables(model: ResNet, key: jax.Array | None = None, image_size: int = 32) -> dict:
    """Fresh {'params', 'batch_stats'} from one blank image (the shapes do not depend on its size)."""
    key = jax.random.key(0) if key is None else key
    return model.init(key, jnp.zeros((1, image_size, image_size, 3)), train=False)


BLOCKS: dict[str, type[ResidualBlock]] = {"basic": BasicBlock, "bottleneck": Bottleneck}


def create_model(arch: str, **kwargs: Any) -> ResNet:
    """The ResNet that `registry.ARCHITECTURES[arch]` describes (a UserError for unknown names).

    Takes `num_classes`, `include_top`, `dtype` and the other ResNet fields.
    """
    a = get_architecture(arch)
    return ResNet(
        BLOCKS[a.block], a.layers, groups=a.groups, width_per_group=a.width_per_group, **kwargs
    )


def _factory(arch: str) -> Callable[..., ResNet]:
    def factory(**kwargs: Any) -> ResNet:
        return create_model(arch, **kwargs)

    factory.__name__ = factory.__qualname__ = arch
    factory.__doc__ = f"{get_architecture(arch).title}; takes what `create_model` takes."
    return factory


# Name -> factory, one per registry entry (a name kept from before the registry existed).
ARCHS: dict[str, Callable[..., ResNet]] = {name: _factory(name) for name in ARCHITECTURES}

resnet18 = ARCHS["resnet18"]
resnet34 = ARCHS["resnet34"]
resnet50 = ARCHS["resnet50"]
resnet101 = ARCHS["resnet101"]
resnet152 = ARCHS["resnet152"]
resnext50_32x4d = ARCHS["resnext50_32x4d"]
resnext101_32x8d = ARCHS["resnext101_32x8d"]
resnext101_64x4d = ARCHS["resnext101_64x4d"]
wide_resnet50_2 = ARCHS["wide_resnet50_2"]
wide_resnet101_2 = ARCHS["wide_resnet101_2"]
