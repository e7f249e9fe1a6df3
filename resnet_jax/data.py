"""Image datasets (ImageFolder or tfds) -> shuffled, sharded, prefetched uint8 batches.

The order of an epoch and every random crop depend only on (seed, epoch, example index), never on
the number of worker threads, so a run resumed at batch k sees exactly what it would have seen.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from resnet_jax.errors import UserError
from resnet_jax.files import atomic_write
from resnet_jax.transforms import BadImage, eval_transform_uint8, load_rgb, random_resized_crop_flip

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
_LAYOUT = "ROOT/train/<class>/*.jpg with ROOT/val/<class>/*.jpg, or ROOT/<class>/*.jpg"

# numpy seeds (a, b) and (a, b, 0) identically, so each random stream gets a non-zero tag
# before the example index.
_ORDER_STREAM, _AUGMENT_STREAM = 1, 2


class Source:
    """Random access to labelled images; subclasses read files or tfds records."""

    classes: list[str]

    def __len__(self) -> int:
        raise NotImplementedError

    def label(self, i: int) -> int:
        raise NotImplementedError

    def load(self, i: int) -> Image.Image:
        """The i-th image in RGB; raises BadImage for a corrupt or unreadable one."""
        raise NotImplementedError

    def name(self, i: int) -> str:
        """A file path or record id, for warnings."""
        raise NotImplementedError

    def example(self, i: int) -> tuple[Image.Image, int]:
        """(image, label) in one read; tfds records hold both, so they override this."""
        return self.load(i), self.label(i)


class ImageFolderSource(Source):
    """Image files with integer labels, as torchvision's ImageFolder makes them."""

    def __init__(self, samples: Sequence[tuple[str, int]], classes: list[str]) -> None:
        self.samples = list(samples)
        self.classes = classes

    def __len__(self) -> int:
        return len(self.samples)

    def label(self, i: int) -> int:
        return self.samples[i][1]

    def load(self, i: int) -> Image.Image:
        return load_rgb(self.samples[i][0])

    def name(self, i: int) -> str:
        return self.samples[i][0]


