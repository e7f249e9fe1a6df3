"""The paper's CIFAR-10 networks (resnet20 ... resnet1202, plain20 ... plain110) against a torch
reference written from the paper: shortcuts, sizes, logits, factories."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict

import resnet_jax
from resnet_jax import create_model
from resnet_jax.models.blocks import BasicBlock, pad_shortcut
from resnet_jax.models.factory import init_variables
from resnet_jax.models.layers import BatchNorm, Conv
from resnet_jax.models.resnet import ResNet
from resnet_jax.models.scan import stack_blocks
from resnet_jax.weights.torch_names import torch_to_flax
from tests.helpers import nchw, numpy_state_dict, randomised_cifar_model, relative_error


def torch_logits(tmodel: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return tmodel.eval()(nchw(x)).numpy()


@pytest.mark.parametrize(
    ("name", "shortcut"), [("resnet20", "A"), ("resnet20", "B"), ("plain20", "A")]
)
def test_eval_logits_equal_torchs(name, shortcut):
    tmodel = randomised_cifar_model(name, shortcut=shortcut)
    x = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
    model = create_model(name, shortcut=shortcut)
    got = jax.jit(model.apply)(torch_to_flax(numpy_state_dict(tmodel)), x)
    assert relative_error(got, torch_logits(tmodel, x)) <= 2e-6


def test_resnet56_scanned_logits_equal_torchs():
    tmodel = randomised_cifar_model("resnet56", seed=1)
    x = np.random.default_rng(1).standard_normal((2, 32, 32, 3)).astype(np.float32)
    model = resnet_jax.resnet56()
    variables = stack_blocks(torch_to_flax(numpy_state_dict(tmodel)), model)
    assert variables["params"]["layer3_scan"]["conv1"]["kernel"].shape == (8, 3, 3, 64, 64)
    got = jax.jit(model.apply)(variables, x)
    assert relative_error(got, torch_logits(tmodel, x)) <= 2e-6


def test_option_a_subsamples_and_pads_zero_channels_on_both_sides():
    x = jnp.arange(2 * 4 * 4 * 2, dtype=jnp.float32).reshape(2, 4, 4, 2) + 1
    y = pad_shortcut(x, 6, 2)
    assert y.shape == (2, 2, 2, 6)
    np.testing.assert_array_equal(y[..., 2:4], x[:, ::2, ::2, :])
    assert not np.any(y[..., :2]) and not np.any(y[..., 4:])
    odd = pad_shortcut(jnp.ones((1, 5, 5, 16)), 32, 2)  # 5 -> 3, as a 3x3 conv of stride 2
    assert odd.shape == (1, 3, 3, 32) and float(odd[..., 8:24].min()) == 1.0


def test_option_a_has_no_shortcut_parameters_and_option_b_projects():
    a = flatten_dict(init_variables(create_model("resnet20"))["params"], sep="/")
    b = flatten_dict(init_variables(create_model("resnet20", shortcut="B"))["params"], sep="/")
    assert not any("downsample" in path for path in a)
    extra = {path: v.shape for path, v in b.items() if path not in a}
    assert extra == {
        "layer2_0/downsample/conv/kernel": (1, 1, 16, 32),
        "layer2_0/downsample/bn/scale": (32,),
        "layer2_0/downsample/bn/bias": (32,),
        "layer3_0/downsample/conv/kernel": (1, 1, 32, 64),
        "layer3_0/downsample/bn/scale": (64,),
        "layer3_0/downsample/bn/bias": (64,),
    }


def block_output(shortcut: str, x: jax.Array) -> jax.Array:
    """A BasicBlock whose residual branch is zeroed (bn2 scale and bias 0): what remains is the
    shortcut."""
    norm = lambda **kw: BatchNorm(use_running_average=True, **kw)
    block = BasicBlock(4, 1, shortcut, Conv, norm, zero_init_residual=True)
    return block.apply(block.init(jax.random.key(0), x), x)


def test_plain_blocks_add_no_shortcut():
    x = jnp.abs(jax.random.normal(jax.random.key(0), (2, 8, 8, 4))) + 0.1
    np.testing.assert_array_equal(block_output("identity", x), x)
    np.testing.assert_array_equal(block_output("none", x), jnp.zeros_like(x))
    with pytest.raises(ValueError, match="shortcut must be one of identity, projection"):
        block_output("C", x)


def test_zero_init_residual_is_refused_for_plain_networks():
    with pytest.raises(ValueError, match="plain network .* has none"):
        init_variables(resnet_jax.plain20(zero_init_residual=True))


def test_factories_build_the_registrys_networks():
    model = resnet_jax.resnet1202()
    assert isinstance(model, ResNet) and model.layers == (200, 200, 200)
    assert (model.num_classes, model.stem, model.shortcut, model.residual) == (
        10,
        "cifar",
        "A",
        True,
    )
    assert model.planes == (16, 32, 64) and model.block is BasicBlock
    assert not resnet_jax.plain110().residual
    assert resnet_jax.resnet20(num_classes=100, shortcut="B").num_classes == 100
    x = jnp.zeros((1, 32, 32, 3))
    feature_map = jax.eval_shape(resnet_jax.resnet20(include_top=False).init, jax.random.key(0), x)
    assert "fc" not in feature_map["params"]
    out = jax.eval_shape(resnet_jax.resnet20(include_top=False).apply, feature_map, x)
    assert out.shape == (1, 8, 8, 64)  # a stride-1 stem: 32 -> 32 -> 16 -> 8
