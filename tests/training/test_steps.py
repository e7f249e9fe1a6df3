"""resnet_jax.training.steps: the loss against torch, the train and eval steps, masks, frozen
stages, gradient accumulation against a torch loop, the EMA and the mixing inside the step."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

from resnet_jax.models.blocks import BasicBlock
from resnet_jax.models.factory import create_model, init_variables
from resnet_jax.models.preprocess import eval_logits, normalize
from resnet_jax.models.resnet import ResNet
from resnet_jax.training import batch_augment as ba
from resnet_jax.training import ema, optim, steps
from resnet_jax.training.parallel import DataParallel
from resnet_jax.training.transfer import initial_variables
from resnet_jax.weights.torch_names import torch_to_flax
from tests.helpers import flat, nchw, numpy_state_dict, step_errors


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
    return initial_variables(create_model("resnet18", num_classes=3), "resnet18", "none", 0)[0]


def make_state(model, variables, optimizer="adam", lr=1e-3, weight_decay=0.0, frozen=-1):
    dp = DataParallel()
    tx = optim.make_optimizer(optimizer, lr, weight_decay, frozen)
    create = jax.jit(partial(steps.create_state, model.apply, tx), out_shardings=dp.replicated)
    return dp, create(dp.replicate(variables))


def test_cross_entropy_matches_torch_with_label_smoothing():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, 5)).astype(np.float32)
    labels = rng.integers(0, 5, 6)
    ours = steps.cross_entropy(logits, labels, 0.1)
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
        state, totals = step(state, batch, dp.replicate(steps.zero_totals()))
        losses.append(float(totals["loss"]) / float(totals["count"]))
    assert int(state.step) == 5
    assert losses[-1] < 0.5 * losses[0], losses


def test_masked_rows_count_for_nothing(variables):
    model = create_model("resnet18", num_classes=3)
    dp, state = make_state(model, variables)
    batch = random_batch(2, n=4)
    eval_step = dp.jit_eval_step()
    full = eval_step(state, dp.shard(batch), dp.replicate(steps.zero_totals()))
    garbage = {k: v.copy() for k, v in batch.items()}
    garbage["image"][2:] = 255 - garbage["image"][2:]
    garbage["label"][2:] = 0
    garbage["mask"][2:] = False
    half = eval_step(state, dp.shard(garbage), dp.replicate(steps.zero_totals()))
    firsts = {k: np.concatenate([v[:2], v[:2]]) for k, v in batch.items()}
    twice = eval_step(state, dp.shard(firsts), dp.replicate(steps.zero_totals()))
    assert float(full["count"]) == 4 and float(half["count"]) == 2
    # Eval mode: rows are independent, so the two real rows give exactly half of `twice`.
    assert float(half["loss"]) == pytest.approx(float(twice["loss"]) / 2, rel=1e-6)
    assert float(half["correct"]) == float(twice["correct"]) / 2


def test_frozen_stages_stay_bit_identical(variables):
    # --freeze layer3: the stem and layer1..layer3 frozen, layer4 and the head trained. (The
    # frozen-backbone case runs end to end in test_train_cli.py.)
    freeze, trained = "layer3", {"layer4_0", "layer4_1", "fc"}
    model = create_model("resnet18", num_classes=3, frozen_stages=optim.FREEZE[freeze])
    # AdamW with a large decay: frozen parameters must get neither updates nor decay.
    dp, state = make_state(
        model, variables, "adamw", lr=1e-2, weight_decay=0.5, frozen=optim.FREEZE[freeze]
    )
    before_p, before_s = flat(state.params), flat(state.batch_stats)
    step = dp.jit_train_step()
    for seed in range(2):
        state, _ = step(state, dp.shard(random_batch(seed)), dp.replicate(steps.zero_totals()))
    after_p, after_s = flat(state.params), flat(state.batch_stats)
    changed = {k.split("/")[0] for k in before_p if not np.array_equal(before_p[k], after_p[k])}
    changed_stats = {
        k.split("/")[0] for k in before_s if not np.array_equal(before_s[k], after_s[k])
    }
    assert changed == trained
    assert changed_stats == trained - {"fc"}


def test_eval_step_counts_the_confusion_matrix_of_the_real_rows(variables):
    model = create_model("resnet18", num_classes=3)
    dp, state = make_state(model, variables)
    eval_step = dp.jit_eval_step()
    totals = dp.replicate(steps.zero_totals(3))
    batches = [random_batch(seed, n=4) for seed in (3, 4)]
    batches[1]["mask"][1:] = False  # one real row, three of padding
    for batch in batches:
        totals = eval_step(state, dp.shard(batch), totals)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    expected = np.zeros((3, 3), int)
    for batch in batches:
        predicted = np.argmax(eval_logits(model.apply, variables, batch["image"]), -1)
        np.add.at(expected, (batch["label"][batch["mask"]], predicted[batch["mask"]]), 1)
    assert totals["confusion"].dtype == np.int32
    np.testing.assert_array_equal(totals["confusion"], expected)
    assert np.trace(expected) == float(totals["correct"]) and expected.sum() == 5


def tiny_resnet(frozen: int = -1, dtype=jnp.float32) -> ResNet:
    """One BasicBlock per stage: the smallest torchvision-shaped ResNet."""
    return ResNet(BasicBlock, (1, 1, 1, 1), num_classes=3, frozen_stages=frozen, dtype=dtype)


def sgd_state(model: ResNet, variables: dict) -> steps.TrainState:
    tx = optim.make_optimizer("sgd", 0.1, 1e-4)
    return steps.create_state(model.apply, tx, jax.tree.map(jnp.asarray, variables))


def test_soft_cross_entropy_matches_torch_with_probability_targets():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, 5)).astype(np.float32)
    targets = rng.dirichlet(np.ones(5), 6).astype(np.float32)
    ours = steps.soft_cross_entropy(logits, targets, 0.1)
    ref = torch.nn.functional.cross_entropy(
        torch.tensor(logits), torch.tensor(targets), label_smoothing=0.1, reduction="none"
    )
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-5)


@pytest.mark.slow
def test_accumulated_micro_batches_match_a_torch_accumulation_loop():
    """accumulate_steps=2 in float64 equals torch's loop: backward() on rows 0, 2 and on rows
    1, 3 (each loss divided by the whole batch's 4 rows), then one SGD step; BatchNorm uses each
    micro-batch's statistics and updates its running statistics twice."""
    torch.manual_seed(0)
    tmodel = torchvision.models.resnet.ResNet(
        torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=3
    ).double()
    variables = torch_to_flax(numpy_state_dict(tmodel))
    batch = random_batch(5, n=4, size=32)
    x = nchw(normalize(batch["image"])).double()
    opt = torch.optim.SGD(tmodel.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    tmodel.train()
    for j in range(2):
        rows = slice(j, None, 2)
        logits = tmodel(x[rows])
        loss = torch.nn.functional.cross_entropy(
            logits, torch.tensor(batch["label"][rows], dtype=torch.int64), reduction="sum"
        )
        (loss / 4).backward()
    opt.step()
    want = torch_to_flax(numpy_state_dict(tmodel))
    with jax.enable_x64(True):
        model = tiny_resnet(dtype=jnp.float64)
        state = sgd_state(model, jax.tree.map(lambda v: v.astype(np.float64), variables))
        options = steps.StepOptions(accumulate_steps=2)
        state, totals = jax.jit(steps.train_step, static_argnums=3)(
            state, batch, steps.zero_totals(), options
        )
        got = {"params": state.params, "batch_stats": state.batch_stats}
    worst = max(step_errors(got, want).items(), key=lambda kv: kv[1])
    assert worst[1] <= 1e-9, worst
    assert float(totals["count"]) == 4


def test_accumulation_equals_one_batch_where_batchnorm_uses_running_statistics():
    """With the backbone frozen (BatchNorm on running statistics) two micro-batches give the
    big batch's step. (Where BatchNorm trains they differ, as the float64 test above shows
    torch's loop does too.)"""
    batch = random_batch(6, n=4, size=16)
    model = tiny_resnet(frozen=4)
    variables = init_variables(model)
    results = []
    for k in (1, 2):
        options = steps.StepOptions(accumulate_steps=k)
        state, totals = jax.jit(steps.train_step, static_argnums=3)(
            sgd_state(model, variables), batch, steps.zero_totals(), options
        )
        results.append((flat(state.params), float(totals["loss"])))
    (one, loss_one), (two, loss_two) = results
    assert loss_two == pytest.approx(loss_one, rel=1e-5)
    for name, value in two.items():
        np.testing.assert_allclose(value, one[name], rtol=1e-5, atol=1e-7, err_msg=name)
    assert not np.array_equal(one["fc/kernel"], flat(variables["params"])["fc/kernel"])


def test_the_ema_follows_the_steps():
    model = tiny_resnet()
    state = steps.create_state(
        model.apply, optim.make_optimizer("sgd", 0.1, 0.0), init_variables(model), with_ema=True
    )
    options = steps.StepOptions(ema=ema.EmaSchedule(0.75, every=1))
    step = jax.jit(steps.train_step, static_argnums=3)
    trained = []
    for seed in (7, 8):
        state, _ = step(state, random_batch(seed, size=16), steps.zero_totals(), options)
        trained.append({"params": state.params, "batch_stats": state.batch_stats})
    # The first update copies the weights; the second moves a quarter of the way.
    want = jax.tree.map(lambda a, b: 0.75 * a + 0.25 * b, *trained)
    for name, value in flat(state.ema).items():
        np.testing.assert_allclose(value, flat(want)[name], rtol=1e-5, atol=1e-6, err_msg=name)
    evaluated = steps.ema_state(state)
    assert evaluated.params is state.ema["params"]


def test_mixing_draws_from_the_seed_and_the_step():
    """The step's loss is the mixed loss of `augment_batch` with the key (seed, step)."""
    model = tiny_resnet()
    variables = init_variables(model)
    batch = random_batch(9, size=16)
    spec = ba.BatchAugment(mixup_alpha=0.4, cutmix_alpha=1.0, erase_prob=0.5)
    options = steps.StepOptions(label_smoothing=0.1, augment=spec, seed=11)
    step = jax.jit(steps.train_step, static_argnums=3)
    _, totals = step(sgd_state(model, variables), batch, steps.zero_totals(), options)

    @jax.jit
    def mixed_loss(variables, batch):
        key = jax.random.fold_in(jax.random.key(11), 0)
        images = normalize(batch["image"])
        mixed = ba.augment_batch(key, images, batch["label"], batch["mask"], spec)
        logits, _ = model.apply(variables, mixed.images, train=True, mutable=["batch_stats"])
        return jnp.sum(steps.soft_cross_entropy(logits, ba.mixed_targets(mixed, 3), 0.1))

    assert float(totals["loss"]) == pytest.approx(float(mixed_loss(variables, batch)), rel=1e-5)
    later = sgd_state(model, variables).replace(step=1)  # step 1 draws another mix
    _, totals_1 = step(later, batch, steps.zero_totals(), options)
    assert float(totals_1["loss"]) != pytest.approx(float(totals["loss"]), rel=1e-5)


def test_top_k_hits_and_the_mean_of_two_softmaxes_match_torch():
    rng = np.random.default_rng(2)
    logits, mirrored = (3 * rng.normal(size=(6, 7)).astype(np.float32) for _ in range(2))
    labels = rng.integers(0, 7, 6).astype(np.int32)
    mask = np.array([True] * 5 + [False])
    top5 = torch.tensor(logits).topk(5).indices == torch.tensor(labels)[:, None]
    assert 0 < int(top5.any(1)[:5].sum()) < 5
    assert float(steps.top_k_correct(logits, labels, mask, 5)) == int(top5.any(1)[:5].sum())
    # Fewer classes than k: every real row is a hit.
    assert float(steps.top_k_correct(logits[:, :3], labels % 3, mask, 5)) == 5

    mean = (torch.softmax(torch.tensor(logits), 1) + torch.softmax(torch.tensor(mirrored), 1)) / 2
    log_mean = steps.mean_softmax_log(logits, mirrored)
    np.testing.assert_allclose(jax.nn.softmax(log_mean), mean.numpy(), rtol=1e-6)
    want = -np.log(mean.numpy()[np.arange(6), labels])
    np.testing.assert_allclose(steps.cross_entropy(log_mean, labels), want, rtol=1e-5)
    # Probabilities that underflow in one view stay finite: the loss has no 0 * -inf.
    extreme = np.array([[200.0, -200.0]], np.float32)
    log_mean = steps.mean_softmax_log(extreme, extreme[:, ::-1])
    np.testing.assert_allclose(np.exp(log_mean), [[0.5, 0.5]], rtol=1e-6)
    assert np.isfinite(steps.cross_entropy(log_mean, np.array([1]))).all()
