"""Scanned stages (`models/scan.py`): the same variables, outputs, statistics and gradients as
the unscanned model, whatever the options, in a graph that does not grow with depth."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax.inference.gradcam import gradcam
from resnet_jax.models import scan as scan_module
from resnet_jax.models.blocks import BasicBlock, Bottleneck
from resnet_jax.models.factory import create_model
from resnet_jax.models.init import init_variables, variable_shapes
from resnet_jax.models.registry import CIFAR_EVAL
from resnet_jax.models.resnet import FC_STAGE, ResNet
from resnet_jax.models.scan import scanned_stages, stack_blocks, unstack_blocks
from tests.helpers import relative_error

DEPTH = 3  # with SCAN_MIN_REPEATS 2 (below), the second stage of `tiny` is scanned


@pytest.fixture(autouse=True)
def shallow_scans(monkeypatch):
    """Scan from 2 repeated blocks, so that small graphs (quick to compile) hold a scan."""
    monkeypatch.setattr(scan_module, "SCAN_MIN_REPEATS", 2)


def tiny(scan: bool, **kwargs) -> ResNet:
    """Two narrow stages, the second scanned: a CIFAR stem, option A."""
    fields = {"planes": (4, 8), "stem": "cifar", "shortcut": "A", "num_classes": 3}
    return ResNet(BasicBlock, (2, DEPTH), scan=scan, **{**fields, **kwargs})


def images(seed: int = 0, size: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, size, size, 3)).astype(np.float32)


@partial(jax.jit, static_argnums=0)
def train_outputs(model: ResNet, variables: dict, x: jax.Array) -> dict:
    """Train-mode logits, updated statistics and gradients, and eval logits."""

    def loss(params):
        out, upd = model.apply(
            {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
        )
        return jnp.sum(out * jnp.arange(out.shape[-1])), (out, upd["batch_stats"])

    grads, (logits, stats) = jax.grad(loss, has_aux=True)(variables["params"])
    eval_logits = model.apply(variables, x)
    return {"eval": eval_logits, "train": logits, "batch_stats": stats, "grads": grads}


def canonical(outputs: dict) -> dict:
    """`train_outputs` with the scanned gradients and statistics unstacked."""
    return {**outputs, **unstack_blocks({k: outputs[k] for k in ("batch_stats", "grads")})}


def worst_error(got: dict, want: dict) -> float:
    errors = jax.tree.map(relative_error, canonical(got), canonical(want))
    return max(jax.tree.leaves(errors))


def test_scanned_variables_are_stacked_and_start_as_the_unscanned_ones():
    assert scanned_stages((1, 2, 3)) == {3: 2} and scanned_stages((1, 3), scan=False) == {}
    flat, scanned = init_variables(tiny(False)), init_variables(tiny(True))
    assert "layer2_scan" in scanned["params"] and "layer2_1" not in scanned["params"]
    kernel = scanned["params"]["layer2_scan"]["conv1"]["kernel"]
    assert kernel.shape == (DEPTH - 1, 3, 3, 8, 8)
    assert scanned["batch_stats"]["layer2_scan"]["bn2"]["var"].shape == (DEPTH - 1, 8)
    back = unstack_blocks(scanned)
    assert jax.tree.all(jax.tree.map(np.array_equal, back, flat))
    restacked = stack_blocks(flat, tiny(True))
    assert jax.tree.all(jax.tree.map(np.array_equal, restacked, scanned))
    shapes = variable_shapes(tiny(True))
    assert jax.tree.map(np.shape, shapes) == jax.tree.map(np.shape, scanned)


def test_a_files_layout_given_to_a_scanned_model_names_the_fix():
    variables = init_variables(tiny(scan=False), jax.random.key(0), image_size=16)
    with pytest.raises(ValueError, match=r"layer2_scan.*stack_blocks\(variables, model\)"):
        tiny(scan=True).apply(variables, images())
    scanned = stack_blocks(variables, tiny(scan=True))
    assert tiny(scan=True).apply(scanned, images()).shape == (2, 3)


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"frozen_stages": 2},  # the scanned stage frozen: running statistics, no gradients
        {"shortcut": "B", "zero_init_residual": True, "frozen_stages": 1},
        {"residual": False, "head": "append", "frozen_stages": FC_STAGE},
    ],
)
def test_scanned_train_step_equals_unscanned(fields):
    flat, scanned = tiny(False, **fields), tiny(True, **fields)
    variables = init_variables(flat, jax.random.key(1))
    x = images()
    want = train_outputs(flat, variables, x)
    got = train_outputs(scanned, stack_blocks(variables, scanned), x)
    assert worst_error(got, want) <= 1e-5
    frozen = fields.get("frozen_stages", -1) >= 2
    grads = got["grads"]["layer2_scan"]
    assert any(np.any(g != 0) for g in jax.tree.leaves(grads)) != frozen
    before = stack_blocks(variables, scanned)["batch_stats"]["layer2_scan"]
    same = jax.tree.all(jax.tree.map(np.array_equal, got["batch_stats"]["layer2_scan"], before))
    assert same == frozen


@pytest.mark.slow  # a float64 proof
def test_scanned_step_is_exact_in_float64():
    with jax.enable_x64(True):
        flat, scanned = tiny(False, dtype=jnp.float64), tiny(True, dtype=jnp.float64)
        variables = init_variables(flat, jax.random.key(2))
        x = images(1).astype(np.float64)
        want = train_outputs(flat, variables, x)
        got = train_outputs(scanned, stack_blocks(variables, scanned), x)
    assert worst_error(got, want) <= 1e-13


@pytest.mark.slow  # a float64 proof
def test_remat_keeps_outputs_gradients_and_statistics():
    """`remat=True` recomputes each block in the backward pass: float64 results equal, the
    variables the same."""
    with jax.enable_x64(True):
        plain = tiny(True, dtype=jnp.float64)
        variables = stack_blocks(init_variables(tiny(False), jax.random.key(3)), plain)
        x = images(2).astype(np.float64)
        want = train_outputs(plain, variables, x)
        got = train_outputs(plain.clone(remat=True), variables, x)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    assert worst_error(got, want) <= 1e-13


@pytest.mark.slow
def test_scanned_bottleneck_bfloat16_and_feature_map():
    fields = {"planes": (4, 4), "stem": "imagenet", "shortcut": "B"}
    flat = ResNet(Bottleneck, (1, DEPTH), scan=False, **fields)
    scanned = flat.clone(scan=True)
    variables = init_variables(flat)
    x = images(2, 32)
    for model_fields in ({"include_top": False}, {"dtype": jnp.bfloat16}):
        want = flat.clone(**model_fields).apply(variables, x)
        got = scanned.clone(**model_fields).apply(stack_blocks(variables, scanned), x)
        assert got.dtype == want.dtype == jnp.float32
        tolerance = 1e-6 if "include_top" in model_fields else 2e-2
        assert relative_error(got, want) <= tolerance


def test_gradcam_of_a_scanned_model_is_the_unscanned_ones():
    flat = create_model("resnet20", scan=False)
    scanned = create_model("resnet20")
    variables = init_variables(flat, jax.random.key(3))
    x = np.random.default_rng(3).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    want = jax.jit(partial(gradcam, flat, transform=CIFAR_EVAL))(variables, x)
    got = jax.jit(partial(gradcam, scanned, transform=CIFAR_EVAL))(
        stack_blocks(variables, scanned), x
    )
    assert got[1].shape == (2, 8, 8)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-5)


def test_the_scanned_graph_does_not_grow_with_depth():
    def equations(depth: int) -> int:
        model = tiny(True).clone(layers=(2, depth))
        variables = variable_shapes(model)
        jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x))(variables, jnp.zeros((1, 8, 8, 3)))
        return len(jaxpr.eqns)

    assert equations(DEPTH) == equations(4 * DEPTH)


def test_scanned_stages_run_unrolled_where_xla_cpu_differentiates_convolutions(monkeypatch):
    # XLA:CPU's own convolution gradients inside a loop are tens of times slower than unrolled.
    flat, scanned = tiny(False, num_classes=4), tiny(True, num_classes=4)
    variables = init_variables(flat, jax.random.key(4))
    x = images(4)

    def loops(model: ResNet, v: dict) -> int:
        return train_outputs.lower(model, v, x).as_text().count("stablehlo.while")

    stacked = stack_blocks(variables, scanned)
    assert loops(scanned, stacked) > 0 and loops(flat, variables) == 0
    monkeypatch.setenv("RESNET_JAX_CONV", "xla")
    flat, scanned = flat.clone(num_classes=5), scanned.clone(num_classes=5)  # fresh traces
    variables = init_variables(flat, jax.random.key(4))
    stacked = stack_blocks(variables, scanned)
    assert loops(scanned, stacked) == 0
    want = train_outputs(flat, variables, x)
    assert worst_error(train_outputs(scanned, stacked, x), want) <= 1e-5
