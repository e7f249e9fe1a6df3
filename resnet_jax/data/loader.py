"""Sources (image folders or tfds) -> shuffled, sharded, prefetched uint8 batches.

The order of an epoch and every random crop depend only on (seed, epoch, example index, copy),
never on the number of worker threads, so a run resumed at batch k sees exactly what it would
have seen.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from resnet_jax.data.sources import Source, open_image_folder
from resnet_jax.data.train_transform import TrainTransform
from resnet_jax.data.transforms import BadImage, eval_size, eval_transform_uint8
from resnet_jax.runtime.errors import UserError

__all__ = ["Loader", "default_workers", "open_datasets"]

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
    """One decoding thread per CPU core this process may use, at most 16."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    # A guess, not measured beyond 2 cores: the GIL-held Python glue around each image limits
    # what threads past 16 could add.
    return min(cores, 16)


class Loader:
    """Batches of uint8 NHWC images for one process, decoded by a thread pool.

    With `train=False` it makes the validation batches and `inference.Predictor`'s batches
    alike: `eval_transform_uint8(image, image_size, resize_size)`, normalised on the device by
    `steps.eval_logits`. With `train=True` each image goes through `transform` (default: the
    ImageNet RandomResizedCrop + flip), `repeats` times per epoch (see `indices`). `on_skip`
    gets each unreadable image (default: a logged warning).
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

    def _augment_rng(self, epoch: int, index: int, copy: int) -> np.random.Generator:
        """The Generator of one image's crop and augmentations; copy 0 keeps the original seeds."""
        key = (self.seed, epoch, _AUGMENT_STREAM, index) + ((copy,) if copy else ())
        return np.random.default_rng(key)

    def _fill(
        self, out: dict[str, np.ndarray], row: int, index: int, copy: int, epoch: int
    ) -> BadImage | None:
        """Decode and transform copy `copy` of example `index` into `out[...][row]`; the error if
        the image is bad."""
        try:
            image, label = self.source.example(int(index))
            if self.train:
                rng = self._augment_rng(epoch, int(index), int(copy))
                out["image"][row] = self.transform(image, self.image_size, rng)
            else:
                out["image"][row] = eval_transform_uint8(image, self.image_size, self.resize_size)
        except BadImage as e:
            return e
        out["label"][row], out["mask"][row] = label, True
        return None

    def _submit(
        self, pool: ThreadPoolExecutor, rows: np.ndarray, copies: np.ndarray, epoch: int
    ) -> tuple[dict[str, np.ndarray], list[Future]]:
        b, size = self.local_batch_size, self.image_size
        out = {
            "image": np.zeros((b, size, size, 3), np.uint8),
            "label": np.zeros(b, np.int32),
            "mask": np.zeros(b, bool),
        }
        futures = [
            pool.submit(self._fill, out, r, i, c, epoch)
            for r, (i, c) in enumerate(zip(rows, copies))
            if i >= 0
        ]
        return out, futures

    def epoch(self, epoch: int, start: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Yield this process's batches `start`.. of epoch `epoch` (see `indices` for the order).

        Each batch is {"image": uint8 (b, H, W, 3), "label": int32 (b,), "mask": bool (b,)};
        padding rows and unreadable images are zeros with mask False.
        """
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        b, p = self.local_batch_size, self.process_index
        rows, copies = (a[start:, p * b : (p + 1) * b] for a in self._rows(epoch))
        self.skipped = 0
        is_finalizing = sys.is_finalizing  # a local survives interpreter teardown; `sys` not
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="resnet_jax-data")
        pending: list[tuple[dict[str, np.ndarray], list[Future]]] = []
        try:
            for k in range(len(rows)):
                # Keep `prefetch` batches queued behind the one being handed out.
                while len(pending) <= self.prefetch and k + len(pending) < len(rows):
                    j = k + len(pending)
                    pending.append(self._submit(pool, rows[j], copies[j], epoch))
                out, futures = pending.pop(0)
                for future in futures:
                    if (error := future.result()) is not None:
                        self.skipped += 1
                        if self.on_skip is not None:
                            self.on_skip(error)
                        else:
                            log.warning("Skipped an unreadable image: %s", error)
                yield out
        finally:
            # Runs when the epoch ends and when the consumer stops early (generator closed). A
            # generator still referenced at interpreter exit is closed after the modules are torn
            # down; concurrent.futures has stopped its threads by then, so there is nothing to do.
            if not is_finalizing():
                pool.shutdown(wait=True, cancel_futures=True)
        if self.skipped and self.on_skip is None:
            log.warning(
                "%d unreadable image(s) skipped in epoch %d; see the warnings above.",
                self.skipped,
                epoch,
            )
