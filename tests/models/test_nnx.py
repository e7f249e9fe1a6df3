"""resnet_jax.models.nnx: the NNX modules compute what the Linen ones do, train like them, round-trip."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from resnet_jax import load_variables, save_variables
from resnet_jax.models import nnx as rnnx
from resnet_jax.models.blocks import Bottleneck
from resnet_jax.models.factory import create_model, init_variables
from resnet_jax.models.preprocess import normalize
from resnet_jax.models.resnet import ResNet
from resnet_jax.runtime.errors import UserError
from resnet_jax.training import optim, steps
from resnet_jax.weights.torch_names import torch_to_flax
from tests.helpers import (
    flat,
    numpy_state_dict,
    randomised_cifar_model,
    randomised_torch_model,
    relative_error,
    step_errors,
)

# The one-block-per-stage grouped model of conftest (not in the registry: built from Linen).
RESNEXT14 = partial(ResNet, Bottleneck, (1, 1, 1, 1), groups=32, width_per_group=4)


@nnx.jit
def forward(model: rnnx.NnxResNet, x: jax.Array) -> jax.Array:
    return model(x)


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    """A randomised torchvision resnet18 with 5 classes, written as a .pth."""
    path = tmp_path_factory.mktemp("nnx") / "resnet18.pth"
    torch.save(randomised_torch_model("resnet18", num_classes=5).state_dict(), path)
    return path


def linen_and_nnx(name, resnet18_file):
    """The Linen model, its variables and the NNX model holding them, for one test model."""
    if name == "resnet18":  # through a written file and create_nnx_model, as a user would
        variables = load_variables(resnet18_file)
        model = rnnx.create_nnx_model("resnet18", num_classes=5, variables=variables)
        return model.linen, variables, model
    variables = torch_to_flax(numpy_state_dict(randomised_torch_model(name, num_classes=5)))
    linen = RESNEXT14(num_classes=5)
    return linen, variables, rnnx.NnxResNet(linen, variables)


@pytest.mark.parametrize("name", ["resnet18", "resnext14_32x4d"])
def test_eval_and_train_mode_equal_linen(name, resnet18_file):
    linen, variables, model = linen_and_nnx(name, resnet18_file)
    x = np.random.default_rng(0).standard_normal((4, 32, 32, 3)).astype(np.float32)
    assert not model.use_running_average  # train mode from the start, as in torch
    model.eval()
    want = jax.jit(partial(linen.apply, train=False))(variables, x)
    assert relative_error(forward(model, x), want) <= 1e-6

    model.train()
    apply = jax.jit(partial(linen.apply, train=True, mutable=["batch_stats"]))
    want, updates = apply(variables, x)
    assert relative_error(forward(model, x), want) <= 1e-6
    got = {"batch_stats": rnnx.to_linen_variables(model)["batch_stats"]}
    worst = max(step_errors(got, updates).items(), key=lambda kv: kv[1])
    assert worst[1] <= 1e-6, worst

    model.eval()  # back to the running statistics, now the updated ones
    want = jax.jit(partial(linen.apply, train=False))({**variables, **updates}, x)
    assert relative_error(forward(model, x), want) <= 1e-6


def nnx_and_linen_adam_steps(variables, dtype, batches, lr=1e-3):
    """Adam steps on resnet18 (3 classes) from `variables`: through nnx.Optimizer, and through
    the Linen train step of resnet_jax.training.steps. Returns both results as {'params', 'batch_stats',
    'losses'}."""
    tx = optim.make_optimizer("adam", lr, 0.0)
    model = rnnx.create_nnx_model("resnet18", num_classes=3, variables=variables, dtype=dtype)
    model.train()
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def nnx_step(model, optimizer, images, labels):
        def loss_fn(model):
            return jnp.mean(steps.cross_entropy(model(normalize(images)), labels))

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    state = steps.create_state(model.linen.apply, tx, jax.tree.map(jnp.asarray, variables))
    linen_step = jax.jit(steps.train_step)
    nnx_losses, linen_losses = [], []
    for batch in batches:
        nnx_losses.append(nnx_step(model, optimizer, batch["image"], batch["label"]))
        state, totals = linen_step(state, batch, steps.zero_totals())
        linen_losses.append(totals["loss"] / totals["count"])
    got = {**rnnx.to_linen_variables(model), "losses": jnp.stack(nnx_losses)}
    want = {"params": state.params, "batch_stats": state.batch_stats}
    return got, {**want, "losses": jnp.stack(linen_losses)}


def random_batches(count: int, n: int = 4, size: int = 32) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    return [
        {
            "image": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
            "label": rng.integers(0, 3, n).astype(np.int32),
            "mask": np.ones(n, bool),
        }
        for _ in range(count)
    ]


def resnet18_variables():
    return torch_to_flax(numpy_state_dict(randomised_torch_model("resnet18", num_classes=3)))


def test_adam_steps_equal_the_linen_train_step():
    # float32 only catches gross errors here: a flipped ReLU mask moves Adam's sign-like update
    # of a few weights by up to 2 lr, so parameters are compared by the share of weights that
    # differ; the float64 test below carries the exactness claim.
    variables = resnet18_variables()
    got, want = nnx_and_linen_adam_steps(variables, jnp.float32, random_batches(3))
    errors = step_errors({k: got[k] for k in ("batch_stats", "losses")}, want)
    worst = max(errors.items(), key=lambda kv: kv[1])
    assert worst[1] <= 1e-4, worst
    for (path, g), w in zip(
        jax.tree_util.tree_leaves_with_path(got["params"]), jax.tree.leaves(want["params"])
    ):
        g, w = np.asarray(g), np.asarray(w)
        differ = np.abs(g - w) > 1e-4 * np.abs(w).max()
        assert differ.mean() <= 0.01, (jax.tree_util.keystr(path), differ.mean())


@pytest.mark.slow
def test_adam_steps_equal_the_linen_train_step_in_float64():
    variables = resnet18_variables()
    with jax.enable_x64(True):
        variables = jax.tree.map(lambda v: v.astype(np.float64), variables)
        got, want = nnx_and_linen_adam_steps(variables, jnp.float64, random_batches(3))
        assert jax.tree.leaves(got["params"])[0].dtype == jnp.float64
    worst = max(step_errors(got, want).items(), key=lambda kv: kv[1])
    assert worst[1] <= 1e-9, worst


def test_frozen_stages_stay_bit_identical_under_nnx_optimizer(resnet18_file):
    """frozen_stages reaches the Linen model, and optim.make_optimizer's frozen labels work on
    the nnx.State that nnx.Optimizer hands to optax: AdamW's decay touches only layer4 and fc."""
    variables = load_variables(resnet18_file)
    model = rnnx.create_nnx_model("resnet18", num_classes=5, frozen_stages=3, variables=variables)
    model.train()
    tx = optim.make_optimizer("adamw", 1e-2, 0.5, frozen_stages=3)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, images, labels):
        def loss_fn(model):
            return jnp.mean(steps.cross_entropy(model(normalize(images)), labels))

        optimizer.update(model, nnx.grad(loss_fn)(model))

    batch = random_batches(1)[0]
    step(model, optimizer, batch["image"], batch["label"])
    after = rnnx.to_linen_variables(model)
    for collection, trained in (
        ("params", {"layer4_0", "layer4_1", "fc"}),
        ("batch_stats", {"layer4_0", "layer4_1"}),
    ):
        same = jax.tree.map(np.array_equal, after[collection], variables[collection])
        changed = {name for name, tree in same.items() if not all(jax.tree.leaves(tree))}
        assert changed == trained, collection


