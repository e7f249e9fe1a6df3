"""Resumable training checkpoints with orbax: OUTPUT_DIR/checkpoints/<epoch>/, latest and best kept.

Each checkpoint holds the train state (step, params, batch_stats, optimizer state) and a JSON
`meta` record (epoch, run configuration, metrics history, best accuracy). Orbax writes a step
into a temporary folder and renames it when complete, so a `kill -9` during a write leaves only
a temporary folder that is ignored (and removed) the next time the folder is opened.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from resnet_jax.steps import TrainState

__all__ = ["Checkpoints"]


def _ranking(metrics: dict) -> tuple[float, int]:
    # Higher accuracy wins; on a tie the earlier epoch stays best, like best.msgpack.
    return metrics["val_accuracy"], -metrics["epoch"]


def _items(state: TrainState) -> dict[str, Any]:
    # The arrays of a TrainState; apply_fn and tx are code, rebuilt from the run's options.
    return {
        "step": state.step,
        "params": state.params,
        "batch_stats": state.batch_stats,
        "opt_state": state.opt_state,
    }


class Checkpoints:
    """The checkpoint folder of one run: `save` after each epoch, `restore` the latest."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory).absolute()
        policy = ocp.checkpoint_managers.AnyPreservationPolicy(
            [
                ocp.checkpoint_managers.LatestN(1),
                ocp.checkpoint_managers.BestN(get_metric_fn=_ranking, reverse=False, n=1),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy, best_fn=_ranking, cleanup_tmp_directories=True, create=True
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )

    def latest_epoch(self) -> int | None:
        """The epoch of the newest complete checkpoint, or None if there is none."""
        return self._manager.latest_step()

    def all_epochs(self) -> list[int]:
        """Epochs of the complete checkpoints on disk."""
        return list(self._manager.all_steps())

    def save(
        self, epoch: int, state: TrainState, meta: dict[str, Any], val_accuracy: float | None
    ) -> None:
        """Start writing `state` and `meta` as epoch `epoch` (asynchronously; see `wait`)."""
        items = _items(state)
        metrics = None if val_accuracy is None else {"val_accuracy": val_accuracy, "epoch": epoch}
        self._manager.save(
            epoch,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(items), meta=ocp.args.JsonSave(meta)
            ),
            metrics=metrics,
        )

    def meta(self, epoch: int | None = None) -> dict[str, Any]:
        """The JSON record saved with `epoch` (default: the latest), read without the arrays."""
        epoch = self.latest_epoch() if epoch is None else epoch
        restored = self._manager.restore(
            epoch, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
        )
        return restored["meta"]

    def restore(self, target: TrainState, epoch: int | None = None) -> TrainState:
        """The state saved with `epoch` (default: the latest), laid out like `target`.

        `target` may hold `jax.ShapeDtypeStruct`s with shardings (from `jax.eval_shape`).
        """
        epoch = self.latest_epoch() if epoch is None else epoch
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _items(target))
        restored = self._manager.restore(
            epoch, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        )
        return target.replace(**restored["state"])

    def wait(self) -> None:
        """Block until the checkpoint being written (if any) is complete on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending writes and release orbax's resources."""
        self._manager.close()
