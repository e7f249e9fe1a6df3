"""A run's training and validation batches, sharded onto the mesh: from an image folder or tfds
(augmented per image as the recipe says; validation at --eval-resize / --eval-crop), or made on
the device with `--synthetic`."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Generator, Iterator

import jax

from resnet_jax.data.loader import Loader, open_datasets
from resnet_jax.data.synthetic import synthetic_batches
from resnet_jax.training.config import TrainConfig
from resnet_jax.training.parallel import DataParallel
from resnet_jax.training.run_setup import train_transform
from resnet_jax.training.steps import Batch
from resnet_jax.weights.metadata import ModelMetadata

__all__ = ["SYNTHETIC_CLASSES", "TrainValBatches"]

SYNTHETIC_CLASSES = 1000  # an ImageNet-sized head, so throughput matches the usual benchmarks


class TrainValBatches:
    """Training and validation batches, already on the devices, plus the class names."""

    def __init__(self, config: TrainConfig, dp: DataParallel) -> None:
        self.config, self.dp = config, dp
        if config.synthetic:
            self.classes, self.num_classes = None, SYNTHETIC_CLASSES
            self.steps, self.val_steps = config.synthetic, 0
            return
        train, val, self.classes = open_datasets(
            config.data_dir, config.dataset, val_fraction=config.val_fraction
        )
        self.num_classes = len(self.classes)
        common = {
            "batch_size": config.batch_size,
            "seed": config.seed,
            "workers": config.workers,
            "process_index": jax.process_index(),
            "process_count": jax.process_count(),
            "processes": not config.worker_threads,
        }
        self.train_loader = Loader(
            train, train=True, image_size=config.image_size, transform=train_transform(config),
            repeats=config.ra_reps, reduced_decode=not config.full_decode, **common,
        )  # fmt: skip
        self.val_loader = Loader(
            val, train=False, image_size=config.eval_crop, resize_size=config.eval_resize,
            **common,
        )  # fmt: skip
        self.steps, self.val_steps = len(self.train_loader), len(self.val_loader)

    def close(self) -> None:
        """End the loaders' worker processes."""
        if not self.config.synthetic:
            self.train_loader.close()
            self.val_loader.close()

    def metadata(self) -> ModelMetadata | None:
        """What best.msgpack records: the classes, and the eval transform of `val`."""
        if self.config.synthetic:
            return None
        c, loader = self.config, self.val_loader
        return ModelMetadata(
            c.arch, self.num_classes, tuple(self.classes), image_size=c.image_size,
            resize_size=loader.resize_size, crop_size=loader.image_size, head=c.head,
        )  # fmt: skip

    def train(self, epoch: int, steps: int | None = None) -> Iterator[Batch]:
        """The training batches of `epoch` (1-based), in the order its seed gives: all of them,
        or the first `steps` (`--max-steps` cuts the last epoch short)."""
        c, steps = self.config, self.steps if steps is None else steps
        if c.synthetic:
            key = jax.random.fold_in(jax.random.key(c.seed), epoch)
            return synthetic_batches(
                self.dp.batch, key, steps, c.batch_size, c.image_size, self.num_classes
            )
        return self.dp.prefetch(_first(self.train_loader.epoch(epoch), steps))

    def val(self, epoch: int) -> Iterator[Batch]:
        """The validation batches, rows beyond the data masked out."""
        return self.dp.prefetch(self.val_loader.epoch(epoch))


def _first(batches: Generator[Batch, None, None], n: int) -> Iterator[Batch]:
    """The first `n` of `batches`, then the generator is closed (its epoch's decoding stops)."""
    with contextlib.closing(batches):
        yield from itertools.islice(batches, n)
