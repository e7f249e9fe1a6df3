"""The CPU-friendly convolution and pooling against XLA's own and torch's, gradients included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from resnet_jax.ops.xla import conv2d, grouped_conv, max_pool, patch_conv, pointwise_conv
from tests.helpers import nchw, relative_error


@pytest.mark.parametrize("shape", [(2, 9, 9, 3), (2, 8, 10, 3), (1, 2, 2, 4)])
def test_max_pool_matches_torch_including_ties(shape):
    rng = np.random.RandomState(0)
    x = np.maximum(rng.randn(*shape), 0).astype(np.float32)  # ReLU output: ties at 0
    x[0, :3, :3, 0] = 1.0  # and a window of equal maxima
    y, vjp = jax.vjp(max_pool, jnp.asarray(x))
    g = rng.randn(*y.shape).astype(np.float32)
    (dx,) = vjp(jnp.asarray(g))

    xt = nchw(x).requires_grad_()
    yt = torch.nn.functional.max_pool2d(xt, 3, 2, 1)
    yt.backward(nchw(g))
    assert np.array_equal(np.asarray(y), yt.detach().numpy().transpose(0, 2, 3, 1))
    # The gradient goes to torch's element (the first maximum), so only rounding differs.
    assert relative_error(dx, xt.grad.numpy().transpose(0, 2, 3, 1)) < 1e-6


@pytest.mark.parametrize(
    ("size", "k", "stride", "padding"), [(2, 3, 1, 1), (1, 3, 1, 1), (5, 7, 2, 3)]
)
def test_patch_conv_equals_xla_convolution(size, k, stride, padding):
    rng = np.random.RandomState(1)
    x = jnp.asarray(rng.randn(2, size, size + 1, 4), jnp.float32)
    w = jnp.asarray(rng.randn(k, k, 4, 5), jnp.float32)
    ours, ours_vjp = jax.vjp(lambda x, w: patch_conv(x, w, stride, padding), x, w)
    xla, xla_vjp = jax.vjp(lambda x, w: conv2d(x, w, stride, padding), x, w)
    assert relative_error(ours, xla) < 1e-6
    dy = jnp.asarray(rng.randn(*xla.shape), jnp.float32)
    for got, want in zip(ours_vjp(dy), xla_vjp(dy)):
        assert relative_error(got, want) < 1e-5


def test_pointwise_conv_and_its_gradients_equal_a_1x1_convolution():
    rng = np.random.RandomState(3)
    x = jnp.asarray(rng.randn(2, 5, 6, 8), jnp.float32)
    w = jnp.asarray(rng.randn(8, 12), jnp.float32)
    ours, ours_vjp = jax.vjp(pointwise_conv, x, w)
    xla, xla_vjp = jax.vjp(lambda x, w: conv2d(x, w[None, None], 1, 0), x, w)
    assert relative_error(ours, xla) < 1e-6
    dy = jnp.asarray(rng.randn(*xla.shape), jnp.float32)
    for got, want in zip(ours_vjp(dy), xla_vjp(dy)):
        assert got.shape == want.shape
        assert relative_error(got, want) < 1e-6


@pytest.mark.parametrize(
    ("groups", "stride", "channels"), [(4, 1, 8), (2, 2, 8), (32, 1, 512), (32, 2, 512)]
)
def test_grouped_conv_and_gradients_equal_xla(groups, stride, channels):
    # 8 channels take the dense block-diagonal path on CPU, 512 XLA's grouped convolution.
    rng = np.random.RandomState(2)
    x = jnp.asarray(rng.randn(2, 7, 7, channels), jnp.float32)
    w = jnp.asarray(rng.randn(3, 3, channels // groups, 64), jnp.float32)
    ours, ours_vjp = jax.vjp(lambda x, w: grouped_conv(x, w, stride, 1, groups), x, w)
    xla, xla_vjp = jax.vjp(lambda x, w: conv2d(x, w, stride, 1, groups), x, w)
    dy = jnp.asarray(rng.randn(*xla.shape), jnp.float32)
    assert relative_error(ours, xla) < 1e-6
    for got, want in zip(ours_vjp(dy), xla_vjp(dy)):
        assert relative_error(got, want) < 1e-6
