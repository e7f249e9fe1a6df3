"""Sources (image folders or tfds) -> shuffled, sharded, prefetched uint8 batches.

The order of an epoch and every random crop depend only on (seed, epoch, example index, copy),
never on the number or kind of workers, so a run resumed at batch k sees exactly what it would
have seen.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Self

import numpy as np

from resnet_jax.data.sources import Source, open_image_folder
from resnet_jax.data.train_transform import TrainTransform
from resnet_jax.data.transforms import BadImage, eval_size, eval_transform_uint8
from resnet_jax.data.workers import ProcessWorkers, ThreadWorkers
from resnet_jax.runtime.errors import UserError

__all__ = ["Examples", "Loader", "default_workers", "open_datasets"]

log = logging.getLogger(__name__)

# numpy seeds (a, b) and (a, b, 0) identically, so each random stream gets a non-zero tag
# before the example index.
_ORDER_STREAM, _AUGMENT_STREAM = 1, 2


def open_datasets(
    data_dir: str | None = None,
    dataset: str = "tf_flowers",
    *,
    val_fraction: float = 0.1,
    tfds_dir: str | None = None,
    download: bool = True,
) -> tuple[Source, Source, list[str]]:
    """(train, val, classes) from an image folder when `data_dir` is given, else from tfds."""
    if data_dir is not None:
        train, val, classes = open_image_folder(data_dir, val_fraction)
    else:
        from resnet_jax.data.tfds import open_tfds  # tfds is slow to import: only when used

        train, val, classes = open_tfds(
            dataset, val_fraction=val_fraction, data_dir=tfds_dir, download=download
        )
    if len(classes) < 2:
        where = data_dir if data_dir is not None else f"tfds dataset '{dataset}'"
        raise UserError(
            f"{where} has only one class ({classes[0]}); a classifier needs at least two, "
            "so add another class folder."
        )
    return train, val, classes


def default_workers() -> int:
    """One decoding worker per CPU core this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


@dataclasses.dataclass(frozen=True)
class Examples:
    """How copy `copy` of example `index` in epoch `epoch` becomes (uint8 HWC image, label):
    what the workers run, picklable for worker processes."""

    source: Source
    train: bool
    image_size: int
    resize_size: int
    seed: int
    transform: TrainTransform
    reduced_decode: bool

    def get(self, index: int, copy: int, epoch: int) -> tuple[np.ndarray, int]:
        if not self.train:
            image, label = self.source.example(index)
            return eval_transform_uint8(image, self.image_size, self.resize_size), label
        image, label = self.source.example(index, lazy=self.reduced_decode)
        # Copy 0 keeps the seeds of a run without repeated augmentation.
        rng = np.random.default_rng(
            (self.seed, epoch, _AUGMENT_STREAM, index) + ((copy,) if copy else ())
        )
        return self.transform(image, self.image_size, rng, self.reduced_decode), label


