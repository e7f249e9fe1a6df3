"""The CPU extension (oneDNN convolutions, BatchNorm sums) against XLA and float64, and the path
switch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from resnet_jax import UserError
from resnet_jax.models.factory import create_model
from resnet_jax.models.layers import BatchNorm
from resnet_jax.ops import extension as kernels
from resnet_jax.ops.xla import conv2d
from tests.helpers import relative_error

needs_extension = pytest.mark.skipif(
    not kernels.available(), reason="the CPU extension is not built"
)

# (input NHWC, kernel size, output channels, stride, padding, groups)
CASES = {
    "dense": ((4, 9, 9, 8), 3, 16, 1, 1, 1),
    "odd batch": ((3, 9, 9, 8), 3, 16, 1, 1, 1),
    "strided": ((2, 9, 10, 8), 3, 16, 2, 1, 1),
    "no padding": ((1, 8, 7, 4), 3, 5, 1, 0, 1),
    "stem 7x7": ((2, 17, 17, 3), 7, 8, 2, 3, 1),
    "1x1": ((2, 6, 5, 16), 1, 24, 1, 0, 1),
    "1x1 strided": ((2, 7, 7, 16), 1, 24, 2, 0, 1),
    "grouped": ((6, 8, 8, 32), 3, 32, 1, 1, 8),
    "grouped strided": ((1, 9, 9, 64), 3, 64, 2, 1, 32),
    "smaller than window": ((2, 2, 2, 8), 3, 8, 1, 1, 1),
}


@needs_extension
@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_gradients_equal_xla(case):
    shape, k, out, stride, padding, groups = CASES[case]
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(*shape), jnp.float32)
    w = jnp.asarray(rng.randn(k, k, shape[-1] // groups, out), jnp.float32)

    def ours(x, w):
        return kernels.onednn_conv(x, w, stride, padding, groups)

    def xla(x, w):
        return conv2d(x, w, stride, padding, groups)

    y, ours_vjp = jax.vjp(jax.jit(ours), x, w)
    want, xla_vjp = jax.vjp(xla, x, w)
    assert y.shape == want.shape
    assert relative_error(y, want) < 1e-6
    dy = jnp.asarray(rng.randn(*want.shape), jnp.float32)
    for got, expected in zip(ours_vjp(dy), xla_vjp(dy)):
        assert got.shape == expected.shape
        assert relative_error(got, expected) < 1e-6


@needs_extension
def test_models_are_the_same_on_both_paths(monkeypatch):
    model = create_model("resnet18", num_classes=10)
    x = jnp.asarray(np.random.RandomState(1).randn(2, 32, 32, 3), jnp.float32)
    variables = model.init(jax.random.key(0), x, train=False)

    def loss_and_grads(path):
        monkeypatch.setenv(kernels.CONV_ENV, path)

        def loss(params):
            # Eval mode: train-mode BatchNorm over 2x1x1 maps would magnify rounding.
            return jnp.sum(model.apply({**variables, "params": params}, x, train=False) ** 2)

        return jax.jit(jax.value_and_grad(loss))(variables["params"])

    (l_xla, g_xla), (l_dnnl, g_dnnl) = loss_and_grads("xla"), loss_and_grads("onednn")
    assert relative_error(l_dnnl, l_xla) < 1e-5
    for got, want in zip(jax.tree.leaves(g_dnnl), jax.tree.leaves(g_xla)):
        assert relative_error(got, want) < 1e-4


def test_only_float32_goes_to_onednn(monkeypatch):
    monkeypatch.setenv(kernels.CONV_ENV, "xla")
    assert not kernels.use_onednn(jnp.float32)
    monkeypatch.delenv(kernels.CONV_ENV)
    assert kernels.use_onednn(jnp.float32) == kernels.available()
    assert not kernels.use_onednn(jnp.float64)
    assert not kernels.use_onednn(jnp.bfloat16)


def test_a_forced_path_that_cannot_run_is_one_clear_error(monkeypatch):
    monkeypatch.setenv(kernels.CONV_ENV, "cudnn")
    with pytest.raises(UserError, match="RESNET_JAX_CONV='cudnn' is not a convolution path"):
        kernels.conv_path()
    monkeypatch.setenv(kernels.CONV_ENV, "onednn")
    monkeypatch.setattr(kernels, "_load", lambda: "the CPU extension is not built")
    with pytest.raises(UserError, match="not built: reinstall"):
        kernels.conv_path()


# (shape, mean, spread) of BatchNorm inputs: channel counts off the vector width, a mean that
# dwarfs the spread (float32 E[x^2] - E[x]^2 would lose the variance), a wide layer4-like map.
BN_CASES = {
    "plain": ((4, 6, 5, 24), 0.5, 2.0),
    "odd channels": ((3, 5, 7, 13), -1.0, 0.5),
    "mean dwarfs spread": ((8, 4, 4, 16), 1000.0, 1.0),
    "wide": ((2, 3, 3, 2048), 0.0, 1.0),
}


def _float64_batch_norm(x, scale, bias):
    axes = tuple(range(x.ndim - 1))
    mean = x.mean(axes)
    var = jnp.square(x - mean).mean(axes)
    return (x - mean) * lax.rsqrt(var + 1e-5) * scale + bias, mean, var


@needs_extension
@pytest.mark.parametrize("case", list(BN_CASES))
def test_batch_norm_and_its_gradients_equal_float64(case):
    shape, loc, spread = BN_CASES[case]
    c = shape[-1]
    rng = np.random.default_rng(0)
    x = (loc + spread * rng.standard_normal(shape)).astype(np.float32)
    scale = rng.uniform(0.5, 1.5, c).astype(np.float32)
    bias = rng.standard_normal(c).astype(np.float32)
    # Cotangents for y and for the mean and variance outputs (the running statistics' inputs).
    cotangents = tuple(rng.standard_normal(s).astype(np.float32) for s in (shape, c, c))

    def ours(x, scale, bias):
        return kernels.batch_norm_train(x, scale, bias, 1e-5)

    got, vjp = jax.vjp(jax.jit(ours), x, scale, bias)
    got_grads = vjp(cotangents)
    with jax.enable_x64(True):
        wide = [np.asarray(a, np.float64) for a in (x, scale, bias)]
        want, ref_vjp = jax.vjp(_float64_batch_norm, *wide)
        want_grads = ref_vjp(tuple(np.asarray(a, np.float64) for a in cotangents))
        want, want_grads = jax.tree.map(np.asarray, (want, want_grads))
    # The sums are accumulated in double: mean and variance are float32-rounded float64.
    assert relative_error(got[1], want[1]) < 1e-6
    assert relative_error(got[2], want[2]) < 1e-6
    # y and the gradients go through x - mean in float32, which keeps |mean| / spread times
    # float32's rounding of x.
    tolerance = 1e-5 * (1 + abs(loc) / spread)
    assert relative_error(got[0], want[0]) < tolerance
    for name, g, w in zip(("x", "scale", "bias"), got_grads, want_grads):
        assert relative_error(g, w) < tolerance, name


@needs_extension
def test_batch_norm_layer_is_the_same_on_both_paths(monkeypatch):
    x = jnp.asarray(3.0 + np.random.RandomState(2).randn(4, 8, 8, 32), jnp.float32)
    bn = BatchNorm(use_running_average=False)
    variables = bn.init(jax.random.key(0), x)

    def run(path):
        monkeypatch.setenv(kernels.CONV_ENV, path)

        def loss(params, x):
            y, new = bn.apply({**variables, "params": params}, x, mutable=["batch_stats"])
            return jnp.sum(jnp.sin(y)), new

        return jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(variables["params"], x)

    (l_xla, s_xla), g_xla = run("xla")
    (l_ext, s_ext), g_ext = run("onednn")
    assert relative_error(l_ext, l_xla) < 1e-5
    for got, want in zip(jax.tree.leaves((s_ext, g_ext)), jax.tree.leaves((s_xla, g_xla))):
        assert relative_error(got, want) < 1e-5
