"""float64 end to end: one train step and an eval forward equal torchvision's in float64.

In float64 no ReLU input sits within rounding of zero, so these carry the exactness claim for
every hand-written gradient (float32 gradient checks cannot: see test_models.py).
x64 is switched on only inside each test (`jax.enable_x64`), so no other test sees it.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from resnet_jax import BatchNorm, create_model, resnet18
from resnet_jax.models.scan import stack_blocks, unstack_blocks
from resnet_jax.ops.xla import conv2d, grouped_conv, max_pool, patch_conv, pointwise_conv
from resnet_jax.weights.torch_names import torch_to_flax
from tests.helpers import (
    flax_step,
    numpy_state_dict,
    randomised_cifar_model,
    randomised_torch_model,
    relative_error,
    step_errors,
    torch_step,
)

pytestmark = pytest.mark.slow  # float64 train steps of three models against torch


def xla_max_pool(x: jax.Array) -> jax.Array:
    """MaxPool2d(3, 2, 1) with XLA's reduce_window and JAX's generic gradient."""
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    return lax.reduce_window(padded, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "VALID")


# name: (ours, XLA's own computation of the same, input shape, kernel shape). max_pool has no
# kernel; it gets a per-channel scale so that every case has the same two arguments.
OPS = {
    "pointwise_conv": (
        pointwise_conv, lambda x, w: conv2d(x, w[None, None], 1, 0), (2, 5, 5, 8), (8, 6)
    ),
    "patch_conv": (
        partial(patch_conv, stride=2, padding=1), partial(conv2d, stride=2, padding=1),
        (2, 5, 5, 4), (3, 3, 4, 6),
    ),
    "grouped_conv, dense on CPU": (
        lambda x, w: grouped_conv(x, w, 1, 1, 4), partial(conv2d, stride=1, padding=1, groups=4),
        (2, 5, 5, 8), (3, 3, 2, 8),
    ),
    "grouped_conv, grouped on CPU": (
        lambda x, w: grouped_conv(x, w, 1, 1, 32), partial(conv2d, stride=1, padding=1, groups=32),
        (1, 3, 3, 512), (3, 3, 16, 64),
    ),
    "max_pool": (
        lambda x, w: max_pool(x) * w, lambda x, w: xla_max_pool(x) * w, (2, 7, 7, 3), (3,)
    ),
}  # fmt: skip


@pytest.mark.parametrize("op", list(OPS))
def test_ops_and_their_gradients_stay_float64(op):
    ours, xla, x_shape, w_shape = OPS[op]
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    with jax.enable_x64(True):
        got, got_vjp = jax.vjp(ours, x, w)
        want, want_vjp = jax.vjp(xla, x, w)
        dy = rng.standard_normal(want.shape)
        pairs = [(got, want), *zip(got_vjp(dy), want_vjp(dy))]
    for got, want in pairs:
        assert got.dtype == jnp.float64
        assert relative_error(got, want) <= 1e-13


# At 64 px and batch 2 these three cover every hand-written gradient on every CPU path: max_pool;
# pointwise_conv (1x1 convs, downsample shortcuts); patch_conv under BasicBlock's patch_pixels
# rule (resnet18's layer1-4) and for maps smaller than the kernel (layer4's 2x2); grouped_conv
# as a dense block-diagonal convolution (resnext layer1-2, <= 256 channels) and with XLA's
# grouped forward and the dense kernel gradient (layer3-4).
@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext50_32x4d"])
def test_float64_train_step_matches_torch(name):
    tmodel = randomised_torch_model(name, num_classes=5).double()
    state = numpy_state_dict(tmodel)
    x = np.random.RandomState(0).randn(2, 64, 64, 3)
    labels = np.array([0, 3])
    want = torch_step(tmodel, x, labels)
    with jax.enable_x64(True):
        model = create_model(name, num_classes=5, dtype=jnp.float64)
        got = flax_step(model, torch_to_flax(state), x, labels)
        assert {leaf.dtype for leaf in jax.tree.leaves(got)} == {jnp.dtype("float64")}
    worst = max(step_errors(got, want).items(), key=lambda kv: kv[1])
    assert worst[1] <= 1e-9, worst


# The paper's CIFAR-10 networks against the torch reference of tests/helpers.py: option A (zero
# padding), option B (projection), a plain network, and resnet56, whose stages run scanned (its
# stacked gradients and statistics are unstacked to compare them by name).
@pytest.mark.parametrize(
    ("name", "shortcut"),
    [("resnet20", "A"), ("resnet20", "B"), ("plain20", "A"), ("resnet56", "A")],
)
def test_float64_cifar_train_step_matches_torch(name, shortcut):
    tmodel = randomised_cifar_model(name, shortcut=shortcut, num_classes=5).double()
    state = numpy_state_dict(tmodel)
    x = np.random.RandomState(0).randn(2, 32, 32, 3)
    labels = np.array([0, 3])
    want = torch_step(tmodel, x, labels)
    with jax.enable_x64(True):
        model = create_model(name, num_classes=5, shortcut=shortcut, dtype=jnp.float64)
        got = flax_step(model, stack_blocks(torch_to_flax(state), model), x, labels)
        assert {leaf.dtype for leaf in jax.tree.leaves(got)} == {jnp.dtype("float64")}
    assert ("layer2_scan" in got["grads"]) == (name == "resnet56")
    got |= unstack_blocks({"grads": got["grads"], "batch_stats": got["batch_stats"]})
    worst = max(step_errors(got, want).items(), key=lambda kv: kv[1])
    assert worst[1] <= 1e-9, worst


def test_float64_models_initialise_in_float64():
    with jax.enable_x64(True):
        model = resnet18(num_classes=3, dtype=jnp.float64)
        variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype("float64")}


def test_batch_norm_statistics_are_float64_for_float64_inputs():
    # float32 holds 1e4 + N(0, 1) to ~5e-4: statistics in float32 would be off by ~1e-4.
    x = 1e4 + np.random.default_rng(0).standard_normal((4, 3, 3, 8))
    with jax.enable_x64(True):
        bn = BatchNorm(use_running_average=False, dtype=jnp.float64)
        y, updates = bn.apply(bn.init(jax.random.key(0), x), x, mutable=["batch_stats"])
    assert y.dtype == jnp.float64
    rows = x.reshape(-1, 8)
    want = (rows - rows.mean(0)) / np.sqrt(rows.var(0) + 1e-5)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 8), want, rtol=0, atol=1e-10)
    running_var = 0.9 + 0.1 * rows.var(0, ddof=1)
    np.testing.assert_allclose(updates["batch_stats"]["var"], running_var, rtol=1e-12)