class Loader:
    """Batches of uint8 NHWC images for one process, decoded by `workers` threads or processes.

    With `train=False` it makes the validation batches and `inference.Predictor`'s batches
    alike: `eval_transform_uint8(image, image_size, resize_size)`, normalised on the device by
    `steps.eval_logits`. With `train=True` each image goes through `transform` (default: the
    ImageNet RandomResizedCrop + flip), `repeats` times per epoch (see `indices`). `on_skip`
    gets each unreadable image (default: a logged warning).

    `processes`: decode in worker processes (`data.workers`), started at the first epoch and
    kept until `close()` (or `with Loader(...)`), instead of threads started for each epoch;
    POSIX systems only, threads elsewhere. `reduced_decode`: random resized training crops of
    JPEGs decoded at 1/2, 1/4 or 1/8 size where the crop allows
    (`transforms.reduced_resized_crop`); False decodes in full, bit-identical to torchvision.
    """

    def __init__(
        self,
        source: Source,
        batch_size: int,
        *,
        train: bool,
        image_size: int = 224,
        seed: int = 0,
        workers: int = 0,
        process_index: int = 0,
        process_count: int = 1,
        prefetch: int = 2,
        resize_size: int | None = None,
        on_skip: Callable[[BadImage], None] | None = None,
        transform: TrainTransform | None = None,
        repeats: int = 1,
        processes: bool = False,
        reduced_decode: bool = True,
    ) -> None:
        if batch_size < 1 or batch_size % process_count:
            raise UserError(
                f"Batch size {batch_size} must be a positive multiple of the "
                f"{process_count} processes; pick a batch size divisible by it."
            )
        if train and len(source) < batch_size:
            raise UserError(
                f"Batch size {batch_size} is larger than the {len(source)} training "
                "images, so an epoch would be empty; lower the batch size."
            )
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        if repeats < 1 or (repeats > 1 and not train):
            raise ValueError(f"repeats must be 1, or more for training, not {repeats}")
        self.source = source
        self.batch_size = batch_size  # global
        self.local_batch_size = batch_size // process_count
        self.train = train
        self.image_size = image_size
        self.seed = seed % 2**63  # numpy seeds must be non-negative
        self.workers = workers or default_workers()
        self.process_index = process_index
        self.process_count = process_count
        self.transform = TrainTransform() if transform is None else transform
        self.repeats = repeats
        self.prefetch = max(1, prefetch)
        self.skipped = 0
        # The eval resize before the centre crop (default: in ImageNet's 256/224 proportion).
        self.resize_size = eval_size(image_size) if resize_size is None else resize_size
        self.on_skip = on_skip
        self.processes = processes and os.name == "posix"  # workers inherit descriptors
        self.examples = Examples(
            source, train, image_size, self.resize_size, self.seed, self.transform,
            reduced_decode and train,
        )  # fmt: skip
        self._process_workers: ProcessWorkers | None = None
        self._epochs = 0  # epochs started: only the latest may run on the worker processes

    def close(self) -> None:
        """End the worker processes (a later epoch starts new ones); nothing to do for threads."""
        if self._process_workers is not None:
            self._process_workers.close()
            self._process_workers = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __len__(self) -> int:
        if self.train:
            return len(self.source) // self.batch_size
        return (len(self.source) + self.batch_size - 1) // self.batch_size

    def indices(self, epoch: int) -> np.ndarray:
        """Example index of every row of the epoch, all processes: (batches, global batch); -1 pads.

        Train: a permutation from (seed, epoch), the partial last batch dropped. Eval: in order,
        the last batch padded with -1. With `repeats` k > 1, repeated augmentation as
        torchvision's RASampler does it with one replica per process: each index of the
        permutation k times in a row, dealt out in turn to processes 0, 1, ... (so the copies
        of an image go to different processes when there are k or more), the epoch cut to its
        usual length.
        """
        return self._rows(epoch)[0]

    def _rows(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(example index, copy number) of every row of the epoch, both shaped as `indices`."""
        n, size, shape = len(self.source), len(self) * self.batch_size, (len(self), -1)
        if not self.train:
            order = np.concatenate([np.arange(n), np.full(size - n, -1)]).reshape(shape)
            return order, np.zeros_like(order)
        order = np.random.default_rng((self.seed, epoch, _ORDER_STREAM)).permutation(n)
        k = self.repeats
        index, copy = np.repeat(order, k)[:size], np.tile(np.arange(k), n)[:size]
        if k > 1:
            # Position q of each global batch goes to process q % P, as its row q // P.
            dealt = (len(self), self.local_batch_size, self.process_count)
            index = index.reshape(dealt).transpose(0, 2, 1)
            copy = copy.reshape(dealt).transpose(0, 2, 1)
        return index.reshape(shape), copy.reshape(shape)

    def _workers(self) -> ThreadWorkers | ProcessWorkers:
        """This epoch's threads, or the worker processes (started on first use)."""
        shape = (self.local_batch_size, self.image_size, self.image_size, 3)
        slots = self.prefetch + 1  # the batches in flight
        if not self.processes:
            return ThreadWorkers(self.examples, self.workers, slots, shape)
        if self._process_workers is None or self._process_workers.closed:
            self._process_workers = ProcessWorkers(self.examples, self.workers, slots, shape)
            weakref.finalize(self, self._process_workers.close)  # also runs at exit
        self._process_workers.end_epoch()  # the tasks of an earlier epoch left open, if any
        return self._process_workers

    def _submit(
        self,
        workers: ThreadWorkers | ProcessWorkers,
        slot: int,
        indices: np.ndarray,
        copies: np.ndarray,
        epoch: int,
    ) -> list[tuple[list[int], Any]]:
        """Hand the real rows of one batch to the workers in about one chunk per worker:
        [(rows, task)]."""
        rows = [r for r, i in enumerate(indices) if i >= 0]
        size = math.ceil(len(indices) / self.workers)
        chunks = [rows[k : k + size] for k in range(0, len(rows), size)]
        return [
            (c, workers.submit(slot, c, [(int(indices[r]), int(copies[r])) for r in c], epoch))
            for c in chunks
        ]

    def _collect(
        self, workers: ThreadWorkers | ProcessWorkers, slot: int, tasks: list[tuple[list[int], Any]]
    ) -> dict[str, np.ndarray]:
        """The finished batch in `slot`; padding rows and unreadable images are zeros, mask False."""
        b = self.local_batch_size
        batch = {"label": np.zeros(b, np.int32), "mask": np.zeros(b, bool)}
        for rows, task in tasks:
            for row, outcome in zip(rows, workers.result(task)):
                if isinstance(outcome, BadImage):
                    self._skip(outcome)
                else:
                    batch["label"][row], batch["mask"][row] = outcome, True
        batch["image"] = workers.take(slot)
        batch["image"][~batch["mask"]] = 0
        return batch

    def _skip(self, error: BadImage) -> None:
        self.skipped += 1
        if self.on_skip is not None:
            self.on_skip(error)
        else:
            log.warning("Skipped an unreadable image: %s", error)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Yield this process's batches `start`.. of epoch `epoch` (see `indices` for the order).

        Each batch is {"image": uint8 (b, H, W, 3), "label": int32 (b,), "mask": bool (b,)};
        padding rows and unreadable images are zeros with mask False. With worker processes,
        starting an epoch ends the loader's previous one.
        """
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        b, p = self.local_batch_size, self.process_index
        rows, copies = (a[start:, p * b : (p + 1) * b] for a in self._rows(epoch))
        self.skipped = 0
        self._epochs += 1
        this_epoch = self._epochs
        is_finalizing = sys.is_finalizing  # a local survives interpreter teardown; `sys` not
        workers = self._workers()
        shared = workers is self._process_workers  # kept across epochs, one epoch at a time
        pending: deque[tuple[int, list]] = deque()  # (slot, tasks) of the batches in flight
        try:
            for k in range(len(rows)):
                if shared and self._epochs != this_epoch:
                    raise RuntimeError("another epoch of this Loader started; run one at a time")
                # Keep `prefetch` batches in flight behind the one being handed out.
                while len(pending) <= self.prefetch and k + len(pending) < len(rows):
                    n = k + len(pending)
                    slot = n % (self.prefetch + 1)
                    pending.append((slot, self._submit(workers, slot, rows[n], copies[n], epoch)))
                slot, tasks = pending.popleft()
                yield self._collect(workers, slot, tasks)
        finally:
            # Runs when the epoch ends and when the consumer stops early (generator closed). A
            # generator still referenced at interpreter exit is closed after the modules are torn
            # down; the threads have stopped and the processes been closed by then.
            if not is_finalizing() and (not shared or self._epochs == this_epoch):
                workers.end_epoch()
        if self.skipped and self.on_skip is None:
            log.warning(
                "%d unreadable image(s) skipped in epoch %d; see the warnings above.",
                self.skipped,
                epoch,
            )
