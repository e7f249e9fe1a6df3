"""resnet_jax.training: optimizer vs torch.optim, loss, frozen stages, head swap, the steps."""

from __future__ import annotations

from functools import partial

import jax
import numpy as np
import optax
import pytest
import torch
from flax import traverse_util

from resnet_jax import training
from resnet_jax.errors import UserError
from resnet_jax.models import create_model
from resnet_jax.parallel import DataParallel
from resnet_jax.weights import save_variables


def random_batch(seed: int, n: int = 4, size: int = 32, classes: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
        "label": rng.integers(0, classes, n).astype(np.int32),
        "mask": np.ones(n, bool),
    }


@pytest.fixture(scope="module")
def variables():
    """Random resnet18 variables with a 3-class head (NumPy)."""
    return training.initial_variables(
        create_model("resnet18", num_classes=3), "resnet18", "none", 0
    )[0]


def make_state(model, variables, optimizer="adam", lr=1e-3, weight_decay=0.0, frozen=-1):
    dp = DataParallel()
    tx = training.make_optimizer(optimizer, lr, weight_decay, frozen)
    create = jax.jit(partial(training.create_state, model.apply, tx), out_shardings=dp.replicated)
    return dp, create(dp.replicate(variables))


def flat(tree) -> dict:
    return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


# ------------------------------------------------------------------------------ optimizers


@pytest.mark.parametrize(
    "name, torch_opt",
    [
        ("adam", lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.1)),
        ("adamw", lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1)),
        ("sgd", lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, weight_decay=0.1)),
    ],
)
def test_optimizers_match_torch(name, torch_opt):
    rng = np.random.default_rng(0)
    start = rng.normal(size=(5,)).astype(np.float32)
    grads = rng.normal(size=(4, 5)).astype(np.float32)
    tx = training.make_optimizer(name, 0.01, 0.1)
    params, opt_state = {"w": start}, tx.init({"w": start})
    weight = torch.nn.Parameter(torch.tensor(start))
    opt = torch_opt([weight])
    for g in grads:
        updates, opt_state = tx.update({"w": g}, opt_state, params)
        params = optax.apply_updates(params, updates)
        weight.grad = torch.tensor(g)
        opt.step()
    np.testing.assert_allclose(params["w"], weight.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_schedules():
    cosine = training.make_schedule(0.1, "cosine", warmup_steps=10, total_steps=110)
    assert float(cosine(0)) == 0.0
    assert float(cosine(10)) == pytest.approx(0.1)
    assert float(cosine(60)) == pytest.approx(0.05, rel=1e-4)
    assert float(cosine(110)) == pytest.approx(0.0, abs=1e-7)
    constant = training.make_schedule(0.1, "constant", warmup_steps=4, total_steps=100)
    assert [round(float(constant(s)), 6) for s in (0, 2, 4, 50)] == [0.0, 0.05, 0.1, 0.1]
    assert float(training.make_schedule(0.1, "constant", 0, 100)(0)) == pytest.approx(0.1)


def test_unknown_optimizer_and_schedule_are_user_errors():
    with pytest.raises(UserError, match="adam, adamw or sgd"):
        training.make_optimizer("lamb", 0.1, 0.0)
    with pytest.raises(UserError, match="constant or cosine"):
        training.make_schedule(0.1, "step", 0, 10)


def test_param_labels_follow_freeze():
    params = {
        name: {"kernel": 0} for name in ("conv1", "bn1", "layer1_0", "layer2_1", "layer4_1", "fc")
    }
    labels = training.param_labels(params, training.FREEZE["layer2"])
    frozen = {name for name, leaf in labels.items() if leaf["kernel"] == "frozen"}
    assert frozen == {"conv1", "bn1", "layer1_0", "layer2_1"}
    labels = training.param_labels(params, training.FREEZE["backbone"])
    assert {n for n, leaf in labels.items() if leaf["kernel"] == "trained"} == {"fc"}


# ------------------------------------------------------------------------------ loss and steps


def test_cross_entropy_matches_torch_with_label_smoothing():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, 5)).astype(np.float32)
    labels = rng.integers(0, 5, 6)
    ours = training.cross_entropy(logits, labels, 0.1)
    ref = torch.nn.functional.cross_entropy(
        torch.tensor(logits), torch.tensor(labels), label_smoothing=0.1, reduction="none"
    )
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-5)


