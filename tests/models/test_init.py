"""init_variables: the variables `model.init` makes, with the same initialisers, drawn on the host
without compiling the model; seeded and deterministic."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from resnet_jax import create_model, init_variables
from resnet_jax.models.blocks import BasicBlock
from resnet_jax.models.init import variable_shapes
from resnet_jax.models.layers import conv_std, linear_bound
from resnet_jax.models.resnet import ResNet


def flat(tree) -> dict:
    return flatten_dict(jax.device_get(tree), sep="/")


@pytest.fixture(scope="module")
def both():
    """A small CIFAR-stem ResNet (a stage of 3 blocks, zero-initialised residuals, option B, 7
    classes, an appended head) as `model.init` and as `init_variables` make it."""
    model = ResNet(
        BasicBlock, (1, 3), planes=(32, 64), stem="cifar", num_classes=7, zero_init_residual=True,
        head="append",
    )  # fmt: skip
    x = jnp.zeros((1, 32, 32, 3))
    return flat(jax.jit(model.init)(jax.random.key(0), x)), flat(init_variables(model))


def test_same_variables_shapes_and_dtypes(both):
    linen, ours = both
    assert {p: (v.shape, v.dtype) for p, v in ours.items()} == {
        p: (v.shape, v.dtype) for p, v in linen.items()
    }


def test_constants_are_the_modules(both):
    linen, ours = both
    constants = [p for p in linen if p.startswith("batch_stats") or "bn" in p.split("/")[-2]]
    assert len(constants) == 4 * 10  # scale, bias, mean and var of its 10 BatchNorms
    for path in constants:
        np.testing.assert_array_equal(ours[path], linen[path], err_msg=path)
    assert not np.any(ours["params/layer2_0/bn2/scale"])  # zero_init_residual
    assert np.all(ours["params/layer2_0/downsample/bn/scale"] == 1)


def test_random_ones_have_the_modules_distributions(both):
    linen, ours = both
    for path in ("params/layer2_0/conv2/kernel", "params/layer2_1/conv1/kernel"):
        for values in (ours[path], linen[path]):  # 36,864 values each
            assert values.std() == pytest.approx(conv_std(values.shape), rel=0.015)
            assert abs(values.mean()) < 0.03 * values.std()
    for path, fan_in in (("fc/kernel", 64), ("fc/bias", 64), ("head/kernel", 1000)):
        for values in (ours[f"params/{path}"], linen[f"params/{path}"]):
            bound = linear_bound(fan_in)
            assert bound >= np.abs(values).max() > 0.9 * bound
    assert np.abs(ours["params/head/bias"]).max() <= linear_bound(1000)
    assert not np.array_equal(
        ours["params/layer2_0/conv2/kernel"], ours["params/layer2_1/conv2/kernel"]
    )


def test_seeded_deterministic_and_float64_where_asked():
    model = create_model("resnet20")
    a, b = (
        flat(init_variables(model, jax.random.key(5))),
        flat(init_variables(model, jax.random.key(5))),
    )
    c = flat(init_variables(model, jax.random.key(6)))
    assert all(np.array_equal(a[p], b[p]) for p in a)
    assert not np.array_equal(a["params/conv1/kernel"], c["params/conv1/kernel"])
    with jax.enable_x64(True):
        wide = init_variables(create_model("resnet20", dtype=jnp.float64))
        assert jax.tree.map(np.shape, variable_shapes(create_model("resnet20"))) == jax.tree.map(
            np.shape, wide
        )
    assert {x.dtype for x in jax.tree.leaves(wide)} == {np.dtype("float64")}
