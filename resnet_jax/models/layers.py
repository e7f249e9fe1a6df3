"""The layers of every ResNet: a bias-free convolution and BatchNorm with torch's semantics,
and the initialisers torchvision uses."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from resnet_jax.ops import extension, xla

__all__ = [
    "BatchNorm", "Conv", "Dtype", "conv_init", "conv_std", "linear_bound", "storage_dtype",
    "torch_linear_init",
]  # fmt: skip

Dtype = Any


def storage_dtype(dtype: Dtype) -> jnp.dtype:
    """Parameters, BatchNorm statistics and logits: float32 for float32 and bfloat16 compute,
    float64 for float64 compute (which needs `jax_enable_x64`)."""
    return jax.dtypes.canonicalize_dtype(jnp.promote_types(dtype, jnp.float32))


def conv_std(shape: tuple[int, ...]) -> float:
    """The std of an HWIO conv kernel's initial values: torchvision's
    kaiming_normal_(mode="fan_out", nonlinearity="relu"), N(0, 2 / fan_out)."""
    kh, kw, _, out = shape
    return math.sqrt(2.0 / (kh * kw * out))


def conv_init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> jax.Array:
    """Initial conv kernel values, N(0, conv_std(shape)^2)."""
    return conv_std(shape) * jax.random.normal(key, shape, dtype)


def linear_bound(fan_in: int) -> float:
    """torch.nn.Linear's default init for weight and bias: U(-bound, bound), 1/sqrt(fan_in)."""
    return 1.0 / math.sqrt(fan_in)


def torch_linear_init(fan_in: int) -> Callable:
    """U(-linear_bound(fan_in), linear_bound(fan_in)), for a Dense kernel or bias."""
    bound = linear_bound(fan_in)
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
        xla_conv = partial(
            xla.conv, stride=s, padding=p, groups=self.groups, patch_pixels=self.patch_pixels
        )
        if extension.use_onednn(x.dtype):  # on CPU; elsewhere XLA's
            return extension.conv(x, kernel, s, p, self.groups, fallback=xla_conv)
        return xla_conv(x, kernel)


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
        if extension.use_onednn(x.dtype) and scale.dtype == jnp.float32:
            fallback = partial(_batch_norm_xla, epsilon=self.epsilon)
            y, mean, var = extension.batch_norm(x, scale, bias, self.epsilon, fallback)
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