def test_loss_goes_down_on_a_fixed_batch(variables):
    model = create_model("resnet18", num_classes=3)
    dp, state = make_state(model, variables, lr=1e-3)
    step = dp.jit_train_step()
    batch = dp.shard(random_batch(0))
    losses = []
    for _ in range(5):
        state, totals = step(state, batch, dp.replicate(training.zero_totals()))
        losses.append(float(totals["loss"]) / float(totals["count"]))
    assert int(state.step) == 5
    assert losses[-1] < 0.5 * losses[0], losses


def test_masked_rows_count_for_nothing(variables):
    model = create_model("resnet18", num_classes=3)
    dp, state = make_state(model, variables)
    batch = random_batch(2, n=4)
    eval_step = dp.jit_eval_step()
    full = eval_step(state, dp.shard(batch), dp.replicate(training.zero_totals()))
    garbage = {k: v.copy() for k, v in batch.items()}
    garbage["image"][2:] = 255 - garbage["image"][2:]
    garbage["label"][2:] = 0
    garbage["mask"][2:] = False
    half = eval_step(state, dp.shard(garbage), dp.replicate(training.zero_totals()))
    firsts = {k: np.concatenate([v[:2], v[:2]]) for k, v in batch.items()}
    twice = eval_step(state, dp.shard(firsts), dp.replicate(training.zero_totals()))
    assert float(full["count"]) == 4 and float(half["count"]) == 2
    # Eval mode: rows are independent, so the two real rows give exactly half of `twice`.
    assert float(half["loss"]) == pytest.approx(float(twice["loss"]) / 2, rel=1e-6)
    assert float(half["correct"]) == float(twice["correct"]) / 2


def test_frozen_stages_stay_bit_identical(variables):
    # --freeze layer3: the stem and layer1..layer3 frozen, layer4 and the head trained. (The
    # frozen-backbone case runs end to end in test_train_cli.py.)
    freeze, trained = "layer3", {"layer4_0", "layer4_1", "fc"}
    model = create_model("resnet18", num_classes=3, frozen_stages=training.FREEZE[freeze])
    # AdamW with a large decay: frozen parameters must get neither updates nor decay.
    dp, state = make_state(
        model, variables, "adamw", lr=1e-2, weight_decay=0.5, frozen=training.FREEZE[freeze]
    )
    before_p, before_s = flat(state.params), flat(state.batch_stats)
    step = dp.jit_train_step()
    for seed in range(2):
        state, _ = step(state, dp.shard(random_batch(seed)), dp.replicate(training.zero_totals()))
    after_p, after_s = flat(state.params), flat(state.batch_stats)
    changed = {k.split("/")[0] for k in before_p if not np.array_equal(before_p[k], after_p[k])}
    changed_stats = {
        k.split("/")[0] for k in before_s if not np.array_equal(before_s[k], after_s[k])
    }
    assert changed == trained
    assert changed_stats == trained - {"fc"}


# ------------------------------------------------------------------------------ pretrained weights


@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory):
    """resnet18 variables with a 1000-class head, saved as a .msgpack file."""
    variables, _ = training.initial_variables(create_model("resnet18"), "resnet18", "none", seed=7)
    path = tmp_path_factory.mktemp("weights") / "imagenet.msgpack"
    save_variables(path, variables)
    return variables, path


def test_head_swap_keeps_backbone_and_makes_new_head(imagenet_like, tmp_path):
    pretrained, path = imagenet_like
    model = create_model("resnet18", num_classes=3)
    loaded, message = training.initial_variables(model, "resnet18", str(path), seed=0)
    assert "1000-class head replaced by a new 3-class head" in message
    got, want = flat(loaded), flat(pretrained)
    assert got["params/fc/kernel"].shape == (512, 3)
    assert not np.array_equal(got["params/fc/kernel"], want["params/fc/kernel"][:, :3])
    for key, value in want.items():
        if not key.startswith("params/fc/"):
            np.testing.assert_array_equal(got[key], value)

    # A file whose head already has 3 outputs keeps it (fine-tuning our own checkpoint).
    save_variables(tmp_path / "mine.msgpack", loaded)
    again, message = training.initial_variables(
        model, "resnet18", str(tmp_path / "mine.msgpack"), 1
    )
    assert "replaced" not in message
    np.testing.assert_array_equal(again["params"]["fc"]["kernel"], got["params/fc/kernel"])


def test_weights_of_another_arch_are_a_user_error(imagenet_like):
    model = create_model("resnet34", num_classes=3)
    with pytest.raises(UserError, match="do not fit resnet34"):
        training.initial_variables(model, "resnet34", str(imagenet_like[1]), 0)