@pytest.mark.parametrize("suffix", [".msgpack", ".safetensors"])
def test_variables_round_trip_through_every_format(suffix, tmp_path, resnet18_file):
    variables = load_variables(resnet18_file)
    model = rnnx.create_nnx_model("resnet18", num_classes=5, variables=variables)
    save_variables(tmp_path / f"back{suffix}", rnnx.to_linen_variables(model))
    loaded = rnnx.to_linen_variables(
        rnnx.create_nnx_model(
            "resnet18", num_classes=5, variables=load_variables(tmp_path / f"back{suffix}")
        )
    )
    want, got = flat(variables), flat(loaded)
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_fresh_variables_are_the_linen_init_from_rngs():
    model = rnnx.create_nnx_model("resnet18", num_classes=3, rngs=nnx.Rngs(1))
    linen = create_model("resnet18", num_classes=3)
    want = flat(init_variables(linen, nnx.Rngs(1).params()))
    got = flat(rnnx.to_linen_variables(model))
    assert got.keys() == want.keys()
    assert all(np.array_equal(got[k], want[k]) for k in want)
    state = nnx.state(model)  # NNX variable types under the Linen names
    assert isinstance(state["layer1_0"]["conv1"]["kernel"], nnx.Param)
    assert isinstance(state["layer2_0"]["downsample"]["bn"]["var"], nnx.BatchStat)


def test_wrong_arch_or_variables_are_one_clear_sentence(resnet18_file):
    variables = load_variables(resnet18_file)  # resnet18, 5 classes
    extra_stat = {**variables, "batch_stats": {**variables["batch_stats"], "extra": 0.0}}
    fit = "These variables do not fit"
    redo = "; pass the arch, num_classes and head they were made with."
    cases = [  # arch, num_classes, variables: what the message says
        ("resnet19", 5, variables, ["Unknown architecture 'resnet19'; choose one of: resnet18,"]),
        ("resnet18", 5, {"params": {}}, ["variables= must be a dict with 'params' and"]),
        ("resnet34", 5, variables, [f"{fit} resnet34 (num_classes=5", "80 missing: ", redo]),
        ("resnet18", 1000, variables, ["2 wrong shape: ", "(512, 5) (expected (512, 1000))", redo]),
        ("resnet18", 5, extra_stat, ["1 unexpected: batch_stats/extra", redo]),
    ]
    for arch, num_classes, given, fragments in cases:
        with pytest.raises(UserError) as error:
            rnnx.create_nnx_model(arch, num_classes=num_classes, variables=given)
        text = str(error.value)
        assert all(f in text for f in fragments), text
        assert text.endswith(".") and ". " not in text and "\n" not in text, text


def test_a_scanned_cifar_resnet_from_torchvision_layout_variables(tmp_path):
    # resnet56's stages are scanned: its NNX variables are stacked, files keep one entry per block.
    tmodel = randomised_cifar_model("resnet56")
    variables = torch_to_flax(numpy_state_dict(tmodel))
    model = rnnx.create_nnx_model("resnet56", variables=variables)
    assert model.linen.num_classes == 10 and model.layer2_scan["conv1"]["kernel"].shape[0] == 8
    model.eval()
    x = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        want = tmodel.eval()(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    assert relative_error(forward(model, jnp.asarray(x)), want) <= 2e-6
    save_variables(tmp_path / "r56.msgpack", rnnx.to_linen_variables(model))
    assert "layer2_8" in load_variables(tmp_path / "r56.msgpack")["params"]
