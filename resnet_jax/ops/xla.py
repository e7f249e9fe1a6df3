"""Convolution and pooling written so that XLA:CPU runs them fast; same results as XLA's own.

Each works around a slow path of XLA:CPU found by profiling ResNet steps (benchmarks/speed.py):
grouped convolutions, 1x1 kernel gradients, convolutions of small inputs, and max-pooling's
generic gradient.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from resnet_jax.ops.platform import cpu_or_default

__all__ = [
    "block_diagonal", "conv", "conv2d", "grouped_conv", "max_pool", "patch_conv", "pointwise_conv",
]  # fmt: skip


def conv2d(
    x: jax.Array, kernel: jax.Array, stride: int, padding: int, groups: int = 1
) -> jax.Array:
    """NHWC x HWIO convolution with torch's symmetric zero padding: XLA's own."""
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
    )


# On CPU, grouped convolutions up to this many input channels run as dense ones with a
# block-diagonal kernel: XLA:CPU's grouped kernels are so slow that `groups` times the FLOPs
# at dense speed wins below it (benchmarks/RESULTS.md).
DENSE_GROUPED_MAX_CHANNELS = 256


def block_diagonal(kernel: jax.Array, groups: int) -> jax.Array:
    """The dense HWIO kernel equal to a grouped one: its blocks off the diagonal are zero."""
    k, _, per_group, out = kernel.shape
    blocks = kernel.reshape(k, k, per_group, groups, out // groups)
    eye = jnp.eye(groups, dtype=kernel.dtype)
    return jnp.einsum("hwcgo,ag->hwacgo", blocks, eye).reshape(k, k, groups * per_group, out)


def _grouped_on_cpu(x, kernel, groups, compute):
    """compute(x, kernel, groups), or on CPU and narrow inputs compute(x, dense kernel, 1)."""
    if x.shape[-1] > DENSE_GROUPED_MAX_CHANNELS:
        return compute(x, kernel, groups)
    return cpu_or_default(
        lambda x, kernel: compute(x, block_diagonal(kernel, groups), 1),
        lambda x, kernel: compute(x, kernel, groups),
        x,
        kernel,
    )


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def grouped_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int, groups: int):
    """A grouped convolution (ResNeXt) at a speed XLA:CPU can afford.

    On CPU the kernel gradient is the dense one (`groups` times the FLOPs) restricted to the
    diagonal blocks, XLA's grouped one being much slower; narrow layers also run forward and
    input gradient as dense convolutions (DENSE_GROUPED_MAX_CHANNELS). Elsewhere: XLA's own.
    """
    return _grouped_on_cpu(x, kernel, groups, lambda x, w, g: conv2d(x, w, stride, padding, g))


def _grouped_conv_fwd(x, kernel, stride, padding, groups):
    return grouped_conv(x, kernel, stride, padding, groups), (x, kernel)


def _grouped_conv_bwd(stride, padding, groups, residuals, dy):
    x, kernel = residuals

    def input_grad(x, w, g):
        return jax.vjp(lambda x: conv2d(x, w, stride, padding, g), x)[1](dy)[0]

    dx = _grouped_on_cpu(x, kernel, groups, input_grad)

    def from_dense(x, dy):
        k, _, per_group, out = kernel.shape
        dense = jnp.zeros((k, k, x.shape[-1], out), kernel.dtype)
        full = jax.vjp(lambda w: conv2d(x, w, stride, padding), dense)[1](dy)[0]
        full = full.reshape(k, k, groups, per_group, groups, out // groups)
        return jnp.einsum("hwgcgo->hwcgo", full).reshape(kernel.shape)

    def native(x, dy):
        return jax.vjp(lambda w: conv2d(x, w, stride, padding, groups), kernel)[1](dy)[0]

    return dx, cpu_or_default(from_dense, native, x, dy)


grouped_conv.defvjp(_grouped_conv_fwd, _grouped_conv_bwd)


@jax.custom_vjp
def pointwise_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """A 1x1 convolution, NHWC x (in, out), as one matrix product over channels.

    The kernel gradient is taken over flattened rows: from the 4-D contraction that autodiff
    writes, XLA:CPU first transposes the output gradient.
    """
    return jnp.dot(x, kernel)


def _pointwise_conv_fwd(x, kernel):
    return jnp.dot(x, kernel), (x, kernel)


def _pointwise_conv_bwd(residuals, dy):
    x, kernel = residuals
    x_rows, dy_rows = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    return jnp.dot(dy, kernel.T), jnp.dot(x_rows.T, dy_rows)


pointwise_conv.defvjp(_pointwise_conv_fwd, _pointwise_conv_bwd)


def _windows(x: jax.Array, k: int, stride: int, padding: int, fill: float = 0.0) -> list[jax.Array]:
    """The k*k strided views of x padded with `fill`, in row-major window order: view (i, j)
    holds, for each output position, the input under cell (i, j) of its window."""
    n, h, w, c = x.shape
    ho, wo = ((d + 2 * padding - k) // stride + 1 for d in (h, w))
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    xp = jnp.pad(x, pad, constant_values=fill)
    return [
        lax.slice(xp, (0, i, j, 0), (n, i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, c),
                  (1, stride, stride, 1))
        for i in range(k)
        for j in range(k)
    ]  # fmt: skip


def patch_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """A convolution as one matrix product: the k*k views side by side times the kernel
    reshaped to (k*k*in, out)."""
    k, c = kernel.shape[0], x.shape[-1]
    patches = jnp.concatenate(_windows(x, k, stride, padding), axis=-1)
    return pointwise_conv(patches, kernel.reshape(k * k * c, -1))


@partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool(x: jax.Array, window: int = 3, stride: int = 2, padding: int = 1) -> jax.Array:
    """torch's MaxPool2d(window, stride, padding) on NHWC: -inf padding, and the gradient goes
    to the first maximum of each window, as torch's does.

    The hand-written gradient replaces JAX's generic one (select_and_scatter plus variadic
    window reductions over index arrays), which took about a tenth of a ResNet-34 step on CPU.
    """
    views = _windows(x, window, stride, padding, -jnp.inf)
    out = views[0]
    for v in views[1:]:
        out = jnp.maximum(out, v)
    return out


def _max_pool_fwd(x, window, stride, padding):
    y = max_pool(x, window, stride, padding)
    return y, (x, y)


def _max_pool_bwd(window, stride, padding, residuals, g):
    x, y = residuals
    n, h, w, c = x.shape
    hp, wp = h + 2 * padding, w + 2 * padding
    taken = jnp.zeros(y.shape, bool)
    grad = jnp.zeros((n, hp, wp, c), g.dtype)
    for k, view in enumerate(_windows(x, window, stride, padding, -jnp.inf)):
        i, j = divmod(k, window)
        hit = (view == y) & ~taken
        taken = taken | hit
        # Spread this window position's share back onto the padded input grid.
        grad = grad + lax.pad(
            jnp.where(hit, g, 0).astype(g.dtype),
            jnp.zeros((), g.dtype),
            ((0, 0, 0),
             (i, hp - i - (stride * (y.shape[1] - 1) + 1), stride - 1),
             (j, wp - j - (stride * (y.shape[2] - 1) + 1), stride - 1),
             (0, 0, 0)),
        )  # fmt: skip
    return (grad[:, padding : padding + h, padding : padding + w, :],)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def conv(
    x: jax.Array, kernel: jax.Array, stride: int, padding: int, groups: int = 1,
    patch_pixels: int = 0,
) -> jax.Array:  # fmt: skip
    """A convolution by XLA, routed around XLA:CPU's slow paths: 1x1 as a matrix product,
    grouped as `grouped_conv`, inputs smaller than the window (or, on CPU, of at most
    `patch_pixels` pixels N*H*W) as products over stacked patches."""
    k = kernel.shape[0]
    if k == 1 and groups == 1:
        # Written as a matrix product, XLA:CPU computes the weight gradient as a plain matmul
        # instead of a slow transposed convolution.
        return pointwise_conv(x[:, ::stride, ::stride, :], kernel[0, 0])
    if groups > 1:
        return grouped_conv(x, kernel, stride, padding, groups)
    if min(x.shape[1:3]) < k:
        # XLA:CPU runs a convolution whose input is smaller than its window (layer4 of
        # 32-64 px images) far slower than the same product over stacked patches.
        return patch_conv(x, kernel, stride, padding)
    if x.shape[0] * x.shape[1] * x.shape[2] <= patch_pixels:
        return cpu_or_default(
            lambda x, kernel: patch_conv(x, kernel, stride, padding),
            lambda x, kernel: conv2d(x, kernel, stride, padding),
            x,
            kernel,
        )
    return conv2d(x, kernel, stride, padding)
