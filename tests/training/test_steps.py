"""resnet_jax.training.steps: the loss against torch, the train and eval steps, masks, frozen stages."""

from __future__ import annotations

from functools import partial

import jax
import numpy as np
import pytest
import torch

from resnet_jax.models.factory import create_model
from resnet_jax.models.preprocess import eval_logits
from resnet_jax.training import optim, steps
from resnet_jax.training.parallel import DataParallel
from resnet_jax.training.transfer import initial_variables
from tests.helpers import flat


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
