"""Resumable training checkpoints with orbax: OUTPUT_DIR/checkpoints/<epoch>/, latest and best kept.

Each checkpoint holds the train state (step, params, batch_stats, optimizer state, the EMA of
the weights when the run keeps one) and a JSON
`meta` record (epoch, run configuration, metrics history, best accuracy). Orbax writes a step
into a temporary folder and renames it when complete, so a `kill -9` during a write leaves only
a temporary folder that is ignored (and removed) the next time the folder is opened.
A write that fails (full disk) or a checkpoint that cannot be read (truncated files) ends in
one UserError naming the folder, the last good epoch and what to do.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from resnet_jax.runtime.errors import UserError
from resnet_jax.runtime.files import write_error
from resnet_jax.training.steps import TrainState

__all__ = ["Checkpoints"]


def _ranking(metrics: dict) -> tuple[float, int]:
    # Higher accuracy wins; on a tie the earlier epoch stays best, like best.msgpack.
    return metrics["val_accuracy"], -metrics["epoch"]


def _items(state: TrainState) -> dict[str, Any]:
    # The arrays of a TrainState; apply_fn and tx are code, rebuilt from the run's options.
    items = {
        "step": state.step,
        "params": state.params,
        "batch_stats": state.batch_stats,
        "opt_state": state.opt_state,
    }
    return items if state.ema is None else {**items, "ema": state.ema}


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
        self._writing_epoch: int | None = None  # the epoch of the latest save
        self._failure: UserError | None = None  # the write failure already reported
        _quiet_orbax_failures()

    def latest_epoch(self) -> int | None:
        """The epoch of the newest complete checkpoint, or None if there is none."""
        return self._manager.latest_step()

    def save(
        self, epoch: int, state: TrainState, meta: dict[str, Any], val_accuracy: float | None
    ) -> None:
        """Start writing `state` and `meta` as epoch `epoch` (asynchronously; see `wait`)."""
        items = _items(state)
        metrics = None if val_accuracy is None else {"val_accuracy": val_accuracy, "epoch": epoch}
        args = ocp.args.Composite(state=ocp.args.StandardSave(items), meta=ocp.args.JsonSave(meta))
        self.wait()  # a failed write of the previous epoch is reported as that epoch's
        self._writing_epoch = epoch
        with self._writing():
            self._manager.save(epoch, args=args, metrics=metrics)

    def meta(self, epoch: int | None = None) -> dict[str, Any]:
        """The JSON record saved with `epoch` (default: the latest), read without the arrays."""
        epoch = self.latest_epoch() if epoch is None else epoch
        args = ocp.args.Composite(meta=ocp.args.JsonRestore())
        return self._restore(epoch, args)["meta"]

    def restore(self, target: TrainState, epoch: int | None = None) -> TrainState:
        """The state saved with `epoch` (default: the latest), laid out like `target`.

        `target` may hold `jax.ShapeDtypeStruct`s with shardings (from `jax.eval_shape`).
        """
        epoch = self.latest_epoch() if epoch is None else epoch
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _items(target))
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        return target.replace(**self._restore(epoch, args)["state"])

    def _restore(self, epoch: int, args: ocp.args.Composite) -> Any:
        """orbax's restore; a damaged checkpoint (truncated or unreadable files) is a UserError."""
        try:
            return self._manager.restore(epoch, args=args)
        except Exception as e:  # damaged files raise JSONDecodeError, ValueError, OSError...
            raise self._damaged(epoch) from e

    def _complete_epochs(self) -> list[int]:
        # From the disk: after a failed write, orbax's own list can miss earlier epochs.
        return sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit())

    def _damaged(self, epoch: int) -> UserError:
        folder = self.directory / str(epoch)
        earlier = [e for e in self._complete_epochs() if e < epoch]
        advice = "start a new run with --overwrite"
        if earlier:
            advice = f"delete that folder to resume from epoch {max(earlier)}, or {advice}"
        return UserError(f"The checkpoint {folder} is damaged or unreadable; {advice}.")

    def wait(self) -> None:
        """Block until the checkpoint being written (if any) is complete on disk."""
        with self._writing():
            self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending writes and release orbax's resources."""
        if self._failure is not None:  # already reported; closing only releases resources
            with contextlib.suppress(Exception):
                self._manager.close()
            self._remove_partial(settle_s=0.5)
            return
        with self._writing():
            self._manager.close()

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Turn a failed (asynchronous) checkpoint write into one UserError, and delete what
        it left half-written."""
        try:
            yield
        except UserError:
            raise
        except Exception as e:  # orbax re-raises the writer's error: ValueError, OSError...
            self._remove_partial()
            self._failure = self._write_failed(self._writing_epoch, e)
            raise self._failure from e

    def _remove_partial(self, settle_s: float = 0.0) -> None:
        """Delete orbax's temporary folder of the epoch being written, again and again for
        `settle_s` seconds: tensorstore's writes still in flight when the first one failed
        recreate it for a moment (orbax does not wait for them)."""
        if self._writing_epoch is None:
            return
        deadline = time.monotonic() + settle_s
        while True:
            for partial in self.directory.glob(f"{self._writing_epoch}.orbax-checkpoint-tmp*"):
                shutil.rmtree(partial, ignore_errors=True)
            if time.monotonic() >= deadline:
                return
            time.sleep(0.05)

    def _write_failed(self, epoch: int | None, error: Exception) -> UserError:
        folder = self.directory if epoch is None else self.directory / str(epoch)
        # tensorstore reports the operating system's error as "[os_error_code='28']".
        code = re.search(r"os_error_code='(\d+)'", str(error))
        if code is not None:
            error = OSError(int(code.group(1)), os.strerror(int(code.group(1))))
        if isinstance(error, OSError):
            reason = str(write_error(folder, error)).removesuffix(".")
        else:
            detail = str(error).splitlines()[0][:200] if str(error) else ""
            reason = f"Cannot write {folder} ({type(error).__name__}: {detail})"
        good = [e for e in self._complete_epochs() if e != epoch]
        kept = (
            f"the last good checkpoint is epoch {max(good)} (--resume continues from it)"
            if good
            else "no checkpoint was kept"
        )
        return UserError(f"{reason}; training stopped, and {kept}.")


def _quiet_orbax_failures() -> None:
    """Keep the echoes of a failed checkpoint read or write off stderr; `Checkpoints` raises
    the failure itself as one UserError.

    - orbax logs the failure of a background write (through absl) up to five times.
    - orbax runs tensorstore's reads and writes in an asyncio loop that it closes as soon as
      one fails; the others still finish in tensorstore's threads, and each reports
      "RuntimeError: Event loop is closed" through `sys.unraisablehook` (dozens of tracebacks),
      or, failing too, is logged by asyncio as "Task exception was never retrieved" when the
      process exits.
    """
    for name in ("absl", "asyncio"):  # orbax logs through absl.logging
        logger = logging.getLogger(name)
        if not any(isinstance(f, _OrbaxErrorFilter) for f in logger.filters):
            logger.addFilter(_OrbaxErrorFilter())
    if not getattr(sys.unraisablehook, "drops_closed_loop_callbacks", False):
        sys.unraisablehook = _UnraisableFilter(sys.unraisablehook)


class _OrbaxErrorFilter(logging.Filter):
    """Drops orbax's ERROR records and asyncio's reports of orbax's failed tasks (see
    `_quiet_orbax_failures`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        if record.name == "asyncio":
            message = record.getMessage()
            return not ("never retrieved" in message and "orbax" in message)
        return "orbax" not in record.pathname


class _UnraisableFilter:
    """Drops "Event loop is closed" reports, passing every other one on (see
    `_quiet_orbax_failures`)."""

    drops_closed_loop_callbacks = True

    def __init__(self, previous: Callable[[Any], object]) -> None:
        self.previous = previous

    def __call__(self, unraisable: Any) -> None:
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            self.previous(unraisable)