def _class_dirs(folder: Path) -> list[str]:
    """Sorted names of the class subfolders (hidden ones such as .ipynb_checkpoints ignored)."""
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _image_files(class_dir: Path) -> list[str]:
    """All images under `class_dir`, recursively and sorted, like torchvision's make_dataset."""
    found = []
    for root, dirs, files in os.walk(class_dir, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [
            os.path.join(root, f)
            for f in sorted(files)
            if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")
        ]
    return found


def _scan(folder: Path, classes: list[str]) -> list[list[str]]:
    """Image paths per class; UserError for a class folder without images."""
    per_class = []
    for name in classes:
        files = _image_files(folder / name)
        if not files:
            raise UserError(
                f"Class folder {folder / name} has no images "
                f"({', '.join(IMAGE_EXTENSIONS)}); add some or remove the folder."
            )
        per_class.append(files)
    return per_class


def _samples(per_class: list[list[str]]) -> list[tuple[str, int]]:
    return [(path, label) for label, files in enumerate(per_class) for path in files]


def val_count(n: int, val_fraction: float) -> int:
    """How many of a class's n examples go to val: int(n * val_fraction), as the seed's
    split_data.py takes them (tf_flowers: 364 of 3,670), but at least 1 and never all."""
    return min(max(int(n * val_fraction), 1), n - 1) if n > 1 else 0


def pick_val(keys: Sequence[str], val_fraction: float) -> set[str]:
    """The keys of one class that go to val: the first `val_count` ranked by their SHA-256.

    The choice does not depend on listing order, and adding a key moves at most one other.
    """
    ranked = sorted(keys, key=lambda k: hashlib.sha256(k.encode()).digest())
    return set(ranked[: val_count(len(keys), val_fraction)])


def split_by_fraction(
    files: list[str], val_fraction: float, class_dir: str | os.PathLike
) -> tuple[list[str], list[str]]:
    """Deterministic (train, val) split of the files of one class folder (see `pick_val`).

    Files are keyed by their path relative to `class_dir`, so the split is the same wherever
    the dataset lives.
    """
    keys = {f: Path(f).relative_to(class_dir).as_posix() for f in files}
    val = pick_val(list(keys.values()), val_fraction)
    return [f for f in files if keys[f] not in val], [f for f in files if keys[f] in val]


def open_image_folder(
    root: str | os.PathLike, val_fraction: float = 0.1
) -> tuple[ImageFolderSource, ImageFolderSource, list[str]]:
    """ROOT/train + ROOT/val, or ROOT/<class> split per class by `val_fraction`."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(
            f"Data folder {root} does not exist; pass --data-dir with an image folder "
            f"laid out as {_LAYOUT}."
        )
    train_dir, val_dir = root / "train", root / "val"
    if train_dir.is_dir() != val_dir.is_dir():
        have, missing = ("train", "val") if train_dir.is_dir() else ("val", "train")
        raise UserError(
            f"{root} has a {have}/ folder but no {missing}/ folder; add "
            f"{root / missing}/<class>/ images with the same class folders."
        )
    if train_dir.is_dir():
        classes, val_classes = _class_dirs(train_dir), _class_dirs(val_dir)
        if classes != val_classes:
            only_train = sorted(set(classes) - set(val_classes)) or "none"
            only_val = sorted(set(val_classes) - set(classes)) or "none"
            raise UserError(
                f"{train_dir} and {val_dir} have different class folders (only in "
                f"train: {only_train}; only in val: {only_val}); make them match."
            )
        if not classes:
            raise UserError(
                f"{train_dir} has no class folders; put images in "
                f"{train_dir}/<class>/ and {val_dir}/<class>/."
            )
        train = _samples(_scan(train_dir, classes))
        val = _samples(_scan(val_dir, classes))
    else:
        if not 0 < val_fraction < 1:
            raise UserError(
                f"val_fraction must be between 0 and 1 to split {root}, got {val_fraction}."
            )
        classes = _class_dirs(root)
        if not classes:
            raise UserError(f"{root} has no class folders with images; lay it out as {_LAYOUT}.")
        splits = [
            split_by_fraction(files, val_fraction, root / name)
            for name, files in zip(classes, _scan(root, classes))
        ]
        train, val = _samples([t for t, _ in splits]), _samples([v for _, v in splits])
        if not val:
            raise UserError(
                f"val_fraction={val_fraction} leaves no validation images in {root}; "
                f"raise it or add ROOT/train and ROOT/val folders."
            )
    return ImageFolderSource(train, classes), ImageFolderSource(val, classes), classes


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
        return open_image_folder(data_dir, val_fraction)
    from resnet_jax.tfds_source import open_tfds  # tfds is slow to import; load it only here

    return open_tfds(dataset, val_fraction=val_fraction, data_dir=tfds_dir, download=download)


def write_class_indices(path: str | os.PathLike, classes: Sequence[str]) -> None:
    """Write {"0": "daisy", ...} as indented JSON, atomically."""
    text = json.dumps({str(i): name for i, name in enumerate(classes)}, indent=4)
    with atomic_write(path, "w") as f:
        f.write(text)


def read_class_indices(path: str | os.PathLike) -> list[str]:
    """Class names in label order from a file written by `write_class_indices`."""
    try:
        table = json.loads(Path(path).read_text())
        classes = [table[str(i)] for i in range(len(table))]
    except FileNotFoundError:
        raise UserError(
            f"Class index file {path} does not exist; pass the one written next to the checkpoint."
        ) from None
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UserError(
            f'{path} is not a class index file like {{"0": "daisy", ...}}; '
            "pass the one written next to the checkpoint."
        ) from None
    if not all(isinstance(c, str) for c in classes):
        raise UserError(f"{path} has class names that are not strings; fix or rewrite the file.")
    return classes


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
    """Batches of uint8 NHWC images for one process, decoded by a thread pool."""

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
        self.source = source
        self.batch_size = batch_size  # global
        self.local_batch_size = batch_size // process_count
        self.train = train
        self.image_size = image_size
        self.seed = seed % 2**63  # numpy seeds must be non-negative
        self.workers = workers or default_workers()
        self.process_index = process_index
        self.prefetch = max(1, prefetch)
        self.skipped = 0

    def __len__(self) -> int:
        if self.train:
            return len(self.source) // self.batch_size
        return (len(self.source) + self.batch_size - 1) // self.batch_size

    def indices(self, epoch: int) -> np.ndarray:
        """Example index of every row of the epoch, all processes: (batches, global batch); -1 pads.

        Train: a permutation from (seed, epoch), the partial last batch dropped. Eval: in order,
        the last batch padded with -1.
        """
        n, size = len(self.source), len(self) * self.batch_size
        if self.train:
            order = np.random.default_rng((self.seed, epoch, _ORDER_STREAM)).permutation(n)[:size]
        else:
            order = np.concatenate([np.arange(n), np.full(size - n, -1)])
        return order.reshape(len(self), self.batch_size)

    def _fill(self, out: dict[str, np.ndarray], row: int, index: int, epoch: int) -> str | None:
        """Decode and transform example `index` into `out[...][row]`; the message if it is bad."""
        try:
            image, label = self.source.example(int(index))
            if self.train:
                rng = np.random.default_rng((self.seed, epoch, _AUGMENT_STREAM, int(index)))
                out["image"][row] = random_resized_crop_flip(image, self.image_size, rng)
            else:
                out["image"][row] = eval_transform_uint8(image, self.image_size)
        except BadImage as e:
            return str(e)
        out["label"][row], out["mask"][row] = label, True
        return None

    def _submit(
        self, pool: ThreadPoolExecutor, rows: np.ndarray, epoch: int
    ) -> tuple[dict[str, np.ndarray], list[Future]]:
        b, size = self.local_batch_size, self.image_size
        out = {
            "image": np.zeros((b, size, size, 3), np.uint8),
            "label": np.zeros(b, np.int32),
            "mask": np.zeros(b, bool),
        }
        futures = [pool.submit(self._fill, out, r, i, epoch) for r, i in enumerate(rows) if i >= 0]
        return out, futures

    def epoch(self, epoch: int, start: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Yield this process's batches `start`.. of epoch `epoch` (see `indices` for the order).

        Each batch is {"image": uint8 (b, H, W, 3), "label": int32 (b,), "mask": bool (b,)};
        padding rows and unreadable images are zeros with mask False.
        """
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        b, p = self.local_batch_size, self.process_index
        rows = self.indices(epoch)[start:, p * b : (p + 1) * b]
        self.skipped = 0
        is_finalizing = sys.is_finalizing  # a local survives interpreter teardown; `sys` not
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="resnet_jax-data")
        pending: list[tuple[dict[str, np.ndarray], list[Future]]] = []
        try:
            for k in range(len(rows)):
                # Keep `prefetch` batches queued behind the one being handed out.
                while len(pending) <= self.prefetch and k + len(pending) < len(rows):
                    pending.append(self._submit(pool, rows[k + len(pending)], epoch))
                out, futures = pending.pop(0)
                for future in futures:
                    if (message := future.result()) is not None:
                        self.skipped += 1
                        log.warning("Skipped an unreadable image: %s", message)
                yield out
        finally:
            # Runs when the epoch ends and when the consumer stops early (generator closed). A
            # generator still referenced at interpreter exit is closed after the modules are torn
            # down; concurrent.futures has stopped its threads by then, so there is nothing to do.
            if not is_finalizing():
                pool.shutdown(wait=True, cancel_futures=True)
        if self.skipped:
            log.warning(
                "%d unreadable image(s) skipped in epoch %d; see the warnings above.",
                self.skipped,
                epoch,
            )
