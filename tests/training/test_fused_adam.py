"""The fused Adam and AdamW against optax's: same state layout, same updates within the last
bits (XLA contracts some multiply-adds into FMAs, the extension does not), same path choice."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from resnet_jax.ops import extension
from resnet_jax.training import fused_adam
from resnet_jax.training.optim import make_optimizer, param_labels

needs_extension = pytest.mark.skipif(
    not extension.available(), reason="the CPU extension is not built"
)

SCHEDULE = lambda count: (1e-3 / (1.0 + count)).astype(jnp.float32)


def reference(name: str, lr, wd: float) -> optax.GradientTransformation:
    if name == "adam":
        return optax.chain(optax.add_decayed_weights(wd), optax.adam(lr))
    return optax.adamw(lr, weight_decay=wd)


def tree(rng: np.random.Generator, scale: float, dtype=jnp.float32) -> dict:
    """Parameters or gradients like a model's: a conv kernel, a BatchNorm pair, a long vector
    that spans several of the extension's chunks."""
    shapes = {"conv1": {"kernel": (3, 3, 4, 8)}, "bn1": {"scale": (8,), "bias": (8,)},
              "fc": {"kernel": (70_001,)}}  # fmt: skip
    return jax.tree.map(lambda s: jnp.asarray(scale * rng.normal(size=s), dtype), shapes,
                        is_leaf=lambda s: isinstance(s, tuple))  # fmt: skip


def run(tx, params, grads_per_step, fused_step: bool):
    """The parameters and state after the steps, each step jitted as a train step is."""

    @jax.jit
    def step(params, state, grads):
        if fused_step:
            return fused_adam.apply_update(tx, grads, state, params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for grads in grads_per_step:
        params, state = step(params, state, grads)
    return params, state


def assert_close(ours, theirs, rtol: float) -> None:
    """Equal tree layouts (checkpoints stay loadable) and leaves within `rtol` of each leaf's
    largest value: a last-bit difference before a cancellation can leave a small value with a
    larger relative error."""
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * float(np.max(np.abs(b))))


@needs_extension
@pytest.mark.parametrize("name", ["adam", "adamw"])
@pytest.mark.parametrize("wd", [0.0, 0.05])
@pytest.mark.parametrize("lr", [1e-3, SCHEDULE], ids=["constant", "schedule"])
@pytest.mark.parametrize("fused_step", [True, False], ids=["step", "update"])
def test_matches_optax_over_steps(name, wd, lr, fused_step):
    rng = np.random.default_rng(0)
    params = tree(rng, 1.0)
    # Gradients near 1e-7 make sqrt(nu) comparable to eps = 1e-8, so eps's place counts too.
    grads = [tree(rng, s) for s in (1e-7, 1.0, 3e-7, 10.0, 1e-6)]
    make = fused_adam.adam if name == "adam" else fused_adam.adamw
    ours = run(make(lr, wd), params, grads, fused_step)
    theirs = run(reference(name, lr, wd), params, grads, fused_step=False)
    assert_close(ours, theirs, rtol=1e-6)


@needs_extension
def test_the_update_is_one_extension_call_on_cpu_float32():
    params = tree(np.random.default_rng(0), 1.0)
    tx = fused_adam.adam(1e-3)
    text = jax.jit(lambda p, s: tx.step(p, s, p)).lower(params, tx.init(params)).as_text()
    assert text.count("resnet_jax_adam_update") == 1


def test_other_dtypes_and_the_xla_switch_run_optax_itself(monkeypatch):
    params = tree(np.random.default_rng(0), 1.0, jnp.bfloat16)
    tx = fused_adam.adam(1e-3)
    text = jax.jit(lambda p, s: tx.step(p, s, p)).lower(params, tx.init(params)).as_text()
    assert "resnet_jax_adam_update" not in text
    monkeypatch.setenv(extension.CONV_ENV, "xla")
    params = tree(np.random.default_rng(0), 1.0)
    text = jax.jit(lambda p, s: tx.step(p, s, p)).lower(params, tx.init(params)).as_text()
    assert "resnet_jax_adam_update" not in text


@needs_extension
def test_groups_and_frozen_stages_match_optax():
    """make_optimizer's multi_transform hands each group's part of the tree to its own Adam."""
    rng = np.random.default_rng(1)
    params = {"bn1": tree(rng, 1.0)["bn1"], "layer1": tree(rng, 1.0), "layer2": tree(rng, 1.0)}
    grads = [jax.tree.map(lambda p, s=s: p * s, params) for s in (0.1, -1.0, 2.0)]
    ours = make_optimizer("adam", 1e-2, 0.1, frozen_stages=1, norm_weight_decay=0.0)
    groups = {"trained": reference("adam", 1e-2, 0.1), "norm": reference("adam", 1e-2, 0.0),
              "frozen": optax.set_to_zero()}  # fmt: skip
    theirs = optax.multi_transform(
        groups, lambda p: param_labels(p, frozen_stages=1, split_norm=True)
    )
    ours_out = run(ours, params, grads, fused_step=True)
    theirs_out = run(theirs, params, grads, fused_step=False)
    assert_close(ours_out, theirs_out, rtol=1e-6)
    assert jnp.array_equal(ours_out[0]["bn1"]["scale"], params["bn1"]["scale"])  # frozen
