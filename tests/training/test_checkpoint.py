"""resnet_jax.training.checkpoint: exact round trip, latest + best kept, partial writes ignored."""

from __future__ import annotations

import errno
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from orbax.checkpoint._src.handlers.json_checkpoint_handler import JsonCheckpointHandler

from resnet_jax.runtime.errors import UserError
from resnet_jax.training.checkpoint import Checkpoints
from resnet_jax.training.optim import make_optimizer
from resnet_jax.training.steps import TrainState


def small_state(seed: int = 0, with_ema: bool = False) -> TrainState:
    """A TrainState shaped like a ResNet's: a frozen part under multi_transform, Adam moments,
    and with `with_ema` an average of the weights."""
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
    state = state.apply_gradients(grads=grads)
    average = {"params": jax.tree.map(lambda p: p / 2, params), "batch_stats": batch_stats}
    return state.replace(ema=average) if with_ema else state


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


def test_the_ema_round_trips(tmp_path):
    state = small_state(with_ema=True)
    ckpts = Checkpoints(tmp_path)
    ckpts.save(1, state, {}, val_accuracy=0.5)
    ckpts.close()
    restored = Checkpoints(tmp_path).restore(jax.eval_shape(lambda: small_state(1, True)))
    assert leaves_equal(restored.ema, state.ema) and leaves_equal(restored, state)


def epochs_on_disk(folder) -> list[int]:
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def test_keeps_the_latest_and_the_best_across_resumes(tmp_path):
    state = small_state()
    ckpts = Checkpoints(tmp_path)
    for epoch, accuracy in enumerate([0.5, 0.9, 0.7], start=1):
        ckpts.save(epoch, state, {"epoch": epoch}, val_accuracy=accuracy)
        ckpts.wait()
    assert epochs_on_disk(tmp_path) == [2, 3]
    ckpts.close()
    # A resumed run must still know that epoch 2 is the best, and drop the old latest.
    ckpts = Checkpoints(tmp_path)
    for epoch, accuracy in enumerate([0.9, 0.6], start=4):
        ckpts.save(epoch, state, {"epoch": epoch}, val_accuracy=accuracy)
        ckpts.wait()
    # Epoch 2 stays the best (the tie of epoch 4 does not replace it), epoch 5 is the latest.
    assert epochs_on_disk(tmp_path) == [2, 5]
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


def two_epochs(folder) -> None:
    """Epoch 1 (the best) and epoch 2 (the latest), both kept."""
    ckpts = Checkpoints(folder)
    for epoch, accuracy in ((1, 0.9), (2, 0.5)):
        ckpts.save(epoch, small_state(), {"epoch": epoch}, val_accuracy=accuracy)
    ckpts.close()


def truncate_meta(folder) -> None:
    (folder / "meta" / "metadata").write_text('{"epo')


def truncate_arrays(folder) -> None:
    for path in (folder / "state").rglob("d/*"):
        os.truncate(path, path.stat().st_size // 2)


@pytest.mark.parametrize("damage", [truncate_meta, truncate_arrays])
def test_a_damaged_checkpoint_names_its_folder_and_what_to_do(tmp_path, damage):
    two_epochs(tmp_path)
    damage(tmp_path / "2")
    ckpts = Checkpoints(tmp_path)
    with pytest.raises(UserError) as error:
        ckpts.meta()
        ckpts.restore(jax.eval_shape(small_state))
    ckpts.close()
    assert str(error.value) == (
        f"The checkpoint {tmp_path / '2'} is damaged or unreadable; delete that folder to resume "
        "from epoch 1, or start a new run with --overwrite."
    )


def test_a_failed_write_is_one_line_naming_the_last_good_checkpoint(tmp_path, monkeypatch):
    ckpts = Checkpoints(tmp_path)
    ckpts.save(1, small_state(), {"epoch": 1}, val_accuracy=0.5)

    async def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    ckpts.wait()
    monkeypatch.setattr(JsonCheckpointHandler, "_save_fn", disk_full)
    with pytest.raises(UserError) as error:
        ckpts.save(2, small_state(), {"epoch": 2}, val_accuracy=0.6)
        ckpts.wait()  # the write is asynchronous: its failure shows here at the latest
    ckpts.close()  # already reported: no second error
    assert str(error.value) == (
        f"Cannot write {tmp_path / '2'}: the disk is full; free some space and try again; "
        "training stopped, and the last good checkpoint is epoch 1 (--resume continues from it)."
    )
    # Nothing half-written is left, and a resumed run starts from epoch 1.
    reopened = Checkpoints(tmp_path)
    assert os.listdir(tmp_path) == ["1"] and reopened.latest_epoch() == 1
    reopened.close()
