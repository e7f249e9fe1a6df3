"""resnet_jax.checkpoint: exact round trip, latest + best kept, partial writes ignored."""

from __future__ import annotations

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax

from resnet_jax.checkpoint import Checkpoints
from resnet_jax.optim import make_optimizer
from resnet_jax.steps import TrainState


def small_state(seed: int = 0) -> TrainState:
    """A TrainState shaped like a ResNet's: a frozen part under multi_transform, Adam moments."""
    rng = np.random.default_rng(seed)
    params = {
        "conv1": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)},
        "fc": {"kernel": jnp.asarray(rng.normal(size=(4, 2)), jnp.float32),
               "bias": jnp.zeros(2, jnp.float32)},
    }  # fmt: skip
    batch_stats = {
        "bn1": {"mean": jnp.asarray(rng.normal(size=4), jnp.float32), "var": jnp.ones(4)}
    }
    tx = make_optimizer("adam", 0.1, 0.0, frozen_stages=0)
    state = TrainState.create(apply_fn=None, params=params, tx=tx, batch_stats=batch_stats)
    grads = jax.tree.map(jnp.ones_like, params)
    return state.apply_gradients(grads=grads)


def leaves_equal(a, b) -> bool:
    return all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def test_round_trip_is_exact(tmp_path):
    state = small_state()
    ckpts = Checkpoints(tmp_path / "checkpoints")
    assert ckpts.latest_epoch() is None
    meta = {"config": {"lr": 0.1}, "history": [{"epoch": 1, "train_loss": 0.25}]}
    ckpts.save(1, state, meta, val_accuracy=0.5)
    ckpts.close()

    target = jax.eval_shape(lambda: small_state(seed=1))
    reopened = Checkpoints(tmp_path / "checkpoints")
    assert reopened.meta() == meta
    restored = reopened.restore(target)
    assert int(restored.step) == 1
    assert leaves_equal(restored, state)
    assert isinstance(restored.opt_state, optax.transforms.PartitionState)


def test_keeps_the_latest_and_the_best_across_resumes(tmp_path):
    state = small_state()
    ckpts = Checkpoints(tmp_path)
    for epoch, accuracy in enumerate([0.5, 0.9, 0.7], start=1):
        ckpts.save(epoch, state, {"epoch": epoch}, val_accuracy=accuracy)
        ckpts.wait()
    assert ckpts.all_epochs() == [2, 3]
    ckpts.close()
    # A resumed run must still know that epoch 2 is the best, and drop the old latest.
    ckpts = Checkpoints(tmp_path)
    for epoch, accuracy in enumerate([0.9, 0.6], start=4):
        ckpts.save(epoch, state, {"epoch": epoch}, val_accuracy=accuracy)
        ckpts.wait()
    # Epoch 2 stays the best (the tie of epoch 4 does not replace it), epoch 5 is the latest.
    assert ckpts.all_epochs() == [2, 5]
    assert ckpts.latest_epoch() == 5
    ckpts.close()


def test_a_partial_write_is_ignored_and_replaced(tmp_path):
    state = small_state()
    ckpts = Checkpoints(tmp_path)
    ckpts.save(1, state, {"epoch": 1}, val_accuracy=0.5)
    ckpts.close()
    # What a kill -9 during the write of epoch 2 leaves behind: orbax's temporary folder.
    partial = tmp_path / "2.orbax-checkpoint-tmp"
    shutil.copytree(tmp_path / "1", partial)
    (partial / "state" / "commit_success.txt").unlink(missing_ok=True)
    shutil.rmtree(partial / "meta")

    reopened = Checkpoints(tmp_path)
    assert reopened.latest_epoch() == 1
    assert reopened.meta() == {"epoch": 1}
    assert leaves_equal(reopened.restore(jax.eval_shape(small_state)), state)
    # The resumed run writes epoch 2 again; the leftover is gone by then.
    reopened.save(2, state, {"epoch": 2}, val_accuracy=0.4)
    reopened.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]
